/**
 * The guest's memory map: an immutable, sorted set of mapped regions with guest-physical (GPA) and frontend
 * virtual (UVA) lookups. A change of the map builds a new table; readers keep using the table they hold until they
 * are told to swap (see backend/ for how that is synchronized with worker threads).
 */
import { ProtocolError, VirtioError } from '../errors.js';
import type { GuestMemory } from './guest-memory.js';
import type { MappedRegion } from './region.js';

export class MemoryTable implements GuestMemory {
  /** Sorted by gpa; no two overlap in GPA or UVA space. */
  readonly regions: readonly MappedRegion[];
  #last = 0; // index of the last region hit: consecutive accesses are usually in the same region

  static readonly EMPTY = new MemoryTable([]);

  constructor(regions: readonly MappedRegion[]) {
    const sorted = [...regions].sort((a, b) => a.gpa - b.gpa);
    for (let i = 1; i < sorted.length; i++) {
      const prev = sorted[i - 1] as MappedRegion;
      const cur = sorted[i] as MappedRegion;
      if (prev.gpa + prev.size > cur.gpa) {
        throw new ProtocolError(
          'VHOST_PROTOCOL_BAD_REGION',
          `regions overlap in guest memory at 0x${cur.gpa.toString(16)}`,
        );
      }
    }
    const byUva = [...sorted].sort((a, b) => a.uva - b.uva);
    for (let i = 1; i < byUva.length; i++) {
      const prev = byUva[i - 1] as MappedRegion;
      const cur = byUva[i] as MappedRegion;
      if (prev.uva + prev.size > cur.uva) {
        throw new ProtocolError(
          'VHOST_PROTOCOL_BAD_REGION',
          `regions overlap in frontend address space at 0x${cur.uva.toString(16)}`,
        );
      }
    }
    this.regions = sorted;
  }

  /** One past the highest guest-physical address of the table (0 when empty). */
  get end(): number {
    const last = this.regions[this.regions.length - 1];
    return last === undefined ? 0 : last.gpa + last.size;
  }

  /** The region holding `gpa`, or undefined. */
  findRegion(gpa: number): MappedRegion | undefined {
    const regions = this.regions;
    const hit = regions[this.#last];
    if (hit !== undefined && gpa >= hit.gpa && gpa < hit.gpa + hit.size) return hit;
    let lo = 0;
    let hi = regions.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const r = regions[mid] as MappedRegion;
      if (gpa < r.gpa) hi = mid - 1;
      else if (gpa >= r.gpa + r.size) lo = mid + 1;
      else {
        this.#last = mid;
        return r;
      }
    }
    return undefined;
  }

  view(gpa: number, len: number): Uint8Array {
    const r = this.findRegion(gpa);
    if (r === undefined) {
      // An empty access right at a region's end is allowed (a zero-length buffer after the last byte).
      if (len === 0 && this.regions.some((x) => x.gpa + x.size === gpa)) return new Uint8Array(0);
      throw new VirtioError('GUEST_MEMORY_UNMAPPED', `guest address 0x${gpa.toString(16)} is not mapped`);
    }
    const offset = gpa - r.gpa;
    const n = Math.min(len, r.size - offset);
    return new Uint8Array(r.buffer, r.bufferOffset + offset, n);
  }

  /**
   * Translates a frontend virtual address range (how vhost-user gives ring addresses) to a guest-physical address.
   * The whole range must lie in one region. Throws `VHOST_PROTOCOL_BAD_RING_ADDRESS` otherwise.
   */
  uvaToGpa(uva: number, len: number): number {
    for (const r of this.regions) {
      if (uva >= r.uva && uva < r.uva + r.size) {
        if (uva + len > r.uva + r.size) break;
        return r.gpa + (uva - r.uva);
      }
    }
    throw new ProtocolError(
      'VHOST_PROTOCOL_BAD_RING_ADDRESS',
      `frontend address 0x${uva.toString(16)} (+${len}) is not inside one memory region`,
    );
  }

  /** A new table with `added` regions and without `removed` ones. */
  with(added: readonly MappedRegion[], removed: readonly MappedRegion[] = []): MemoryTable {
    return new MemoryTable([...this.regions.filter((r) => !removed.includes(r)), ...added]);
  }
}
