/**
 * A virtio-blk driver (VIRTIO 1.2 §5.2) on top of a started `VhostUserFrontend`: what a guest's virtio_blk does,
 * in this process. Used by tests and as the load generator of the benchmarks, so the per-request path is kept
 * allocation-light: every request slot owns a fixed piece of guest RAM (header, status byte, indirect table, data
 * buffer) and reusable segment objects; a request costs its Promise and, for writes and reads, one copy.
 * `submitRaw` (the load generator's path) costs neither: a callback instead of a Promise, the slot's buffer as data.
 *
 * Per queue there are at most `slotsPerQueue` requests in flight (bounded by the ring: one descriptor per request
 * with indirect descriptors, three without); further requests wait in FIFO order for a slot. Chains added in one
 * synchronous burst are published together and the backend is kicked once, and only when the ring asks for it
 * (EVENT_IDX avail_event, or VRING_USED_F_NO_NOTIFY); each chain is also published as soon as it is added, so that a
 * backend that is awake works on it while the rest of the burst is built. Completions are collected when the call
 * eventfd fires (watched on the event loop) and opportunistically when a queue runs out of slots; the notification is
 * re-armed only once the used ring is found empty.
 *
 * Every operation resolves with the virtio-blk status byte (`BlkStatus.OK`, `IOERR`, `UNSUPP`), plus data for
 * reads and GET_ID; it rejects only when the request could not be completed at all (disconnect, a broken used ring,
 * `close()`).
 */
import { VhostError } from '../errors.js';
import * as native from '../native/index.js';
import { VirtioFeature, featureBit, hasFeature } from '../protocol/constants.js';
import { queueDriverLayout, type QueueDriver } from '../queue/queue-driver.js';
import type { AddChainOptions } from '../queue/split-queue-driver.js';
import {
  BLK_ID_BYTES,
  BlkConfigOffset,
  BlkFeature,
  BlkRequestType,
  BlkStatus,
  DISCARD_SEGMENT_SIZE,
  REQUEST_HEADER_SIZE,
  SECTOR_SIZE,
  WRITE_ZEROES_FLAG_UNMAP,
} from '../devices/blk/constants.js';
import { packedRingFeature, type FrontendQueue, type QueueConfig, type VhostUserFrontend } from './frontend.js';
import type { GuestRam, GuestRamRegion } from './guest-ram.js';

/** Error codes of the blk driver (`VhostError.code`). */
export const BlkDriverErrorCode = {
  /** `close()` was called while the request was waiting or in flight. */
  CLOSED: 'VHOST_BLK_DRIVER_CLOSED',
  /** The device returned something the ring does not allow; every request of the driver failed. */
  BROKEN: 'VHOST_BLK_DRIVER_BROKEN',
  /** Options do not fit what the device or the frontend offers. */
  BAD_OPTION: 'VHOST_BLK_DRIVER_BAD_OPTION',
} as const;

/** The parts of `struct virtio_blk_config` (§5.2.4) the driver uses. Fields beyond what GET_CONFIG returned are 0. */
export interface BlkConfig {
  /** Capacity in 512-byte sectors. */
  readonly capacity: number;
  readonly sizeMax: number;
  readonly segMax: number;
  readonly blkSize: number;
  readonly numQueues: number;
  readonly maxDiscardSectors: number;
  readonly maxWriteZeroesSectors: number;
}

/** Decodes a virtio-blk config space (little endian). */
export function parseBlkConfig(bytes: Uint8Array): BlkConfig {
  const padded = new Uint8Array(BlkConfigOffset.size);
  padded.set(bytes.subarray(0, BlkConfigOffset.size));
  const v = new DataView(padded.buffer);
  const O = BlkConfigOffset;
  return {
    capacity: Number(v.getBigUint64(O.capacity, true)),
    sizeMax: v.getUint32(O.sizeMax, true),
    segMax: v.getUint32(O.segMax, true),
    blkSize: v.getUint32(O.blkSize, true),
    numQueues: v.getUint16(O.numQueues, true),
    maxDiscardSectors: v.getUint32(O.maxDiscardSectors, true),
    maxWriteZeroesSectors: v.getUint32(O.maxWriteZeroesSectors, true),
  };
}

