/**
 * One region of guest memory as the frontend describes it (vhost-user `VhostUserMemoryRegion`), mapped into this
 * process. The frontend's numbers are hostile until checked: `mapRegion` validates every field against overflow
 * and against the file's real size before anything is mapped (a mapping past the end of a file would SIGBUS).
 *
 * The file's size must also stay that way: if the frontend shrinks the file afterwards, the next access to a page
 * past its new end raises SIGBUS, which kills this whole process (every device, every frontend), and JS accesses
 * cannot be guarded against it. The kernel's answer is the seal F_SEAL_SHRINK, which makes every ftruncate() that
 * shrinks the file fail (EPERM), for every process. `mapRegion` therefore makes sure the file carries it:
 * - already sealed against shrinking (QEMU's memory-backend-memfd, seal=on by default; our GuestRam): nothing to do;
 * - a memfd that can still be sealed (created with MFD_ALLOW_SEALING, no F_SEAL_SEAL: QEMU seal=off, frontends
 *   that do not bother): the backend adds F_SEAL_SHRINK itself. Seals belong to the file, so this is visible to
 *   the frontend: it can no longer shrink that memfd, ever; growing it and punching holes (how VMMs discard guest
 *   memory) still work. Shrinking memory a backend maps is never legitimate, so this only removes the crash;
 * - a file that cannot be sealed: a memfd created without MFD_ALLOW_SEALING (DPDK's --no-huge memory, checked with
 *   DPDK 22.11: `memfd_create("nohuge", 0)`, F_GET_SEALS = F_SEAL_SEAL), a tmpfs or hugetlbfs file (QEMU's
 *   memory-backend-file share=on, the classic hugepage setup), a regular file. Refusing those would break real
 *   frontends, so they are accepted and marked `truncatable`: the residual risk is that such a frontend can crash
 *   this process by truncating its own memory. The session logs a warning for each.
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
  /**
   * True when the file could not be sealed against shrinking (see above): the frontend can still truncate it,
   * which would crash this process at the next access. Absent means false.
   */
  readonly truncatable?: boolean;
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
  const { buffer, bufferOffset, stat, truncatable } = mapFileRange(fd, fileOffset, size, 'VHOST_PROTOCOL_BAD_REGION', 'region');
  return { gpa, size, uva, fileOffset, buffer, bufferOffset, dev: stat.dev, ino: stat.ino, slot, truncatable };
}

/** A range of a file mapped by `mapFileRange`. */
export interface MappedFileRange {
  /** The mapping, from the page boundary at or below the range's file offset. */
  readonly buffer: SharedArrayBuffer;
  /** Where the range starts in `buffer`. */
  readonly bufferOffset: number;
  readonly stat: native.FileStat;
  /** The file could not be sealed against shrinking (`sealAgainstShrinking`). */
  readonly truncatable: boolean;
}

/**
 * Maps bytes [offset, offset + size) of `fd` shared and writable (guest memory, a dirty log): sealed against
 * shrinking first when the file allows it (with `mustSeal`, refused when it does not), sized second (the range must
 * lie inside the file: a frontend shrinking it in between cannot pass the check), mapped from the page boundary
 * below `offset`. Refusals are `ProtocolError`s with `code`, naming `what`. Does not take ownership of `fd`.
 */
export function mapFileRange(fd: number, offset: number, size: number, code: `VHOST_PROTOCOL_${string}`, what: string, mustSeal = false): MappedFileRange {
  let truncatable: boolean;
  let stat: native.FileStat;
  try {
    truncatable = !sealAgainstShrinking(fd);
    stat = native.fstat(fd);
  } catch (err) {
    throw new ProtocolError(code, `${what} fd is not usable`, { cause: err });
  }
  if (mustSeal && truncatable) throw new ProtocolError(code, `${what} fd is not a memfd sealed (or sealable) against shrinking`);
  if (offset + size > stat.size) {
    throw new ProtocolError(
      code,
      `${what} [0x${offset.toString(16)}, +0x${size.toString(16)}) extends past the end of its file (0x${stat.size.toString(16)} bytes)`,
    );
  }
  const aligned = offset - (offset % native.PAGE_SIZE);
  try {
    return { buffer: native.mapShared(fd, aligned, size + offset - aligned, true), bufferOffset: offset - aligned, stat, truncatable };
  } catch (err) {
    throw new ProtocolError(code, `${what} cannot be mapped`, { cause: err });
  }
}

/**
 * Makes sure the file cannot shrink (F_SEAL_SHRINK), adding the seal when the file allows it. Returns false when
 * the file cannot be sealed (see the file comment). Runs before the size check, so the size checked then holds for
 * as long as the file lives. Throws the system error of an fd that cannot be inspected at all.
 */
export function sealAgainstShrinking(fd: number): boolean {
  const seals = native.getSeals(fd);
  if (seals < 0) return false; // not a memfd, tmpfs or hugetlbfs file: no seals at all
  if ((seals & native.F_SEAL_SHRINK) !== 0) return true;
  if ((seals & native.F_SEAL_SEAL) !== 0) return false; // sealing is closed (or was never allowed)
  try {
    native.addSeals(fd, native.F_SEAL_SHRINK);
    return true;
  } catch {
    // EPERM: an fd without write access (mapping it writable fails next anyway), or F_SEAL_SEAL added meanwhile
    const now = native.getSeals(fd);
    return now >= 0 && (now & native.F_SEAL_SHRINK) !== 0;
  }
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
