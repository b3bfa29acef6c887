/**
 * A ring of variable-size frame records in a buffer: single producer, single consumer. The switch has one per
 * (source port, destination port) in shared memory, each end in its own thread; the loopback port has one in an
 * ordinary buffer, both ends in one thread. A record is the frame's offload fields (the virtio-net header, so that
 * a GSO frame or a partial checksum crosses unchanged) and its bytes, which may be a 64 KiB GSO frame as well as a
 * 60-byte one: fixed slots would take 64 KiB each.
 *
 * Layout of a ring: two control words (`head`, `tail`: byte positions that only grow, wrapping at 2^32, their
 * difference the bytes in use) on their own 64-byte lines, then `capacity` bytes of records. A record starts
 * RECORD_ALIGN-aligned: a 16-byte header (length i32, flags u8, gso_type u8, then hdr_len, gso_size, csum_start,
 * csum_offset as u16) then the frame, padded to RECORD_ALIGN. A record never wraps: when one does not fit before the
 * end, the producer writes a SKIP header there and starts the record at position 0.
 *
 * Memory ordering (Atomics, sequentially consistent): the producer writes the record, then stores `tail` (release);
 * the consumer loads `tail` (acquire) before it reads a record, and stores `head` once it is done with it, after
 * which the producer may overwrite those bytes (it loads `head` before it writes).
 */
import { copyBytes } from '../../../queue/descriptor-chain.js';
import type { VnetHeader } from '../offload.js';

export const RECORD_ALIGN = 64;
const RECORD_HEADER = 16;
const SKIP = -1;
/** Bytes of the control words before the records (head and tail each on a 64-byte line of its own). */
export const RING_CONTROL_BYTES = 128;

/** `FrameRing.push` results. */
export const PUSH_FULL = 0;
export const PUSH_QUEUED = 1;
export const PUSH_WAKE = 2;
export type PushResult = typeof PUSH_FULL | typeof PUSH_QUEUED | typeof PUSH_WAKE;

/** Bytes a ring of `capacity` record bytes takes in its buffer. */
export function frameRingBytes(capacity: number): number {
  return RING_CONTROL_BYTES + capacity;
}

function align(n: number): number {
  return (n + RECORD_ALIGN - 1) & ~(RECORD_ALIGN - 1);
}

export class FrameRing {
  /** Largest frame a record can hold: half the ring, so that one always fits in an empty ring. */
  readonly maxFrame: number;
  readonly #ctrl: Int32Array;
  readonly #i32: Int32Array;
  readonly #u16: Uint16Array;
  readonly #u8: Uint8Array;
  /** Offset of the records in `u8` (a record's frame starts RECORD_HEADER bytes after the record). */
  readonly #base: number;
  readonly #capacity: number;
  /** Consumer: the position of the current record and its size in the ring (0: none). */
  #current = 0;
  #currentSize = 0;
  /** Producer: its tail (the shared word lags behind until `#publish`). */
  #tail: number;

  /**
   * The ring at byte `offset` of `buffer` (`frameRingBytes(capacity)` bytes; `offset` a multiple of 64). `capacity`
   * is a power of two and a multiple of RECORD_ALIGN. A new buffer (zeros) is an empty ring.
   */
  constructor(buffer: ArrayBufferLike, offset: number, capacity: number) {
    if ((capacity & (capacity - 1)) !== 0 || capacity < 2 * RECORD_ALIGN || offset % 64 !== 0) {
      throw new RangeError(`frame ring: capacity ${capacity} must be a power of two >= ${2 * RECORD_ALIGN}, offset 64-aligned`);
    }
    this.#ctrl = new Int32Array(buffer, offset, RING_CONTROL_BYTES / 4);
    this.#base = offset + RING_CONTROL_BYTES;
    this.#capacity = capacity;
    this.#u8 = new Uint8Array(buffer);
    this.#i32 = new Int32Array(buffer, 0, Math.floor(buffer.byteLength / 4));
    this.#u16 = new Uint16Array(buffer, 0, Math.floor(buffer.byteLength / 2));
    this.maxFrame = capacity / 2 - RECORD_HEADER; // fits an empty ring wherever its positions are (with a SKIP or not)
    this.#tail = Atomics.load(this.#ctrl, 16); // a port made again over a ring in use (a reconnected device)
  }

  /** The whole buffer: the offsets `peek` returns are offsets in it. */
  get bytes(): Uint8Array {
    return this.#u8;
  }

  // ---- producer ----------------------------------------------------------------------------------------------------