/** Result of `read`. */
export interface BlkReadResult {
  readonly status: number;
  /** The data read (zeros unless status is OK). */
  readonly data: Uint8Array;
}

/** Result of `getId`. */
export interface BlkIdResult {
  readonly status: number;
  /** The serial, up to its first NUL (at most 20 bytes). */
  readonly id: string;
}

/** Options of `new BlkDriver` (on a frontend already started). */
export interface BlkDriverOptions {
  /** Guest RAM for the request buffers (default: the frontend's). */
  readonly memory?: GuestRam;
  /** Largest read or write in bytes (default 128 KiB): each slot owns a data buffer of this size. */
  readonly maxRequestBytes?: number;
  /** Requests in flight per queue (default and maximum: the ring size with indirect descriptors, a third without). */
  readonly slotsPerQueue?: number;
  /** Put each request in an indirect table (default: when RING_INDIRECT_DESC was acknowledged). */
  readonly indirect?: boolean;
  /** Allocate request buffers in the region holding this GPA (default: anywhere). */
  readonly bufferRegion?: number | GuestRamRegion;
}

/** Options of `BlkDriver.start`: starts the frontend, then makes the driver. */
export interface BlkStartOptions extends BlkDriverOptions {
  readonly memory: GuestRam;
  /** Request queues (default 1). More than one needs VIRTIO_BLK_F_MQ. */
  readonly queues?: number;
  /** Ring size, a power of two (default 128; a packed ring takes any size up to 32768). */
  readonly queueSize?: number;
  /** Acknowledge VIRTIO_F_RING_EVENT_IDX when offered (default true). */
  readonly eventIdx?: boolean;
  /** Use packed rings: acknowledge VIRTIO_F_RING_PACKED, which the backend must offer (default false: split rings). */
  readonly packed?: boolean;
  /**
   * Ask for an inflight region as QEMU's vhost-user-blk does (SET_FEATURES, GET_INFLIGHT_FD, SET_INFLIGHT_FD before
   * the rings start; needs INFLIGHT_SHMFD), so that the backend tracks every request in it. The region's fd is
   * closed once handed over: this driver does not reconnect.
   */
  readonly inflight?: boolean;
  /** Allocate the rings in the region holding this GPA (default: anywhere). */
  readonly ringRegion?: number | GuestRamRegion;
  /** See `StartOptions.memoryMode`. */
  readonly memoryMode?: 'table' | 'regions';
  /** More feature bits to acknowledge if offered. */
  readonly extraFeatures?: bigint;
  /** See `StartOptions.ownMemory`. */
  readonly ownMemory?: boolean;
}

const DEFAULT_MAX_REQUEST_BYTES = 128 * 1024;
const DEFAULT_QUEUE_SIZE = 128;
/** Completions consumed in one go before `#drain` lets the event loop run (timers, other queues, the socket). */
const DRAIN_BUDGET = 1024;
/** Slot layout: header at 0, status at 16, indirect table at 64 (4 entries), data at 512. */
const STATUS_OFFSET = REQUEST_HEADER_SIZE;
const INDIRECT_OFFSET = 64;
const DATA_OFFSET = 512;

/** Device features this driver understands (acknowledged when offered). */
const DRIVER_BLK_FEATURES =
  featureBit(BlkFeature.SIZE_MAX) |
  featureBit(BlkFeature.SEG_MAX) |
  featureBit(BlkFeature.RO) |
  featureBit(BlkFeature.BLK_SIZE) |
  featureBit(BlkFeature.FLUSH) |
  featureBit(BlkFeature.TOPOLOGY) |
  featureBit(BlkFeature.DISCARD) |
  featureBit(BlkFeature.WRITE_ZEROES);

interface MutableSegment {
  addr: number;
  len: number;
  writable: boolean;
}

type Resolve = (status: number) => void;
type Reject = (err: Error) => void;

/**
 * Completion callback of `submitRaw`: the virtio-blk status byte and the caller's token. `status` is
 * `RAW_FAILED` (-1) when the request could not be completed at all; `BlkDriver.error` then says why.
 */
