/**
 * The descriptor-chain fuzzer: random rings (descriptor graphs, indirect tables that are nested, misaligned, cross
 * region ends or run into holes, or have up to 65536 entries, wrapping indices, lengths near 2^32, addresses near
 * 2^53 and 2^64, rings that overlap each other or the buffers, and a driver that rewrites memory while the device
 * reads it) are served by the real device side: `SplitQueue` plus the virtio-blk queue handler over a file, in the
 * loop the queue worker runs (batches of at most BATCH_LIMIT chains, notifications suppressed, re-check).
 *
 * Invariants checked in every case:
 * - only `VirtioError`s come out of the queue or the handler (anything else is a bug: a RangeError from a typed
 *   array means an access outside a region's buffer, since each region is its own buffer);
 * - a failed pop consumes nothing and leaves the chain empty;
 * - a popped chain is exactly what an independent model (bigint arithmetic, visited sets) accepts, and satisfies the
 *   structural bounds (descriptor budget, 2^32 - 1 bytes, addresses below 2^53, readable before writable);
 * - the device writes guest memory only inside the writable buffers of the chains it completed and the used ring;
 *   canaries around the regions stay intact; no `view` call with an impossible address;
 * - the work per pop is bounded (view calls, time).
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { VirtioError } from '../../src/errors.js';
import { BlkQueueHandler } from '../../src/devices/blk/blk-queue.js';
import { BlkRequestType } from '../../src/devices/blk/constants.js';
import {
  MAX_CHAIN_BYTES,
  MAX_INDIRECT_ENTRIES,
  SplitQueue,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  availRingSize,
  descTableSize,
  usedRingSize,
  type DescriptorChain,
} from '../../src/queue/index.js';
import { SplitQueueDriver, type RawDescriptor } from '../../src/queue/split-queue-driver.js';
import { GuardedMemory, RangeSet } from './guarded-memory.js';
import { timeBoxedAssert, type FuzzReport } from './config.js';

/** The queue worker's per-queue batch limit (src/backend/queue-worker.ts BATCH_LIMIT, not exported there). */
export const WORKER_BATCH_LIMIT = 256;

export const TWO_53 = 2n ** 53n;
export const U64_MAX = 2n ** 64n - 1n;

// ---- memory layout ------------------------------------------------------------------------------------------------

/** A: rings and buffers; B and C adjacent; D large enough for a 65536-entry indirect table; holes between. */
export const A = 0x0;
export const A_END = 0x1_0000;
export const B = 0x2_0000;
export const C = 0x3_0000;
export const C_END = 0x4_0000;
export const D = 0x10_0000;
export const D_SIZE = 0x10_1000;
export const RING_BASE = 0x1000;
/** Blk request headers are pre-written here (8 slots of 0x100). */
export const HEADERS = 0x8000;

export function fuzzMemory(guard: number): GuardedMemory {
  return new GuardedMemory([
    { gpa: A, size: A_END - A, guard },
    { gpa: B, size: C - B, guard },
    { gpa: C, size: C_END - C, guard },
    { gpa: D, size: D_SIZE, guard },
  ]);
}

/** Where indirect tables go: aligned in B, across B|C, running into the hole after A, in a hole, odd, huge in D. */
export const TABLES = [B + 0x100, C - 40, A_END - 48, 0x1_8000, B + 0x801] as const;
export const HUGE_TABLE = D;

// ---- scenarios ------------------------------------------------------------------------------------------------------

type RingPlacement =
  | { kind: 'standard' }
  | { kind: 'random'; desc: number; avail: number; used: number }
  | { kind: 'fixed'; desc: number; avail: number; used: number };

interface HugeTable {
  /** linear: entry i -> i + 1 for `count` entries; loop: the last one points back; random: random next fields. */
  readonly shape: 'linear' | 'loop' | 'random';
  readonly count: number;
  readonly writableFrom: number;
  readonly seed: number;
}

interface Mutation {
  /** Applied when the memory's view counter reaches this call number (a driver racing the device). */
  readonly atCall: number;
  readonly gpa: number;
  readonly bytes: Uint8Array;
}

export interface ChainScenario {
  readonly size: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  readonly cacheViews: boolean;
  readonly tight: boolean;
  readonly ring: RingPlacement;
  readonly start: number;
  readonly usedStart: number;
  readonly descs: readonly RawDescriptor[];
  readonly tables: readonly (readonly RawDescriptor[])[];
  readonly huge: HugeTable | undefined;
  readonly headers: readonly { type: number; sectorLo: number; sectorHi: number }[];
  readonly heads: readonly number[];
  readonly availDelta: number;
  readonly availFlags: number;
  readonly usedEvent: number;
  readonly mutations: readonly Mutation[];
  /** Well-formed blk requests laid over `descs` (direct or through indirect tables); their heads lead the avail ring. */
  readonly requests: readonly RequestSpec[];
  /** Descriptors overwritten after the layout: corruption of an otherwise valid ring. */
  readonly corrupt: readonly { readonly index: number; readonly desc: RawDescriptor }[];
}

