/**
 * Little-endian field access on `Uint8Array`s, shared by the header and payload codecs.
 *
 * The spec says "All numbers are in the machine native byte order". vhost-user peers share one host, and this
 * package supports little-endian Linux hosts only (x86_64, aarch64, riscv64), so native order is little endian.
 * Callers check bounds before reading; these helpers do not.
 *
 * @internal
 */

/** Reads the u32 at `offset`. */
export function readU32(bytes: Uint8Array, offset: number): number {
  return (
    ((bytes[offset] ?? 0) | ((bytes[offset + 1] ?? 0) << 8) | ((bytes[offset + 2] ?? 0) << 16)) +
    (bytes[offset + 3] ?? 0) * 0x100_0000
  );
}

/** Reads the u16 at `offset`. */
export function readU16(bytes: Uint8Array, offset: number): number {
  return (bytes[offset] ?? 0) | ((bytes[offset + 1] ?? 0) << 8);
}

/** Reads the u64 at `offset` as a `bigint`. */
export function readU64(bytes: Uint8Array, offset: number): bigint {
  const lo = readU32(bytes, offset);
  const hi = readU32(bytes, offset + 4);
  return hi === 0 ? BigInt(lo) : (BigInt(hi) << 32n) | BigInt(lo);
}

/** Writes u32 `value` at `offset`; `value` must already be range-checked. */
export function writeU32(bytes: Uint8Array, offset: number, value: number): void {
  bytes[offset] = value & 0xff;
  bytes[offset + 1] = (value >>> 8) & 0xff;
  bytes[offset + 2] = (value >>> 16) & 0xff;
  bytes[offset + 3] = (value >>> 24) & 0xff;
}

/** Writes u16 `value` at `offset`; `value` must already be range-checked. */
export function writeU16(bytes: Uint8Array, offset: number, value: number): void {
  bytes[offset] = value & 0xff;
  bytes[offset + 1] = (value >>> 8) & 0xff;
}

/** Writes u64 `value` at `offset`; `value` must already be range-checked. */
export function writeU64(bytes: Uint8Array, offset: number, value: bigint): void {
  writeU32(bytes, offset, Number(value & 0xffff_ffffn));
  writeU32(bytes, offset + 4, Number(value >> 32n));
}

/** Throws a `RangeError` unless `value` is an integer in [0, 2^32). For encoders: a bad value is our bug. */
export function checkU32(value: number, field: string): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff_ffff) {
    throw new RangeError(`${field} is not a u32: ${value}`);
  }
}

/** Throws a `RangeError` unless `value` is an integer in [0, 2^16). */
export function checkU16(value: number, field: string): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff) {
    throw new RangeError(`${field} is not a u16: ${value}`);
  }
}

/** Throws a `RangeError` unless `value` is in [0, 2^64). */
export function checkU64(value: bigint, field: string): void {
  if (typeof value !== 'bigint' || value < 0n || value > 0xffff_ffff_ffff_ffffn) {
    throw new RangeError(`${field} is not a u64: ${String(value)}`);
  }
}
