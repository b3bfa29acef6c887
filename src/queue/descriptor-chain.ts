/**
 * The reusable result of `SplitQueue.popChain` and byte-stream helpers over it.
 *
 * A `DescriptorChain` is a plain record of validated segments: `(addr, len, writable)` triples in chain order, with all
 * readable (device read-only) segments first. The queue does not translate buffer addresses: devices either copy
 * through `ChainReader` / `ChainWriter` (which call `GuestMemory.view` and handle buffers that cross a region end) or
 * translate the segments themselves for zero copy.
 *
 * One chain object is allocated per worker (or per queue) and refilled by every `popChain`: nothing is allocated per
 * request. Its contents stay valid until the next `popChain` into the same object.
 */
import { VirtioError } from '../errors.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import * as native from '../native/index.js';

/** A validated descriptor chain: head index plus parallel segment arrays (capacity fixed at construction). */
export class DescriptorChain {
  /** Maximum number of segments this object holds. */
  readonly capacity: number;
  /** Guest-physical address of each segment (exact: below 2^53, and `addr + len <= 2^53`). */
  readonly addr: Float64Array;
  /** Byte length of each segment. */
  readonly len: Uint32Array;
  /** 1 when the segment is device write-only, 0 when device read-only. */
  readonly writable: Uint8Array;
  /** Descriptor index of the chain head: the `id` to hand back to `SplitQueue.addUsed`. */
  head = 0;
  /** Number of segments (direct and indirect descriptors; the descriptor referring to an indirect table is not one). */
  count = 0;
  /** Number of readable segments: segments `[0, readableCount)` are readable, `[readableCount, count)` writable. */
  readableCount = 0;
  /** Sum of the lengths of the readable segments. */
  readableBytes = 0;
  /** Sum of the lengths of the writable segments (an upper bound for the used length). */
  writableBytes = 0;
  /** True when the chain went through an indirect descriptor table. */
  indirect = false;

  constructor(capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1) throw new RangeError(`chain capacity must be >= 1, got ${capacity}`);
    this.capacity = capacity;
    this.addr = new Float64Array(capacity);
    this.len = new Uint32Array(capacity);
    this.writable = new Uint8Array(capacity);
  }

  /** Empties the chain (keeps the arrays). */
  clear(): void {
    this.head = 0;
    this.count = 0;
    this.readableCount = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
    this.indirect = false;
  }

  /**
   * Appends a segment. Used by the queue, which has already validated the values and the capacity; the order rule
   * (readable before writable) is the caller's.
   */
  push(addr: number, len: number, writable: boolean): void {
    const i = this.count;
    if (i >= this.capacity) throw new RangeError(`chain capacity ${this.capacity} exceeded`);
    this.addr[i] = addr;
    this.len[i] = len;
    this.writable[i] = writable ? 1 : 0;
    this.count = i + 1;
    if (writable) {
      this.writableBytes += len;
    } else {
      this.readableCount = i + 1;
      this.readableBytes += len;
    }
  }
}

/**
 * Below this many bytes `TypedArray.set` is as fast as the addon's memmove (a call costs ~15 ns); above, set() into or
 * out of shared memory copies with relaxed atomics, byte by byte when the two sides differ mod 8, up to 15x slower.
 */
export const NATIVE_COPY_MIN = 64;

/** Copies `len` bytes from `src[srcOffset..]` to `dst[dstOffset..]` (the caller checked both ranges). */
export function copyBytes(dst: Uint8Array, dstOffset: number, src: Uint8Array, srcOffset: number, len: number): void {
  if (len >= NATIVE_COPY_MIN) native.copy(dst, dstOffset, src, srcOffset, len);
  else for (let i = 0; i < len; i++) dst[dstOffset + i] = src[srcOffset + i] as number;
}

/**
 * Up to this many bytes, `copyWords` (a JS loop of 32-bit DataView accesses, ~16 ns for 64 bytes) beats the addon's
 * memmove (~45 ns a call whatever the size); above ~128 bytes the call wins.
 */
export const WORD_COPY_MAX = 96;

/**
 * Copies `len` bytes between two DataViews (offsets relative to each view) with 32-bit loads and stores, at any
 * alignment: for short copies whose views the caller keeps (a frame header, a 64-byte frame). The caller checked
 * both ranges; plain accesses, so guest memory racing the copy gives a mix of old and new bytes, as any copy does.
 */
export function copyWords(dst: DataView, dstOffset: number, src: DataView, srcOffset: number, len: number): void {
  let i = 0;
  for (; i + 8 <= len; i += 8) {
    dst.setInt32(dstOffset + i, src.getInt32(srcOffset + i, true), true);
    dst.setInt32(dstOffset + i + 4, src.getInt32(srcOffset + i + 4, true), true);
  }
  for (; i < len; i++) dst.setUint8(dstOffset + i, src.getUint8(srcOffset + i));
}

/**
 * Copies `len` bytes of guest memory at `gpa` into `dst[dstOffset..]`, calling `mem.view` once per region crossed.
 * Throws `GUEST_MEMORY_UNMAPPED` (from `mem.view`, or here if a view comes back empty) when part of the range is in a hole.
 */
export function copyFromGuest(mem: GuestMemory, gpa: number, dst: Uint8Array, dstOffset: number, len: number): void {
  let done = 0;
  while (done < len) {
    const v = mem.view(gpa + done, len - done);
    if (v.length === 0) throw unmapped(gpa + done);
    copyBytes(dst, dstOffset + done, v, 0, v.length);
    done += v.length;
  }
}

