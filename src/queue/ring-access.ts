/**
 * Internal helpers shared by the device side (`SplitQueue`) and the driver side (`SplitQueueDriver`): resolving a
 * ring area into one contiguous view, and byte order for the `Atomics` accesses.
 *
 * Guest rings are little-endian. Plain fields are read and written with `DataView` and `littleEndian = true`.
 * `Atomics` only works on integer typed arrays, which use the host's byte order, so the 16-bit indices go through
 * `le16`, which is the identity on little-endian hosts (x86-64, arm64) and a byte swap on big-endian ones (s390x).
 */
import { VirtioError } from '../errors.js';
import type { DirtyLog } from '../memory/dirty-log.js';
import { MAX_ADDRESS, type GuestMemory } from '../memory/guest-memory.js';

/** True when typed arrays use little-endian byte order on this host. */
export const HOST_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function swap16(x: number): number {
  return ((x & 0xff) << 8) | (x >>> 8);
}
function identity16(x: number): number {
  return x;
}

/** Converts between a little-endian u16 in guest memory and the value an `Atomics` access on a `Uint16Array` sees. */
export const le16: (x: number) => number = HOST_LITTLE_ENDIAN ? identity16 : swap16;

/** 2^53: one past the last exact address (`MAX_ADDRESS + 1`). A buffer may end at, but not past, this address. */
export const ADDRESS_LIMIT = MAX_ADDRESS + 1;

/**
 * Migration: logs `count` entries of `entrySize` bytes of a ring of `ringSize` entries at guest address `base`, from
 * entry `first` on, wrapping at the ring's end (a whole ring at most): the used elements of a split ring, the used
 * descriptors of a packed one.
 */
export function logRingEntries(log: DirtyLog, base: number, entrySize: number, ringSize: number, first: number, count: number): void {
  const run = Math.min(count, ringSize - first);
  log.mark(base + entrySize * first, entrySize * run);
  if (count > run) log.mark(base, entrySize * Math.min(count - run, first));
}

/** Formats a guest address for messages. */
export function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

/**
 * Checks a ring address: a non-negative safe integer (callers pass -1 for an address `u64ToAddress` rejected) that is
 * a multiple of `align`. Throws `VIRTIO_RING_UNMAPPED` / `VIRTIO_RING_MISALIGNED`.
 */
export function checkRingAddress(gpa: number, len: number, align: number, what: string): void {
  if (!Number.isSafeInteger(gpa) || gpa < 0 || gpa > ADDRESS_LIMIT - len) {
    throw new VirtioError('VIRTIO_RING_UNMAPPED', `${what} at ${String(gpa)} (${len} bytes) is not a valid guest address`);
  }
  if (gpa % align !== 0) {
    throw new VirtioError('VIRTIO_RING_MISALIGNED', `${what} at ${hex(gpa)} is not ${align}-byte aligned`);
  }
}

/**
 * Resolves a ring area to one view of exactly `len` bytes. A ring must lie inside one memory region: the views are
 * built once and indexed directly afterwards. Throws `VIRTIO_RING_UNMAPPED` (hole or region end inside the ring) or
 * `VIRTIO_RING_MISALIGNED` (the address is not a multiple of `align`, or the view's byte offset in its buffer is not a
 * multiple of `hostAlign`, the alignment the typed arrays built over it need).
 */
export function resolveRing(
  mem: GuestMemory,
  gpa: number,
  len: number,
  align: number,
  hostAlign: number,
  what: string,
): Uint8Array {
  checkRingAddress(gpa, len, align, what);
  let v: Uint8Array;
  try {
    v = mem.view(gpa, len);
  } catch (err) {
    if (err instanceof VirtioError) {
      throw new VirtioError('VIRTIO_RING_UNMAPPED', `${what} at ${hex(gpa)} is not in guest memory`, { cause: err });
    }
    throw err;
  }
  if (v.length !== len) {
    throw new VirtioError(
      'VIRTIO_RING_UNMAPPED',
      `${what} at ${hex(gpa)} (${len} bytes) does not lie inside one memory region (${v.length} bytes mapped)`,
    );
  }
  if (v.byteOffset % hostAlign !== 0) {
    // The guest address is aligned but the host mapping of its region is not: typed arrays cannot be built.
    throw new VirtioError('VIRTIO_RING_MISALIGNED', `${what} at ${hex(gpa)} maps to a host offset not ${hostAlign}-byte aligned`);
  }
  return v;
}