/** A blk request as a driver would lay it out (header, data in 1-3 pieces, status byte). */
export interface RequestSpec {
  readonly type: number;
  readonly sector: number;
  readonly dataLen: number;
  readonly dataAt: 'A' | 'B' | 'BC' | 'D' | 'Dend' | 'hole' | 'ring';
  readonly split: number;
  readonly indirect: boolean;
  readonly statusAt: 'A' | 'C' | 'hole' | 'ring';
}

export const lenArb: fc.Arbitrary<number> = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom(0, 1, 15, 16, 17, 20, 21, 512, 513, 528, 1024, 4096) },
  { weight: 2, arbitrary: fc.constantFrom(0x7fff_ffff, 0x8000_0000, 0xffff_fff0, 0xffff_ffff, 0xffff_fe00) },
  { weight: 2, arbitrary: fc.nat({ max: 0xffff_ffff }) },
);

/**
 * Buffer addresses: header slots, buffers in every region, region ends, holes, the rings, limits of 2^53 / 2^64.
 * `ringAddrs`: addresses inside the rings (default: the split layout's desc, avail, used and used + 4).
 */
export function bufferAddrArb(size: number, ringAddrs?: readonly number[]): fc.Arbitrary<bigint> {
  const ringish = SplitQueueDriver.layout(size, RING_BASE);
  const rings = ringAddrs ?? [ringish.descAddr, ringish.availAddr, ringish.usedAddr, ringish.usedAddr + 4];
  return fc.oneof(
    { weight: 6, arbitrary: fc.integer({ min: 0, max: 7 }).map((i) => BigInt(HEADERS + 0x100 * i)) },
    { weight: 6, arbitrary: fc.integer({ min: 0, max: 0x6fff }).map((x) => BigInt(0x9000 + x)) },
    {
      weight: 4,
      arbitrary: fc.constantFrom(
        B,
        C - 8,
        C - 1,
        C_END - 1,
        A_END - 8,
        A_END,
        0x1_8000,
        D,
        D + D_SIZE - 8,
        ...rings,
      ).map(BigInt),
    },
    { weight: 2, arbitrary: fc.constantFrom(TWO_53 - 16n, TWO_53 - 1n, TWO_53, TWO_53 + 16n, U64_MAX, U64_MAX - 15n, 2n ** 63n) },
    { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: U64_MAX }) },
  );
}

function descArb(size: number, nextMax: number): fc.Arbitrary<RawDescriptor> {
  const next = fc.oneof({ weight: 8, arbitrary: fc.nat({ max: Math.max(0, nextMax - 1) }) }, { weight: 1, arbitrary: fc.nat({ max: 0xffff }) });
  const data = fc.record({
    addr: bufferAddrArb(size),
    len: lenArb,
    flags: fc.constantFrom(0, VRING_DESC_F_NEXT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE),
    next,
  });
  const indirect = fc.oneof(
    {
      weight: 4,
      arbitrary: fc.record({
        addr: fc.constantFrom(...TABLES).map(BigInt),
        len: fc.oneof({ weight: 6, arbitrary: fc.integer({ min: 1, max: 8 }).map((k) => 16 * k) }, { weight: 1, arbitrary: lenArb }),
        flags: fc.oneof(
          { weight: 6, arbitrary: fc.constant(VRING_DESC_F_INDIRECT) },
          { weight: 1, arbitrary: fc.constantFrom(VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE) },
        ),
        next,
      }),
    },
    {
      weight: 2,
      arbitrary: fc.record({
        addr: fc.constantFrom(BigInt(HUGE_TABLE), BigInt(HUGE_TABLE + 8), BigInt(D + D_SIZE - 0x100)),
        len: fc.constantFrom(16 * 1024, 16 * 1025, 16 * 4096, 16 * MAX_INDIRECT_ENTRIES, 16 * (MAX_INDIRECT_ENTRIES + 1), 16 * 3000),
        flags: fc.constant(VRING_DESC_F_INDIRECT),
        next,
      }),
    },
  );
  const random = fc.record({
    addr: fc.bigInt({ min: 0n, max: U64_MAX }),
    len: lenArb,
    flags: fc.oneof({ weight: 3, arbitrary: fc.nat({ max: 7 }) }, { weight: 1, arbitrary: fc.nat({ max: 0xffff }) }),
    next: fc.nat({ max: 0xffff }),
  });
  return fc.oneof({ weight: 10, arbitrary: data }, { weight: 3, arbitrary: indirect }, { weight: 1, arbitrary: random });
}

