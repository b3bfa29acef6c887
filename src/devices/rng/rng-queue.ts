/**
 * virtio-rng, queue half (runs in a worker thread): each chain's device-writable buffers are filled with bytes from
 * the system's CSPRNG (`crypto.randomFillSync`, getrandom(2)), straight into guest memory, and the used length is the
 * number of bytes written (§5.4.6: "the device MUST place one or more random bytes into the buffer", and may place
 * fewer than its size). Device-readable buffers carry nothing for this device and are ignored.
 *
 * With a rate limit (at most `bytes` per `periodMs`, as QEMU's virtio-rng `max-bytes` and `period`), a request that
 * finds the period's bytes spent waits: `process` returns PENDING (the worker keeps the chain's memory mapped), a
 * timerfd expires when the next period starts, and `reap` fills the waiting requests in order from the new budget.
 */
import { randomFillSync } from 'node:crypto';
import { VirtioError } from '../../errors.js';
import type { GuestMemory } from '../../memory/guest-memory.js';
import * as native from '../../native/index.js';
import type { DescriptorChain } from '../../queue/descriptor-chain.js';
import { PENDING, type QueueContext, type QueueHandler } from '../device.js';
import { QueueStat, countStat } from '../queue-stats.js';

export interface RngQueueOptions {
  /** Most bytes given per request. */
  readonly maxBytesPerRequest: number;
  /** At most `bytes` every `periodMs` milliseconds (absent: no limit). */
  readonly rateLimit?: { readonly bytes: number; readonly periodMs: number };
}

/** A request waiting for the next period: its head and its writable buffers (views of pinned guest memory). */
interface Waiting {
  readonly head: number;
  readonly buffers: Uint8Array[];
}

export class RngQueueHandler implements QueueHandler {
  readonly completionFd: number | undefined;
  readonly #maxBytes: number;
  readonly #stats: Float64Array;
  readonly #rate: { readonly bytes: number; readonly periodMs: number } | undefined;
  /** Bytes left in the current period, and when it ends (performance.now()). */
  #budget = 0;
  #periodEnd = 0;
  readonly #waiting: Waiting[] = [];

  constructor(options: RngQueueOptions, context: QueueContext) {
    this.#maxBytes = options.maxBytesPerRequest;
    this.#stats = context.stats;
    this.#rate = options.rateLimit;
    this.completionFd = this.#rate === undefined ? undefined : native.timerfdCreate();
  }

  process(mem: GuestMemory, chain: DescriptorChain): number {
    const buffers = writableViews(mem, chain, this.#maxBytes);
    if (buffers.length === 0) {
      // Nothing writable: the driver gets a used length of 0 (Linux reads it as "no data") and the request is done.
      countStat(this.#stats, QueueStat.errors);
      return 0;
    }
    if (this.#rate === undefined) return this.#fill(buffers, Infinity);
    this.#newPeriod();
    if (this.#waiting.length === 0 && this.#budget > 0) return this.#fill(buffers, this.#budget);
    this.#waiting.push({ head: chain.head, buffers });
    this.#wakeAtPeriodEnd();
    return PENDING;
  }

  reap(complete: (head: number, len: number) => void): void {
    this.#newPeriod();
    while (this.#budget > 0) {
      const w = this.#waiting.shift();
      if (w === undefined) return;
      complete(w.head, this.#fill(w.buffers, this.#budget));
    }
    if (this.#waiting.length > 0) this.#wakeAtPeriodEnd();
  }

  /** Arms the timerfd (the completionFd) for the end of the current period: `reap` runs then. */
  #wakeAtPeriodEnd(): void {
    native.timerfdArm(this.completionFd as number, Math.max(this.#periodEnd - performance.now(), 0.001));
  }

  /** Starts a new period (a full budget) once the current one is over. */
  #newPeriod(): void {
    const rate = this.#rate as { readonly bytes: number; readonly periodMs: number };
    const now = performance.now();
    if (now < this.#periodEnd) return;
    this.#budget = rate.bytes;
    this.#periodEnd = now + rate.periodMs;
  }

  /** Fills the buffers in order, at most `limit` bytes; returns the count (the used length). */
  #fill(buffers: readonly Uint8Array[], limit: number): number {
    let written = 0;
    for (const b of buffers) {
      const n = Math.min(b.length, limit - written);
      if (n <= 0) break;
      randomFillSync(b, 0, n);
      written += n;
    }
    if (this.#rate !== undefined) this.#budget -= written;
    countStat(this.#stats, QueueStat.bytesRead, written); // bytes given to the driver
    return written;
  }

  close(): void {
    if (this.completionFd !== undefined) native.close(this.completionFd);
  }
}

/** Views of the chain's writable buffers, at most `max` bytes in all, region by region. */
function writableViews(mem: GuestMemory, chain: DescriptorChain, max: number): Uint8Array[] {
  const views: Uint8Array[] = [];
  let total = 0;
  for (let i = chain.readableCount; i < chain.count && total < max; i++) {
    let gpa = chain.addr[i] as number;
    let left = Math.min(chain.len[i] as number, max - total);
    while (left > 0) {
      // A view of guest memory, shorter than asked where a region ends: the rest comes from the next one.
      const view = mem.view(gpa, left);
      if (view.length === 0) throw new VirtioError('GUEST_MEMORY_UNMAPPED', `guest address 0x${gpa.toString(16)} is not mapped`);
      views.push(view);
      gpa += view.length;
      left -= view.length;
      total += view.length;
    }
  }
  return views;
}

/** The worker module entry (`VirtioDevice.worker.module`). */
export function createQueueHandler(options: unknown, context: QueueContext): QueueHandler {
  return new RngQueueHandler(options as RngQueueOptions, context);
}
