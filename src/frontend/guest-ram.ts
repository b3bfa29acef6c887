/**
 * Guest RAM owned by the frontend (the VMM side): memfds mapped into this process, described to a backend as
 * vhost-user memory regions.
 *
 * Each region has a guest-physical address (GPA), a size, a file (a memfd this object created) with an offset in it,
 * and a fake but distinct "userspace address" (UVA), the address QEMU would send: its own virtual address of the
 * region. Regions of one file get UVAs at the same distance as their file offsets, as when QEMU maps one memfd
 * once and describes parts of it (`-m 3G` on x86: [0, 2G) and [4G, 5G) of guest memory from one memfd, the second
 * at mmap offset 2G).
 *
 * A simple bump allocator hands out guest memory for rings and request buffers; allocations are never freed one by
 * one (they live as long as the RAM, or until `resetAllocator`). Regions can be added and removed later (memory
 * hot-plug); removing a region revokes its mapping here, so it must have been removed from the backend first.
 */
import { VhostError, VirtioError } from '../errors.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import { MemoryTable } from '../memory/memory-table.js';
import type { MappedRegion } from '../memory/region.js';
import * as native from '../native/index.js';
import type { MemoryRegion } from '../protocol/payloads.js';

/** Where the fake userspace addresses start (a typical x86-64 mmap area). */
export const UVA_BASE = 0x7f00_0000_0000;
/** Distance between the UVA ranges of two files: 64 GiB, so files of up to 64 GiB never overlap. */
const UVA_FILE_STRIDE = 0x10_0000_0000;

/** A memfd owned by a `GuestRam`. */
export interface GuestRamFile {
  /** The memfd. Owned by the `GuestRam`: closed by `close()`. */
  readonly fd: number;
  readonly size: number;
  readonly name: string;
  /** The UVA of file offset 0. */
  readonly uvaBase: number;
}

/** One region of guest RAM. */
export interface GuestRamRegion {
  readonly gpa: number;
  readonly size: number;
  /** The fake frontend virtual address of the region's first byte. */
  readonly uva: number;
  /** Offset of the region in its file (vhost-user `mmap_offset`). */
  readonly fileOffset: number;
  readonly file: GuestRamFile;
  /** The mapping of exactly this region. */
  readonly buffer: SharedArrayBuffer;
  /** A view of the whole region. */
  readonly bytes: Uint8Array;
}

/** Options of `GuestRam.addRegion`. */
export interface AddRegionOptions {
  readonly gpa: number;
  readonly size: number;
  /** The file to map from (default: a new memfd of exactly `size` bytes). */
  readonly file?: GuestRamFile;
  /** Offset in `file` (default 0); page-aligned. */
  readonly fileOffset?: number;
  /** Override the UVA (default: `file.uvaBase + fileOffset`). */
  readonly uva?: number;
}

/** Options of `GuestRam.alloc`. */
export interface AllocOptions {
  /** Alignment, a power of two (default 64). */
  readonly align?: number;
  /** Allocate in the region that holds this GPA (default: the first region, by GPA, with room). */
  readonly region?: number | GuestRamRegion;
}

interface RegionState {
  readonly region: GuestRamRegion;
  readonly mapped: MappedRegion;
  /** Next free byte, relative to the region's start. */
  cursor: number;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

function checkPageMultiple(value: number, what: string): void {
  if (!Number.isSafeInteger(value) || value < 0 || value % native.PAGE_SIZE !== 0) {
    throw new RangeError(`${what} must be a non-negative multiple of the page size (${native.PAGE_SIZE}): ${value}`);
  }
}

/** Guest memory made of memfds mapped into this process. Implements `GuestMemory` (GPA lookups). */
export class GuestRam implements GuestMemory {
  /** One region of `size` bytes at `gpa` (default 0) in a new memfd. */
  static create(size: number, options: { readonly gpa?: number; readonly name?: string } = {}): GuestRam {
    const ram = new GuestRam();
    try {
      const file = ram.createFile(size, options.name ?? 'guest-ram');
      ram.addRegion({ gpa: options.gpa ?? 0, size, file });
    } catch (err) {
      ram.close();
      throw err;
    }
    return ram;
  }

  /**
   * Two regions from ONE memfd, as QEMU describes `-m 3G` on x86: `lowSize` bytes at GPA 0 (file offset 0), then
   * `highSize` bytes at `highGpa` (default 4 GiB) at file offset `lowSize`. Sizes can be small in tests.
   */
  static split(options: { readonly lowSize: number; readonly highSize: number; readonly highGpa?: number }): GuestRam {
    const { lowSize, highSize } = options;
    const highGpa = options.highGpa ?? 0x1_0000_0000;
    const ram = new GuestRam();
    try {
      const file = ram.createFile(lowSize + highSize, 'guest-ram');
      ram.addRegion({ gpa: 0, size: lowSize, file, fileOffset: 0 });
      ram.addRegion({ gpa: highGpa, size: highSize, file, fileOffset: lowSize });
    } catch (err) {
      ram.close();
      throw err;
    }
    return ram;
  }