const ringArb = (size: number): fc.Arbitrary<RingPlacement> =>
  fc.oneof(
    { weight: 6, arbitrary: fc.constant<RingPlacement>({ kind: 'standard' }) },
    {
      // Anywhere in A, overlapping each other and the buffers, or running off A's end.
      weight: 3,
      arbitrary: fc.record({
        kind: fc.constant('random' as const),
        desc: fc.nat({ max: (A_END - 16) / 16 }).map((k) => 16 * k),
        avail: fc.nat({ max: (A_END - 2) / 2 }).map((k) => 2 * k),
        used: fc.nat({ max: (A_END - 4) / 4 }).map((k) => 4 * k),
      }),
    },
    {
      weight: 1,
      arbitrary: fc.constantFrom<RingPlacement>(
        { kind: 'fixed', desc: C - 16 * Math.max(1, size / 2), avail: RING_BASE, used: RING_BASE + 0x800 }, // desc across B|C
        { kind: 'fixed', desc: RING_BASE + 8, avail: RING_BASE + 0x800, used: RING_BASE + 0xc00 }, // misaligned desc
        { kind: 'fixed', desc: RING_BASE, avail: RING_BASE + 0x801, used: RING_BASE + 0xc00 }, // misaligned avail
        { kind: 'fixed', desc: RING_BASE, avail: RING_BASE + 0x800, used: RING_BASE + 0xc02 }, // misaligned used
        { kind: 'fixed', desc: RING_BASE, avail: 0x1_8000, used: RING_BASE + 0xc00 }, // avail in a hole
        { kind: 'fixed', desc: 2 ** 53 - 16 * size, avail: RING_BASE, used: RING_BASE + 0xc00 }, // desc at the top
        { kind: 'fixed', desc: RING_BASE, avail: RING_BASE, used: RING_BASE }, // all three on top of each other
      ),
    },
  );

export const headerArb = fc.record({
  type: fc.oneof(
    { weight: 8, arbitrary: fc.constantFrom(BlkRequestType.IN, BlkRequestType.OUT, BlkRequestType.FLUSH, BlkRequestType.GET_ID, BlkRequestType.DISCARD, BlkRequestType.WRITE_ZEROES) },
    { weight: 1, arbitrary: fc.nat({ max: 0xffff_ffff }) },
  ),
  sectorLo: fc.oneof(fc.nat({ max: 4096 }), fc.nat({ max: 0xffff_ffff })),
  sectorHi: fc.oneof({ weight: 5, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.nat({ max: 0xffff_ffff }) }),
});

const mutationArb: fc.Arbitrary<Mutation> = fc.record({
  atCall: fc.integer({ min: 1, max: 40 }),
  gpa: fc.oneof(
    fc.constantFrom(...TABLES.slice(0, 3)),
    fc.constant(RING_BASE),
    fc.integer({ min: 0, max: 31 }).map((i) => RING_BASE + 16 * i),
    fc.integer({ min: 0, max: 7 }).map((i) => HEADERS + 0x100 * i),
  ),
  bytes: fc.uint8Array({ minLength: 1, maxLength: 16 }),
});

export const requestArb: fc.Arbitrary<RequestSpec> = fc.record({
  type: fc.oneof(
    { weight: 10, arbitrary: fc.constantFrom(BlkRequestType.IN, BlkRequestType.IN, BlkRequestType.OUT, BlkRequestType.OUT, BlkRequestType.FLUSH, BlkRequestType.GET_ID, BlkRequestType.DISCARD, BlkRequestType.WRITE_ZEROES) },
    { weight: 1, arbitrary: fc.nat({ max: 0xffff_ffff }) },
  ),
  sector: fc.oneof({ weight: 6, arbitrary: fc.nat({ max: 2047 }) }, { weight: 1, arbitrary: fc.nat({ max: 0xffff_ffff }) }),
  dataLen: fc.oneof({ weight: 6, arbitrary: fc.constantFrom(0, 16, 512, 1024, 4096, 20) }, { weight: 1, arbitrary: fc.nat({ max: 8192 }) }),
  dataAt: fc.oneof(
    { weight: 6, arbitrary: fc.constantFrom('A', 'B', 'D') },
    { weight: 2, arbitrary: fc.constantFrom('BC', 'Dend', 'hole', 'ring') },
  ),
  split: fc.integer({ min: 1, max: 3 }),
  indirect: fc.boolean(),
  statusAt: fc.oneof({ weight: 8, arbitrary: fc.constant('A' as const) }, { weight: 1, arbitrary: fc.constantFrom('C', 'hole', 'ring') }),
});

