/**
 * The view of guest memory that queue and device code is given. Memory is a parameter of every queue operation
 * (as in rust-vmm's virtio-queue), so the same code runs over mmap'd regions, a test buffer or a revoked map.
 *
 * Addresses are guest-physical (GPA) JavaScript numbers. Anything at or above 2^53 cannot be exact in a number and
 * is never mapped: callers turn 64-bit wire values into numbers with `u64ToAddress`, which rejects such values.
 */
export interface GuestMemory {
  /**
   * A view of guest memory that starts at `gpa` and is at most `len` bytes long. It is shorter than `len` when the
   * region holding `gpa` ends first (the caller continues at `gpa + view.length`, which may be in the next region).
   * Throws a `VirtioError` with code `GUEST_MEMORY_UNMAPPED` when `gpa` is in no region.
   * `len` of 0 returns an empty view if `gpa` is mapped or equals a region's end.
   */
  view(gpa: number, len: number): Uint8Array;
}

/** Largest address a JavaScript number represents exactly. */
export const MAX_ADDRESS = Number.MAX_SAFE_INTEGER;

/** Combines the two 32-bit halves of a little-endian u64 address; returns -1 if it is not below 2^53. */
export function u64ToAddress(lo: number, hi: number): number {
  if (hi >= 0x200000) return -1;
  return hi * 0x1_0000_0000 + lo;
}
