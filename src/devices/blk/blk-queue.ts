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
import { STOP, STOPPED, type IoCompletion, type IoRequest, type IoSpan, type IoThreadInit } from './io-messages.js';
import { openBlockBackend, type BlockBackend, type BlockBackendOptions } from './block-backend.js';
import {
  BLK_ID_BYTES,
  BlkRequestType,
  BlkStatus,
  DISCARD_SEGMENT_SIZE,
  REQUEST_HEADER_SIZE,
  SECTOR_SIZE,
} from './constants.js';

export interface BlkQueueOptions {
  backend: BlockBackendOptions;
  serial: string;
  capacityBytes: number;
  /**
   * 'sync' (default): reads and writes run in the queue worker, inside its batch. 'async': they run in an I/O
   * thread per queue and complete later; the worker pins the request's memory until then.
   */
  io?: 'sync' | 'async';
  /**
   * async only: complete each request this long after its I/O (exercises requests in flight); a list is taken in
   * turn, request by request, so that `[5000, 0]` completes every other request at once: out of order.
   */
  completionDelayMs?: number | readonly number[];
}

/** The async half: an I/O thread, its request and completion ports, and the completion eventfd. */
class AsyncIo {
  readonly completionFd = native.eventfdCreate(0, true);
  readonly #thread: Worker;
  readonly #completions: MessagePort;
  readonly #control = new Int32Array(new SharedArrayBuffer(8));

  constructor(options: BlkQueueOptions) {
    const { port1, port2 } = new MessageChannel();
    this.#completions = port1;
    const init: IoThreadInit = {
      backend: options.backend,
      completions: port2,
      completionFd: this.completionFd,
      control: this.#control.buffer,
      delaysMs: typeof options.completionDelayMs === 'number' ? [options.completionDelayMs] : (options.completionDelayMs ?? []),
    };
    this.#thread = new Worker(new URL('./blk-io-thread.js', import.meta.url), { workerData: init, transferList: [port2] });
  }

  submit(req: IoRequest): void {
    this.#thread.postMessage(req);
  }