export const chainScenarioArb: fc.Arbitrary<ChainScenario> = fc
  .constantFrom(1, 2, 4, 8, 8, 16, 32, 256)
  .chain((size) =>
    fc.record({
      size: fc.constant(size),
      eventIdx: fc.boolean(),
      indirect: fc.oneof({ weight: 4, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
      cacheViews: fc.oneof({ weight: 3, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
      tight: fc.boolean(),
      ring: ringArb(size),
      start: fc.oneof(fc.constant(0), fc.integer({ min: 0xfff0, max: 0xffff }), fc.nat({ max: 0xffff })),
      usedStart: fc.oneof({ weight: 4, arbitrary: fc.constant(-1) }, { weight: 1, arbitrary: fc.nat({ max: 0xffff }) }),
      descs: fc.array(descArb(size, size), { minLength: Math.min(size, 32), maxLength: Math.min(size, 32) }),
      tables: fc.array(fc.array(descArb(size, 8), { minLength: 1, maxLength: 8 }), { minLength: TABLES.length, maxLength: TABLES.length }),
      huge: fc.oneof(
        { weight: 5, arbitrary: fc.constant(undefined) },
        {
          weight: 1,
          arbitrary: fc.record({
            shape: fc.constantFrom<HugeTable['shape']>('linear', 'loop', 'random'),
            count: fc.constantFrom(2, 1023, 1024, 1025, 4096, MAX_INDIRECT_ENTRIES),
            writableFrom: fc.nat({ max: 2000 }),
            seed: fc.nat(),
          }),
        },
      ),
      headers: fc.array(headerArb, { minLength: 8, maxLength: 8 }),
      heads: fc.array(fc.oneof({ weight: 8, arbitrary: fc.nat({ max: size - 1 }) }, { weight: 1, arbitrary: fc.nat({ max: 0xffff }) }), {
        minLength: 1,
        maxLength: Math.min(size, 64),
      }),
      availDelta: fc.oneof({ weight: 8, arbitrary: fc.nat({ max: Math.min(size, 64) }) }, { weight: 1, arbitrary: fc.nat({ max: 0xffff }) }),
      availFlags: fc.nat({ max: 0xffff }),
      usedEvent: fc.nat({ max: 0xffff }),
      mutations: fc.oneof({ weight: 6, arbitrary: fc.constant([]) }, { weight: 1, arbitrary: fc.array(mutationArb, { maxLength: 4 }) }),
      requests: fc.oneof(
        { weight: 1, arbitrary: fc.constant([]) },
        { weight: 3, arbitrary: fc.array(requestArb, { minLength: 1, maxLength: Math.min(size, 48) }) },
      ),
      corrupt: fc.oneof(
        { weight: 3, arbitrary: fc.constant([]) },
        { weight: 1, arbitrary: fc.array(fc.record({ index: fc.nat({ max: Math.min(size, 32) - 1 }), desc: descArb(size, size) }), { maxLength: 3 }) },
      ),
    }),
  );

// ---- the model ------------------------------------------------------------------------------------------------------

export interface Segment {
  addr: number;
  len: number;
  writable: boolean;
}

/** 16 bytes at `gpa` if all are mapped, else undefined. */
export function readEntry(mem: GuardedMemory, gpa: bigint): DataView | undefined {
  if (gpa + 16n > TWO_53) return undefined;
  const g = Number(gpa);
  const r = mem.regionOf(g);
  if (r !== undefined && g + 16 <= r.end) return new DataView(r.buffer, r.guard + (g - r.gpa), 16);
  for (let i = 0; i < 16; i++) if (mem.regionOf(g + i) === undefined) return undefined;
  return new DataView(mem.peek(g, 16).buffer);
}

/** An independent model of chain validation (VIRTIO 1.2 §2.7.5): the segments, or 'error'. */
export function modelChain(mem: GuardedMemory, s: { size: number; indirect: boolean }, descAddr: number, head: number): Segment[] | 'error' {
  if (head >= s.size) return 'error';
  const budget = Math.max(s.size, 1024);
  const segs: Segment[] = [];
  let total = 0;
  let seenWritable = false;
  let table = BigInt(descAddr);
  let tableLen = s.size;
  let idx = head;
  let inIndirect = false;
  let visited = new Set<number>();
  for (;;) {
    if (visited.has(idx)) return 'error';
    visited.add(idx);
    const raw = readEntry(mem, table + 16n * BigInt(idx));
    if (raw === undefined) return 'error';
    const addr = raw.getBigUint64(0, true);
    const len = raw.getUint32(8, true);
    const flags = raw.getUint16(12, true);
    const next = raw.getUint16(14, true);
    if (addr >= TWO_53 || addr + BigInt(len) > TWO_53) return 'error';
    if (flags & VRING_DESC_F_INDIRECT) {
      if (!s.indirect || inIndirect || flags & VRING_DESC_F_NEXT) return 'error';
      if (len === 0 || len % 16 !== 0 || len / 16 > MAX_INDIRECT_ENTRIES) return 'error';
      table = addr;
      tableLen = len / 16;
      inIndirect = true;
      visited = new Set();
      idx = 0;
      continue;
    }
    if (segs.length + 1 > budget) return 'error';
    total += len;
    if (total > MAX_CHAIN_BYTES) return 'error';
    const writable = (flags & VRING_DESC_F_WRITE) !== 0;
    if (!writable && seenWritable) return 'error';
    seenWritable ||= writable;
    segs.push({ addr: Number(addr), len, writable });
    if (!(flags & VRING_DESC_F_NEXT)) return segs;
    if (next >= tableLen) return 'error';
    idx = next;
  }
}

export function segmentsOf(chain: DescriptorChain): Segment[] {
  const out: Segment[] = [];
  for (let i = 0; i < chain.count; i++) out.push({ addr: chain.addr[i] ?? NaN, len: chain.len[i] ?? NaN, writable: chain.writable[i] === 1 });
  return out;
}

/** Structural bounds every popped chain satisfies, whatever the model says. */
export function checkChainBounds(chain: DescriptorChain, size: number, maxChainLength: number): void {
  if (chain.head < 0 || chain.head >= size) throw new Error(`chain head ${chain.head} out of range`);
  if (chain.count < 1 || chain.count > maxChainLength) throw new Error(`chain of ${chain.count} descriptors`);
  let total = 0;
  let readable = 0;
  let writable = 0;
  for (let i = 0; i < chain.count; i++) {
    const a = chain.addr[i] ?? -1;
    const l = chain.len[i] ?? -1;
    if (!Number.isSafeInteger(a) || a < 0 || a + l > 2 ** 53) throw new Error(`segment ${i}: ${a} + ${l} is not below 2^53`);
    if ((chain.writable[i] === 1) !== i >= chain.readableCount) throw new Error(`segment ${i}: readable after writable`);
    total += l;
    if (chain.writable[i] === 1) writable += l;
    else readable += l;
  }
  if (total > MAX_CHAIN_BYTES) throw new Error(`chain of ${total} bytes`);
  if (readable !== chain.readableBytes || writable !== chain.writableBytes) throw new Error('byte counts do not add up');
}

// ---- one case -----------------------------------------------------------------------------------------------------

export interface ChainCounts {
  cases: number;
  setupRejected: number;
  popped: number;
  popErrors: number;
  completed: number;
  handlerErrors: number;
  hugeTables: number;
  mutated: number;
}

export function newChainCounts(): ChainCounts {
  return { cases: 0, setupRejected: 0, popped: 0, popErrors: 0, completed: 0, handlerErrors: 0, hugeTables: 0, mutated: 0 };
}

/** Everything one fuzz process keeps between cases: two memories (tight and guarded) and a blk handler over a file. */
export class ChainRig {
  readonly tight = fuzzMemory(0);
  readonly guarded = fuzzMemory(64);
  readonly handler: BlkQueueHandler;
  readonly #dir: string;

  constructor() {
    this.#dir = mkdtempSync(join(tmpdir(), 'vhost-user-fuzz-'));
    const image = join(this.#dir, 'disk.img');
    const bytes = new Uint8Array(1024 * 1024);
    for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7 + (i >>> 9)) & 0xff;
    writeFileSync(image, bytes);
    this.handler = new BlkQueueHandler({ backend: { kind: 'file', path: image, readOnly: false }, serial: 'fuzz', capacityBytes: bytes.length, io: 'sync' });
  }

  close(): void {
    this.handler.close();
    rmSync(this.#dir, { recursive: true, force: true });
  }
}

function ringAddrs(s: ChainScenario): { desc: number; avail: number; used: number } {
  if (s.ring.kind === 'standard') {
    const l = SplitQueueDriver.layout(s.size, RING_BASE);
    return { desc: l.descAddr, avail: l.availAddr, used: l.usedAddr };
  }
  return { desc: s.ring.desc, avail: s.ring.avail, used: s.ring.used };
}

export function le16(v: number): Uint8Array {
  return new Uint8Array([v & 0xff, (v >>> 8) & 0xff]);
}

function encodeDesc(d: RawDescriptor): Uint8Array {
  const b = new Uint8Array(16);
  const v = new DataView(b.buffer);
  const a = BigInt.asUintN(64, typeof d.addr === 'bigint' ? d.addr : BigInt(d.addr));
  v.setBigUint64(0, a, true);
  v.setUint32(8, d.len >>> 0, true);
  v.setUint16(12, d.flags & 0xffff, true);
  v.setUint16(14, d.next & 0xffff, true);
  return b;
}

function writeHugeTable(mem: GuardedMemory, h: HugeTable): void {
  const r = mem.regionOf(HUGE_TABLE);
  if (r === undefined) return;
  const v = new DataView(r.buffer, r.guard);
  let x = h.seed >>> 0;
  const n = Math.min(h.count, Math.floor((r.size - (HUGE_TABLE - r.gpa)) / 16));
  for (let i = 0; i < n; i++) {
    const off = HUGE_TABLE - r.gpa + 16 * i;
    const last = i === h.count - 1;
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    let next = i + 1;
    if (h.shape === 'loop' && last) next = x % h.count;
    if (h.shape === 'random') next = x % (h.count + 2);
    const chained = h.shape !== 'linear' || !last;
    const writable = i >= h.writableFrom;
    v.setBigUint64(off, BigInt(0x9000 + (i % 64) * 16), true);
    v.setUint32(off + 8, i === 0 ? 16 : 1, true);
    v.setUint16(off + 12, (chained ? VRING_DESC_F_NEXT : 0) | (writable ? VRING_DESC_F_WRITE : 0), true);
    v.setUint16(off + 14, next & 0xffff, true);
  }
}

function dataBase(at: RequestSpec['dataAt'], j: number): number {
  switch (at) {
    case 'A':
      return 0x9000 + ((j * 0x1000) % 0x6000);
    case 'B':
      return B + 0x4000 + ((j * 0x2000) % 0xa000);
    case 'BC':
      return C - 0x200;
    case 'D':
      return D + 0x1000 + j * 0x2000;
    case 'Dend':
      return D + D_SIZE - 0x100;
    case 'hole':
      return 0x1_8000;
    case 'ring':
      return RING_BASE;
  }
}

/**
 * The segments of request `r` (the `j`th of its scenario) as a driver lays it out: a 16-byte header (written to its
 * slot in HEADERS now), the data in 1-3 pieces at `r.dataAt`, a status byte at `r.statusAt`.
 */
export function requestSegments(mem: GuardedMemory, r: RequestSpec, j: number): Segment[] {
  const slot = HEADERS + 0x100 * (j % 16);
  const hdr = new Uint8Array(16);
  const hv = new DataView(hdr.buffer);
  hv.setUint32(0, r.type >>> 0, true);
  hv.setUint32(8, r.sector >>> 0, true);
  mem.poke(slot, hdr);
  const segs: Segment[] = [{ addr: slot, len: 16, writable: false }];
  const dataWritable = r.type === BlkRequestType.IN || r.type === BlkRequestType.GET_ID;
  const base = dataBase(r.dataAt, j);
  let done = 0;
  for (let k = 0; k < r.split && done < r.dataLen; k++) {
    const len = k === r.split - 1 ? r.dataLen - done : Math.min(r.dataLen - done, 512 * (k + 1));
    segs.push({ addr: base + done, len, writable: dataWritable });
    done += len;
  }
  const statusBase = r.statusAt === 'A' ? 0xf000 : r.statusAt === 'C' ? C + 0x100 : r.statusAt === 'hole' ? 0x1_9000 : RING_BASE + 2;
  segs.push({ addr: statusBase + j, len: 1, writable: true });
  return segs;
}

/** Where the indirect table of request `j` goes: in B, 0x100 apart; the first one across B|C when its status is in C. */
export function requestTableAddr(r: RequestSpec, j: number): number {
  return j === 0 && r.statusAt === 'C' ? C - 16 * 2 : B + 0x100 + 0x100 * j;
}

/**
 * Lays the scenario's well-formed requests into the descriptor table (direct chains from index 0 up) or into indirect
 * tables in B (one per request, 0x100 apart, the first one across B|C when its status lives in C). Returns the heads.
 */
function layRequests(mem: GuardedMemory, s: ChainScenario, descAddr: number): number[] {
  const heads: number[] = [];
  let nextDesc = 0;
  const limit = Math.min(s.size, 32);
  s.requests.forEach((r, j) => {
    const segs = requestSegments(mem, r, j);
    const n = segs.length;
    const descs = segs.map((x, i) => ({
      addr: x.addr,
      len: x.len,
      flags: (x.writable ? VRING_DESC_F_WRITE : 0) | (i < n - 1 ? VRING_DESC_F_NEXT : 0),
      next: i + 1,
    }));
    if (r.indirect && s.indirect && nextDesc < limit) {
      const table = requestTableAddr(r, j);
      descs.forEach((d, i) => mem.poke(table + 16 * i, encodeDesc(d)));
      heads.push(nextDesc);
      mem.poke(descAddr + 16 * nextDesc, encodeDesc({ addr: table, len: 16 * n, flags: VRING_DESC_F_INDIRECT, next: 0 }));
      nextDesc++;
    } else if (nextDesc + n <= limit) {
      heads.push(nextDesc);
      descs.forEach((d, i) => mem.poke(descAddr + 16 * (nextDesc + i), encodeDesc({ ...d, next: nextDesc + i + 1 })));
      nextDesc += n;
    }
  });
  return heads;
}

/**
 * Lays out scenario `s` in memory and runs the device over it. Throws (an assertion-style Error) when an invariant
 * breaks; returns normally otherwise.
 */
export function runChainCase(rig: ChainRig, s: ChainScenario, counts: ChainCounts): void {
  counts.cases++;
  const mem = s.tight ? rig.tight : rig.guarded;
  mem.clear();
  mem.onView = undefined;
  mem.violations.length = 0;
  const ring = ringAddrs(s);

  // The driver's side, written byte by byte (parts that fall in holes are dropped).
  s.descs.forEach((d, i) => mem.poke(ring.desc + 16 * i, encodeDesc(d)));
  s.tables.forEach((t, k) => t.forEach((d, i) => mem.poke((TABLES[k] as number) + 16 * i, encodeDesc(d))));
  if (s.huge !== undefined) {
    counts.hugeTables++;
    writeHugeTable(mem, s.huge);
  }
  const requestHeads = layRequests(mem, s, ring.desc);
  s.corrupt.forEach((c) => mem.poke(ring.desc + 16 * c.index, encodeDesc(c.desc)));
  if (requestHeads.length === 0) s.headers.forEach((h, i) => {
    const b = new Uint8Array(16);
    const v = new DataView(b.buffer);
    v.setUint32(0, h.type >>> 0, true);
    v.setUint32(8, h.sectorLo >>> 0, true);
    v.setUint32(12, h.sectorHi >>> 0, true);
    mem.poke(HEADERS + 0x100 * i, b);
  });
  const mask = s.size - 1;
  const heads = requestHeads.length > 0 ? [...requestHeads, ...s.heads].slice(0, s.size) : s.heads;
  for (let i = 0; i < heads.length; i++) mem.poke(ring.avail + 4 + 2 * ((s.start + i) & mask), le16(heads[i] as number));
  mem.poke(ring.avail, le16(s.availFlags));
  const delta = requestHeads.length > 0 && s.availDelta <= s.size ? Math.min(requestHeads.length, s.size) : s.availDelta;
  mem.poke(ring.avail + 2, le16((s.start + delta) & 0xffff));
  mem.poke(ring.avail + 4 + 2 * s.size, le16(s.usedEvent));
  const usedStart = s.usedStart < 0 ? s.start : s.usedStart;
  mem.poke(ring.used + 2, le16(usedStart));

  // Setup: the checks the worker's startQueue runs (a VirtioError there fails the queue, nothing else may escape).
  let queue: SplitQueue;
  try {
    queue = new SplitQueue({ size: s.size, descAddr: ring.desc, availAddr: ring.avail, usedAddr: ring.used, eventIdx: s.eventIdx, indirect: s.indirect, cacheViews: s.cacheViews });
    queue.attach(mem);
    queue.setBase(s.start, queue.ringUsedIdx());
  } catch (err) {
    if (!(err instanceof VirtioError)) throw new Error(`queue setup threw a non-VirtioError: ${String(err)}`, { cause: err });
    counts.setupRejected++;
    return;
  }
  if (s.mutations.length > 0) {
    counts.mutated++;
    const pending = [...s.mutations].sort((a, b) => a.atCall - b.atCall);
    const base = mem.viewCalls;
    mem.onView = (_gpa, _len, call) => {
      while (pending.length > 0 && (pending[0] as Mutation).atCall <= call - base) {
        const m = pending.shift() as Mutation;
        mem.poke(m.gpa, m.bytes);
      }
    };
  }

  const before = mem.snapshot();
  const allowed = new RangeSet();
  allowed.add(ring.used, ring.used + usedRingSize(s.size));
  const chain = queue.createChain();
  const ringBytes = descTableSize(s.size) + availRingSize(s.size);
  const maxViewsPerPop = 4 * (queue.maxChainLength + s.size) + 16 + (s.cacheViews ? 0 : ringBytes);
  let stopped = false;
  let shadow = s.start;
  // The worker's loop (queue-worker.ts processQueue), three batches at most.
  for (let batch = 0; batch < 3 && !stopped; batch++) {
    queue.disableNotification();
    let handled = 0;
    for (let round = 1; ; round++) {
      while (handled < WORKER_BATCH_LIMIT) {
        const at = queue.lastAvailIdx;
        // What the device should do, mirroring its shadow of avail.idx (re-read only once it caught up with it).
        let expected: Segment[] | 'error' | 'empty' | undefined;
        if (at === shadow) {
          const availIdx = mem.peek(ring.avail + 2, 2);
          const idx = (availIdx[0] ?? 0) | ((availIdx[1] ?? 0) << 8);
          const pendingCount = (idx - at) & 0xffff;
          if (pendingCount > s.size) expected = 'error';
          else {
            shadow = idx;
            if (pendingCount === 0) expected = 'empty';
          }
        }
        if (expected === undefined) {
          const headBytes = mem.peek(ring.avail + 4 + 2 * (at & mask), 2);
          expected = modelChain(mem, s, ring.desc, (headBytes[0] ?? 0) | ((headBytes[1] ?? 0) << 8));
        }
        if (s.mutations.length > 0) expected = undefined; // the driver races the device: only the bounds hold
        const calls = mem.viewCalls;
        const t0 = performance.now();
        let ok: boolean;
        try {
          ok = queue.popChain(mem, chain);
        } catch (err) {
          if (!(err instanceof VirtioError)) throw new Error(`popChain threw a non-VirtioError: ${String(err)}`, { cause: err });
          if (queue.lastAvailIdx !== at) throw new Error(`a failed pop (${err.code}) consumed the chain`, { cause: err });
          if (chain.count !== 0) throw new Error(`a failed pop (${err.code}) left ${chain.count} segments in the chain`, { cause: err });
          if (expected !== undefined && expected !== 'error') {
            throw new Error(`the device rejected (${err.code}: ${err.message}) a chain the model accepts: ${JSON.stringify(expected)}`, { cause: err });
          }
          counts.popErrors++;
          stopped = true;
          break;
        }
        const dt = performance.now() - t0;
        if (mem.viewCalls - calls > maxViewsPerPop) throw new Error(`one pop made ${mem.viewCalls - calls} view calls`);
        if (dt > 500) throw new Error(`one pop took ${dt.toFixed(0)} ms`);
        if (!ok) {
          if (expected !== undefined && expected !== 'empty') throw new Error(`popChain found nothing, expected ${JSON.stringify(expected).slice(0, 200)}`);
          break;
        }
        if (expected === 'empty') throw new Error('popChain popped a chain from an empty ring');
        counts.popped++;
        checkChainBounds(chain, s.size, queue.maxChainLength);
        if (expected === 'error') throw new Error(`the device accepted a chain the model rejects: ${JSON.stringify(segmentsOf(chain).slice(0, 8))}`);
        if (expected !== undefined) {
          const got = segmentsOf(chain);
          if (JSON.stringify(got) !== JSON.stringify(expected)) {
            throw new Error(`chain differs from the model:\n  device ${JSON.stringify(got.slice(0, 8))}\n  model  ${JSON.stringify(expected.slice(0, 8))}`);
          }
        }
        for (let i = chain.readableCount; i < chain.count; i++) {
          const a = chain.addr[i] as number;
          allowed.add(a, a + (chain.len[i] as number));
        }
        let len: number;
        try {
          len = rig.handler.process(mem, chain);
        } catch (err) {
          if (!(err instanceof VirtioError)) throw new Error(`the blk handler threw a non-VirtioError: ${String(err)}`, { cause: err });
          counts.handlerErrors++;
          stopped = true;
          break;
        }
        if (!Number.isInteger(len) || len < 1 || len > chain.writableBytes) {
          throw new Error(`used length ${len} for a chain with ${chain.writableBytes} writable bytes`);
        }
        queue.pushUsed(chain.head, len);
        counts.completed++;
        handled++;
      }
      if (stopped) break;
      queue.publishUsed();
      queue.needsNotification();
      if (handled >= WORKER_BATCH_LIMIT || round >= WORKER_BATCH_LIMIT) break;
      let more: boolean;
      try {
        more = queue.enableNotification();
        shadow = queue.seenAvailIdx; // the device's shadow moves with this read too
      } catch (err) {
        if (!(err instanceof VirtioError)) throw new Error(`enableNotification threw ${String(err)}`, { cause: err });
        stopped = true;
        break;
      }
      if (!more) {
        stopped = true; // idle: the worker would poll now
        break;
      }
      queue.disableNotification();
    }
  }
  mem.onView = undefined;
  if (mem.violations.length > 0) throw new Error(`impossible view calls: ${mem.violations.slice(0, 3).join('; ')}`);
  const guard = mem.checkGuards();
  if (guard !== undefined) throw new Error(guard);
  if (s.mutations.length === 0) {
    const outside = mem.changedOutside(before, allowed);
    if (outside !== undefined) throw new Error(`the device wrote outside the writable buffers and the used ring: ${outside}`);
  }
}

/** Runs the chain fuzzer for `ms` (or `numRuns` cases); throws fast-check's report (with seed and path) on a failure. */
export function fuzzChains(options: { ms: number; seed: number; numRuns?: number }): FuzzReport {
  const rig = new ChainRig();
  const counts = newChainCounts();
  const t0 = Date.now();
  try {
    timeBoxedAssert(
      fc.property(chainScenarioArb, (s) => {
        runChainCase(rig, s, counts);
      }),
      { ms: options.ms, seed: options.seed, ...(options.numRuns !== undefined ? { numRuns: options.numRuns } : {}) },
    );
  } finally {
    rig.close();
  }
  return { target: 'chains', seed: options.seed, ms: Date.now() - t0, runs: counts.cases, counts: { ...counts } };
}
