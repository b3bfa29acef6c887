/**
 * virtio-blk, queue half (runs in worker threads): turns a descriptor chain into a block request (VIRTIO 1.2
 * §5.2.6) and completes it. Data moves directly between the backend file and guest memory views.
 *
 * Chain layout (any layout is accepted, descriptors may split or merge parts):
 *   readable:  header (type u32, reserved u32, sector u64) | data for OUT, or segments for DISCARD/WRITE_ZEROES
 *   writable:  data for IN / GET_ID | status u8 (the last writable byte)
 *
 * Hot path (reads and writes in the queue worker): no allocation per request on the null device, one view per data
 * span on a file. The handler keeps typed-array views over the whole memory region it used last (`RegionCache`), valid
 * for as long as the worker passes the same memory table; the header is read and the status written through them,
 * and data spans that lie inside that region are checked with two comparisons. Anything else (a buffer that crosses
 * a region end, a table that is not a `MemoryTable`, a region too large for one view) takes the general path through
 * `GuestMemory.view`, with the same results and errors.
 */
import { VirtioError } from '../../errors.js';
import type { GuestMemory } from '../../memory/guest-memory.js';
import { RegionCache } from '../../memory/region-cache.js';
import { ChainReader, type DescriptorChain } from '../../queue/descriptor-chain.js';
import { MessageChannel, Worker, receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import * as native from '../../native/index.js';
import { PENDING, type QueueContext, type QueueHandler } from '../device.js';
import { countStat, QUEUE_COUNTERS, QueueStat } from '../queue-stats.js';
import {
  CONTROL_WORDS,
  FLUSHED_SEQ,
  FLUSHED_STATUS,
  STOP,
  STOPPED,
  type IoAttach,
  type IoClientMessage,
  type IoCompletion,
  type IoEngineOptions,
  type IoOp,
  type IoRequest,
  type IoSpan,
  type IoThreadInit,
} from './io-messages.js';
import { openBlockBackend, type BlockBackend } from './block-backend.js';
import {
  BLK_ID_BYTES,
  BlkFeature,
  BlkRequestType,
  BlkStatus,
  DISCARD_SEGMENT_SIZE,
  REQUEST_HEADER_SIZE,
  SECTOR_SIZE,
  WRITE_ZEROES_FLAG_UNMAP,
} from './constants.js';

export interface BlkQueueOptions {
  /** A file or null device (opened in each worker), or an NBD export (always served from I/O threads). */
  backend: IoEngineOptions;
  serial: string;
  capacityBytes: number;
  /**
   * 'sync' (default; files and null devices only): requests run in the queue worker, inside its batch. 'async':
   * reads and writes run in an I/O thread and complete later (an NBD disk: every request); the worker pins the
   * request's memory until then.
   */
  io?: 'sync' | 'async';
  /**
   * async: the queues of a device in one worker share one I/O thread (an NBD server without CAN_MULTI_CONN gets
   * one connection); else each queue has its own.
   */
  shareIoThread?: boolean;
  /**
   * async only: complete each read or write this long after its I/O (exercises requests in flight); a list is taken
   * in turn, request by request, so that `[5000, 0]` completes every other one at once: out of order.
   */
  completionDelayMs?: number | readonly number[];
}

/** An I/O thread and the queues it serves (one, or all the queues of a device in this worker). */
class IoThread {
  readonly #thread: Worker;
  readonly #onIdle: () => void;
  #clients = 0;

  constructor(options: BlkQueueOptions, onIdle: () => void = () => undefined) {
    this.#onIdle = onIdle;
    const init: IoThreadInit = {
      engine: options.backend,
      delaysMs: typeof options.completionDelayMs === 'number' ? [options.completionDelayMs] : (options.completionDelayMs ?? []),
    };
    this.#thread = new Worker(new URL('./blk-io-thread.js', import.meta.url), { workerData: init });
  }

  attach(): IoClient {
    this.#clients++;
    return new IoClient(this.#thread, () => {
      // The thread ends itself once its last client stopped; terminate only bounds a thread stuck elsewhere.
      if (--this.#clients > 0) return;
      this.#onIdle();
      void this.#thread.terminate();
    });
  }

  get clients(): number {
    return this.#clients;
  }
}

/** I/O threads shared by the queues of one device (`BlkQueueOptions.shareIoThread`), by device instance. */
const sharedThreads = new Map<number, IoThread>();

/** The I/O thread a new queue of device `instance` attaches to: a new one, or the device's shared one. */
function ioThreadFor(options: BlkQueueOptions, instance: number): IoThread {
  if (options.shareIoThread !== true) return new IoThread(options);
  let thread = sharedThreads.get(instance);
  if (thread === undefined || thread.clients === 0) {
    thread = new IoThread(options, () => sharedThreads.delete(instance));
    sharedThreads.set(instance, thread);
  }
  return thread;
}

/** One queue's end of an I/O thread: its request and completion port, completion eventfd and control words. */
class IoClient {
  readonly completionFd = native.eventfdCreate(0, true);
  readonly #port: MessagePort;
  readonly #control = new Int32Array(new SharedArrayBuffer(CONTROL_WORDS * 4));
  readonly #detach: () => void;
  /** Requests of the current batch, posted together by `endBatch`. */
  #batch: IoRequest[] = [];
  #flushSeq = 0;

  constructor(thread: Worker, detach: () => void) {
    const { port1, port2 } = new MessageChannel();
    this.#port = port1;
    this.#detach = detach;
    const msg: IoAttach = { type: 'attach', port: port2, completionFd: this.completionFd, control: this.#control.buffer };
    thread.postMessage(msg, [port2]);
  }

  submit(req: IoRequest): void {
    this.#batch.push(req);
  }

  /** Sends the batch's requests in one message. */
  endBatch(): void {
    if (this.#batch.length === 0) return;
    this.#port.postMessage(this.#batch satisfies IoClientMessage);
    this.#batch = [];
  }

  reap(complete: (head: number, len: number) => void): void {
    for (let m = receiveMessageOnPort(this.#port); m !== undefined; m = receiveMessageOnPort(this.#port)) {
      for (const c of m.message as IoCompletion[]) complete(c.head, c.len);
    }
  }

  /** Asks the thread for a flush and waits for it (bounded); false if it failed or did not answer in time. */
  flushSync(timeoutMs: number): boolean {
    this.endBatch();
    const seq = ++this.#flushSeq;
    this.#port.postMessage({ type: 'flush-sync', seq } satisfies IoClientMessage);
    const deadline = Date.now() + timeoutMs;
    for (let seen = Atomics.load(this.#control, FLUSHED_SEQ); seen !== seq; seen = Atomics.load(this.#control, FLUSHED_SEQ)) {
      const left = deadline - Date.now();
      if (left <= 0) return false;
      Atomics.wait(this.#control, FLUSHED_SEQ, seen, left);
    }
    return Atomics.load(this.#control, FLUSHED_STATUS) === BlkStatus.OK;
  }

  /**
   * Stops this queue's part of the thread. Waits (bounded) until the thread has confirmed that it will not touch the
   * queue's memory or eventfd again; only then is the eventfd closed (else a late write could hit a reused fd number).
   */
  close(): void {
    this.#batch = []; // abandoned with the rest: their pins are released by the worker
    Atomics.store(this.#control, STOP, 1);
    this.#port.postMessage({ type: 'stop' } satisfies IoClientMessage);
    const r = Atomics.wait(this.#control, STOPPED, 0, 5000);
    if (r !== 'timed-out' || Atomics.load(this.#control, STOPPED) === 1) native.close(this.completionFd);
    this.#port.close();
    this.#detach();
  }
}

function unmapped(gpa: number): VirtioError {
  return new VirtioError('GUEST_MEMORY_UNMAPPED', `guest address 0x${gpa.toString(16)} is not mapped`);
}

/** Calls `fn(view, dataOffset)` for each piece of guest memory in bytes [start, start + length) of one chain part. */
function forEachSpan(
  mem: GuestMemory,
  chain: DescriptorChain,
  writablePart: boolean,
  start: number,
  length: number,
  fn: (view: Uint8Array, dataOffset: number) => void,
): void {
  const first = writablePart ? chain.readableCount : 0;
  const end = writablePart ? chain.count : chain.readableCount;
  let skip = start;
  let done = 0;
  for (let i = first; i < end && done < length; i++) {
    const segLen = chain.len[i] as number;
    if (skip >= segLen) {
      skip -= segLen;
      continue;
    }
    let gpa = (chain.addr[i] as number) + skip;
    let want = Math.min(segLen - skip, length - done);
    skip = 0;
    while (want > 0) {
      const view = mem.view(gpa, want); // shorter than `want` where a region ends: continue in the next one
      if (view.length === 0) throw unmapped(gpa);
      fn(view, done);
      gpa += view.length;
      want -= view.length;
      done += view.length;
    }
  }
}

/** How long a stopping queue waits for its I/O thread's flush beyond the NBD timeout. */
const FLUSH_WAIT_MARGIN_MS = 5000;

export class BlkQueueHandler implements QueueHandler {
  /** sync mode: the file or null device, opened in this worker. */
  readonly #backend: BlockBackend | undefined;
  readonly #readOnly: boolean;
  /** The null device: data is never touched, buffers are only checked to be mapped. */
  readonly #nullData: boolean;
  readonly #capacity: number;
  readonly #id: Uint8Array;
  readonly #reader = new ChainReader();
  readonly #header = new Uint8Array(REQUEST_HEADER_SIZE);
  readonly #headerView = new DataView(this.#header.buffer);
  readonly #segment = new Uint8Array(DISCARD_SEGMENT_SIZE);
  readonly #segmentView = new DataView(this.#segment.buffer);
  /** async mode: this queue's end of its I/O thread. */
  readonly #io: IoClient | undefined;
  /** The driver did not negotiate FLUSH: the disk is write-through, writes complete once durable. */
  readonly #writeThrough: boolean;
  /** The longest a stopping queue waits for its flush. */
  readonly #flushWaitMs: number;
  readonly completionFd: number | undefined;
  /** The status byte: the last writable byte of every request, counted in its used length. */
  readonly trailingStatusBytes = 1;
  /** This queue's counters (queue-stats.ts): bytes moved and error statuses. */
  readonly #stats: Float64Array;

  /** The region used last (see the module comment). */
  readonly #regions = new RegionCache();

  constructor(
    options: BlkQueueOptions,
    stats: Float64Array = new Float64Array(QUEUE_COUNTERS.length),
    context: Pick<QueueContext, 'features' | 'instance'> = { features: 1n << BigInt(BlkFeature.FLUSH), instance: 0 },
  ) {
    this.#stats = stats;
    const engine = options.backend;
    this.#readOnly = engine.readOnly;
    this.#writeThrough = (context.features & (1n << BigInt(BlkFeature.FLUSH))) === 0n;
    this.#flushWaitMs = (engine.kind === 'nbd' ? engine.timeoutMs : 0) + FLUSH_WAIT_MARGIN_MS;
    // A file or null device is opened here too: its flushes, discards and write-zeroes run in this worker (async
    // mode hands only reads and writes over). An NBD disk has nothing local: everything goes to its I/O thread.
    if (engine.kind !== 'nbd') this.#backend = openBlockBackend(engine);
    if (options.io === 'async' || engine.kind === 'nbd') {
      this.#io = ioThreadFor(options, context.instance).attach();
      this.completionFd = this.#io.completionFd;
    }
    this.#nullData = engine.kind === 'null';
    this.#capacity = Math.min(options.capacityBytes, this.#backend?.size ?? options.capacityBytes);
    this.#id = new Uint8Array(BLK_ID_BYTES);
    this.#id.set(Buffer.from(options.serial).subarray(0, BLK_ID_BYTES));
  }

  process(mem: GuestMemory, chain: DescriptorChain): number {
    if (chain.writableBytes < 1) {
      throw new VirtioError('VIRTIO_BLK_NO_STATUS', `request ${chain.head} has no writable status byte`);
    }
    if (chain.readableBytes < REQUEST_HEADER_SIZE) {
      throw new VirtioError('VIRTIO_BLK_SHORT_HEADER', `request ${chain.head} has a ${chain.readableBytes}-byte header`);
    }
    this.#regions.use(mem);
    // The header is read once into locals (no double fetch): through the region views when the first descriptor
    // holds all of it, else through the chain reader.
    let type: number;
    let sectorLo: number;
    let sectorHi: number;
    const at = (chain.len[0] as number) >= REQUEST_HEADER_SIZE ? this.#regions.locate(chain.addr[0] as number, REQUEST_HEADER_SIZE) : -1;
    if (at >= 0) {
      const v = this.#regions.dv;
      type = v.getUint32(at, true);
      sectorLo = v.getUint32(at + 8, true);
      sectorHi = v.getUint32(at + 12, true);
    } else {
      this.#reader.reset(mem, chain).readExact(this.#header);
      type = this.#headerView.getUint32(0, true);
      sectorLo = this.#headerView.getUint32(8, true);
      sectorHi = this.#headerView.getUint32(12, true);
    }
    const inLen = chain.writableBytes - 1; // device-writable data before the status byte
    const outLen = chain.readableBytes - REQUEST_HEADER_SIZE; // driver data after the header

    let status: number = BlkStatus.OK;
    let written = 0;
    switch (type) {
      case BlkRequestType.IN:
      case BlkRequestType.OUT: {
        const isRead = type === BlkRequestType.IN;
        const len = isRead ? inLen : outLen;
        const pos = this.#byteRange(sectorLo, sectorHi, len);
        if (pos < 0 || len % SECTOR_SIZE !== 0 || (!isRead && this.#readOnly)) {
          status = BlkStatus.IOERR;
          break;
        }
        if (this.#io !== undefined) {
          this.#submitData(mem, chain, isRead, pos, len);
          countStat(this.#stats, isRead ? QueueStat.bytesRead : QueueStat.bytesWritten, len); // counted when submitted
          return PENDING;
        }
        try {
          this.#transfer(this.#backend as BlockBackend, mem, chain, isRead, pos, len);
          countStat(this.#stats, isRead ? QueueStat.bytesRead : QueueStat.bytesWritten, len);
          if (isRead) written = len;
        } catch (err) {
          if (err instanceof VirtioError) throw err;
          status = BlkStatus.IOERR;
        }
        break;
      }
      case BlkRequestType.FLUSH:
        if (this.#backend === undefined) {
          this.#submitOther(mem, chain, 'flush', 0, 0, false);
          return PENDING;
        }
        try {
          this.#backend?.flush();
        } catch {
          status = BlkStatus.IOERR;
        }
        break;
      case BlkRequestType.GET_ID: {
        const n = Math.min(BLK_ID_BYTES, inLen);
        forEachSpan(mem, chain, true, 0, n, (view, off) => view.set(this.#id.subarray(off, off + view.length)));
        written = n;
        break;
      }
      case BlkRequestType.DISCARD:
      case BlkRequestType.WRITE_ZEROES:
        this.#reader.reset(mem, chain).skip(REQUEST_HEADER_SIZE);
        status = this.#discardOrZero(mem, chain, type === BlkRequestType.WRITE_ZEROES, outLen);
        if (status === PENDING) return PENDING;
        break;
      default:
        status = BlkStatus.UNSUPP;
    }
    if (status !== BlkStatus.OK) countStat(this.#stats, QueueStat.errors);
    this.#writeStatus(mem, chain, status);
    return written + 1;
  }

  /**
   * Moves the data of a read (into the writable part, from its start) or a write (from the readable part, after
   * the header) between the backend and guest memory: one backend call per piece of guest memory, straight into or
   * out of the guest's pages. The null device only checks that every piece is mapped.
   */
  #transfer(backend: BlockBackend, mem: GuestMemory, chain: DescriptorChain, isRead: boolean, pos: number, length: number): void {
    const first = isRead ? chain.readableCount : 0;
    const end = isRead ? chain.count : chain.readableCount;
    const nullData = this.#nullData;
    let skip = isRead ? 0 : REQUEST_HEADER_SIZE;
    let done = 0;
    for (let i = first; i < end && done < length; i++) {
      const segLen = chain.len[i] as number;
      if (skip >= segLen) {
        skip -= segLen;
        continue;
      }
      let gpa = (chain.addr[i] as number) + skip;
      let want = Math.min(segLen - skip, length - done);
      skip = 0;
      while (want > 0) {
        let view: Uint8Array | undefined;
        let n: number;
        const at = this.#regions.locate(gpa, want);
        if (at >= 0) {
          n = want;
          if (!nullData) view = new Uint8Array(this.#regions.u8.buffer, at, n);
        } else {
          view = mem.view(gpa, want); // shorter than `want` where a region ends: continue in the next one
          n = view.length;
          if (n === 0) throw unmapped(gpa);
        }
        if (view !== undefined && !nullData) {
          if (isRead) backend.read(view, pos + done);
          else backend.write(view, pos + done);
        }
        gpa += n;
        want -= n;
        done += n;
      }
    }
  }

  endBatch(): void {
    this.#io?.endBatch();
  }

  reap(complete: (head: number, len: number) => void): void {
    this.#io?.reap(complete);
  }

  /**
   * The queue stopped with nothing in flight: completed writes go to stable storage (fdatasync, NBD FLUSH). An I/O
   * thread's flush is waited for, at most the NBD timeout and a margin.
   */
  flush(): void {
    if (this.#readOnly) return;
    if (this.#backend !== undefined) this.#backend.flush();
    else this.#io?.flushSync(this.#flushWaitMs);
  }

  close(): void {
    this.#io?.close();
    this.#backend?.close();
  }

  /** Hands a read or write to the I/O thread: the spans are views captured now, under the current memory table. */
  #submitData(mem: GuestMemory, chain: DescriptorChain, isRead: boolean, pos: number, len: number): void {
    const spans: IoSpan[] = [];
    const collect = (view: Uint8Array, off: number): void => {
      spans.push({ buffer: view.buffer as SharedArrayBuffer, offset: view.byteOffset, length: view.length, pos: pos + off });
    };
    if (isRead) forEachSpan(mem, chain, true, 0, len, collect);
    else forEachSpan(mem, chain, false, REQUEST_HEADER_SIZE, len, collect);
    const status = this.#statusView(mem, chain);
    (this.#io as IoClient).submit({
      head: chain.head,
      op: isRead ? 'read' : 'write',
      spans,
      pos,
      length: len,
      fua: !isRead && this.#writeThrough,
      unmap: false,
      status: { buffer: status.buffer as SharedArrayBuffer, offset: status.byteOffset },
      len: (isRead ? len : 0) + 1,
    });
  }

  /** Hands a flush, discard or write-zeroes to the I/O thread (it completes with just its status byte). */
  #submitOther(mem: GuestMemory, chain: DescriptorChain, op: IoOp, pos: number, length: number, unmap: boolean): void {
    const status = this.#statusView(mem, chain);
    (this.#io as IoClient).submit({
      head: chain.head,
      op,
      spans: [],
      pos,
      length,
      fua: op === 'zero' && this.#writeThrough,
      unmap,
      status: { buffer: status.buffer as SharedArrayBuffer, offset: status.byteOffset },
      len: 1,
    });
  }

  /** The byte offset of `len` bytes at the given sector, or -1 when the range is not inside the device. */
  #byteRange(sectorLo: number, sectorHi: number, len: number): number {
    if (sectorHi >= 0x200000 / SECTOR_SIZE) return -1; // sector * 512 would not be exact below 2^53
    const pos = (sectorHi * 0x1_0000_0000 + sectorLo) * SECTOR_SIZE;
    return pos + len <= this.#capacity ? pos : -1;
  }

  /** A status, or PENDING when the I/O thread performs it. */
  #discardOrZero(mem: GuestMemory, chain: DescriptorChain, zero: boolean, outLen: number): number {
    // One segment per request (config max_discard_seg / max_write_zeroes_seg = 1).
    if (outLen !== DISCARD_SEGMENT_SIZE) return BlkStatus.IOERR;
    this.#reader.readExact(this.#segment);
    const v = this.#segmentView;
    const sectors = v.getUint32(8, true);
    const flags = v.getUint32(12, true);
    if ((flags & ~WRITE_ZEROES_FLAG_UNMAP) !== 0) return BlkStatus.UNSUPP;
    const pos = this.#byteRange(v.getUint32(0, true), v.getUint32(4, true), sectors * SECTOR_SIZE);
    if (pos < 0 || this.#readOnly) return BlkStatus.IOERR;
    if (this.#backend === undefined) {
      this.#submitOther(mem, chain, zero ? 'zero' : 'discard', pos, sectors * SECTOR_SIZE, (flags & WRITE_ZEROES_FLAG_UNMAP) !== 0);
      return PENDING;
    }
    if (!zero) return BlkStatus.OK; // discard is a hint; a file without hole punching keeps its data
    try {
      this.#backend?.writeZeroes(pos, sectors * SECTOR_SIZE);
    } catch {
      return BlkStatus.IOERR;
    }
    return BlkStatus.OK;
  }

  /** Writes the status into the last writable byte of the chain. */
  #writeStatus(mem: GuestMemory, chain: DescriptorChain, status: number): void {
    const last = chain.count - 1;
    const len = chain.len[last] as number;
    if (len > 0) {
      const at = this.#regions.locate((chain.addr[last] as number) + len - 1, 1);
      if (at >= 0) {
        this.#regions.u8[at] = status;
        return;
      }
    }
    this.#statusView(mem, chain)[0] = status;
  }

  /** A 1-byte view of the chain's last writable byte (the caller checked that the writable part is not empty). */
  #statusView(mem: GuestMemory, chain: DescriptorChain): Uint8Array {
    for (let i = chain.count - 1; i >= chain.readableCount; i--) {
      const len = chain.len[i] as number;
      if (len === 0) continue;
      const view = mem.view((chain.addr[i] as number) + len - 1, 1);
      if (view.length !== 1) throw new VirtioError('GUEST_MEMORY_UNMAPPED', 'status byte is not mapped');
      return view;
    }
    throw new VirtioError('VIRTIO_BLK_NO_STATUS', `request ${chain.head} has no writable status byte`);
  }
}

/** The worker-module entry point (see devices/device.ts `DeviceWorkerModule`). */
export function createQueueHandler(options: unknown, context: QueueContext): QueueHandler {
  return new BlkQueueHandler(options as BlkQueueOptions, context.stats, context);
}
