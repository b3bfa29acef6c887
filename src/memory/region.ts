/**
 * One region of guest memory as the frontend describes it (vhost-user `VhostUserMemoryRegion`), mapped into this
 * process. The frontend's numbers are hostile until checked: `mapRegion` validates every field against overflow
 * and against the file's real size before anything is mapped (a mapping past the end of a file would SIGBUS).
 */
import { ProtocolError } from '../errors.js';
import * as native from '../native/index.js';
import { MAX_ADDRESS } from './guest-memory.js';

/** A region as the wire describes it, with u64 fields. */
export interface RegionDescriptor {
  guestPhysAddr: bigint;
  memorySize: bigint;
  userspaceAddr: bigint;
  mmapOffset: bigint;
}

/** A mapped region. Plain data: it can be posted to worker threads (the buffer is shared, not copied). */
export interface MappedRegion {
  /** Guest-physical address of the first byte. */
  readonly gpa: number;
  readonly size: number;
  /** The frontend's (VMM's) virtual address of the first byte: ring addresses arrive in this space. */
  readonly uva: number;
  /** Offset of the region in its file, as the frontend gave it. */
  readonly fileOffset: number;
  /** The mapping; the region starts at `bufferOffset` in it (mmap needs page-aligned file offsets). */
  readonly buffer: SharedArrayBuffer;
  readonly bufferOffset: number;
  /** Identity of the backing file, to tell "the same memory" apart from "the same numbers in a new memfd". */
  readonly dev: bigint;
  readonly ino: bigint;
  /** The memory slot (0..508): indexes the region's pin counter shared with the workers. */
  readonly slot: number;
}

function checkedNumber(value: bigint, what: string): number {
  if (value < 0n || value > BigInt(MAX_ADDRESS)) {
    throw new ProtocolError('VHOST_PROTOCOL_BAD_REGION', `${what} 0x${value.toString(16)} is out of range`);
  }
  return Number(value);
}

/**
 * Validates a region descriptor against its fd and maps it into memory slot `slot`. Does not take ownership of `fd`
 * (the caller closes it; the mapping stays valid after close).
 */
export function mapRegion(desc: RegionDescriptor, fd: number, slot = 0): MappedRegion {
  const gpa = checkedNumber(desc.guestPhysAddr, 'guest address');
  const size = checkedNumber(desc.memorySize, 'size');
  const uva = checkedNumber(desc.userspaceAddr, 'userspace address');
  const fileOffset = checkedNumber(desc.mmapOffset, 'mmap offset');
  if (size === 0) throw new ProtocolError('VHOST_PROTOCOL_BAD_REGION', 'region size is 0');
  if (gpa + size > MAX_ADDRESS || uva + size > MAX_ADDRESS || fileOffset + size > MAX_ADDRESS) {
    throw new ProtocolError('VHOST_PROTOCOL_BAD_REGION', 'region end overflows');
  }
  let stat: native.FileStat;
  try {
    stat = native.fstat(fd);
  } catch (err) {
    throw new ProtocolError('VHOST_PROTOCOL_BAD_REGION', 'region fd is not usable', { cause: err });
  }
  if (fileOffset + size > stat.size) {
    throw new ProtocolError(
      'VHOST_PROTOCOL_BAD_REGION',
      `region [0x${fileOffset.toString(16)}, +0x${size.toString(16)}) extends past the end of its file (0x${stat.size.toString(16)} bytes)`,
    );
  }
  const alignedOffset = fileOffset - (fileOffset % native.PAGE_SIZE);
  const bufferOffset = fileOffset - alignedOffset;
  let buffer: SharedArrayBuffer;
  try {
    buffer = native.mapShared(fd, alignedOffset, size + bufferOffset, true);
  } catch (err) {
    throw new ProtocolError('VHOST_PROTOCOL_BAD_REGION', 'region cannot be mapped', { cause: err });
  }
  return { gpa, size, uva, fileOffset, buffer, bufferOffset, dev: stat.dev, ino: stat.ino, slot };
}

/** True when two regions are the same memory at the same addresses (fd numbers do not matter, files do). */
export function sameRegion(a: MappedRegion, b: MappedRegion): boolean {
  return (
    a.gpa === b.gpa &&
    a.size === b.size &&
    a.uva === b.uva &&
    a.fileOffset === b.fileOffset &&
    a.dev === b.dev &&
    a.ino === b.ino
  );
}

/** True when a mapped region is exactly what `desc` describes in file `stat`. */
export function regionMatches(region: MappedRegion, desc: RegionDescriptor, stat: native.FileStat): boolean {
  return (
    BigInt(region.gpa) === desc.guestPhysAddr &&
    BigInt(region.size) === desc.memorySize &&
    BigInt(region.uva) === desc.userspaceAddr &&
    BigInt(region.fileOffset) === desc.mmapOffset &&
    region.dev === stat.dev &&
    region.ino === stat.ino
  );
}