export type BlkRawCallback = (status: number, token: number) => void;

/** `BlkRawCallback` status of a request that was not completed (disconnect, broken ring, `close()`). */
export const RAW_FAILED = -1;

/** A request: the fields of a slot in flight, or of a waiter. */
interface RequestFields {
  type: number;
  sector: number;
  /** Data bytes (read/write), or sectors (discard/write zeroes). */
  length: number;
  /** Write source or read/GET_ID destination. */
  buffer: Uint8Array | undefined;
  /** Write-zeroes UNMAP flag. */
  unmap: boolean;
  resolve: Resolve;
  reject: Reject;
  /** `submitRaw`: the callback (then `resolve` and `reject` are unused) and its token. */
  raw: BlkRawCallback | undefined;
  token: number;
}

class Slot implements RequestFields {
  readonly index: number;
  readonly header: DataView;
  readonly status: Uint8Array;
  readonly data: Uint8Array;
  /** The start of the data buffer as a discard / write-zeroes segment. */
  readonly segment: DataView;
  readonly hdrSeg: MutableSegment;
  readonly dataSeg: MutableSegment;
  readonly statusSeg: MutableSegment;
  readonly three: MutableSegment[];
  readonly two: MutableSegment[];
  readonly chainOptions: AddChainOptions;
  type = 0;
  sector = 0;
  length = 0;
  buffer: Uint8Array | undefined = undefined;
  unmap = false;
  resolve: Resolve = noop;
  reject: Reject = noop;
  raw: BlkRawCallback | undefined = undefined;
  token = 0;
  /** A request occupies the slot (submitted, not completed). */
  busy = false;

  constructor(index: number, memory: GuestRam, base: number, maxBytes: number, indirect: boolean) {
    this.index = index;
    const bytes = memory.bytes(base, DATA_OFFSET + maxBytes);
    this.header = new DataView(bytes.buffer, bytes.byteOffset, REQUEST_HEADER_SIZE);
    this.status = bytes.subarray(STATUS_OFFSET, STATUS_OFFSET + 1);
    this.data = bytes.subarray(DATA_OFFSET);
    this.segment = new DataView(bytes.buffer, bytes.byteOffset + DATA_OFFSET, DISCARD_SEGMENT_SIZE);
    this.hdrSeg = { addr: base, len: REQUEST_HEADER_SIZE, writable: false };
    this.dataSeg = { addr: base + DATA_OFFSET, len: 0, writable: false };
    this.statusSeg = { addr: base + STATUS_OFFSET, len: 1, writable: true };
    this.three = [this.hdrSeg, this.dataSeg, this.statusSeg];
    this.two = [this.hdrSeg, this.statusSeg];
    this.chainOptions = indirect ? { indirectAddr: base + INDIRECT_OFFSET } : {};
  }
}

function noop(): void {}

interface QueueState {
  readonly index: number;
  readonly fq: FrontendQueue;
  readonly driver: QueueDriver<number>;
  readonly slots: Slot[];
  /** Stack of free slot indices. */
  readonly free: number[];
  /** Requests waiting for a slot (FIFO; `waitHead` is the next one). */
  readonly waiting: RequestFields[];
  waitHead: number;
  /** Chains were added since the last publish. */
  dirty: boolean;
  /** `#drain` is running (a raw callback that submits must not drain again from inside `pollUsed`). */
  draining: boolean;
  /** `#drain(this queue)`, for `setImmediate`. */
  readonly redrain: () => void;
  readonly onUsed: (slot: number, len: number) => void;
}

