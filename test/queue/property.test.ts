/**
 * Property tests (fast-check): random descriptor tables never make the device misbehave, and random valid chains
 * survive a driver -> device -> driver round trip unchanged.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { VirtioError } from '../../src/errors.js';
import {
  MAX_CHAIN_BYTES,
  MAX_INDIRECT_ENTRIES,
  SplitQueueDriver,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  type RawDescriptor,
} from '../../src/queue/index.js';
import { BUF_BASE, HOLE_AB, REGION_B, REGION_C, queuePair, segmentsOf, type TestMemory } from './test-memory.js';

const RUNS = 300;
const TWO_53 = 2n ** 53n;

/** Where indirect tables may be: in region B, straddling B/C, running into the hole after A, in a hole. */
const TABLE_ADDRS = [REGION_B + 0x100, REGION_C - 40, HOLE_AB - 48, HOLE_AB + 0x100] as const;
const MAX_TABLE_ENTRIES = 6;

const addrArb: fc.Arbitrary<bigint> = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom(...TABLE_ADDRS.map(BigInt)) },
  { weight: 3, arbitrary: fc.constantFrom(BigInt(BUF_BASE), BigInt(HOLE_AB - 8), TWO_53 - 16n, TWO_53, 2n ** 64n - 1n) },
  { weight: 2, arbitrary: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }) },
);
const lenArb = (): fc.Arbitrary<number> =>
  fc.oneof(
    { weight: 5, arbitrary: fc.constantFrom(0, 1, 16, 17, 32, 48, 64, 96, 16 * MAX_TABLE_ENTRIES) },
    { weight: 2, arbitrary: fc.constantFrom(0xffff_ffff, 0x8000_0000, 16 * (MAX_INDIRECT_ENTRIES + 1)) },
    { weight: 1, arbitrary: fc.nat({ max: 0xffff_ffff }) },
  );
/** Descriptors: mostly plausible data or indirect descriptors (so valid chains are common), some fully random. */
const descArb = (size: number): fc.Arbitrary<RawDescriptor> => {
  const next = fc.oneof(
    { weight: 8, arbitrary: fc.nat({ max: Math.max(size, MAX_TABLE_ENTRIES) - 1 }) },
    { weight: 1, arbitrary: fc.nat({ max: 0xffff }) },
  );
  const data = fc.record({
    addr: fc.oneof(fc.bigInt({ min: 0n, max: 0xffffn }), fc.constant(BigInt(HOLE_AB - 8))),
    len: fc.nat({ max: 4096 }),
    flags: fc.constantFrom(0, 0, VRING_DESC_F_NEXT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE),
    next,
  });
  const indirect = fc.record({
    addr: fc.constantFrom(...TABLE_ADDRS.map(BigInt)),
    len: fc.oneof({ weight: 6, arbitrary: fc.integer({ min: 1, max: MAX_TABLE_ENTRIES }).map((k) => 16 * k) }, { weight: 1, arbitrary: lenArb() }),
    flags: fc.oneof(
      { weight: 6, arbitrary: fc.constant(VRING_DESC_F_INDIRECT) },
      { weight: 1, arbitrary: fc.constantFrom(VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE) },
    ),
    next,
  });
  const random = fc.record({
    addr: addrArb,
    len: lenArb(),
    flags: fc.oneof({ weight: 3, arbitrary: fc.nat({ max: 7 }) }, { weight: 1, arbitrary: fc.nat({ max: 0xffff }) }),
    next,
  });
  return fc.oneof({ weight: 8, arbitrary: data }, { weight: 2, arbitrary: indirect }, { weight: 1, arbitrary: random });
};

interface Scenario {
  readonly size: number;
  readonly indirect: boolean;
  readonly start: number;
  readonly descs: readonly RawDescriptor[];
  readonly tables: readonly (readonly RawDescriptor[])[];
  readonly heads: readonly number[];
  readonly availDelta: number;
}

