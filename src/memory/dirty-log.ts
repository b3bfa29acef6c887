/**
 * The dirty-page log of live migration (vhost-user spec "Migration", VHOST_F_LOG_ALL + LOG_SHMFD): a bitmap the
 * frontend shares with SET_LOG_BASE, one bit per 4 KiB guest-physical page (page p: byte p / 8, bit p % 8). The
 * backend sets the bit of every page it writes while logging is on; the frontend (QEMU's migration thread) takes and
 * clears the bitmap concurrently, 64 bits at a time (`qatomic_xchg`), and sends those pages again.
 *
 * Memory ordering: a bit is set with `Atomics.or` *after* the data it stands for was written (every caller's
 * duty). The OR is sequentially consistent, so the data stores before it are visible to a frontend whose exchange
 * reads the bit. Setting the bit first could lose the page: the frontend could clear the bit and copy the page
 * between our bit and our data. On x86 byte and 64-bit atomics on the same memory are coherent, so our byte ORs and
 * QEMU's word exchanges do not lose each other's updates.
 *
 * A page past the end of the log is not marked: SET_LOG_BASE checks that the log covers the memory table, so only
 * addresses the frontend gave outside guest memory (a used ring's `log_guest_addr`) land there.
 */
import { VhostError } from '../errors.js';
import { LOG_PAGE_SIZE } from '../protocol/constants.js';

/** Guest bytes one byte of the log covers. */
export const LOG_BYTE_SPAN = LOG_PAGE_SIZE * 8;

/** The log size (bytes) that covers guest-physical addresses [0, end). */
export function logBytesFor(end: number): number {
  return Math.ceil(end / LOG_BYTE_SPAN);
}

export class DirtyLog {
  /** The bitmap (a view of the frontend's shared memory). */
  readonly bits: Uint8Array;

  /** A log of `size` bytes at `offset` in `buffer`. */
  constructor(buffer: SharedArrayBuffer, offset: number, size: number) {
    if (!Number.isInteger(size) || size < 1 || !Number.isInteger(offset) || offset < 0 || offset + size > buffer.byteLength) {
      throw new VhostError('VHOST_BAD_OPTION', `a dirty log of ${size} bytes at ${offset} does not fit its buffer of ${buffer.byteLength}`);
    }
    this.bits = new Uint8Array(buffer, offset, size);
  }

  /** Marks every page of guest-physical range [gpa, gpa + len) dirty (after the caller wrote it). */
  mark(gpa: number, len: number): void {
    if (len <= 0) return;
    let page = Math.floor(gpa / LOG_PAGE_SIZE);
    const last = Math.floor((gpa + len - 1) / LOG_PAGE_SIZE);
    const bits = this.bits;
    while (page <= last) {
      const byte = Math.floor(page / 8);
      if (byte >= bits.length) return;
      const first = page % 8;
      const end = Math.min(8, first + last - page + 1); // bits [first, end) of this byte
      Atomics.or(bits, byte, (0xff >> (8 - (end - first))) << first);
      page += end - first;
    }
  }

  /**
   * Takes the marked pages and clears them, byte by byte with an atomic exchange (as QEMU does per 64-bit word), so
   * a bit set concurrently is either taken now or stays for the next call. Returns the page numbers in order.
   */
  takeDirty(): number[] {
    const pages: number[] = [];
    const bits = this.bits;
    for (let i = 0; i < bits.length; i++) {
      if (bits[i] === 0) continue; // a plain pre-check; the exchange below is what counts
      const b = Atomics.exchange(bits, i, 0);
      for (let bit = 0; bit < 8; bit++) if ((b & (1 << bit)) !== 0) pages.push(i * 8 + bit);
    }
    return pages;
  }
}
