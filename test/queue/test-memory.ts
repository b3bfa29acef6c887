/**
 * Test helpers: a `GuestMemory` over plain `SharedArrayBuffer`s placed at given guest-physical addresses, and a
 * ready-made driver/device queue pair over it.
 */
import { VirtioError } from '../../src/errors.js';
import type { GuestMemory } from '../../src/memory/guest-memory.js';
import { SplitQueue } from '../../src/queue/split-queue.js';
import { SplitQueueDriver } from '../../src/queue/split-queue-driver.js';
import type { DescriptorChain } from '../../src/queue/descriptor-chain.js';

export interface RegionSpec {
  readonly gpa: number;
  readonly size: number;
  /**
   * Byte offset of the region inside its `SharedArrayBuffer` (default 64), so code that forgets `view.byteOffset`
   * fails.
   */
  readonly hostOffset?: number;
}

interface Region {
  readonly gpa: number;
  readonly size: number;
  readonly end: number;
  readonly bytes: Uint8Array;
}

/** A `GuestMemory` over one `SharedArrayBuffer` per region. Regions must not overlap; holes between them are unmapped. */
export class TestMemory implements GuestMemory {
  readonly regions: readonly Region[];
  /** Number of `view` calls so far (tests bound the work done per operation with it). */
  viewCalls = 0;

  constructor(specs: readonly RegionSpec[]) {
    this.regions = specs
      .map((s) => {
        const hostOffset = s.hostOffset ?? 64;
        const sab = new SharedArrayBuffer(hostOffset + s.size + 64);
        return { gpa: s.gpa, size: s.size, end: s.gpa + s.size, bytes: new Uint8Array(sab, hostOffset, s.size) };
      })
      .sort((a, b) => a.gpa - b.gpa);
  }

  view(gpa: number, len: number): Uint8Array {
    this.viewCalls++;
    if (!Number.isSafeInteger(gpa) || gpa < 0 || !Number.isSafeInteger(len) || len < 0) {
      throw new VirtioError('GUEST_MEMORY_UNMAPPED', `bad range ${gpa}+${len}`);
    }
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

  /** Copies `data` to `gpa` (may cross adjacent regions). */
  write(gpa: number, data: Uint8Array | readonly number[]): void {
    const src = data instanceof Uint8Array ? data : Uint8Array.from(data);
    let done = 0;
    while (done < src.length) {
      const v = this.view(gpa + done, src.length - done);
      v.set(src.subarray(done, done + v.length));
      done += v.length;
    }
  }

  /** Copies `len` bytes at `gpa` out (may cross adjacent regions). */
  read(gpa: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    let done = 0;
    while (done < len) {
      const v = this.view(gpa + done, len - done);
      out.set(v, done);
      done += v.length;
    }
    return out;
  }
}

/**
 * The standard test memory:
 * - A: 0x0000_0000..0x0001_0000 (rings at 0x1000, buffers above 0x8000), then a hole up to 0x2_0000;
 * - B: 0x0002_0000..0x0003_0000 and C: 0x0003_0000..0x0004_0000, adjacent (a buffer may cross from B into C);
 * - a hole from 0x4_0000.
 */
export const REGION_A = 0x0;
export const HOLE_AB = 0x1_0000;
export const REGION_B = 0x2_0000;
export const REGION_C = 0x3_0000;
export const HOLE_AFTER_C = 0x4_0000;
export const RING_BASE = 0x1000;
export const BUF_BASE = 0x8000;

export function standardMemory(): TestMemory {
  return new TestMemory([
    { gpa: REGION_A, size: 0x1_0000 },
    { gpa: REGION_B, size: 0x1_0000, hostOffset: 128 },
    { gpa: REGION_C, size: 0x1_0000, hostOffset: 0 },
  ]);
}

export interface QueuePair {
  readonly mem: TestMemory;
  readonly driver: SplitQueueDriver<string>;
  readonly queue: SplitQueue;
  readonly chain: DescriptorChain;
}

export interface PairOptions {
  readonly size?: number;
  readonly eventIdx?: boolean;
  readonly indirect?: boolean;
  readonly mem?: TestMemory;
  readonly base?: number;
}

/** A driver and an attached device queue sharing rings at `RING_BASE` in `standardMemory()`. */
export function queuePair(options: PairOptions = {}): QueuePair {
  const mem = options.mem ?? standardMemory();
  const size = options.size ?? 8;
  const eventIdx = options.eventIdx ?? false;
  const layout = SplitQueueDriver.layout(size, options.base ?? RING_BASE);
  const driver = new SplitQueueDriver<string>(mem, { size, ...layout, eventIdx });
  const queue = new SplitQueue({ size, ...layout, eventIdx, indirect: options.indirect ?? true });
  queue.attach(mem);
  return { mem, driver, queue, chain: queue.createChain() };
}

/** Reads a chain's segments as plain objects for `deepEqual`. */
export function segmentsOf(chain: DescriptorChain): { addr: number; len: number; writable: boolean }[] {
  const out: { addr: number; len: number; writable: boolean }[] = [];
  for (let i = 0; i < chain.count; i++) {
    out.push({ addr: chain.addr[i] ?? NaN, len: chain.len[i] ?? NaN, writable: chain.writable[i] === 1 });
  }
  return out;
}

/** Calls `fn` and returns the `VirtioError` code it throws (fails if it throws anything else or nothing). */
export function codeOf(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    if (err instanceof VirtioError) return err.code;
    throw err;
  }
  throw new Error('expected a VirtioError, nothing was thrown');
}
