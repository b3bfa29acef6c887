/**
 * An instrumented `GuestMemory` for the fuzzers: every region is its own `SharedArrayBuffer`, so an access that
 * leaves a region cannot reach another one, and either
 * - `guard: 0`: the buffer is exactly the region, so any typed-array or DataView access past its end throws a
 *   `RangeError` (which the fuzzers count as a bug: only `VirtioError`s may come out of the queue or a device), or
 * - `guard: n`: the region sits between two n-byte canaries, checked after every case (a write outside the region
 *   through a view of its buffer changes them).
 * It also records every `view` call (and any call with an address or length no caller should ever pass), can diff
 * the whole memory against a snapshot (to check that the device wrote only where the driver allowed it), and can
 * run a hook on each `view` call, which the fuzzers use to rewrite descriptors while the device is reading them.
 */
import { VirtioError } from '../../src/errors.js';
import type { GuestMemory } from '../../src/memory/guest-memory.js';

export interface GuardedRegionSpec {
  readonly gpa: number;
  /** Bytes (a multiple of 16). */
  readonly size: number;
  /** Canary bytes before and after the region in its buffer (a multiple of 16, default 0). */
  readonly guard?: number;
}

export interface GuardedRegion {
  readonly gpa: number;
  readonly size: number;
  readonly end: number;
  readonly guard: number;
  readonly buffer: SharedArrayBuffer;
  /** The region itself. */
  readonly bytes: Uint8Array;
}

/** A half-open range of guest-physical addresses. */
export interface Range {
  readonly start: number;
  readonly end: number;
}

function canary(i: number): number {
  return (0xa5 ^ Math.imul(i, 31)) & 0xff;
}

/**
 * A set of address ranges, coalesced: chains through a huge indirect table add the same few buffers thousands of
 * times, so ranges are kept by start address (the longest end wins) and merged once before lookups.
 */
export class RangeSet {
  readonly #byStart = new Map<number, number>();
  #merged: Range[] | undefined;

  add(start: number, end: number): void {
    if (end <= start) return;
    const prev = this.#byStart.get(start);
    if (prev === undefined || prev < end) this.#byStart.set(start, end);
    this.#merged = undefined;
  }

  has(gpa: number): boolean {
    const m = (this.#merged ??= this.#merge());
    let lo = 0;
    let hi = m.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const r = m[mid] as Range;
      if (gpa < r.start) hi = mid - 1;
      else if (gpa >= r.end) lo = mid + 1;
      else return true;
    }
    return false;
  }

  #merge(): Range[] {
    const sorted = [...this.#byStart].sort((a, b) => a[0] - b[0]);
    const out: { start: number; end: number }[] = [];
    for (const [start, end] of sorted) {
      const last = out.at(-1);
      if (last !== undefined && start <= last.end) last.end = Math.max(last.end, end);
      else out.push({ start, end });
    }
    return out;
  }
}

export class GuardedMemory implements GuestMemory {
  readonly regions: readonly GuardedRegion[];
  /** `view` calls so far. */
  viewCalls = 0;
  /** Calls that no correct caller makes (address or length not a non-negative safe integer). */
  readonly violations: string[] = [];
  /** Called before each `view` answers (after the call is counted): may rewrite guest memory. */
  onView: ((gpa: number, len: number, call: number) => void) | undefined;

  constructor(specs: readonly GuardedRegionSpec[]) {
    this.regions = specs
      .map((s) => {
        const guard = s.guard ?? 0;
        if (s.size % 16 !== 0 || guard % 16 !== 0) throw new RangeError('sizes and guards are multiples of 16');
        const buffer = new SharedArrayBuffer(guard + s.size + guard);
        return { gpa: s.gpa, size: s.size, end: s.gpa + s.size, guard, buffer, bytes: new Uint8Array(buffer, guard, s.size) };
      })
      .sort((a, b) => a.gpa - b.gpa);
    for (let i = 1; i < this.regions.length; i++) {
      const prev = this.regions[i - 1] as GuardedRegion;
      if (prev.end > (this.regions[i] as GuardedRegion).gpa) throw new RangeError('regions overlap');
    }
    this.resetGuards();
  }