  /**
   * Copies bytes [offset, offset + length) of `buf` into a record with the offload fields `hdr` and publishes it.
   * Returns PUSH_FULL when the ring has no room (or the frame is larger than maxFrame), PUSH_WAKE when the consumer
   * had taken every record before it (it may be asleep, or about to sleep, and must be woken), else PUSH_QUEUED.
   */
  push(buf: Uint8Array, offset: number, length: number, hdr: VnetHeader): PushResult {
    const from = this.#tail; // before the record (and a SKIP before it)
    const at = this.#reserve(length);
    if (at < 0) return PUSH_FULL;
    copyBytes(this.#u8, at, buf, offset, length);
    this.#publish(length, hdr);
    // Judged after the store of tail, from head, which the consumer cannot move past `from` without seeing the record.
    return Atomics.load(this.#ctrl, 0) === from ? PUSH_WAKE : PUSH_QUEUED;
  }

  /** `push` of a record made of two pieces, `first` then `second` (vsock: a packet's header and its payload). */
  pushParts(first: Uint8Array, second: Uint8Array | undefined, hdr: VnetHeader): PushResult {
    const from = this.#tail;
    const n = first.length + (second?.length ?? 0);
    const at = this.#reserve(n);
    if (at < 0) return PUSH_FULL;
    copyBytes(this.#u8, at, first, 0, first.length);
    if (second !== undefined) copyBytes(this.#u8, at + first.length, second, 0, second.length);
    this.#publish(n, hdr);
    return Atomics.load(this.#ctrl, 0) === from ? PUSH_WAKE : PUSH_QUEUED;
  }

  /** Whether a record of `length` bytes would fit now (producer side; no side effect). */
  canPush(length: number): boolean {
    if (length > this.maxFrame || length < 0) return false;
    const free = this.#capacity - ((this.#tail - Atomics.load(this.#ctrl, 0)) | 0);
    const need = align(length + RECORD_HEADER);
    const toEnd = this.#capacity - (this.#tail & (this.#capacity - 1));
    return need > toEnd ? need + toEnd <= free : need <= free;
  }

  /** Reserves a record for a frame of `length` bytes; returns the offset in `bytes` where the frame goes, or -1. */
  #reserve(length: number): number {
    if (length > this.maxFrame || length < 0) return -1;
    const head = Atomics.load(this.#ctrl, 0); // acquire: the consumer is done with everything before head
    let tail = this.#tail;
    const free = this.#capacity - ((tail - head) | 0);
    const need = align(length + RECORD_HEADER);
    let pos = tail & (this.#capacity - 1);
    const toEnd = this.#capacity - pos;
    if (need > toEnd) {
      if (need + toEnd > free) return -1;
      this.#i32[(this.#base + pos) >> 2] = SKIP; // published with the record, by the same store of tail
      tail = (tail + toEnd) | 0;
      this.#tail = tail; // made visible by `#publish`, with the record after it
      pos = 0;
    } else if (need > free) {
      return -1;
    }
    this.#i32[(this.#base + pos) >> 2] = length;
    return this.#base + pos + RECORD_HEADER;
  }

  /** Publishes the record `#reserve` made, with its offload fields. */
  #publish(length: number, hdr: VnetHeader): void {
    const tail = this.#tail;
    const at = this.#base + (tail & (this.#capacity - 1));
    const u8 = this.#u8;
    u8[at + 4] = hdr.flags;
    u8[at + 5] = hdr.gsoType;
    const h = (at + 6) >> 1;
    const u16 = this.#u16;
    u16[h] = hdr.hdrLen;
    u16[h + 1] = hdr.gsoSize;
    u16[h + 2] = hdr.csumStart;
    u16[h + 3] = hdr.csumOffset;
    // Release: the record (and a SKIP before it) is written before the consumer can see the new tail.
    this.#tail = (tail + align(length + RECORD_HEADER)) | 0;
    Atomics.store(this.#ctrl, 16, this.#tail);
  }

  // ---- consumer ----------------------------------------------------------------------------------------------------

  /** Whether a record waits (no side effect). */
  hasRecord(): boolean {
    return this.#currentSize !== 0 || Atomics.load(this.#ctrl, 16) !== Atomics.load(this.#ctrl, 0);
  }

  /**
   * Makes the oldest record current; returns its frame offset in `bytes` (its length and fields in `hdr` and the
   * return of `currentLength`), or -1 when the ring is empty. The record stays current until `release`.
   */
  peek(hdr: VnetHeader): number {
    let head = Atomics.load(this.#ctrl, 0); // only this thread stores it
    const tail = Atomics.load(this.#ctrl, 16); // acquire: the records before tail are complete
    if (head === tail) return -1;
    let at = this.#base + (head & (this.#capacity - 1));
    let length = this.#i32[at >> 2] as number;
    if (length === SKIP) {
      head = (head + this.#capacity - (head & (this.#capacity - 1))) | 0;
      Atomics.store(this.#ctrl, 0, head); // the skipped bytes are free
      if (head === tail) return -1;
      at = this.#base;
      length = this.#i32[at >> 2] as number;
    }
    const u8 = this.#u8;
    hdr.flags = u8[at + 4] as number;
    hdr.gsoType = u8[at + 5] as number;
    const h = (at + 6) >> 1;
    const u16 = this.#u16;
    hdr.hdrLen = u16[h] as number;
    hdr.gsoSize = u16[h + 1] as number;
    hdr.csumStart = u16[h + 2] as number;
    hdr.csumOffset = u16[h + 3] as number;
    this.#current = head;
    this.#currentSize = align(length + RECORD_HEADER);
    this.currentLength = length;
    return at + RECORD_HEADER;
  }

  /** Length of the frame `peek` returned. */
  currentLength = 0;

  /** Done with the current record: its bytes may be reused. */
  release(): void {
    if (this.#currentSize === 0) return;
    Atomics.store(this.#ctrl, 0, (this.#current + this.#currentSize) | 0);
    this.#currentSize = 0;
  }
}