/** A virtio-blk driver over a started frontend; see the module comment. */
export class BlkDriver {
  /**
   * Acknowledges the blk features this driver understands, starts `queues` queues on the frontend, and returns the
   * driver. The frontend must be connected (handshake done, GET_CONFIG read) and not yet started.
   */
  static async start(frontend: VhostUserFrontend, options: BlkStartOptions): Promise<BlkDriver> {
    const offered = frontend.backendFeatures;
    const queues = options.queues ?? 1;
    const queueSize = options.queueSize ?? DEFAULT_QUEUE_SIZE;
    if (!Number.isInteger(queues) || queues < 1) throw new VhostError(BlkDriverErrorCode.BAD_OPTION, `bad queue count ${queues}`);
    let features = (DRIVER_BLK_FEATURES | (options.extraFeatures ?? 0n) | featureBit(VirtioFeature.VERSION_1)) & offered;
    if (options.indirect ?? true) features |= featureBit(VirtioFeature.RING_INDIRECT_DESC) & offered;
    if (options.eventIdx ?? true) features |= featureBit(VirtioFeature.RING_EVENT_IDX) & offered;
    const packed = options.packed ?? false;
    if (packed) features |= packedRingFeature(offered, BlkDriverErrorCode.BAD_OPTION);
    if (queues > 1) {
      if (!hasFeature(offered, BlkFeature.MQ)) {
        throw new VhostError(BlkDriverErrorCode.BAD_OPTION, `${queues} queues need VIRTIO_BLK_F_MQ, which is not offered`);
      }
      features |= featureBit(BlkFeature.MQ);
      const config = parseBlkConfig(frontend.config);
      if (config.numQueues !== 0 && queues > config.numQueues) {
        throw new VhostError(BlkDriverErrorCode.BAD_OPTION, `${queues} queues asked, the device has ${config.numQueues}`);
      }
    }
    const memory = options.memory;
    const queueConfigs: QueueConfig[] = [];
    for (let index = 0; index < queues; index++) {
      if (options.ringRegion === undefined) {
        queueConfigs.push({ index, size: queueSize });
      } else {
        const ringBytes = queueDriverLayout(packed, queueSize, 0).end;
        queueConfigs.push({ index, size: queueSize, ringGpa: memory.alloc(ringBytes, { align: 4096, region: options.ringRegion }) });
      }
    }
    if (options.inflight === true) {
      // The backend lays the region out for the ring layout in these features (QEMU: vhost_dev_prepare_inflight).
      await frontend.setFeatures(features);
      const region = await frontend.getInflightFd(queues, queueSize);
      try {
        await frontend.setInflightFd(region);
      } finally {
        if (region.fd >= 0) native.close(region.fd); // the backend keeps its own mapping
      }
    }
    await frontend.start({
      features,
      queues: queueConfigs,
      memory,
      ...(options.memoryMode !== undefined ? { memoryMode: options.memoryMode } : {}),
      ...(options.ownMemory !== undefined ? { ownMemory: options.ownMemory } : {}),
    });
    return new BlkDriver(frontend, options);
  }

  readonly frontend: VhostUserFrontend;
  readonly config: BlkConfig;
  readonly maxRequestBytes: number;
  readonly slotsPerQueue: number;
  readonly indirect: boolean;
  readonly #queues: QueueState[] = [];
  readonly #removeDisconnectListener: () => void;
  #flushScheduled = false;
  readonly #flushDirty = (): void => this.#flushAll();
  #error: Error | undefined;
  #closed = false;

