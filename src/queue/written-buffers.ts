/**
 * Migration: which guest pages a device wrote into a request's buffers, for the dirty log (memory/dirty-log.ts).
 *
 * A device writes the device-writable part of a chain and says how much in the used length (VIRTIO 1.2 §2.7.8.2:
 * "the number of bytes written into the device-writable portion of the buffer"). Devices write that part from its
 * start (net receive: header then frame; rng: random bytes), except for a status trailer that some write at its very
 * end (blk's status byte, counted in the used length). So the bytes written are: the first `len - trailer` bytes of
 * the writable part, and its last `trailer` bytes. libvhost-user logs only the prefix (`vu_log_queue_fill`), which
 * for a blk request that failed logs a data page the device did not write and misses the status byte's page.
 *
 * A request that completes while the chain object it was popped into still holds it (a synchronous device, a frame
 * in one receive chain) is logged from that chain (`logChainWritten`). One that completes after the object was
 * reused (async I/O, a frame over several receive chains) has its writable segments recorded per head (`record`)
 * and logged at completion (`logUsed`). Either way after the device's writes and before the used element is
 * published. Nothing is allocated per request once a head's arrays are as long as its longest chain.
 */
import type { DirtyLog } from '../memory/dirty-log.js';
import type { DescriptorChain } from './descriptor-chain.js';
import type { DeviceQueue } from './device-queue.js';

export class WrittenBuffers {
  readonly #addr: (Float64Array | undefined)[];
  readonly #len: (Uint32Array | undefined)[];
  readonly #count: Int32Array;

  /** For a queue of `size` heads (buffer ids). */
  constructor(size: number) {
    this.#addr = new Array<Float64Array | undefined>(size);
    this.#len = new Array<Uint32Array | undefined>(size);
    this.#count = new Int32Array(size);
  }

  /** Remembers the writable segments of `chain` under its head (replacing what that head had). */
  record(chain: DescriptorChain): void {
    const head = chain.head;
    const n = chain.count - chain.readableCount;
    let addr = this.#addr[head];
    let len = this.#len[head];
    if (addr === undefined || len === undefined || addr.length < n) {
      addr = this.#addr[head] = new Float64Array(Math.max(n, 4));
      len = this.#len[head] = new Uint32Array(addr.length);
    }
    for (let i = 0; i < n; i++) {
      addr[i] = chain.addr[chain.readableCount + i] as number;
      len[i] = chain.len[chain.readableCount + i] as number;
    }
    this.#count[head] = n;
  }

  /**
   * Logs what the device wrote into the buffers of `head` (recorded) for a used length of `used` bytes, `trailer` of
   * them at the writable part's end. A used length past the writable part logs the writable part (never more).
   */
  logUsed(log: DirtyLog, head: number, used: number, trailer = 0): void {
    const addr = this.#addr[head];
    const len = this.#len[head];
    if (addr === undefined || len === undefined) return;
    logWritten(log, addr, len, 0, this.#count[head] ?? 0, used, trailer);
  }
}

/**
 * Logs what a used length of `used` bytes, `trailer` of them at the end, says was written into segments [from, to)
 * of a chain's writable part (`addr` / `len` parallel arrays): the first `used - trailer` bytes and the last
 * `trailer`, never past the segments.
 */
function logWritten(log: DirtyLog, addr: ArrayLike<number>, len: ArrayLike<number>, from: number, to: number, used: number, trailer: number): void {
  const tail = Math.min(trailer, Math.max(used, 0));
  let left = used - tail;
  for (let i = from; i < to && left > 0; i++) {
    const n = Math.min(len[i] as number, left);
    log.mark(addr[i] as number, n);
    left -= n;
  }
  left = tail;
  for (let i = to - 1; i >= from && left > 0; i--) {
    const segLen = len[i] as number;
    const n = Math.min(segLen, left);
    log.mark((addr[i] as number) + segLen - n, n);
    left -= n;
  }
}

/** Logs what a completion with used length `used` wrote into `chain`'s writable part (see `WrittenBuffers`). */
export function logChainWritten(log: DirtyLog, chain: DescriptorChain, used: number, trailer = 0): void {
  logWritten(log, chain.addr, chain.len, chain.readableCount, chain.count, used, trailer);
}

/**
 * A queue for a device that pops and completes chains itself (a `QueueProducer`: net receive) while logging is on:
 * every completion is logged before it is pushed. The chain popped last is logged from the chain object itself when
 * it completes first (the common case: a frame in one chain); it is recorded only when another pop is about to
 * refill the object before it completed. Everything else goes straight to `queue`. The worker hands this to the
 * producer only while its session logs, so the fast path stays as it is.
 */
export class LoggingQueue implements DeviceQueue {
  readonly #queue: DeviceQueue;
  readonly #written: WrittenBuffers;
  #log: DirtyLog;
  #trailer: number;
  /** The chain popped last, neither recorded nor completed yet. */
  #pending: DescriptorChain | undefined;