  view(gpa: number, len: number): Uint8Array {
    const call = ++this.viewCalls;
    if (!Number.isSafeInteger(gpa) || gpa < 0 || !Number.isSafeInteger(len) || len < 0) {
      this.violations.push(`view(${gpa}, ${len}): not a non-negative safe integer range`);
      throw new VirtioError('GUEST_MEMORY_UNMAPPED', `bad range ${gpa}+${len}`);
    }
    this.onView?.(gpa, len, call);
    for (const r of this.regions) {
      if (gpa >= r.gpa && gpa < r.end) {
        const off = gpa - r.gpa;
        return r.bytes.subarray(off, off + Math.min(len, r.size - off));
      }
    }
    if (len === 0) {
      for (const r of this.regions) if (gpa === r.end) return r.bytes.subarray(r.size, r.size);
    }
    throw new VirtioError('GUEST_MEMORY_UNMAPPED', `guest address 0x${gpa.toString(16)} is not mapped`);
  }

  /** The region holding `gpa`. */
  regionOf(gpa: number): GuardedRegion | undefined {
    return this.regions.find((r) => gpa >= r.gpa && gpa < r.end);
  }

  /** Writes `data` at `gpa`, byte by byte through the regions; bytes that fall in holes are dropped. */
  poke(gpa: number, data: Uint8Array): void {
    for (let i = 0; i < data.length; i++) {
      const r = this.regionOf(gpa + i);
      if (r !== undefined) r.bytes[gpa + i - r.gpa] = data[i] as number;
    }
  }

  /** Reads `len` bytes at `gpa`; bytes in holes read as 0. Does not count as a view call. */
  peek(gpa: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    for (let i = 0; i < len; i++) {
      const r = this.regionOf(gpa + i);
      if (r !== undefined) out[i] = r.bytes[gpa + i - r.gpa] as number;
    }
    return out;
  }

  /** Zeroes every region and restores the canaries. */
  clear(): void {
    for (const r of this.regions) r.bytes.fill(0);
    this.resetGuards();
  }

  resetGuards(): void {
    for (const r of this.regions) {
      const all = new Uint8Array(r.buffer);
      for (let i = 0; i < r.guard; i++) {
        all[i] = canary(i);
        all[r.guard + r.size + i] = canary(i);
      }
    }
  }

  /** A description of the first damaged canary, or undefined. */
  checkGuards(): string | undefined {
    for (const r of this.regions) {
      const all = new Uint8Array(r.buffer);
      for (let i = 0; i < r.guard; i++) {
        if (all[i] !== canary(i)) return `canary ${r.guard - i} bytes before region 0x${r.gpa.toString(16)} was written`;
        if (all[r.guard + r.size + i] !== canary(i)) return `canary ${i} bytes after region 0x${r.end.toString(16)} was written`;
      }
    }
    return undefined;
  }

  /** A copy of every region. */
  snapshot(): Uint8Array[] {
    return this.regions.map((r) => r.bytes.slice());
  }

  /**
   * The first byte that differs from `before` and lies in none of `allowed`, or undefined. Compares 4 bytes at a
   * time and looks at single bytes only where a word differs.
   */
  changedOutside(before: readonly Uint8Array[], allowed: RangeSet): string | undefined {
    for (let k = 0; k < this.regions.length; k++) {
      const r = this.regions[k] as GuardedRegion;
      const old = before[k] as Uint8Array;
      const a = new Uint32Array(r.buffer, r.guard, r.size >>> 2);
      const b = new Uint32Array(old.buffer, old.byteOffset, old.length >>> 2);
      for (let w = 0; w < a.length; w++) {
        if (a[w] === b[w]) continue;
        for (let j = 4 * w; j < 4 * w + 4; j++) {
          if (r.bytes[j] === old[j]) continue;
          const gpa = r.gpa + j;
          if (!allowed.has(gpa)) {
            return `byte 0x${gpa.toString(16)} changed (0x${(old[j] ?? 0).toString(16)} -> 0x${(r.bytes[j] ?? 0).toString(16)})`;
          }
        }
      }
    }
    return undefined;
  }
}