  /** A driver on a started frontend: uses every queue `start` set up, in index order. */
  constructor(frontend: VhostUserFrontend, options: BlkDriverOptions = {}) {
    const memory = options.memory ?? frontend.memory;
    if (memory === undefined || frontend.queues.size === 0) {
      throw new VhostError(BlkDriverErrorCode.BAD_OPTION, 'the frontend is not started');
    }
    this.frontend = frontend;
    this.config = parseBlkConfig(frontend.config);
    this.maxRequestBytes = options.maxRequestBytes ?? DEFAULT_MAX_REQUEST_BYTES;
    if (!Number.isInteger(this.maxRequestBytes) || this.maxRequestBytes < SECTOR_SIZE || this.maxRequestBytes % SECTOR_SIZE !== 0) {
      throw new VhostError(BlkDriverErrorCode.BAD_OPTION, `maxRequestBytes must be a positive multiple of 512: ${this.maxRequestBytes}`);
    }
    const canIndirect = frontend.hasFeature(VirtioFeature.RING_INDIRECT_DESC);
    this.indirect = options.indirect ?? canIndirect;
    if (this.indirect && !canIndirect) {
      throw new VhostError(BlkDriverErrorCode.BAD_OPTION, 'indirect descriptors were not negotiated');
    }
    const indices = [...frontend.queues.keys()].sort((a, b) => a - b);
    const minSize = Math.min(...indices.map((i) => frontend.queue(i).size));
    const maxSlots = this.indirect ? minSize : Math.max(1, Math.floor(minSize / 3));
    this.slotsPerQueue = Math.min(options.slotsPerQueue ?? maxSlots, maxSlots);
    if (!Number.isInteger(this.slotsPerQueue) || this.slotsPerQueue < 1) {
      throw new VhostError(BlkDriverErrorCode.BAD_OPTION, `bad slotsPerQueue ${this.slotsPerQueue}`);
    }
    const slotBytes = DATA_OFFSET + this.maxRequestBytes;
    const allocOptions = { align: 4096, ...(options.bufferRegion !== undefined ? { region: options.bufferRegion } : {}) };
    for (const index of indices) {
      const fq = frontend.queue(index);
      const slots: Slot[] = [];
      const free: number[] = [];
      for (let s = 0; s < this.slotsPerQueue; s++) {
        slots.push(new Slot(s, memory, memory.alloc(slotBytes, allocOptions), this.maxRequestBytes, this.indirect));
        free.push(this.slotsPerQueue - 1 - s);
      }
      const q: QueueState = {
        index,
        fq,
        driver: fq.driver,
        slots,
        free,
        waiting: [],
        waitHead: 0,
        dirty: false,
        draining: false,
        redrain: () => this.#drain(q),
        onUsed: (slot, len) => this.#complete(q, slot, len),
      };
      this.#queues.push(q);
    }
    for (const q of this.#queues) q.fq.watchCall(() => this.#drain(q));
    this.#removeDisconnectListener = frontend.onDisconnect((err) => this.#failAll(err));
  }

  /** Number of request queues. */
  get queueCount(): number {
    return this.#queues.length;
  }

  /** Device capacity in bytes. */
  get capacityBytes(): number {
    return this.config.capacity * SECTOR_SIZE;
  }

  /** Whether the device is read-only (VIRTIO_BLK_F_RO acknowledged). */
  get readOnly(): boolean {
    return this.frontend.hasFeature(BlkFeature.RO);
  }

  /** Requests in flight on queue `queue` (submitted, not completed). */
  inFlight(queue = 0): number {
    const q = this.#queue(queue);
    return this.slotsPerQueue - q.free.length;
  }

  /** Reads `length` bytes (a multiple of 512, at most `maxRequestBytes`) at `sector`. */
  async read(sector: number, length: number, queue = 0): Promise<BlkReadResult> {
    const data = new Uint8Array(length);
    const status = await this.readInto(sector, data, queue);
    return { status, data };
  }

  /** Reads `target.length` bytes at `sector` into `target` (copied when the request completes with OK). */
  readInto(sector: number, target: Uint8Array, queue = 0): Promise<number> {
    if (target.length > this.maxRequestBytes) return this.#tooLong(target.length);
    return this.#submit(queue, BlkRequestType.IN, sector, target.length, target, false);
  }

  /** Writes `data` (a multiple of 512 bytes, at most `maxRequestBytes`) at `sector`; copied at submission. */
  write(sector: number, data: Uint8Array, queue = 0): Promise<number> {
    if (data.length > this.maxRequestBytes) return this.#tooLong(data.length);
    return this.#submit(queue, BlkRequestType.OUT, sector, data.length, data, false);
  }

  /** VIRTIO_BLK_T_FLUSH. */
  flush(queue = 0): Promise<number> {
    return this.#submit(queue, BlkRequestType.FLUSH, 0, 0, undefined, false);
  }

  /** VIRTIO_BLK_T_GET_ID: the device serial. */
  async getId(queue = 0): Promise<BlkIdResult> {
    const raw = new Uint8Array(BLK_ID_BYTES);
    const status = await this.#submit(queue, BlkRequestType.GET_ID, 0, BLK_ID_BYTES, raw, false);
    const end = raw.indexOf(0);
    return { status, id: Buffer.from(raw.subarray(0, end < 0 ? raw.length : end)).toString('utf8') };
  }

  /** VIRTIO_BLK_T_DISCARD of `sectors` sectors at `sector` (one segment). */
  discard(sector: number, sectors: number, queue = 0): Promise<number> {
    return this.#submit(queue, BlkRequestType.DISCARD, sector, sectors, undefined, false);
  }

  /** VIRTIO_BLK_T_WRITE_ZEROES of `sectors` sectors at `sector` (one segment), with the UNMAP flag if `unmap`. */
  writeZeroes(sector: number, sectors: number, unmap = false, queue = 0): Promise<number> {
    return this.#submit(queue, BlkRequestType.WRITE_ZEROES, sector, sectors, undefined, unmap);
  }

  /**
   * Stops watching the call eventfds and rejects every waiting or in-flight request with `VHOST_BLK_DRIVER_CLOSED`.
   * The frontend stays open (close it, then the guest RAM). Idempotent.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#removeDisconnectListener();
    for (const q of this.#queues) {
      try {
        q.fq.watchCall(undefined);
      } catch {
        // the frontend released the queue already
      }
    }
    this.#failAll(new VhostError(BlkDriverErrorCode.CLOSED, 'the blk driver is closed'));
  }

  // ---- submission ------------------------------------------------------------------------------------------------

  #tooLong(length: number): Promise<never> {
    return Promise.reject(new RangeError(`request of ${length} bytes is over maxRequestBytes (${this.maxRequestBytes})`));
  }

  #queue(index: number): QueueState {
    const q = this.#queues[index];
    if (q === undefined) throw new RangeError(`queue ${index} is not in 0..${this.#queues.length - 1}`);
    return q;
  }

  #submit(
    queue: number,
    type: number,
    sector: number,
    length: number,
    buffer: Uint8Array | undefined,
    unmap: boolean,
  ): Promise<number> {
    if (!Number.isSafeInteger(sector) || sector < 0) return Promise.reject(new RangeError(`bad sector ${sector}`));
    if (this.#error !== undefined) return Promise.reject(this.#error);
    const q = this.#queues[queue];
    if (q === undefined) return Promise.reject(new RangeError(`queue ${queue} is not in 0..${this.#queues.length - 1}`));
    return new Promise<number>((resolve, reject) => {
      this.#enqueue(q, { type, sector, length, buffer, unmap, resolve, reject, raw: undefined, token: 0 });
    });
  }

  /**
   * A read (`write` false) or write of `length` bytes at `sector` for load generators (`vhost-user bench blk`): the
   * request uses its slot's own data buffer, so nothing is copied in or out (write data is whatever the buffer holds,
   * read data stays there), and completion calls `done(status, token)` instead of settling a Promise. No allocation
   * per request while a slot is free. `length` is a multiple of 512 up to `maxRequestBytes` (a RangeError otherwise).
   * When the driver has failed, `done` is called with `RAW_FAILED` (synchronously if it had failed before).
   */
  submitRaw(queue: number, write: boolean, sector: number, length: number, token: number, done: BlkRawCallback): void {
    if (!Number.isSafeInteger(sector) || sector < 0) throw new RangeError(`bad sector ${sector}`);
    if (!Number.isInteger(length) || length < 0 || length > this.maxRequestBytes || length % SECTOR_SIZE !== 0) {
      throw new RangeError(`bad request length ${length} (a multiple of 512 up to ${this.maxRequestBytes})`);
    }
    const q = this.#queue(queue);
    if (this.#error !== undefined) {
      done(RAW_FAILED, token);
      return;
    }
    const type = write ? BlkRequestType.OUT : BlkRequestType.IN;
    if (q.free.length === 0 && !q.draining) this.#drain(q); // completions may be waiting: free their slots first
    const slotIndex = q.waiting.length > q.waitHead ? undefined : q.free.pop();
    if (slotIndex === undefined) {
      q.waiting.push({ type, sector, length, buffer: undefined, unmap: false, resolve: noop, reject: noop, raw: done, token });
      return;
    }
    const slot = q.slots[slotIndex] as Slot;
    slot.type = type;
    slot.sector = sector;
    slot.length = length;
    slot.buffer = undefined;
    slot.unmap = false;
    slot.raw = done;
    slot.token = token;
    slot.busy = true;
    this.#place(q, slot);
  }

  /**
   * The data buffer of slot `slot` of queue `queue` (what `submitRaw` writes from and reads into): a load generator
   * fills it once with its write pattern.
   */
  slotBuffer(queue: number, slot: number): Uint8Array {
    const s = this.#queue(queue).slots[slot];
    if (s === undefined) throw new RangeError(`slot ${slot} is not in 0..${this.slotsPerQueue - 1}`);
    return s.data;
  }

  /** Why the driver stopped accepting requests (disconnect, broken ring, `close()`), or undefined while it works. */
  get error(): Error | undefined {
    return this.#error;
  }

  /** Puts a request into a free slot, or at the end of the waiting list. */
  #enqueue(q: QueueState, r: RequestFields): void {
    if (q.free.length === 0 && !q.draining) this.#drain(q); // completions may be waiting: free their slots first
    const slotIndex = q.waiting.length > q.waitHead ? undefined : q.free.pop();
    if (slotIndex === undefined) {
      q.waiting.push(r);
      return;
    }
    this.#fill(q.slots[slotIndex] as Slot, r);
    this.#place(q, q.slots[slotIndex] as Slot);
  }

