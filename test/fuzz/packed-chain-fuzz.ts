/**
 * The packed descriptor-chain fuzzer (VIRTIO_F_RING_PACKED): random packed rings are served by the real device side,
 * `PackedQueue` plus the virtio-blk queue handler over a file, in the loop the queue worker runs (batches of at most
 * WORKER_BATCH_LIMIT chains, `publishUsed` and the notification check after each, notifications re-enabled and the
 * ring re-checked), with asynchronous completion modelled by holding chains in flight and completing them in a
 * random order, and a driver that adds more between batches.
 *
 * Generated: queue sizes that are not powers of two (1, 3, 5, 7, 31, 255, 1000, 1500, ...); a device resuming at any
 * position `index | wrap << 15` (also invalid ones), over a ring that is fresh, lapped or garbage; well-formed blk
 * requests (direct, or through indirect tables) and random descriptors laid from that position on, so that chains
 * straddle the end of the ring and the wrap counter flips in their middle; descriptors whose AVAIL / USED bits are
 * wrong for their slot in the middle of a chain; ids >= size and ids made available again while in flight; indirect
 * tables (nested, misaligned, across region ends, in holes, up to 65536 entries, INDIRECT after NEXT-linked
 * descriptors, INDIRECT with NEXT); lengths near 2^32, addresses near 2^53 and 2^64; rings and event areas on top of
 * each other and of the buffers; a driver that overwrites slots still in flight.
 *
 * Invariants checked in every case:
 * - setup (constructor, attach, resume) fails exactly when the model says, and only with a `VirtioError`;
 * - only `VirtioError`s come out of the queue or the handler; a failed pop consumes nothing (position, slots in
 *   flight) and leaves the chain empty;
 * - every pop equals an independent model (bigint arithmetic, written from VIRTIO 1.2 §2.8 and the bounds documented
 *   in packed-queue.ts, not from its code): empty / rejected / the same id, segments, indirect flag, and the avail
 *   position moved by the slots the chain took; accepted chains satisfy the structural bounds;
 * - every used descriptor is written at the model's used position with the chain's id and length, and flags
 *   AVAIL = USED = the device's wrap counter (+ WRITE when len > 0); the first of a batch only at `publishUsed`;
 *   the used position skips the slots of each chain, in whatever order they complete;
 * - `needsNotification` and `enableNotification` agree with the model of the event suppression areas (§2.8.10);
 * - the device writes guest memory only inside writable buffers of the chains it popped, bytes 8..15 (len, id,
 *   flags) of the used descriptors it wrote, and its event suppression area (memory diff); canaries stay intact;
 *   no `view` call with an impossible address;
 * - the work per pop is bounded (view calls, time).
 */
import fc from 'fast-check';
import { VirtioError } from '../../src/errors.js';
import type { GuestMemory } from '../../src/memory/guest-memory.js';
import { MemoryTable } from '../../src/memory/memory-table.js';
import {
  MAX_CHAIN_BYTES,
  MAX_INDIRECT_ENTRIES,
  PackedQueue,
  PackedQueueDriver,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  type PackedRawDescriptor,
} from '../../src/queue/index.js';
import {
  A_END,
  C,
  C_END,
  D,
  D_SIZE,
  HEADERS,
  HUGE_TABLE,
  RING_BASE,
  TABLES,
  TWO_53,
  U64_MAX,
  WORKER_BATCH_LIMIT,
  ChainRig,
  bufferAddrArb,
  checkChainBounds,
  headerArb,
  le16,
  lenArb,
  readEntry,
  requestArb,
  requestSegments,
  requestTableAddr,
  segmentsOf,
  type RequestSpec,
  type Segment,
} from './chain-fuzz.js';
import type { GuardedMemory } from './guarded-memory.js';
import { RangeSet } from './guarded-memory.js';
import { prng, timeBoxedAssert, type FuzzReport } from './config.js';

/** Descriptor flags of the packed ring (§2.8.1), written down here rather than taken from packed-queue.ts. */
const F_AVAIL = 1 << 7;
const F_USED = 1 << 15;
const NEXT = VRING_DESC_F_NEXT;
const WRITE = VRING_DESC_F_WRITE;
const INDIRECT = VRING_DESC_F_INDIRECT;

// ---- scenarios ------------------------------------------------------------------------------------------------------

/**
 * How a ring entry's AVAIL / USED bits are set, relative to the wrap counter of the slot it lands in: available (what
 * a driver writes), used in this lap, available or used for the other wrap counter, or `raw` (the flags as generated).
 */
export type Mark = 'avail' | 'used' | 'availOther' | 'usedOther' | 'raw';

export interface RingEntry {
  readonly desc: PackedRawDescriptor;
  readonly mark: Mark;
}

export type PackedPlacement =
  | { readonly kind: 'standard' }
  | { readonly kind: 'random' | 'fixed'; readonly desc: number; readonly driver: number; readonly device: number };

export interface PackedHugeTable {
  /**
   * clean: `count` valid entries (readable, then writable from `writableFrom`); noise: the same with NEXT and ids
   * set (reserved in a table, to be ignored); nested: entry `at` has INDIRECT; bad: entry `at` ends past 2^53;
   * bytes: 2^28 bytes per entry (past 2^32 - 1 in total from the 16th on).
   */
  readonly shape: 'clean' | 'noise' | 'nested' | 'bad' | 'bytes';
  readonly count: number;
  readonly writableFrom: number;
  readonly at: number;
}

/** What the driver adds between two batches, at its own position (a hostile one overwrites slots in flight). */
export interface Refill {
  /** Held chains completed first (asynchronous I/O finishing), then published. */
  readonly reap: number;
  readonly requests: readonly RequestSpec[];
  readonly idBase: number;
  readonly entries: readonly RingEntry[];
}