  reap(complete: (head: number, len: number) => void): void {
    for (let m = receiveMessageOnPort(this.#completions); m !== undefined; m = receiveMessageOnPort(this.#completions)) {
      const c = m.message as IoCompletion;
      complete(c.head, c.len);
    }
  }

  /**
   * Stops the I/O thread. Waits (bounded) until it has confirmed that it will not touch guest memory or the eventfd
   * again; only then is the eventfd closed (else a late write could hit a reused fd number).
   */
  close(): void {
    Atomics.store(this.#control, STOP, 1);
    this.#thread.postMessage('stop');
    const r = Atomics.wait(this.#control, STOPPED, 0, 5000);
    if (r !== 'timed-out' || Atomics.load(this.#control, STOPPED) === 1) native.close(this.completionFd);
    void this.#thread.terminate();
    this.#completions.close();
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

export class BlkQueueHandler implements QueueHandler {
  readonly #backend: BlockBackend;
  /** The null device: data is never touched, buffers are only checked to be mapped. */
  readonly #nullData: boolean;
  readonly #capacity: number;
  readonly #id: Uint8Array;
  readonly #reader = new ChainReader();
  readonly #header = new Uint8Array(REQUEST_HEADER_SIZE);
  readonly #headerView = new DataView(this.#header.buffer);
  readonly #segment = new Uint8Array(DISCARD_SEGMENT_SIZE);
  readonly #segmentView = new DataView(this.#segment.buffer);
  readonly #async: AsyncIo | undefined;
  readonly completionFd: number | undefined;
  /** The status byte: the last writable byte of every request, counted in its used length. */
  readonly trailingStatusBytes = 1;
  /** This queue's counters (queue-stats.ts): bytes moved and error statuses. */
  readonly #stats: Float64Array;

  /** The region used last (see the module comment). */
  readonly #regions = new RegionCache();

  constructor(options: BlkQueueOptions, stats: Float64Array = new Float64Array(QUEUE_COUNTERS.length)) {
    this.#stats = stats;
    this.#async = options.io === 'async' ? new AsyncIo(options) : undefined;
    this.completionFd = this.#async?.completionFd;
    this.#backend = openBlockBackend(options.backend);
    this.#nullData = options.backend.kind === 'null';
    this.#capacity = Math.min(options.capacityBytes, this.#backend.size);
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
        if (pos < 0 || len % SECTOR_SIZE !== 0 || (!isRead && this.#backend.readOnly)) {
          status = BlkStatus.IOERR;
          break;
        }
        if (this.#async !== undefined) {
          this.#submit(mem, chain, isRead, pos, len);
          countStat(this.#stats, isRead ? QueueStat.bytesRead : QueueStat.bytesWritten, len); // counted when submitted
          return PENDING;
        }
        try {
          this.#transfer(mem, chain, isRead, pos, len);
          countStat(this.#stats, isRead ? QueueStat.bytesRead : QueueStat.bytesWritten, len);
          if (isRead) written = len;
        } catch (err) {
          if (err instanceof VirtioError) throw err;
          status = BlkStatus.IOERR;
        }
        break;
      }
      case BlkRequestType.FLUSH:
        try {
          this.#backend.flush();
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
        status = this.#discardOrZero(type === BlkRequestType.WRITE_ZEROES, outLen);
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
  #transfer(mem: GuestMemory, chain: DescriptorChain, isRead: boolean, pos: number, length: number): void {
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
          if (isRead) this.#backend.read(view, pos + done);
          else this.#backend.write(view, pos + done);
        }
        gpa += n;
        want -= n;
        done += n;
      }
    }
  }

  reap(complete: (head: number, len: number) => void): void {
    this.#async?.reap(complete);
  }

  /** The queue stopped with nothing in flight: completed writes go to stable storage (fdatasync). */
  flush(): void {
    if (!this.#backend.readOnly) this.#backend.flush();
  }

  close(): void {
    this.#async?.close();
    this.#backend.close();
  }

  /** Hands a read or write to the I/O thread: the spans are views captured now, under the current memory table. */
  #submit(mem: GuestMemory, chain: DescriptorChain, isRead: boolean, pos: number, len: number): void {
    const spans: IoSpan[] = [];
    const collect = (view: Uint8Array, off: number): void => {
      spans.push({ buffer: view.buffer as SharedArrayBuffer, offset: view.byteOffset, length: view.length, pos: pos + off });
    };
    if (isRead) forEachSpan(mem, chain, true, 0, len, collect);
    else forEachSpan(mem, chain, false, REQUEST_HEADER_SIZE, len, collect);
    const status = this.#statusView(mem, chain);
    (this.#async as AsyncIo).submit({
      head: chain.head,
      op: isRead ? 'read' : 'write',
      spans,
      status: { buffer: status.buffer as SharedArrayBuffer, offset: status.byteOffset },
      len: (isRead ? len : 0) + 1,
    });
  }

  /** The byte offset of `len` bytes at the given sector, or -1 when the range is not inside the device. */
  #byteRange(sectorLo: number, sectorHi: number, len: number): number {
    if (sectorHi >= 0x200000 / SECTOR_SIZE) return -1; // sector * 512 would not be exact below 2^53
    const pos = (sectorHi * 0x1_0000_0000 + sectorLo) * SECTOR_SIZE;
    return pos + len <= this.#capacity ? pos : -1;
  }

  #discardOrZero(zero: boolean, outLen: number): number {
    // One segment per request (config max_discard_seg / max_write_zeroes_seg = 1).
    if (outLen !== DISCARD_SEGMENT_SIZE) return BlkStatus.IOERR;
    this.#reader.readExact(this.#segment);
    const v = this.#segmentView;
    const sectors = v.getUint32(8, true);
    const flags = v.getUint32(12, true);
    if ((flags & ~1) !== 0) return BlkStatus.UNSUPP;
    const pos = this.#byteRange(v.getUint32(0, true), v.getUint32(4, true), sectors * SECTOR_SIZE);
    if (pos < 0 || this.#backend.readOnly) return BlkStatus.IOERR;
    if (!zero) return BlkStatus.OK; // discard is a hint; a file without hole punching keeps its data
    try {
      this.#backend.writeZeroes(pos, sectors * SECTOR_SIZE);
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
  return new BlkQueueHandler(options as BlkQueueOptions, context.stats);
}