  #fill(slot: Slot, r: RequestFields): void {
    slot.type = r.type;
    slot.sector = r.sector;
    slot.length = r.length;
    slot.buffer = r.buffer;
    slot.unmap = r.unmap;
    slot.resolve = r.resolve;
    slot.reject = r.reject;
    slot.raw = r.raw;
    slot.token = r.token;
    slot.busy = true;
  }

  /** Writes the request of `slot` into guest memory, adds and publishes its chain (the kick is the flush's). */
  #place(q: QueueState, slot: Slot): void {
    const h = slot.header;
    h.setUint32(0, slot.type, true);
    h.setUint32(4, 0, true);
    h.setUint32(8, slot.sector % 0x1_0000_0000, true);
    h.setUint32(12, Math.floor(slot.sector / 0x1_0000_0000), true);
    slot.status[0] = 0xff; // not a valid status: shows a device that completed without writing one
    let segments: MutableSegment[] = slot.three;
    const data = slot.dataSeg;
    switch (slot.type) {
      case BlkRequestType.IN:
      case BlkRequestType.GET_ID:
        data.len = slot.length;
        data.writable = true;
        if (slot.length === 0) segments = slot.two;
        break;
      case BlkRequestType.OUT:
        data.len = slot.length;
        data.writable = false;
        if (slot.buffer !== undefined) slot.data.set(slot.buffer);
        if (slot.length === 0) segments = slot.two;
        break;
      case BlkRequestType.DISCARD:
      case BlkRequestType.WRITE_ZEROES: {
        const v = slot.segment;
        v.setUint32(0, slot.sector % 0x1_0000_0000, true);
        v.setUint32(4, Math.floor(slot.sector / 0x1_0000_0000), true);
        v.setUint32(8, slot.length, true);
        v.setUint32(12, slot.unmap ? WRITE_ZEROES_FLAG_UNMAP : 0, true);
        h.setUint32(8, 0, true); // the sector is in the segment; the header's is reserved
        h.setUint32(12, 0, true);
        data.len = DISCARD_SEGMENT_SIZE;
        data.writable = false;
        break;
      }
      default:
        segments = slot.two;
    }
    const head = q.driver.addChain(segments, slot.index, slot.chainOptions);
    if (head < 0) {
      // Cannot happen: slots are bounded by the ring's descriptors.
      const { reject, raw, token } = slot;
      this.#release(q, slot);
      if (raw !== undefined) raw(RAW_FAILED, token);
      else reject(new VhostError(BlkDriverErrorCode.BROKEN, `queue ${q.index} ran out of descriptors`));
      return;
    }
    // Published at once (one store of avail.idx), as Linux' virtqueue_add does, so a backend that is awake can start
    // on it while the rest of the burst is built; the kick, if the ring asks for one, is left to the end of the
    // burst (blk-mq's "last request of the batch").
    q.driver.publish();
    q.dirty = true;
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      queueMicrotask(this.#flushDirty);
    }
  }

  /** Publishes the chains added in this burst and kicks where the ring asks for it. */
  #flushAll(): void {
    this.#flushScheduled = false;
    if (this.#error !== undefined) return;
    for (const q of this.#queues) {
      if (!q.dirty) continue;
      q.dirty = false;
      q.fq.publishAndKick();
    }
  }

  // ---- completion ------------------------------------------------------------------------------------------------

  /**
   * Consumes the used ring until it is empty, and only then re-arms the notification (with EVENT_IDX: used_event),
   * looping if more completed meanwhile: while completions keep coming the backend has no reason to signal. After
   * `DRAIN_BUDGET` completions it yields to the event loop and continues from `setImmediate` (the notification is
   * not armed in between, so the backend does not signal for what it publishes meanwhile).
   */
  #drain(q: QueueState): void {
    if (this.#error !== undefined || q.draining) return;
    q.draining = true;
    let budget = DRAIN_BUDGET;
    try {
      for (;;) {
        const n = q.driver.pollUsed(q.onUsed);
        if (n > 0) {
          budget -= n;
          if (budget > 0) continue;
          setImmediate(q.redrain);
          break;
        }
        // enableInterrupts stores used_event (or clears NO_INTERRUPT) and says whether more completed meanwhile.
        if (!q.driver.enableInterrupts()) break;
      }
    } catch (err) {
      this.#failAll(new VhostError(BlkDriverErrorCode.BROKEN, `queue ${q.index}: bad used ring`, { cause: err }));
    } finally {
      q.draining = false;
    }
  }

  #complete(q: QueueState, slotIndex: number, _len: number): void {
    const slot = q.slots[slotIndex];
    if (slot === undefined) return;
    const status = slot.status[0] as number;
    const raw = slot.raw;
    if (raw !== undefined) {
      const token = slot.token;
      this.#release(q, slot);
      raw(status, token);
    } else {
      const buffer = slot.buffer;
      if (buffer !== undefined && (slot.type === BlkRequestType.IN || slot.type === BlkRequestType.GET_ID)) {
        if (status === BlkStatus.OK) buffer.set(slot.data.subarray(0, slot.length));
      }
      const resolve = slot.resolve;
      this.#release(q, slot);
      resolve(status);
    }
    if (q.waitHead < q.waiting.length) this.#startWaiting(q);
  }

  #release(q: QueueState, slot: Slot): void {
    slot.buffer = undefined;
    slot.resolve = noop;
    slot.reject = noop;
    slot.raw = undefined;
    slot.busy = false;
    q.free.push(slot.index);
  }

  /** Moves waiting requests into free slots. */
  #startWaiting(q: QueueState): void {
    while (q.waitHead < q.waiting.length && q.free.length > 0) {
      const w = q.waiting[q.waitHead] as RequestFields;
      q.waiting[q.waitHead] = undefined as unknown as RequestFields;
      q.waitHead++;
      const slot = q.slots[q.free.pop() as number] as Slot;
      this.#fill(slot, w);
      this.#place(q, slot);
    }
    if (q.waitHead === q.waiting.length) {
      q.waiting.length = 0;
      q.waitHead = 0;
    }
  }

  /** Rejects everything waiting or in flight; the driver accepts no more requests. */
  #failAll(err: Error): void {
    if (this.#error !== undefined) return;
    this.#error = err;
    for (const q of this.#queues) {
      for (const slot of q.slots) {
        if (!slot.busy) continue;
        const { reject, raw, token } = slot;
        slot.buffer = undefined;
        slot.resolve = noop;
        slot.reject = noop;
        slot.raw = undefined;
        slot.busy = false;
        if (raw !== undefined) raw(RAW_FAILED, token);
        else reject(err);
      }
      for (let i = q.waitHead; i < q.waiting.length; i++) {
        const w = q.waiting[i] as RequestFields;
        if (w.raw !== undefined) w.raw(RAW_FAILED, w.token);
        else w.reject(err);
      }
      q.waiting.length = 0;
      q.waitHead = 0;
    }
  }
}