export interface PackedScenario {
  readonly size: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  readonly cacheViews: boolean;
  readonly tight: boolean;
  /** The device sees the memory as the worker gives it, a `MemoryTable` (indirect tables found by region). */
  readonly workerMemory: boolean;
  readonly ring: PackedPlacement;
  /** Where the device resumes, `index | wrap << 15` (index >= size: setup must fail). */
  readonly start: number;
  /** The ring before anything is laid: zeroes, used up to `start` as a driver would leave it, or random bytes. */
  readonly background: 'zero' | 'lapped' | 'garbage';
  /** Seeds the garbage and the completion order. */
  readonly seed: number;
  /** Well-formed blk requests laid first from `start`; request k gets id `(idBase + k * idStride) % size`. */
  readonly requests: readonly RequestSpec[];
  readonly idBase: number;
  readonly idStride: number;
  /** Random entries laid after the requests (all of it at most `size` slots). */
  readonly entries: readonly RingEntry[];
  /** Entries overwritten afterwards, by offset from `start`. */
  readonly corrupt: readonly { readonly offset: number; readonly entry: RingEntry }[];
  readonly tables: readonly (readonly PackedRawDescriptor[])[];
  readonly huge: PackedHugeTable | undefined;
  readonly headers: readonly { type: number; sectorLo: number; sectorHi: number }[];
  /** The driver event suppression area (off_wrap, flags). */
  readonly driverEvent: { readonly offWrap: number; readonly flags: number };
  /** Chains kept in flight (asynchronous completion); 0 completes each one at once, in order. */
  readonly hold: number;
  readonly refills: readonly Refill[];
}

function standardLayout(size: number): { desc: number; driver: number; device: number } {
  const l = PackedQueueDriver.layout(size, RING_BASE);
  return { desc: l.descAddr, driver: l.driverAddr, device: l.deviceAddr };
}

function ringAddrs(s: PackedScenario): { desc: number; driver: number; device: number } {
  return s.ring.kind === 'standard' ? standardLayout(s.size) : s.ring;
}

const markArb: fc.Arbitrary<Mark> = fc.oneof(
  { weight: 24, arbitrary: fc.constant<Mark>('avail') },
  { weight: 1, arbitrary: fc.constant<Mark>('used') },
  { weight: 1, arbitrary: fc.constant<Mark>('availOther') },
  { weight: 1, arbitrary: fc.constant<Mark>('usedOther') },
  { weight: 1, arbitrary: fc.constant<Mark>('raw') },
);

function idArb(size: number): fc.Arbitrary<number> {
  return fc.oneof(
    { weight: 8, arbitrary: fc.nat({ max: size - 1 }) },
    { weight: 2, arbitrary: fc.constantFrom(0, 1 % size, size - 1) },
    { weight: 1, arbitrary: fc.constantFrom(size, size + 1, 0x7fff, 0x8000, 0xffff) },
    { weight: 1, arbitrary: fc.nat({ max: 0xffff }) },
  );
}

/** Addresses inside the standard packed layout for buffers: slot 0, its len / id / flags, the two event areas. */
function packedBufferAddrArb(size: number): fc.Arbitrary<bigint> {
  const l = standardLayout(size);
  return bufferAddrArb(size, [l.desc, l.desc + 8, l.desc + 12, l.driver, l.device]);
}

function ringDescArb(size: number): fc.Arbitrary<PackedRawDescriptor> {
  const id = idArb(size);
  const data = fc.record({
    addr: packedBufferAddrArb(size),
    len: lenArb,
    id,
    flags: fc.constantFrom(0, NEXT, NEXT, WRITE, NEXT | WRITE, NEXT | WRITE),
  });
  const indirect = fc.oneof(
    {
      weight: 4,
      arbitrary: fc.record({
        addr: fc.constantFrom(...TABLES).map(BigInt),
        len: fc.oneof({ weight: 6, arbitrary: fc.integer({ min: 1, max: 8 }).map((k) => 16 * k) }, { weight: 1, arbitrary: lenArb }),
        id,
        flags: fc.oneof(
          { weight: 6, arbitrary: fc.constant(INDIRECT) },
          { weight: 1, arbitrary: fc.constantFrom(INDIRECT | NEXT, INDIRECT | WRITE) },
        ),
      }),
    },
    {
      weight: 2,
      arbitrary: fc.record({
        addr: fc.constantFrom(BigInt(HUGE_TABLE), BigInt(HUGE_TABLE + 8), BigInt(D + D_SIZE - 0x100)),
        len: fc.constantFrom(16 * 2, 16 * 1023, 16 * 1024, 16 * 1025, 16 * 1500, 16 * 3000, 16 * MAX_INDIRECT_ENTRIES, 16 * (MAX_INDIRECT_ENTRIES + 1)),
        id,
        flags: fc.constant(INDIRECT),
      }),
    },
  );
  const random = fc.record({
    addr: fc.bigInt({ min: 0n, max: U64_MAX }),
    len: lenArb,
    id: fc.nat({ max: 0xffff }),
    flags: fc.oneof({ weight: 3, arbitrary: fc.nat({ max: 7 }) }, { weight: 1, arbitrary: fc.nat({ max: 0xffff }) }),
  });
  return fc.oneof({ weight: 10, arbitrary: data }, { weight: 3, arbitrary: indirect }, { weight: 1, arbitrary: random });
}

function entryArb(size: number): fc.Arbitrary<RingEntry> {
  return fc.record({ desc: ringDescArb(size), mark: markArb });
}

/** Indirect table entries: only WRITE counts; NEXT and the id are reserved (ignored), INDIRECT is a nested table. */
function tableEntryArb(size: number): fc.Arbitrary<PackedRawDescriptor> {
  return fc.record({
    addr: packedBufferAddrArb(size),
    len: lenArb,
    id: fc.nat({ max: 0xffff }),
    flags: fc.oneof(
      { weight: 8, arbitrary: fc.constantFrom(0, 0, WRITE, WRITE, NEXT, NEXT | WRITE) },
      { weight: 1, arbitrary: fc.constantFrom(INDIRECT, INDIRECT | WRITE) },
      { weight: 1, arbitrary: fc.nat({ max: 0xffff }) },
    ),
  });
}