/** Copies `len` bytes from `src[srcOffset..]` into guest memory at `gpa`, region by region (see `copyFromGuest`). */
export function copyToGuest(mem: GuestMemory, gpa: number, src: Uint8Array, srcOffset: number, len: number): void {
  let done = 0;
  while (done < len) {
    const v = mem.view(gpa + done, len - done);
    if (v.length === 0) throw unmapped(gpa + done);
    copyBytes(v, 0, src, srcOffset + done, v.length);
    done += v.length;
  }
}

function unmapped(gpa: number): VirtioError {
  return new VirtioError('GUEST_MEMORY_UNMAPPED', `guest address 0x${gpa.toString(16)} is not mapped`);
}

/**
 * Reads the readable part of a chain as a byte stream (request headers, small payloads). Reusable: `reset` it for
 * every chain.
 */
export class ChainReader {
  #mem: GuestMemory | undefined;
  #chain: DescriptorChain | undefined;
  #seg = 0;
  #off = 0;
  #remaining = 0;
  #consumed = 0;

  /** Positions the reader at the first readable byte of `chain`. */
  reset(mem: GuestMemory, chain: DescriptorChain): this {
    this.#mem = mem;
    this.#chain = chain;
    this.#seg = 0;
    this.#off = 0;
    this.#remaining = chain.readableBytes;
    this.#consumed = 0;
    return this;
  }

  /** Readable bytes not yet consumed. */
  get remaining(): number {
    return this.#remaining;
  }

  /** Bytes consumed so far (read or skipped). */
  get consumed(): number {
    return this.#consumed;
  }

  /** Copies up to `dst.length` bytes into `dst`; returns the number copied (less only at the end of the readable part). */
  read(dst: Uint8Array): number {
    return this.#advance(dst, dst.length);
  }

  /** Copies exactly `dst.length` bytes, else throws `VIRTIO_CHAIN_TOO_SHORT` (nothing is consumed in that case). */
  readExact(dst: Uint8Array): void {
    if (dst.length > this.#remaining) {
      throw new VirtioError(
        'VIRTIO_CHAIN_TOO_SHORT',
        `chain ${this.#chain?.head ?? '?'}: need ${dst.length} readable bytes, ${this.#remaining} left`,
      );
    }
    this.#advance(dst, dst.length);
  }

  /** Skips up to `n` bytes; returns the number skipped. */
  skip(n: number): number {
    return this.#advance(undefined, n);
  }

  #advance(dst: Uint8Array | undefined, want: number): number {
    const chain = this.#chain;
    const mem = this.#mem;
    if (chain === undefined || mem === undefined) throw new Error('ChainReader used before reset()');
    let n = Math.min(want, this.#remaining);
    let done = 0;
    while (n > 0) {
      const segLen = chain.len[this.#seg] ?? 0;
      const avail = segLen - this.#off;
      if (avail === 0) {
        this.#seg++;
        this.#off = 0;
        continue;
      }
      const k = Math.min(avail, n);
      if (dst !== undefined) copyFromGuest(mem, (chain.addr[this.#seg] ?? 0) + this.#off, dst, done, k);
      // State is updated per step so that a GUEST_MEMORY error leaves the position consistent.
      this.#off += k;
      this.#remaining -= k;
      this.#consumed += k;
      done += k;
      n -= k;
    }
    return done;
  }
}

/** Writes into the writable part of a chain as a byte stream (responses, status bytes). Reusable via `reset`. */
export class ChainWriter {
  #mem: GuestMemory | undefined;
  #chain: DescriptorChain | undefined;
  #seg = 0;
  #off = 0;
  #remaining = 0;
  #written = 0;

  /** Positions the writer at the first writable byte of `chain`. */
  reset(mem: GuestMemory, chain: DescriptorChain): this {
    this.#mem = mem;
    this.#chain = chain;
    this.#seg = chain.readableCount;
    this.#off = 0;
    this.#remaining = chain.writableBytes;
    this.#written = 0;
    return this;
  }

  /** Writable bytes not yet produced. */
  get remaining(): number {
    return this.#remaining;
  }

  /** Bytes produced so far (written or skipped): the value to report as the used length. */
  get written(): number {
    return this.#written;
  }

  /** Copies up to `src.length` bytes from `src`; returns the number copied. */
  write(src: Uint8Array): number {
    return this.#advance(src, src.length);
  }

  /** Copies all of `src`, else throws `VIRTIO_CHAIN_TOO_SHORT` (nothing is written in that case). */
  writeExact(src: Uint8Array): void {
    if (src.length > this.#remaining) {
      throw new VirtioError(
        'VIRTIO_CHAIN_TOO_SHORT',
        `chain ${this.#chain?.head ?? '?'}: need ${src.length} writable bytes, ${this.#remaining} left`,
      );
    }
    this.#advance(src, src.length);
  }

  /** Skips up to `n` bytes (e.g. a payload the device filled through the segments directly); returns the number skipped. */
  skip(n: number): number {
    return this.#advance(undefined, n);
  }

  #advance(src: Uint8Array | undefined, want: number): number {
    const chain = this.#chain;
    const mem = this.#mem;
    if (chain === undefined || mem === undefined) throw new Error('ChainWriter used before reset()');
    let n = Math.min(want, this.#remaining);
    let done = 0;
    while (n > 0) {
      const segLen = chain.len[this.#seg] ?? 0;
      const avail = segLen - this.#off;
      if (avail === 0) {
        this.#seg++;
        this.#off = 0;
        continue;
      }
      const k = Math.min(avail, n);
      if (src !== undefined) copyToGuest(mem, (chain.addr[this.#seg] ?? 0) + this.#off, src, done, k);
      // State is updated per step so that a GUEST_MEMORY error leaves the position consistent.
      this.#off += k;
      this.#remaining -= k;
      this.#written += k;
      done += k;
      n -= k;
    }
    return done;
  }
}