const scenarioArb: fc.Arbitrary<Scenario> = fc
  .constantFrom(1, 2, 4, 8, 16)
  .chain((size) =>
    fc.record({
      size: fc.constant(size),
      indirect: fc.boolean(),
      start: fc.oneof(fc.constant(0), fc.constant(0xfffe), fc.nat({ max: 0xffff })),
      descs: fc.array(descArb(size), { minLength: size, maxLength: size }),
      tables: fc.array(fc.array(descArb(size), { minLength: 1, maxLength: MAX_TABLE_ENTRIES }), {
        minLength: TABLE_ADDRS.length,
        maxLength: TABLE_ADDRS.length,
      }),
      heads: fc.array(fc.oneof({ weight: 5, arbitrary: fc.nat({ max: size - 1 }) }, { weight: 1, arbitrary: fc.nat({ max: 0xffff }) }), {
        minLength: 1,
        maxLength: size,
      }),
      availDelta: fc.oneof({ weight: 5, arbitrary: fc.nat({ max: size }) }, { weight: 1, arbitrary: fc.nat({ max: 0xffff }) }),
    }),
  );

type Segs = { addr: number; len: number; writable: boolean }[];

/**
 * An independent, naive model of the validation rules: reads through TestMemory.read, detects loops with a visited
 * set, does address arithmetic in bigint. Returns the segments or 'error'.
 */