function startArb(size: number): fc.Arbitrary<number> {
  const pos = (index: fc.Arbitrary<number>): fc.Arbitrary<number> => fc.tuple(index, fc.boolean()).map(([i, w]) => i | (w ? 0x8000 : 0));
  return fc.oneof(
    { weight: 3, arbitrary: fc.constant(0x8000) }, // a fresh ring
    { weight: 4, arbitrary: pos(fc.nat({ max: size - 1 })) },
    { weight: 4, arbitrary: pos(fc.integer({ min: Math.max(0, size - 4), max: size - 1 })) }, // chains straddle the end
    { weight: 1, arbitrary: pos(fc.integer({ min: size, max: 0x7fff })) }, // invalid: index >= size
  );
}

function placementArb(size: number): fc.Arbitrary<PackedPlacement> {
  const ringBytes = 16 * size;
  const l = standardLayout(size);
  return fc.oneof(
    { weight: 6, arbitrary: fc.constant<PackedPlacement>({ kind: 'standard' }) },
    {
      // Anywhere in A (mostly where the ring fits), the event areas anywhere: on the ring, the buffers, each other.
      weight: 3,
      arbitrary: fc.record({
        kind: fc.constant('random' as const),
        desc: fc.oneof(
          { weight: 4, arbitrary: fc.nat({ max: Math.max(0, (A_END - ringBytes) / 16) }) },
          { weight: 1, arbitrary: fc.nat({ max: A_END / 16 - 1 }) },
        ).map((k) => 16 * k),
        driver: fc.nat({ max: A_END / 4 - 1 }).map((k) => 4 * k),
        device: fc.nat({ max: A_END / 4 - 1 }).map((k) => 4 * k),
      }),
    },
    {
      weight: 1,
      arbitrary: fc.constantFrom<PackedPlacement>(
        { kind: 'fixed', desc: C - 16 * Math.ceil(size / 2), driver: RING_BASE, device: RING_BASE + 4 }, // ring across B|C
        { kind: 'fixed', desc: C_END - ringBytes, driver: C_END - ringBytes - 8, device: C_END - 4 }, // ring at C's very end
        { kind: 'fixed', desc: RING_BASE + 8, driver: l.driver + 8, device: l.device + 8 }, // misaligned ring
        { kind: 'fixed', desc: l.desc, driver: l.driver + 2, device: l.device }, // misaligned driver area
        { kind: 'fixed', desc: l.desc, driver: l.driver, device: 0x1_8000 }, // device area in a hole
        { kind: 'fixed', desc: 2 ** 53 - ringBytes, driver: l.driver, device: l.device }, // ring at the top
        { kind: 'fixed', desc: RING_BASE, driver: RING_BASE, device: RING_BASE }, // all three on top of each other
        { kind: 'fixed', desc: l.desc, driver: l.driver, device: l.driver }, // the device writes the driver's area
        { kind: 'fixed', desc: l.desc, driver: l.desc + 28, device: l.desc + 12 }, // event areas on slots 0 / 1's id, flags
        { kind: 'fixed', desc: D + 0x1000, driver: D + 0x1000 + ringBytes, device: D + 0x1000 + ringBytes + 4 }, // in D, on the huge table
      ),
    },
  );
}

const hugeArb: fc.Arbitrary<PackedHugeTable | undefined> = fc.oneof(
  { weight: 5, arbitrary: fc.constant(undefined) },
  {
    weight: 1,
    arbitrary: fc.record({
      shape: fc.constantFrom<PackedHugeTable['shape']>('clean', 'clean', 'noise', 'nested', 'bad', 'bytes'),
      count: fc.constantFrom(2, 1023, 1024, 1025, 1500, 4096, MAX_INDIRECT_ENTRIES),
      writableFrom: fc.nat({ max: 2000 }),
      at: fc.nat(),
    }),
  },
);