  constructor(queue: DeviceQueue, written: WrittenBuffers, log: DirtyLog, trailer = 0) {
    this.#queue = queue;
    this.#written = written;
    this.#log = log;
    this.#trailer = trailer;
  }

  /** Logs into `log` from now on (a new SET_LOG_BASE). */
  use(log: DirtyLog, trailer = 0): this {
    this.#log = log;
    this.#trailer = trailer;
    this.#pending = undefined; // a new batch: the chain object may have been refilled without this queue
    return this;
  }

  get size(): number {
    return this.#queue.size;
  }
  get maxChainLength(): number {
    return this.#queue.maxChainLength;
  }
  get eventIdx(): boolean {
    return this.#queue.eventIdx;
  }
  get attached(): boolean {
    return this.#queue.attached;
  }
  get seenAvailIdx(): number {
    return this.#queue.seenAvailIdx;
  }
  attach(mem: Parameters<DeviceQueue['attach']>[0]): void {
    this.#queue.attach(mem);
  }
  detach(): void {
    this.#queue.detach();
  }
  setDirtyLog(log: DirtyLog | undefined, usedLogAddr?: number): void {
    this.#queue.setDirtyLog(log, usedLogAddr);
  }
  createChain(): DescriptorChain {
    return this.#queue.createChain();
  }
  resume(base: number): void {
    this.#queue.resume(base);
  }
  resyncToUsed(): number {
    return this.#queue.resyncToUsed();
  }
  getBase(): number {
    return this.#queue.getBase();
  }
  popChain(mem: Parameters<DeviceQueue['popChain']>[0], chain: DescriptorChain): boolean {
    // The previous chain, still in flight, is copied before the pop may refill the object that holds it.
    if (this.#pending !== undefined) this.#written.record(this.#pending);
    this.#pending = undefined;
    if (!this.#queue.popChain(mem, chain)) return false;
    this.#pending = chain;
    return true;
  }
  unpop(): void {
    this.#pending = undefined; // given back: the chain popped last (an earlier one, if any, was recorded)
    this.#queue.unpop();
  }
  pushUsed(head: number, len: number): void {
    const pending = this.#pending;
    if (pending !== undefined && pending.head === head) {
      logChainWritten(this.#log, pending, len, this.#trailer);
      this.#pending = undefined;
    } else {
      this.#written.logUsed(this.#log, head, len, this.#trailer);
    }
    this.#queue.pushUsed(head, len);
  }
  publishUsed(): void {
    this.#queue.publishUsed();
  }
  needsNotification(): boolean {
    return this.#queue.needsNotification();
  }
  disableNotification(): void {
    this.#queue.disableNotification();
  }
  enableNotification(seen?: number): boolean {
    return this.#queue.enableNotification(seen);
  }
  hasAvailable(): boolean {
    return this.#queue.hasAvailable();
  }
  availableSince(seen: number): boolean {
    return this.#queue.availableSince(seen);
  }
}