  readonly #files: GuestRamFile[] = [];
  /** Files `addRegion` created for one region: closed when that region is removed. */
  readonly #implicitFiles = new Set<GuestRamFile>();
  #states: RegionState[] = [];
  #table: MemoryTable = MemoryTable.EMPTY;
  #nextFile = 0;
  #closed = false;

  /** The regions, sorted by GPA. */
  get regions(): readonly GuestRamRegion[] {
    return this.#states.map((s) => s.region);
  }

  /** The files (memfds) this RAM owns. */
  get files(): readonly GuestRamFile[] {
    return this.#files;
  }

  /** Total size of all regions in bytes. */
  get size(): number {
    let total = 0;
    for (const s of this.#states) total += s.region.size;
    return total;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Creates a memfd of `size` bytes (page multiple) owned by this RAM; map parts of it with `addRegion`. The memfd
   * is sealed against shrinking and growing, as QEMU seals its memfd backends (seal=on): a backend that maps it can
   * rely on its size (shrinking mapped memory makes the mapper's next access SIGBUS). `seal: false` leaves it
   * unsealed (still sealable), for tests of frontends that do not seal.
   */
  createFile(size: number, name = 'guest-ram', options: { readonly seal?: boolean } = {}): GuestRamFile {
    this.#checkOpen();
    checkPageMultiple(size, 'file size');
    if (size === 0) throw new RangeError('file size must not be 0');
    if (size > UVA_FILE_STRIDE) throw new RangeError(`file size ${size} is over ${UVA_FILE_STRIDE}`);
    const fd = native.memfdCreate(name, size);
    if (options.seal ?? true) {
      try {
        native.addSeals(fd, native.F_SEAL_SHRINK | native.F_SEAL_GROW);
      } catch (err) {
        native.close(fd);
        throw err;
      }
    }
    const file: GuestRamFile = { fd, size, name, uvaBase: UVA_BASE + UVA_FILE_STRIDE * this.#nextFile++ };
    this.#files.push(file);
    return file;
  }

  /** Maps a new region (hot-add: tell the backend with `VhostUserFrontend.addMemoryRegion` afterwards). */
  addRegion(options: AddRegionOptions): GuestRamRegion {
    this.#checkOpen();
    const { gpa, size } = options;
    checkPageMultiple(gpa, 'region GPA');
    checkPageMultiple(size, 'region size');
    if (size === 0) throw new RangeError('region size must not be 0');
    const fileOffset = options.fileOffset ?? 0;
    checkPageMultiple(fileOffset, 'region file offset');
    let created: GuestRamFile | undefined;
    const file = options.file ?? (created = this.createFile(size));
    if (!this.#files.includes(file)) throw new RangeError('the file does not belong to this GuestRam');
    if (created !== undefined) this.#implicitFiles.add(created);
    if (fileOffset + size > file.size) {
      throw new RangeError(`region [${fileOffset}, +${size}) does not fit its ${file.size}-byte file`);
    }
    const uva = options.uva ?? file.uvaBase + fileOffset;
    try {
      const buffer = native.mapShared(file.fd, fileOffset, size, true);
      const stat = native.fstat(file.fd);
      const mapped: MappedRegion = {
        gpa,
        size,
        uva,
        fileOffset,
        buffer,
        bufferOffset: 0,
        slot: 0,
        dev: stat.dev,
        ino: stat.ino,
      };
      let table: MemoryTable;
      try {
        table = this.#table.with([mapped]); // checks GPA and UVA overlaps
      } catch (err) {
        native.revoke(buffer);
        throw err;
      }
      const region: GuestRamRegion = { gpa, size, uva, fileOffset, file, buffer, bytes: new Uint8Array(buffer) };
      this.#table = table;
      this.#states = [...this.#states, { region, mapped, cursor: 0 }].sort((a, b) => a.region.gpa - b.region.gpa);
      return region;
    } catch (err) {
      if (created !== undefined) this.#releaseFile(created);
      throw err;
    }
  }

  /**
   * Unmaps a region (hot-remove: remove it from the backend first, with `VhostUserFrontend.removeMemoryRegion`).
   * Stale views of it read zeros afterwards. A memfd that `addRegion` created for it is closed; files made with
   * `createFile` stay open (a region can be plugged again from them) until `close()`.
   */
  removeRegion(region: GuestRamRegion | number): void {
    this.#checkOpen();
    const gpa = typeof region === 'number' ? region : region.gpa;
    const state = this.#states.find((s) => s.region.gpa === gpa);
    if (state === undefined) throw new RangeError(`no region at GPA 0x${gpa.toString(16)}`);
    this.#table = this.#table.with([], [state.mapped]);
    this.#states = this.#states.filter((s) => s !== state);
    native.revoke(state.region.buffer);
    const file = state.region.file;
    if (this.#implicitFiles.has(file)) this.#releaseFile(file);
  }

  /** The region holding `gpa`, or undefined. */
  findRegion(gpa: number): GuestRamRegion | undefined {
    for (const s of this.#states) if (gpa >= s.region.gpa && gpa < s.region.gpa + s.region.size) return s.region;
    return undefined;
  }

  /** `GuestMemory.view`: at most `len` bytes at `gpa`, shorter where the region ends. */
  view(gpa: number, len: number): Uint8Array {
    return this.#table.view(gpa, len);
  }

  /** Exactly `len` bytes at `gpa`, which must lie inside one region (`GUEST_MEMORY_UNMAPPED` otherwise). */
  bytes(gpa: number, len: number): Uint8Array {
    const v = this.#table.view(gpa, len);
    if (v.length !== len) {
      throw new VirtioError('GUEST_MEMORY_UNMAPPED', `[0x${gpa.toString(16)}, +${len}) is not inside one region`);
    }
    return v;
  }

  /** The UVA of `gpa` (what ring addresses are sent as). */
  gpaToUva(gpa: number): number {
    const r = this.findRegion(gpa);
    if (r === undefined) throw new VirtioError('GUEST_MEMORY_UNMAPPED', `guest address 0x${gpa.toString(16)} is not mapped`);
    return r.uva + (gpa - r.gpa);
  }

  /** The GPA of a UVA range that lies inside one region. */
  uvaToGpa(uva: number, len = 1): number {
    return this.#table.uvaToGpa(uva, len);
  }

  /**
   * Allocates `size` bytes (zeroed) inside one region and returns their GPA. Throws `VHOST_GUEST_RAM_FULL` when no
   * region (or not the requested one) has room.
   */
  alloc(size: number, options: AllocOptions = {}): number {
    this.#checkOpen();
    const align = options.align ?? 64;
    if (!isPowerOfTwo(align)) throw new RangeError(`alignment must be a power of two: ${align}`);
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`bad allocation size ${size}`);
    let candidates = this.#states;
    if (options.region !== undefined) {
      const gpa = typeof options.region === 'number' ? options.region : options.region.gpa;
      candidates = this.#states.filter((s) => gpa >= s.region.gpa && gpa < s.region.gpa + s.region.size);
      if (candidates.length === 0) throw new RangeError(`no region holds GPA 0x${gpa.toString(16)}`);
    }
    for (const s of candidates) {
      // Align the GPA (the region's GPA is page-aligned, so aligning the offset is the same for align <= page).
      const start = Math.ceil((s.region.gpa + s.cursor) / align) * align - s.region.gpa;
      if (start + size <= s.region.size) {
        s.cursor = start + size;
        const gpa = s.region.gpa + start;
        s.region.bytes.fill(0, start, start + size);
        return gpa;
      }
    }
    throw new VhostError('VHOST_GUEST_RAM_FULL', `no room for ${size} bytes (align ${align}) in guest RAM`);
  }

  /** Bytes still free for `alloc` in the region holding `gpa` (or in all regions). */
  free(region?: number | GuestRamRegion): number {
    let total = 0;
    for (const s of this.#states) {
      if (region !== undefined) {
        const gpa = typeof region === 'number' ? region : region.gpa;
        if (gpa < s.region.gpa || gpa >= s.region.gpa + s.region.size) continue;
      }
      total += s.region.size - s.cursor;
    }
    return total;
  }

  /** Forgets every allocation (the memory is kept): only when nothing uses allocated memory any more. */
  resetAllocator(): void {
    for (const s of this.#states) s.cursor = 0;
  }

  /** The vhost-user description of a region (SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG payloads). */
  describe(region: GuestRamRegion): MemoryRegion {
    return {
      guestPhysAddr: BigInt(region.gpa),
      memorySize: BigInt(region.size),
      userspaceAddr: BigInt(region.uva),
      mmapOffset: BigInt(region.fileOffset),
    };
  }

  /** Revokes every mapping (stale views read zeros; they are unmapped once garbage) and closes every memfd. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const s of this.#states) {
      try {
        native.revoke(s.region.buffer);
      } catch {
        // already revoked
      }
    }
    this.#states = [];
    this.#table = MemoryTable.EMPTY;
    this.#implicitFiles.clear();
    for (const file of this.#files.splice(0)) native.close(file.fd);
  }

  #releaseFile(file: GuestRamFile): void {
    const i = this.#files.indexOf(file);
    if (i < 0) return;
    this.#files.splice(i, 1);
    this.#implicitFiles.delete(file);
    native.close(file.fd);
  }

  #checkOpen(): void {
    if (this.#closed) throw new VhostError('VHOST_GUEST_RAM_CLOSED', 'the guest RAM is closed');
  }
}