export const packedScenarioArb: fc.Arbitrary<PackedScenario> = fc
  .constantFrom(1, 2, 3, 3, 4, 5, 5, 7, 8, 16, 16, 31, 64, 255, 256, 1000, 1500)
  .chain((size) => {
    const room = Math.min(size, 40);
    const entry = entryArb(size);
    return fc.record({
      size: fc.constant(size),
      eventIdx: fc.boolean(),
      indirect: fc.oneof({ weight: 4, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
      cacheViews: fc.oneof({ weight: 3, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
      tight: fc.boolean(),
      workerMemory: fc.boolean(),
      ring: placementArb(size),
      start: startArb(size),
      background: fc.constantFrom<PackedScenario['background']>('zero', 'lapped', 'lapped', 'lapped', 'garbage'),
      seed: fc.nat(),
      requests: fc.oneof(
        { weight: 1, arbitrary: fc.constant([]) },
        { weight: 3, arbitrary: fc.array(requestArb, { minLength: 1, maxLength: Math.min(size, 24) }) },
      ),
      idBase: fc.nat({ max: size - 1 }),
      idStride: fc.oneof({ weight: 8, arbitrary: fc.constant(1) }, { weight: 1, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.nat({ max: size }) }),
      entries: fc.array(entry, { maxLength: room }),
      corrupt: fc.oneof(
        { weight: 3, arbitrary: fc.constant([]) },
        { weight: 1, arbitrary: fc.array(fc.record({ offset: fc.nat({ max: room - 1 }), entry }), { maxLength: 3 }) },
      ),
      tables: fc.array(fc.array(tableEntryArb(size), { minLength: 1, maxLength: 8 }), { minLength: TABLES.length, maxLength: TABLES.length }),
      huge: hugeArb,
      headers: fc.array(headerArb, { minLength: 8, maxLength: 8 }),
      driverEvent: fc.record({
        offWrap: fc.oneof(
          { weight: 3, arbitrary: fc.tuple(fc.nat({ max: size - 1 }), fc.boolean()).map(([i, w]) => i | (w ? 0x8000 : 0)) },
          { weight: 1, arbitrary: fc.nat({ max: 0xffff }) },
        ),
        flags: fc.oneof({ weight: 6, arbitrary: fc.constantFrom(0, 1, 2, 2, 3) }, { weight: 1, arbitrary: fc.nat({ max: 0xffff }) }),
      }),
      hold: fc.oneof(
        { weight: 3, arbitrary: fc.constant(0) },
        { weight: 2, arbitrary: fc.nat({ max: Math.min(size, 8) }) },
        { weight: 1, arbitrary: fc.constant(size) },
      ),
      refills: fc.oneof(
        { weight: 2, arbitrary: fc.constant([]) },
        {
          weight: 1,
          arbitrary: fc.array(
            fc.record({
              reap: fc.nat({ max: 4 }),
              requests: fc.array(requestArb, { maxLength: Math.min(size, 4) }),
              idBase: fc.oneof({ weight: 6, arbitrary: fc.nat({ max: size - 1 }) }, { weight: 1, arbitrary: fc.nat({ max: 0xffff }) }),
              entries: fc.array(entry, { maxLength: Math.min(size, 6) }),
            }),
            { minLength: 1, maxLength: 3 },
          ),
        },
      ),
    });
  });

// ---- the model ------------------------------------------------------------------------------------------------------

/** Linear position in [0, 2 * size) of `index | wrap << 15`: the index in wrap 1, size + index in wrap 0. */
function linearOf(pos: number, size: number): number {
  const index = pos & 0x7fff;
  return (pos & 0x8000) !== 0 ? index : size + index;
}

/** `index | wrap << 15` of a linear position. */
function encodePos(lin: number, size: number): number {
  return lin < size ? lin | 0x8000 : lin - size;
}

/** The AVAIL / USED bits of `mark` for a slot whose wrap counter is `wrap` (§2.8.1). */
function markBits(mark: Exclude<Mark, 'raw'>, wrap: boolean): number {
  switch (mark) {
    case 'avail':
      return wrap ? F_AVAIL : F_USED; // AVAIL = wrap, USED = !wrap
    case 'used':
      return wrap ? F_AVAIL | F_USED : 0; // AVAIL = USED = wrap
    case 'availOther':
      return markBits('avail', !wrap);
    case 'usedOther':
      return markBits('used', !wrap);
  }
}

function isAvailable(flags: number, wrap: boolean): boolean {
  return ((flags & F_AVAIL) !== 0) === wrap && ((flags & F_USED) !== 0) !== wrap;
}

/** The model's view of the device: positions (linear), the ids in flight and their slots. */
interface ModelState {
  avail: number;
  used: number;
  readonly inFlight: Map<number, number>;
  inFlightSlots: number;
}

interface ModelChain {
  readonly id: number;
  readonly slots: number;
  readonly segs: Segment[];
  readonly indirect: boolean;
  /** The wrap counter flipped inside the chain. */
  readonly straddles: boolean;
}

type ModelPop = 'empty' | { readonly error: string } | ModelChain;

function u16At(mem: GuardedMemory, gpa: number): number {
  const b = mem.peek(gpa, 2);
  return (b[0] ?? 0) | ((b[1] ?? 0) << 8);
}

/**
 * An independent model of popping the chain at `m.avail` (VIRTIO 1.2 §2.8.4-2.8.7, with the bounds packed-queue.ts
 * documents): 'empty', an error (with a reason for the counts), or the chain.
 */
export function modelPackedPop(mem: GuardedMemory, s: { size: number; indirect: boolean }, descAddr: number, m: ModelState): ModelPop {
  const size = s.size;
  const period = 2 * size;
  const room = size - m.inFlightSlots; // slots the device does not hold: a chain running past them runs over itself
  const budget = BigInt(Math.max(size, 1024));
  const maxBytes = BigInt(MAX_CHAIN_BYTES);
  const segs: Segment[] = [];
  let total = 0n;
  let seenWritable = false;
  const firstWrap = m.avail < size;
  const idCheck = (id: number): { error: string } | undefined => {
    if (id >= size) return { error: 'idRange' };
    if (m.inFlight.has(id)) return { error: 'idInFlight' };
    return undefined;
  };
  for (let k = 0; ; k++) {
    const lin = (m.avail + k) % period;
    const wrap = lin < size;
    const slot = wrap ? lin : lin - size;
    const raw = mem.peek(descAddr + 16 * slot, 16);
    const dv = new DataView(raw.buffer);
    const addr = dv.getBigUint64(0, true);
    const len = BigInt(dv.getUint32(8, true));
    const id = dv.getUint16(12, true);
    const flags = dv.getUint16(14, true);
    if (!isAvailable(flags, wrap)) return k === 0 ? 'empty' : { error: 'unavailable' };
    if (k >= room) return { error: 'loop' };
    if ((flags & INDIRECT) !== 0) {
      if (!s.indirect) return { error: 'indirectNotNegotiated' };
      if (k > 0) return { error: 'indirectInChain' };
      if ((flags & NEXT) !== 0) return { error: 'indirectWithNext' };
      if (len === 0n || len % 16n !== 0n || len / 16n > BigInt(MAX_INDIRECT_ENTRIES)) return { error: 'indirectLength' };
      const n = len / 16n;
      if (n > budget) return { error: 'tooLong' };
      if (addr >= TWO_53 || addr + len > TWO_53) return { error: 'address' };
      for (let i = 0n; i < n; i++) {
        const e = readEntry(mem, addr + 16n * i);
        if (e === undefined) return { error: 'tableUnmapped' };
        const ea = e.getBigUint64(0, true);
        const el = BigInt(e.getUint32(8, true));
        const ef = e.getUint16(14, true);
        if ((ef & INDIRECT) !== 0) return { error: 'nested' };
        if (ea >= TWO_53 || ea + el > TWO_53) return { error: 'address' };
        total += el;
        if (total > maxBytes) return { error: 'tooLong' };
        const writable = (ef & WRITE) !== 0;
        if (!writable && seenWritable) return { error: 'order' };
        seenWritable ||= writable;
        segs.push({ addr: Number(ea), len: Number(el), writable });
      }
      return idCheck(id) ?? { id, slots: 1, segs, indirect: true, straddles: false };
    }
    if (addr >= TWO_53 || addr + len > TWO_53) return { error: 'address' };
    if (BigInt(segs.length + 1) > budget) return { error: 'tooLong' };
    total += len;
    if (total > maxBytes) return { error: 'tooLong' };
    const writable = (flags & WRITE) !== 0;
    if (!writable && seenWritable) return { error: 'order' };
    seenWritable ||= writable;
    segs.push({ addr: Number(addr), len: Number(len), writable });
    if ((flags & NEXT) === 0) {
      // The buffer id is in the last descriptor of the list (§2.8.6).
      return idCheck(id) ?? { id, slots: k + 1, segs, indirect: false, straddles: wrap !== firstWrap };
    }
  }
}

/**
 * Whether the driver wants a used buffer notification (§2.8.10) after the used position moved by `moved` slots from
 * `from`: DISABLE no, DESC (with event idx) when the position `off_wrap` was among them, anything else yes.
 * undefined when either answer is fine (off_wrap names no slot of the ring).
 */
function modelNeedsNotification(size: number, eventIdx: boolean, flags: number, offWrap: number, from: number, moved: number): boolean | undefined {
  if (moved === 0) return false;
  const f = flags & 3;
  if (f === 1) return false;
  if (f !== 2 || !eventIdx) return true;
  const off = offWrap & 0x7fff;
  if (off >= size) return undefined;
  if (moved >= 2 * size) return true;
  const event = linearOf(offWrap, size);
  for (let k = 0; k < moved; k++) if ((from + k) % (2 * size) === event) return true;
  return false;
}

// ---- laying the driver's side -----------------------------------------------------------------------------------

function encodePacked(d: Omit<PackedRawDescriptor, 'flags'>, flags: number): Uint8Array {
  const b = new Uint8Array(16);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt.asUintN(64, typeof d.addr === 'bigint' ? d.addr : BigInt(d.addr)), true);
  v.setUint32(8, d.len >>> 0, true);
  v.setUint16(12, d.id & 0xffff, true);
  v.setUint16(14, flags & 0xffff, true);
  return b;
}

function layEntry(mem: GuardedMemory, descAddr: number, size: number, lin: number, e: RingEntry): void {
  const wrap = lin < size;
  const slot = wrap ? lin : lin - size;
  const flags = e.mark === 'raw' ? e.desc.flags : (e.desc.flags & 0x7f7f) | markBits(e.mark, wrap);
  mem.poke(descAddr + 16 * slot, encodePacked(e.desc, flags));
}

/**
 * Lays requests (as a driver does: direct chains of consecutive slots with the id in the last one, other ids
 * garbage; or one slot referring to an indirect table) and then entries from linear position `lin` on, at most
 * `maxSlots` slots. Returns the slots laid.
 */
function layDriver(
  mem: GuardedMemory,
  s: PackedScenario,
  descAddr: number,
  lin: number,
  requests: readonly RequestSpec[],
  ids: (k: number) => number,
  jBase: number,
  entries: readonly RingEntry[],
  maxSlots: number,
): number {
  const size = s.size;
  const period = 2 * size;
  let laid = 0;
  requests.forEach((r, k) => {
    const j = jBase + k;
    const segs = requestSegments(mem, r, j);
    const id = ids(k);
    if (r.indirect && s.indirect && laid < maxSlots) {
      const table = requestTableAddr(r, j);
      // NEXT on all but the last entry for odd j (reserved in a table: to be ignored), the ids garbage.
      segs.forEach((x, i) =>
        mem.poke(table + 16 * i, encodePacked({ addr: x.addr, len: x.len, id: 0xa5a5 }, (x.writable ? WRITE : 0) | (j % 2 === 1 && i < segs.length - 1 ? NEXT : 0))),
      );
      layEntry(mem, descAddr, size, (lin + laid) % period, { desc: { addr: table, len: 16 * segs.length, id, flags: INDIRECT }, mark: 'avail' });
      laid++;
    } else if (laid + segs.length <= maxSlots) {
      segs.forEach((x, i) => {
        const last = i === segs.length - 1;
        const desc = { addr: x.addr, len: x.len, id: last ? id : (id + 1 + i) & 0xffff, flags: (x.writable ? WRITE : 0) | (last ? 0 : NEXT) };
        layEntry(mem, descAddr, size, (lin + laid + i) % period, { desc, mark: 'avail' });
      });
      laid += segs.length;
    }
  });
  for (const e of entries) {
    if (laid >= maxSlots) break;
    layEntry(mem, descAddr, size, (lin + laid) % period, e);
    laid++;
  }
  return laid;
}

function writePackedHuge(mem: GuardedMemory, h: PackedHugeTable): void {
  const r = mem.regionOf(HUGE_TABLE);
  if (r === undefined) return;
  const v = new DataView(r.buffer, r.guard);
  const n = Math.min(h.count, Math.floor((r.size - (HUGE_TABLE - r.gpa)) / 16));
  const at = h.at % h.count;
  for (let i = 0; i < n; i++) {
    const off = HUGE_TABLE - r.gpa + 16 * i;
    let addr = BigInt(0x9000 + (i % 64) * 16);
    let len = i === 0 ? 16 : 1;
    let flags = i >= h.writableFrom ? WRITE : 0;
    let id = 0;
    if (h.shape === 'noise') {
      flags |= NEXT | (i % 2 === 1 ? F_AVAIL | F_USED : 0);
      id = Math.imul(i, 40503) & 0xffff;
    } else if (h.shape === 'nested' && i === at) {
      flags |= INDIRECT;
    } else if (h.shape === 'bad' && i === at) {
      addr = TWO_53 - 1n;
      len = 2;
    } else if (h.shape === 'bytes') {
      len = 0x1000_0000;
    }
    v.setBigUint64(off, addr, true);
    v.setUint32(off + 8, len, true);
    v.setUint16(off + 12, id, true);
    v.setUint16(off + 14, flags, true);
  }
}

/** Whether the model expects setup to succeed: aligned areas, each inside one region, a start index below the size. */
function modelSetup(mem: GuardedMemory, s: PackedScenario, ring: { desc: number; driver: number; device: number }): boolean {
  const inOne = (gpa: number, len: number): boolean => {
    const r = mem.regionOf(gpa);
    return r !== undefined && gpa + len <= r.end;
  };
  return (
    ring.desc % 16 === 0 &&
    ring.driver % 4 === 0 &&
    ring.device % 4 === 0 &&
    inOne(ring.desc, 16 * s.size) &&
    inOne(ring.driver, 4) &&
    inOne(ring.device, 4) &&
    (s.start & 0x7fff) < s.size
  );
}

// ---- one case -----------------------------------------------------------------------------------------------------

export interface PackedChainCounts {
  cases: number;
  setupRejected: number;
  popped: number;
  popErrors: number;
  completed: number;
  handlerErrors: number;
  hugeTables: number;
  /** Accepted chains whose wrap counter flipped inside them; accepted indirect chains. */
  straddled: number;
  indirect: number;
  /** Completions that were not of the oldest chain in flight. */
  outOfOrder: number;
  refills: number;
  /** Pops rejected (as the model expected) for an id in flight, running over slots in flight, a descriptor not available mid-chain. */
  idInFlight: number;
  loop: number;
  unavailable: number;
}

export function newPackedChainCounts(): PackedChainCounts {
  return {
    cases: 0,
    setupRejected: 0,
    popped: 0,
    popErrors: 0,
    completed: 0,
    handlerErrors: 0,
    hugeTables: 0,
    straddled: 0,
    indirect: 0,
    outOfOrder: 0,
    refills: 0,
    idInFlight: 0,
    loop: 0,
    unavailable: 0,
  };
}

/**
 * The worker's kind of guest memory, a `MemoryTable` (PackedQueue looks an indirect table's region up in it instead
 * of calling `view`), over the buffers of a `GuardedMemory`, counting `view` calls and recording impossible ones in
 * the guarded memory's `violations`.
 */
class CountingTable extends MemoryTable {
  calls = 0;
  readonly #guarded: GuardedMemory;

  constructor(mem: GuardedMemory) {
    super(mem.regions.map((r, slot) => ({ gpa: r.gpa, size: r.size, uva: r.gpa, fileOffset: 0, buffer: r.buffer, bufferOffset: r.guard, dev: 0n, ino: 0n, slot })));
    this.#guarded = mem;
  }

  override view(gpa: number, len: number): Uint8Array {
    this.calls++;
    if (!Number.isSafeInteger(gpa) || gpa < 0 || !Number.isSafeInteger(len) || len < 0) {
      this.#guarded.violations.push(`view(${gpa}, ${len}): not a non-negative safe integer range`);
      throw new VirtioError('GUEST_MEMORY_UNMAPPED', `bad range ${gpa}+${len}`);
    }
    return super.view(gpa, len);
  }
}

function fail(message: string, cause?: unknown): never {
  throw new Error(message, cause === undefined ? undefined : { cause });
}

/**
 * Lays out scenario `s` in memory and runs the device over it. Throws (an assertion-style Error) when an invariant
 * breaks; returns normally otherwise.
 */
export function runPackedCase(rig: ChainRig, s: PackedScenario, counts: PackedChainCounts): void {
  counts.cases++;
  const mem = s.tight ? rig.tight : rig.guarded;
  mem.clear();
  mem.onView = undefined;
  mem.violations.length = 0;
  const ring = ringAddrs(s);
  const size = s.size;
  const period = 2 * size;
  const rnd = prng(s.seed);
  const startIndex = s.start & 0x7fff;
  const startValid = startIndex < size;

  // The driver's side, written byte by byte (parts that fall in holes are dropped).
  if (s.background === 'lapped' && startValid) {
    // As a driver leaves it: slots before the start index used in this lap, the others in the previous one.
    const wrap = (s.start & 0x8000) !== 0;
    for (let slot = 0; slot < size; slot++) mem.poke(ring.desc + 16 * slot + 14, le16(markBits('used', slot < startIndex ? wrap : !wrap)));
  } else if (s.background === 'garbage') {
    const g = new Uint8Array(16 * size);
    for (let i = 0; i < g.length; i++) g[i] = Math.floor(rnd() * 256);
    mem.poke(ring.desc, g);
  }
  s.tables.forEach((t, k) => t.forEach((d, i) => mem.poke((TABLES[k] as number) + 16 * i, encodePacked(d, d.flags))));
  if (s.huge !== undefined) {
    counts.hugeTables++;
    writePackedHuge(mem, s.huge);
  }
  if (s.requests.length === 0) {
    s.headers.forEach((h, i) => {
      const b = new Uint8Array(16);
      const v = new DataView(b.buffer);
      v.setUint32(0, h.type >>> 0, true);
      v.setUint32(8, h.sectorLo >>> 0, true);
      v.setUint32(12, h.sectorHi >>> 0, true);
      mem.poke(HEADERS + 0x100 * i, b);
    });
  }
  const startLin = startValid ? linearOf(s.start, size) : 0;
  const laid = layDriver(mem, s, ring.desc, startLin, s.requests, (k) => (s.idBase + k * s.idStride) % size, 0, s.entries, size);
  for (const c of s.corrupt) layEntry(mem, ring.desc, size, (startLin + c.offset) % period, c.entry);
  mem.poke(ring.driver, le16(s.driverEvent.offWrap));
  mem.poke(ring.driver + 2, le16(s.driverEvent.flags));

  // Setup, as the worker's startQueue: construct, attach, resume (a VirtioError there fails the queue).
  const setupOk = modelSetup(mem, s, ring);
  // What the device gets: the guarded memory itself, or a MemoryTable over its buffers as the worker has.
  const dev: GuestMemory = s.workerMemory ? new CountingTable(mem) : mem;
  const viewCalls = (): number => (dev instanceof CountingTable ? dev.calls : mem.viewCalls);
  let queue: PackedQueue;
  try {
    queue = new PackedQueue({ size, descAddr: ring.desc, driverAddr: ring.driver, deviceAddr: ring.device, eventIdx: s.eventIdx, indirect: s.indirect, cacheViews: s.cacheViews });
    queue.attach(dev);
    queue.resume(s.start);
  } catch (err) {
    if (!(err instanceof VirtioError)) fail(`queue setup threw a non-VirtioError: ${String(err)}`, err);
    if (setupOk) fail(`queue setup failed (${err.code}: ${err.message}) where the model expects it to work`, err);
    counts.setupRejected++;
    return;
  }
  if (!setupOk) fail(`queue setup succeeded where the model expects it to fail (ring ${JSON.stringify(ring)}, start 0x${s.start.toString(16)})`);

  const m: ModelState = { avail: startLin, used: startLin, inFlight: new Map(), inFlightSlots: 0 };
  /** The used position at the last notification check and the slots pushed since. */
  let checkedUsed = startLin;
  let moved = 0;
  let firstOfBatch: { slot: number; flags: number } | undefined;
  const pending: { id: number; len: number }[] = [];
  let before = mem.snapshot();
  const allowed = new RangeSet();
  allowed.add(ring.device, ring.device + 4);
  const chain = queue.createChain();
  // A crossing table costs up to 2 view calls per entry, 1 for the whole table otherwise; 3 per ring access (the three
  // areas resolved again) without cached views.
  const maxViewsPerPop = 2 * queue.maxChainLength + 8 + (s.cacheViews ? 0 : 3);
  let driverLin = (startLin + laid) % period;
  let jNext = s.requests.length;
  let stopped = false;

  const checkWrites = (): void => {
    const outside = mem.changedOutside(before, allowed);
    if (outside !== undefined) fail(`the device wrote outside the writable buffers, the used descriptors and its event area: ${outside}`);
  };

  /** Completes `pending[k]` (pushUsed) and checks the used descriptor it wrote. */
  const complete = (k: number): void => {
    const p = pending.splice(k, 1)[0] as { id: number; len: number };
    if (k > 0) counts.outOfOrder++;
    const slots = m.inFlight.get(p.id);
    if (slots === undefined) fail(`model: id ${p.id} is not in flight`);
    const at = m.used;
    const wrap = at < size;
    const slot = wrap ? at : at - size;
    const off = ring.desc + 16 * slot;
    const flagsBefore = u16At(mem, off + 14);
    try {
      queue.pushUsed(p.id, p.len);
    } catch (err) {
      fail(`pushUsed(${p.id}, ${p.len}) threw ${String(err)}`, err);
    }
    const b = new DataView(mem.peek(off + 8, 8).buffer);
    const len = b.getUint32(0, true);
    const id = b.getUint16(4, true);
    const flags = b.getUint16(6, true);
    if (len !== p.len || id !== p.id) fail(`used descriptor at slot ${slot}: id ${id} len ${len}, expected id ${p.id} len ${p.len}`);
    const expectedFlags = (wrap ? F_AVAIL | F_USED : 0) | (p.len > 0 ? WRITE : 0);
    if (firstOfBatch === undefined) {
      if (flags !== flagsBefore) fail(`the first used descriptor of a batch (slot ${slot}) got its flags 0x${flags.toString(16)} before publishUsed`);
      firstOfBatch = { slot, flags: expectedFlags };
    } else if (flags !== expectedFlags) {
      fail(`used descriptor at slot ${slot} (wrap ${wrap ? 1 : 0}, len ${p.len}): flags 0x${flags.toString(16)}, expected 0x${expectedFlags.toString(16)}`);
    }
    allowed.add(off + 8, off + 16);
    m.used = (at + slots) % period;
    m.inFlight.delete(p.id);
    m.inFlightSlots -= slots;
    moved += slots;
    if (queue.usedPosition !== encodePos(m.used, size)) fail(`used position 0x${queue.usedPosition.toString(16)}, model 0x${encodePos(m.used, size).toString(16)}`);
    if (queue.inFlightSlots !== m.inFlightSlots) fail(`${queue.inFlightSlots} slots in flight, model ${m.inFlightSlots}`);
    counts.completed++;
  };

  /** The worker's publish: publishUsed, then the notification check. */
  const publish = (): void => {
    queue.publishUsed();
    if (firstOfBatch !== undefined) {
      const flags = u16At(mem, ring.desc + 16 * firstOfBatch.slot + 14);
      if (flags !== firstOfBatch.flags) fail(`first used descriptor of the batch (slot ${firstOfBatch.slot}): flags 0x${flags.toString(16)} after publishUsed, expected 0x${firstOfBatch.flags.toString(16)}`);
      firstOfBatch = undefined;
    }
    const expected = modelNeedsNotification(size, s.eventIdx, u16At(mem, ring.driver + 2), u16At(mem, ring.driver), checkedUsed, moved);
    const got = queue.needsNotification();
    if (expected !== undefined && got !== expected) fail(`needsNotification ${got}, model ${expected} (moved ${moved} from ${checkedUsed}, driver area ${u16At(mem, ring.driver).toString(16)}/${u16At(mem, ring.driver + 2)})`);
    checkedUsed = m.used;
    moved = 0;
  };

  const completeSome = (n: number): void => {
    for (let i = 0; i < n && pending.length > 0; i++) complete(Math.floor(rnd() * pending.length));
  };

  const batches = 1 + s.refills.length;
  for (let batch = 0; batch < batches && !stopped; batch++) {
    if (batch > 0) {
      const rf = s.refills[batch - 1] as Refill;
      completeSome(rf.reap);
      publish();
      checkWrites();
      counts.refills++;
      const n = layDriver(mem, s, ring.desc, driverLin, rf.requests, (k) => (rf.idBase + k) % (rf.idBase < size ? size : 0x10000), jNext, rf.entries, size);
      driverLin = (driverLin + n) % period;
      jNext += rf.requests.length;
      before = mem.snapshot();
    }
    // The worker's loop (queue-worker.ts processQueue with rearm).
    queue.disableNotification();
    let handled = 0;
    for (let round = 1; ; round++) {
      while (handled < WORKER_BATCH_LIMIT) {
        const expected = modelPackedPop(mem, s, ring.desc, m);
        const base = queue.getBase();
        const calls = viewCalls();
        const t0 = performance.now();
        let ok: boolean;
        try {
          ok = queue.popChain(dev, chain);
        } catch (err) {
          if (!(err instanceof VirtioError)) fail(`popChain threw a non-VirtioError: ${String(err)}`, err);
          if (queue.getBase() !== base) fail(`a failed pop (${err.code}) moved the avail position`, err);
          if (queue.inFlightSlots !== m.inFlightSlots) fail(`a failed pop (${err.code}) changed the slots in flight`, err);
          if (chain.count !== 0) fail(`a failed pop (${err.code}) left ${chain.count} segments in the chain`, err);
          if (expected === 'empty' || !('error' in expected)) {
            fail(`the device rejected (${err.code}: ${err.message}) what the model ${expected === 'empty' ? 'sees as an empty ring' : `accepts: ${JSON.stringify(expected).slice(0, 300)}`}`, err);
          }
          counts.popErrors++;
          if (expected.error === 'idInFlight') counts.idInFlight++;
          else if (expected.error === 'loop') counts.loop++;
          else if (expected.error === 'unavailable') counts.unavailable++;
          stopped = true;
          break;
        }
        const dt = performance.now() - t0;
        if (viewCalls() - calls > maxViewsPerPop) fail(`one pop made ${viewCalls() - calls} view calls`);
        if (dt > 500) fail(`one pop took ${dt.toFixed(0)} ms`);
        if (!ok) {
          if (expected !== 'empty') fail(`popChain found nothing, the model expects ${JSON.stringify(expected).slice(0, 300)}`);
          if (queue.getBase() !== base) fail('an empty pop moved the avail position');
          break;
        }
        if (expected === 'empty') fail(`popChain popped a chain (id ${chain.head}) where the model sees an empty ring`);
        if ('error' in expected) fail(`the device accepted a chain the model rejects (${expected.error}): id ${chain.head} ${JSON.stringify(segmentsOf(chain).slice(0, 8))}`);
        counts.popped++;
        checkChainBounds(chain, size, queue.maxChainLength);
        const got = segmentsOf(chain);
        if (chain.head !== expected.id || chain.indirect !== expected.indirect || JSON.stringify(got) !== JSON.stringify(expected.segs)) {
          fail(
            `chain differs from the model:\n  device id ${chain.head} indirect ${chain.indirect} ${JSON.stringify(got.slice(0, 8))}\n` +
              `  model  id ${expected.id} indirect ${expected.indirect} ${JSON.stringify(expected.segs.slice(0, 8))}`,
          );
        }
        m.avail = (m.avail + expected.slots) % period;
        m.inFlight.set(expected.id, expected.slots);
        m.inFlightSlots += expected.slots;
        if (queue.getBase() !== encodePos(m.avail, size)) fail(`avail position 0x${queue.getBase().toString(16)} after a pop, model 0x${encodePos(m.avail, size).toString(16)}`);
        if (queue.inFlightSlots !== m.inFlightSlots) fail(`${queue.inFlightSlots} slots in flight after a pop, model ${m.inFlightSlots}`);
        if (expected.straddles) counts.straddled++;
        if (expected.indirect) counts.indirect++;
        for (let i = chain.readableCount; i < chain.count; i++) {
          const a = chain.addr[i] as number;
          allowed.add(a, a + (chain.len[i] as number));
        }
        let len: number;
        try {
          len = rig.handler.process(dev, chain);
        } catch (err) {
          if (!(err instanceof VirtioError)) fail(`the blk handler threw a non-VirtioError: ${String(err)}`, err);
          counts.handlerErrors++;
          stopped = true;
          break;
        }
        if (!Number.isInteger(len) || len < 1 || len > chain.writableBytes) fail(`used length ${len} for a chain with ${chain.writableBytes} writable bytes`);
        // Now and then reported as 0 bytes written (a device that fills nothing, net TX): a used descriptor without WRITE.
        pending.push({ id: chain.head, len: rnd() < 0.1 ? 0 : len });
        handled++;
        while (pending.length > s.hold) complete(Math.floor(rnd() * pending.length));
      }
      if (stopped) break;
      publish();
      if (handled >= WORKER_BATCH_LIMIT || round >= WORKER_BATCH_LIMIT) break; // the worker comes back later
      let more: boolean;
      try {
        more = queue.enableNotification();
      } catch (err) {
        fail(`enableNotification threw ${String(err)}`, err);
      }
      const at = m.avail;
      const expectMore = isAvailable(u16At(mem, ring.desc + 16 * (at < size ? at : at - size) + 14), at < size);
      if (more !== expectMore) fail(`enableNotification said ${more}, the model ${expectMore}`);
      if (s.eventIdx && u16At(mem, ring.device) !== encodePos(at, size)) {
        fail(`enableNotification with event idx: device off_wrap 0x${u16At(mem, ring.device).toString(16)}, expected 0x${encodePos(at, size).toString(16)}`);
      }
      if (!more) break; // idle: the worker would poll now
      queue.disableNotification();
    }
  }
  if (!stopped) {
    // The I/O still in flight completes, in any order.
    completeSome(pending.length);
    publish();
  }
  if (mem.violations.length > 0) fail(`impossible view calls: ${mem.violations.slice(0, 3).join('; ')}`);
  const guard = mem.checkGuards();
  if (guard !== undefined) fail(guard);
  checkWrites();
}

/** Runs the packed chain fuzzer for `ms` (or `numRuns` cases); throws fast-check's report (with seed and path) on a failure. */
export function fuzzPackedChains(options: { ms: number; seed: number; numRuns?: number }): FuzzReport {
  const rig = new ChainRig();
  const counts = newPackedChainCounts();
  const t0 = Date.now();
  try {
    timeBoxedAssert(
      fc.property(packedScenarioArb, (s) => {
        runPackedCase(rig, s, counts);
      }),
      { ms: options.ms, seed: options.seed, ...(options.numRuns !== undefined ? { numRuns: options.numRuns } : {}) },
    );
  } finally {
    rig.close();
  }
  return { target: 'packedChains', seed: options.seed, ms: Date.now() - t0, runs: counts.cases, counts: { ...counts } };
}
