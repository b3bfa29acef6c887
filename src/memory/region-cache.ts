/**
 * A hot-path shortcut into guest memory for device code: typed-array views over the whole memory region used last,
 * so that a buffer inside that region is reached with two comparisons and no allocation.
 *
 * `locate(gpa, len)` gives the offset of guest range [gpa, gpa + len) in `u8` / `dv` when the range lies inside one
 * region (which becomes the cached one), else -1: the caller then takes the general path through
 * `GuestMemory.view` (buffers that cross a region end, holes, tables that are not a `MemoryTable`, regions too
 * large for one view), which has the same results and reports the errors.
 *
 * The views belong to the memory table passed to `use`: call `use(mem)` with the table of every batch (it is a
 * no-op while the table is the same). The worker swaps tables only at quiescent points, between batches, so a
 * cached view never outlives the table it came from (docs/memory-sync.md).
 */
import type { GuestMemory } from './guest-memory.js';
import { MemoryTable } from './memory-table.js';
import type { MappedRegion } from './region.js';

/** Largest region a single `Uint8Array` view may cover (typed arrays hold at most 2^32 - 1 elements here). */
const MAX_REGION_VIEW = 0xffff_ffff;

export class RegionCache {
  /** The cached region's mapping (from its buffer's start); index with the offset `locate` returns. */
  u8: Uint8Array = new Uint8Array(0);
  /** The same bytes as `u8`, for little-endian fields. */
  dv: DataView = new DataView(this.u8.buffer);
  #mem: GuestMemory | undefined;
  #table: MemoryTable | undefined;
  // [#start, #end) is the cached region's guest range; `gpa - #delta` the offset of a guest address in u8 / dv.
  #start = 0;
  #end = 0;
  #delta = 0;

  /** Uses memory table `mem` from now on (the cache belonged to the previous one). */
  use(mem: GuestMemory): void {
    if (mem === this.#mem) return;
    this.#mem = mem;
    this.#table = mem instanceof MemoryTable ? mem : undefined;
    this.#forget();
  }

  /** The offset of [gpa, gpa + len) in `u8` / `dv` when it lies inside one region, else -1. */
  locate(gpa: number, len: number): number {
    if (gpa >= this.#start && gpa + len <= this.#end) return gpa - this.#delta;
    const table = this.#table;
    if (table === undefined) return -1;
    const r = table.findRegion(gpa);
    if (r === undefined || gpa + len > r.gpa + r.size || !this.#cache(r)) return -1;
    return gpa - this.#delta;
  }

  #forget(): void {
    this.#start = 0;
    this.#end = 0;
    this.#delta = 0;
    this.u8 = new Uint8Array(0);
    this.dv = new DataView(this.u8.buffer);
  }

  #cache(r: MappedRegion): boolean {
    const bytes = r.bufferOffset + r.size;
    if (bytes > MAX_REGION_VIEW || bytes > r.buffer.byteLength) {
      this.#forget();
      return false;
    }
    this.u8 = new Uint8Array(r.buffer, 0, bytes);
    this.dv = new DataView(r.buffer, 0, bytes);
    this.#start = r.gpa;
    this.#end = r.gpa + r.size;
    this.#delta = r.gpa - r.bufferOffset;
    return true;
  }
}