function model(mem: TestMemory, s: Scenario, descAddr: number, head: number): Segs | 'error' {
  if (head >= s.size) return 'error';
  const budget = Math.max(s.size, 1024);
  const segs: Segs = [];
  let total = 0;
  let seenWritable = false;
  let table = BigInt(descAddr);
  let tableLen = s.size;
  let idx = head;
  let inIndirect = false;
  let visited = new Set<number>();
  try {
    for (;;) {
      if (visited.has(idx)) return 'error';
      visited.add(idx);
      const raw = new DataView(mem.read(Number(table) + 16 * idx, 16).buffer);
      const addr = raw.getBigUint64(0, true);
      const len = raw.getUint32(8, true);
      const flags = raw.getUint16(12, true);
      const next = raw.getUint16(14, true);
      // Addresses >= 2^53 are never mapped (u64ToAddress rejects them), even for a zero-length buffer.
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
  } catch (err) {
    if (err instanceof VirtioError) return 'error';
    throw err;
  }
}

test('random rings: popChain only throws VirtioErrors, terminates, and reports exactly what the model accepts', () => {
  fc.assert(
    fc.property(scenarioArb, (s) => {
      const p = queuePair({ size: s.size, indirect: s.indirect });
      const { mem, driver, queue, chain } = p;
      driver.resetPositions(s.start);
      queue.setBase(s.start);
      s.descs.forEach((d, i) => driver.writeDescriptor(i, d));
      s.tables.forEach((t, k) => {
        t.forEach((d, i) => {
          const gpa = (TABLE_ADDRS[k] as number) + 16 * i;
          try {
            SplitQueueDriver.writeDescriptorAt(mem, gpa, d);
          } catch {
            // Parts of some tables are in holes: those entries stay unmapped.
          }
        });
      });
      for (const h of s.heads) driver.pushAvailRaw(h);
      driver.setAvailIdx(s.start + s.availDelta);
      const layout = SplitQueueDriver.layout(s.size, 0x1000);

      // At most `size` chains can be popped before avail.idx is reached (a larger delta is rejected up front).
      for (let n = 0; n <= s.size; n++) {
        const at = queue.lastAvailIdx;
        const head = mem.read(layout.availAddr + 4 + 2 * (at & (s.size - 1)), 2);
        const expected =
          ((s.start + s.availDelta - at) & 0xffff) > s.size ? 'error' : model(mem, s, layout.descAddr, (head[0] ?? 0) | ((head[1] ?? 0) << 8));
        const calls = mem.viewCalls;
        let ok: boolean;
        try {
          ok = queue.popChain(mem, chain);
        } catch (err) {
          assert.ok(err instanceof VirtioError, `not a VirtioError: ${String(err)}`);
          assert.match(err.code, /^(VIRTIO|GUEST_MEMORY)_[A-Z_]+$/);
          assert.equal(expected, 'error', `device rejected (${err.code}: ${err.message}) what the model accepts`);
          assert.equal(queue.lastAvailIdx, at);
          return;
        }
        if (!ok) {
          assert.equal((s.start + s.availDelta) & 0xffff, at);
          return;
        }
        // Bounded work: one view per indirect table, at most two per entry of a table that crosses a region end.
        assert.ok(mem.viewCalls - calls <= 2 * MAX_TABLE_ENTRIES + 1);
        assert.notEqual(expected, 'error', 'device accepted what the model rejects');
        assert.deepEqual(segmentsOf(chain), expected);
        // Invariants, independent of the model.
        assert.ok(chain.count >= 1 && chain.count <= queue.maxChainLength);
        let total = 0;
        for (let i = 0; i < chain.count; i++) {
          const a = chain.addr[i] ?? -1;
          const l = chain.len[i] ?? -1;
          assert.ok(Number.isSafeInteger(a) && a >= 0 && a + l <= 2 ** 53);
          assert.equal(chain.writable[i] === 1, i >= chain.readableCount);
          total += l;
        }
        assert.equal(total, chain.readableBytes + chain.writableBytes);
        assert.ok(total <= MAX_CHAIN_BYTES);
      }
      assert.fail('popped more chains than the queue size');
    }),
    { numRuns: RUNS },
  );
});

const segmentArb = fc.record({
  addr: fc.oneof(fc.nat({ max: 0xffff }), fc.constantFrom(REGION_C - 8, 2 ** 53 - 4096)),
  len: fc.nat({ max: 4096 }),
});

test('random valid chains survive the round trip: same segments at the device, same tokens and lengths back', () => {
  fc.assert(
    fc.property(
      fc.constantFrom(2, 4, 8),
      fc.boolean(),
      fc.nat({ max: 0xffff }),
      fc.array(
        fc.record({
          readable: fc.array(segmentArb, { maxLength: 3 }),
          writable: fc.array(segmentArb, { maxLength: 3 }),
          indirect: fc.boolean(),
        }),
        { minLength: 1, maxLength: 24 },
      ),
      (size, eventIdx, start, requests) => {
        const { mem, driver, queue, chain } = queuePair({ size, eventIdx });
        driver.resetPositions(start);
        queue.setBase(start);
        const sent = new Map<string, Segs>();
        const byHead = new Map<number, { segs: Segs; indirect: boolean }>();
        const back: string[] = [];
        let next = 0;
        let id = 0;
        const tableOf = (token: number): number => REGION_B + 0x100 * (token % 64);
        while (next < requests.length || driver.inFlight > 0) {
          // Driver: add as many as fit, publish.
          while (next < requests.length) {
            const r = requests[next];
            if (r === undefined) break;
            const segs: Segs = [
              ...r.readable.map((x) => ({ ...x, writable: false })),
              ...r.writable.map((x) => ({ ...x, writable: true })),
            ];
            if (segs.length === 0) segs.push({ addr: BUF_BASE, len: 1, writable: true });
            const token = `r${id}`;
            // A chain longer than the queue only fits through an indirect table.
            const indirect = r.indirect || segs.length > size;
            const head = driver.addChain(segs, token, indirect ? { indirectAddr: tableOf(id) } : {});
            if (head < 0) break;
            sent.set(token, segs);
            byHead.set(head, { segs, indirect });
            id++;
            next++;
          }
          driver.publish();
          // Device: pop everything, complete in reverse order with len = writable bytes.
          const done: [number, number][] = [];
          while (queue.popChain(mem, chain)) {
            const expected = byHead.get(chain.head);
            assert.ok(expected !== undefined, `head ${chain.head} is not in flight`);
            assert.deepEqual(segmentsOf(chain), expected.segs);
            assert.equal(chain.indirect, expected.indirect);
            byHead.delete(chain.head);
            done.push([chain.head, chain.writableBytes]);
          }
          assert.ok(done.length > 0);
          for (const [h, len] of done.reverse()) queue.pushUsed(h, len);
          queue.publishUsed();
          driver.pollUsed((token, len) => {
            const segs = sent.get(token);
            assert.ok(segs !== undefined);
            assert.equal(len, segs.filter((x) => x.writable).reduce((a, x) => a + x.len, 0));
            back.push(token);
          });
        }
        assert.equal(back.length, requests.length);
        assert.equal(driver.freeCount, size);
        assert.equal(queue.lastAvailIdx, (start + requests.length) & 0xffff);
      },
    ),
    { numRuns: 150 },
  );
});
