/**
 * The packed virtqueue, driver and device together (VIRTIO 1.2 §2.8), checked against hex images of the ring: each
 * slot shown as `addr len id flags` in hex (flags 4 digits: 0x0080 AVAIL, 0x8000 USED, 1 NEXT, 2 WRITE, 4 INDIRECT),
 * the event suppression areas as `off_wrap/flags`.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { VhostError, VirtioError } from '../../src/errors.js';
import {
  DescriptorChain,
  PackedQueue,
  PackedQueueDriver,
  VRING_DESC_F_INDIRECT as INDIRECT,
  VRING_DESC_F_NEXT as NEXT,
  VRING_DESC_F_WRITE as WRITE,
  VRING_PACKED_DESC_F_AVAIL as AVAIL,
  VRING_PACKED_DESC_F_USED as USED,
  VRING_PACKED_EVENT_FLAG_DESC,
  VRING_PACKED_EVENT_FLAG_DISABLE,
  VRING_PACKED_EVENT_FLAG_ENABLE,
  packedNeedEvent,
  type PackedRawDescriptor,
  type PackedRingLayout,
} from '../../src/queue/index.js';
import { BUF_BASE, HOLE_AB, REGION_B, REGION_C, RING_BASE, codeOf, segmentsOf, standardMemory, type TestMemory } from './test-memory.js';

interface PackedPair {
  readonly mem: TestMemory;
  readonly driver: PackedQueueDriver<string>;
  readonly queue: PackedQueue;
  readonly chain: DescriptorChain;
  readonly layout: PackedRingLayout;
}

interface PackedPairOptions {
  readonly size?: number;
  readonly eventIdx?: boolean;
  readonly indirect?: boolean;
  readonly cacheViews?: boolean;
  readonly base?: number;
}

function packedPair(o: PackedPairOptions = {}): PackedPair {
  const mem = standardMemory();
  const size = o.size ?? 8;
  const eventIdx = o.eventIdx ?? false;
  const layout = PackedQueueDriver.layout(size, o.base ?? RING_BASE);
  const driver = new PackedQueueDriver<string>(mem, { size, ...layout, eventIdx });
  const queue = new PackedQueue({ size, ...layout, eventIdx, indirect: o.indirect ?? true, cacheViews: o.cacheViews ?? true });
  queue.attach(mem);
  return { mem, driver, queue, chain: queue.createChain(), layout };
}

/** The ring as `addr len id flags` per slot, in hex. */
function image(p: PackedPair, slots?: number): string[] {
  const out: string[] = [];
  for (let i = 0; i < (slots ?? p.driver.size); i++) {
    const d = p.driver.readDescriptor(i);
    out.push(`${d.addr.toString(16)} ${d.len.toString(16)} ${d.id.toString(16)} ${d.flags.toString(16).padStart(4, '0')}`);
  }
  return out;
}

/** An event suppression area as `off_wrap/flags` in hex. */
function ev(e: { offWrap: number; flags: number }): string {
  return `${e.offWrap.toString(16).padStart(4, '0')}/${e.flags}`;
}

const w = (len: number, addr = BUF_BASE): { addr: number; len: number; writable: boolean } => ({ addr, len, writable: true });
const r = (len: number, addr = BUF_BASE): { addr: number; len: number; writable: boolean } => ({ addr, len, writable: false });

function pops(p: PackedPair): number[] {
  const ids: number[] = [];
  while (p.queue.popChain(p.mem, p.chain)) ids.push(p.chain.head);
  return ids;
}

function drain(p: PackedPair): string[] {
  const got: string[] = [];
  p.driver.pollUsed((t, len) => got.push(`${t}:${len}`));
  return got;
}

// ---------------------------------------------------------------------------------------------------------------
// Basics and the byte layout.

test('a round trip, with the raw bytes of the ring: id in the last descriptor, first flags stored last, used descriptor', () => {
  const p = packedPair({ size: 4 });
  const id = p.driver.addChain([r(12), w(0x40, BUF_BASE + 0x100)], 'req');
  assert.equal(id, 0);
  const raw = (slot: number): string => Buffer.from(p.mem.read(p.layout.descAddr + 16 * slot, 16)).toString('hex');
  // addr (le64) len (le32) id (le16) flags (le16)
  assert.equal(raw(0), '0080000000000000' + '0c000000' + '0000' + '0000', 'the first flags are not stored before publish');
  assert.equal(raw(1), '0081000000000000' + '40000000' + '0000' + '8200', 'WRITE | AVAIL (wrap 1)');
  assert.equal(p.queue.hasAvailable(), false);
  assert.equal(p.queue.popChain(p.mem, p.chain), false);
  p.driver.publish();
  assert.equal(raw(0), '0080000000000000' + '0c000000' + '0000' + '8100', 'NEXT | AVAIL');
  assert.equal(p.queue.hasAvailable(), true);
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.chain.head, 0);
  assert.deepEqual(segmentsOf(p.chain), [
    { addr: BUF_BASE, len: 12, writable: false },
    { addr: BUF_BASE + 0x100, len: 0x40, writable: true },
  ]);
  assert.equal(p.queue.getBase(), 0x8002);
  assert.equal(p.queue.inFlightSlots, 2);
  p.queue.pushUsed(0, 5);
  assert.equal(raw(0), '0080000000000000' + '05000000' + '0000' + '8100', 'id / len written, flags not yet');
  assert.deepEqual(drain(p), []);
  p.queue.publishUsed();
  assert.equal(raw(0), '0080000000000000' + '05000000' + '0000' + '8280', 'USED | AVAIL | WRITE (len is valid)');
  assert.deepEqual(drain(p), ['req:5']);
  assert.equal(p.driver.freeCount, 4);
  assert.equal(p.queue.usedPosition, 0x8002);
  assert.equal(p.queue.inFlightSlots, 0);
});

test('the buffer id is read from the last descriptor of the list, not the first (§2.8.6)', () => {
  const p = packedPair();
  p.driver.makeAvailableRaw([
    { addr: BUF_BASE, len: 1, id: 5, flags: NEXT },
    { addr: BUF_BASE, len: 1, id: 6, flags: NEXT | WRITE },
    { addr: BUF_BASE, len: 1, id: 2, flags: WRITE },
  ]);
  assert.deepEqual(image(p, 3), ['8000 1 5 0081', '8000 1 6 0083', '8000 1 2 0082']);
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.chain.head, 2);
  assert.equal(p.chain.count, 3);
});

test('a used descriptor with length 0 has no WRITE flag; the driver reads its length as 0 (§2.8.3)', () => {
  const p = packedPair({ size: 2 });
  p.driver.addChain([r(4)], 'ro');
  p.driver.publish();
  assert.ok(p.queue.popChain(p.mem, p.chain));
  p.queue.pushUsed(p.chain.head, 0);
  p.queue.publishUsed();
  assert.deepEqual(image(p, 1), ['8000 0 0 8080']);
  assert.deepEqual(drain(p), ['ro:0']);
});

// ---------------------------------------------------------------------------------------------------------------
// Wrap-around and sizes that are not powers of two.

test('wrap-around on a queue of 3: the wrap counter flips, the flags follow it, positions encode index | wrap << 15', () => {
  const p = packedPair({ size: 3 });
  const bases: number[] = [];
  for (let i = 0; i < 4; i++) {
    p.driver.addChain([w(8)], `c${i}`);
    p.driver.publish();
    assert.ok(p.queue.popChain(p.mem, p.chain));
    p.queue.pushUsed(p.chain.head, 8);
    p.queue.publishUsed();
    assert.deepEqual(drain(p), [`c${i}:8`]);
    bases.push(p.queue.getBase());
  }
  assert.deepEqual(bases, [0x8001, 0x8002, 0x0000, 0x0001]);
  // Slot 0 was used twice: first in wrap 1 (flags 0x8082), now in wrap 0 (USED = AVAIL = 0, only WRITE).
  assert.deepEqual(image(p, 3), ['8000 8 0 0002', '8000 8 0 8082', '8000 8 0 8082']);
  // The next descriptor the driver makes available in wrap 0 has USED set and AVAIL clear.
  p.driver.addChain([w(8)], 'c4');
  p.driver.publish();
  assert.deepEqual(image(p, 2)[1], '8000 8 0 8002');
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.queue.getBase(), 0x0002);
});

test('a chain straddling the end of the ring: the wrap counter flips in the middle of it', () => {
  const p = packedPair({ size: 4 });
  p.driver.resetPositions(0x8003); // index 3, wrap 1
  p.queue.resume(0x8003);
  assert.deepEqual(image(p), ['0 0 0 8080', '0 0 0 8080', '0 0 0 8080', '0 0 0 0000']);
  const id = p.driver.addChain([r(1, 0x8000), w(2, 0x8100), w(3, 0x8200)], 'straddle');
  p.driver.publish();
  // Slot 3 in wrap 1 (AVAIL), slots 0 and 1 in wrap 0 (USED); the id in slot 1, the last one.
  assert.deepEqual(image(p), ['8100 2 0 8003', `8200 3 ${id} 8002`, '0 0 0 8080', '8000 1 0 0081']);
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.chain.head, id);
  assert.deepEqual(segmentsOf(p.chain), [
    { addr: 0x8000, len: 1, writable: false },
    { addr: 0x8100, len: 2, writable: true },
    { addr: 0x8200, len: 3, writable: true },
  ]);
  assert.equal(p.queue.getBase(), 0x0002);
  p.queue.pushUsed(id, 5);
  p.queue.publishUsed();
  // One used descriptor, at slot 3 with the device's wrap counter 1; the used position skips the 3 slots.
  assert.deepEqual(image(p)[3], `8000 5 ${id} 8082`);
  assert.equal(p.queue.usedPosition, 0x0002);
  assert.deepEqual(drain(p), ['straddle:5']);
  assert.equal(p.driver.usedPosition, 0x0002);
});

for (const size of [1, 3, 5, 6, 7, 100]) {
  test(`a queue of size ${size} (not necessarily a power of two) runs over many wraps`, () => {
    const p = packedPair({ size });
    let n = 0;
    for (let round = 0; round < 5 * size + 3; round++) {
      const k = 1 + (round % Math.min(size, 3));
      const id = p.driver.addChain(Array.from({ length: k }, (_, i) => w(i + 1)), `r${round}`);
      assert.ok(id >= 0);
      p.driver.publish();
      assert.ok(p.queue.popChain(p.mem, p.chain));
      assert.equal(p.chain.count, k);
      p.queue.pushUsed(p.chain.head, round);
      p.queue.publishUsed();
      assert.deepEqual(drain(p), [`r${round}:${round}`]);
      n += k;
    }
    const index = n % size;
    const wrap = Math.floor(n / size) % 2 === 0 ? 0x8000 : 0;
    assert.equal(p.queue.getBase(), index | wrap);
    assert.equal(p.driver.availPosition, index | wrap);
    assert.equal(p.driver.usedPosition, index | wrap);
  });
}

test('queue sizes: 1..32768, any integer; others are VIRTIO_QUEUE_SIZE_INVALID', () => {
  const layout = PackedQueueDriver.layout(32768, 0);
  for (const size of [1, 3, 1000, 32768]) {
    assert.equal(new PackedQueue({ size, ...layout, eventIdx: false, indirect: false }).size, size);
  }
  for (const size of [0, 32769, 2.5, -1]) {
    assert.equal(codeOf(() => new PackedQueue({ size, ...layout, eventIdx: false, indirect: false })), 'VIRTIO_QUEUE_SIZE_INVALID');
  }
  assert.equal(new PackedQueue({ size: 3, ...layout, eventIdx: false, indirect: false }).maxChainLength, 1024);
  assert.equal(new PackedQueue({ size: 32768, ...layout, eventIdx: false, indirect: false }).maxChainLength, 32768);
});

test('layout: the ring, then the driver area, then the device area (4-byte aligned, 4 bytes each)', () => {
  assert.deepEqual(PackedQueueDriver.layout(3, 0x1001), { descAddr: 0x1010, driverAddr: 0x1040, deviceAddr: 0x1044, end: 0x1048 });
});

// ---------------------------------------------------------------------------------------------------------------
// Out-of-order completion and id reuse.

test('ids completed out of order: each used descriptor at the next used slot, the position skipping its chain', () => {
  const p = packedPair({ size: 8 });
  const a = p.driver.addChain([r(1), w(1)], 'A'); // slots 0-1
  const b = p.driver.addChain([w(2)], 'B'); // slot 2
  const c = p.driver.addChain([r(1), r(1), w(3)], 'C'); // slots 3-5
  assert.deepEqual([a, b, c], [0, 1, 2]);
  p.driver.publish();
  assert.deepEqual(pops(p), [0, 1, 2]);
  assert.equal(p.queue.inFlightSlots, 6);
  p.queue.pushUsed(b, 2);
  p.queue.pushUsed(c, 3);
  p.queue.pushUsed(a, 1);
  p.queue.publishUsed();
  // B's used descriptor over slot 0 (advance 1), C's over slot 1 (advance 3), A's over slot 4 (advance 2).
  assert.deepEqual(image(p, 6), ['8000 2 1 8082', '8000 3 2 8082', '8000 2 1 0082', '8000 1 0 0081', '8000 1 0 8082', '8000 3 2 0082']);
  assert.equal(p.queue.usedPosition, 0x8006);
  assert.deepEqual(drain(p), ['B:2', 'C:3', 'A:1']);
  // The ids come back (last freed first) and are reused; slot 6 onwards, over the wrap.
  const ids = [p.driver.addChain([w(1)], 'D'), p.driver.addChain([w(1), w(1)], 'E'), p.driver.addChain([w(1)], 'F')];
  assert.deepEqual(ids, [0, 2, 1]);
  p.driver.publish();
  assert.deepEqual(pops(p), [0, 2, 1]);
  p.queue.pushUsed(1, 7);
  p.queue.publishUsed();
  p.queue.pushUsed(0, 8);
  p.queue.pushUsed(2, 9);
  p.queue.publishUsed();
  assert.deepEqual(drain(p), ['F:7', 'D:8', 'E:9']);
  assert.equal(p.queue.getBase(), 0x0002);
  assert.equal(p.driver.usedPosition, 0x0002);
});

test('restart with chains in flight: the recorded ring descriptors go back into their slots, popChain takes them again', () => {
  const p = packedPair({ size: 8 });
  const rec = p.queue.recordRingDescriptors();
  const a = p.driver.addChain([r(1), w(1)], 'A'); // slots 0-1
  const b = p.driver.addChain([w(2)], 'B'); // slot 2
  const c = p.driver.addChain([r(1), r(1), w(3)], 'C'); // slots 3-5
  p.driver.publish();
  const saved: { addr: bigint; len: number; id: number; flags: number }[][] = [];
  for (let i = 0; i < 3; i++) {
    assert.ok(p.queue.popChain(p.mem, p.chain));
    const chain = [];
    for (let k = 0; k < rec.count; k++) {
      chain.push({ addr: (BigInt(rec.addrHi[k] as number) << 32n) | BigInt(rec.addrLo[k] as number), len: rec.len[k] as number, id: rec.id[k] as number, flags: rec.flags[k] as number });
    }
    saved.push(chain);
  }
  assert.deepEqual(saved.map((ch) => ch.map((d) => `${d.len} ${d.id} ${d.flags.toString(16)}`)), [['1 0 81', '1 0 82'], ['2 1 82'], ['1 0 81', '1 0 81', '3 2 82']]);
  // B completes and is published over slot 0; A and C stay in flight, then the backend dies.
  p.queue.pushUsed(b, 2);
  p.queue.publishUsed();
  assert.deepEqual(drain(p), ['B:2']);
  // A new queue on the same ring: A (2 slots) and C (3 slots) go back from the used position 0x8001, oldest first.
  const q = new PackedQueue({ size: 8, ...p.layout, eventIdx: false, indirect: true });
  q.attach(p.mem);
  q.restoreInFlight(0x8001, [saved[0] as never, saved[2] as never]);
  assert.deepEqual(image(p, 6).slice(1), ['8000 1 0 0081', '8000 1 0 0082', '8000 1 0 0081', '8000 1 0 0081', '8000 3 2 0082']);
  const again: string[] = [];
  while (q.popChain(p.mem, p.chain)) again.push(`${p.chain.head}:${segmentsOf(p.chain).length}`);
  assert.deepEqual(again, [`${a}:2`, `${c}:3`]);
  q.pushUsed(c, 3);
  q.pushUsed(a, 1);
  q.publishUsed();
  assert.deepEqual(drain(p), ['C:3', 'A:1'], 'each completes once, out of order');
  // Across the end of the ring: the lap of each slot decides its AVAIL / USED bits.
  const z = new PackedQueue({ size: 8, ...p.layout, eventIdx: false, indirect: true });
  z.attach(p.mem);
  z.restoreInFlight(0x8007, [saved[2] as never]);
  assert.deepEqual(image(p, 8).filter((_, i) => i === 7 || i < 2), ['8000 1 0 8001', '8000 3 2 8002', '8000 1 0 0081']);
  assert.ok(z.popChain(p.mem, p.chain));
  assert.equal(p.chain.head, c);
  assert.equal(z.getBase(), 0x0002);
  assert.throws(() => z.restoreInFlight(0x8000, Array.from({ length: 3 }, () => saved[2] as never)), RangeError, 'more slots than the ring');
});

test('an id made available again while in flight: VIRTIO_PACKED_ID_IN_FLIGHT, nothing consumed', () => {
  const p = packedPair();
  p.driver.makeAvailableRaw([{ addr: BUF_BASE, len: 1, id: 3, flags: WRITE }]);
  p.driver.makeAvailableRaw([{ addr: BUF_BASE, len: 1, id: 3, flags: WRITE }]);
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(codeOf(() => p.queue.popChain(p.mem, p.chain)), 'VIRTIO_PACKED_ID_IN_FLIGHT');
  assert.equal(p.queue.getBase(), 0x8001);
  assert.equal(p.chain.count, 0);
  // Once completed, the same id is fine again.
  p.queue.pushUsed(3, 0);
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.chain.head, 3);
});

// ---------------------------------------------------------------------------------------------------------------
// Batched publication.

test('batched used descriptors: all written before the first one\'s flags, which publishUsed stores last', () => {
  const p = packedPair({ size: 4 });
  for (let i = 0; i < 3; i++) p.driver.addChain([w(4)], `t${i}`);
  p.driver.publish();
  assert.deepEqual(pops(p), [0, 1, 2]);
  p.queue.pushUsed(2, 1);
  p.queue.pushUsed(0, 2);
  p.queue.pushUsed(1, 3);
  // Elements 2 and 3 of the batch are complete; the first one has id / len but still the driver's flags.
  assert.deepEqual(image(p, 3), ['8000 1 2 0082', '8000 2 0 8082', '8000 3 1 8082']);
  assert.equal(p.driver.getUsed(), undefined, 'the driver sees nothing until the first flags are stored');
  p.queue.publishUsed();
  assert.deepEqual(image(p, 3), ['8000 1 2 8082', '8000 2 0 8082', '8000 3 1 8082']);
  assert.deepEqual(drain(p), ['t2:1', 't0:2', 't1:3']);
});

test('batched available chains: the driver stores each chain\'s first flags at publish, the first chain\'s last', () => {
  const p = packedPair({ size: 4 });
  p.driver.addChain([r(1), w(1)], 'a'); // slots 0-1
  p.driver.addChain([w(2)], 'b'); // slot 2
  assert.deepEqual(image(p, 3), ['8000 1 0 0000', '8000 1 0 0082', '8000 2 1 0000']);
  assert.equal(p.queue.hasAvailable(), false);
  p.driver.publish();
  assert.deepEqual(image(p, 3), ['8000 1 0 0081', '8000 1 0 0082', '8000 2 1 0082']);
  assert.deepEqual(pops(p), [0, 1]);
});

// ---------------------------------------------------------------------------------------------------------------
// Indirect descriptors.

const TABLE = REGION_B + 0x100;

test('indirect (§2.8.7): one ring slot for the whole table; NEXT and ids in the table are ignored, WRITE on the ring descriptor too', () => {
  const p = packedPair();
  const id = p.driver.addChain([r(16), w(512, BUF_BASE + 0x10), w(1, BUF_BASE + 0x400)], 'ind', { indirectAddr: TABLE });
  p.driver.publish();
  assert.deepEqual(image(p, 1), [`${TABLE.toString(16)} 30 ${id} 0084`]);
  assert.equal(p.driver.freeCount, 7);
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.chain.indirect, true);
  assert.equal(p.chain.head, id);
  assert.deepEqual(segmentsOf(p.chain), [
    { addr: BUF_BASE, len: 16, writable: false },
    { addr: BUF_BASE + 0x10, len: 512, writable: true },
    { addr: BUF_BASE + 0x400, len: 1, writable: true },
  ]);
  assert.equal(p.queue.getBase(), 0x8001);
  p.queue.pushUsed(id, 513);
  p.queue.publishUsed();
  assert.deepEqual(drain(p), ['ind:513']);

  // Hand-made: table entries with NEXT and junk ids, ring descriptor with INDIRECT | WRITE.
  PackedQueueDriver.writeDescriptorAt(p.mem, TABLE, { addr: BUF_BASE, len: 1, id: 77, flags: NEXT });
  PackedQueueDriver.writeDescriptorAt(p.mem, TABLE + 16, { addr: BUF_BASE + 1, len: 2, id: 88, flags: WRITE });
  p.driver.makeAvailableRaw([{ addr: TABLE, len: 32, id: 4, flags: INDIRECT | WRITE }]);
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.chain.head, 4);
  assert.deepEqual(segmentsOf(p.chain), [
    { addr: BUF_BASE, len: 1, writable: false },
    { addr: BUF_BASE + 1, len: 2, writable: true },
  ]);
});

test('an indirect table crossing into an adjacent region is read entry by entry; one running into a hole is GUEST_MEMORY_UNMAPPED', () => {
  const p = packedPair();
  const table = REGION_C - 24;
  const segs = [r(0x10, REGION_B), r(0x11, REGION_B + 0x100), w(0x12, REGION_B + 0x200)];
  p.driver.addChain(segs, 'x', { indirectAddr: table });
  p.driver.publish();
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.deepEqual(segmentsOf(p.chain), segs);
  const q = packedPair();
  q.driver.makeAvailableRaw([{ addr: HOLE_AB - 16, len: 32, id: 0, flags: INDIRECT }]);
  assert.equal(codeOf(() => q.queue.popChain(q.mem, q.chain)), 'GUEST_MEMORY_UNMAPPED');
  assert.equal(q.queue.getBase(), 0x8000);
});

test('the chain walk does one GuestMemory call per indirect table and none for direct descriptors', () => {
  const p = packedPair({ size: 16 });
  p.driver.addChain(Array.from({ length: 15 }, (_, i) => ({ addr: BUF_BASE + i, len: 1, writable: i >= 8 })), 'direct');
  p.driver.addChain(Array.from({ length: 100 }, (_, i) => r(1, BUF_BASE + i)), 'indirect', { indirectAddr: 0x2_0000 });
  p.driver.publish();
  const before = p.mem.viewCalls;
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.chain.count, 15);
  assert.equal(p.mem.viewCalls, before);
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.chain.count, 100);
  assert.equal(p.mem.viewCalls, before + 1);
});

// ---------------------------------------------------------------------------------------------------------------
// Malformed chains: each with its code; a failed pop consumes nothing and leaves the chain cleared.

function popError(setup: (p: PackedPair) => void, options: PackedPairOptions = {}): string {
  const p = packedPair(options);
  setup(p);
  const base = p.queue.getBase();
  p.chain.push(0x1234, 1, false); // junk from an earlier request
  const code = codeOf(() => p.queue.popChain(p.mem, p.chain));
  assert.equal(p.queue.getBase(), base, 'a failed pop consumes nothing');
  assert.equal(p.chain.count, 0, 'the chain is left cleared');
  return code;
}

const raw = (descs: readonly PackedRawDescriptor[]) => (p: PackedPair): void => p.driver.makeAvailableRaw(descs);
const d = (flags: number, id = 0, addr: number | bigint = BUF_BASE, len = 1): PackedRawDescriptor => ({ addr, len, id, flags });

test('malformed: buffer id >= queue size: VIRTIO_PACKED_ID_OUT_OF_RANGE (checked in the last descriptor)', () => {
  assert.equal(popError(raw([d(WRITE, 8)])), 'VIRTIO_PACKED_ID_OUT_OF_RANGE');
  assert.equal(popError(raw([d(NEXT, 0), d(WRITE, 0xffff)])), 'VIRTIO_PACKED_ID_OUT_OF_RANGE');
  assert.equal(popError(raw([d(INDIRECT, 8, TABLE, 16)])), 'VIRTIO_PACKED_ID_OUT_OF_RANGE');
});

test('malformed: the chain runs into a descriptor that is not available: VIRTIO_PACKED_DESC_UNAVAILABLE', () => {
  // NEXT on the last available descriptor; the following slot is still zero (never made available).
  assert.equal(popError(raw([d(NEXT), d(NEXT)])), 'VIRTIO_PACKED_DESC_UNAVAILABLE');
  // Straddling the wrap, the descriptor after the end carries the old wrap counter's bits.
  const code = popError((p) => {
    p.driver.resetPositions(0x8007);
    p.queue.resume(0x8007);
    p.driver.writeDescriptor(0, { addr: BUF_BASE, len: 1, id: 0, flags: AVAIL | WRITE }); // wrap-1 bits: wrong after the wrap
    p.driver.writeDescriptor(7, { addr: BUF_BASE, len: 1, id: 0, flags: AVAIL | NEXT });
  });
  assert.equal(code, 'VIRTIO_PACKED_DESC_UNAVAILABLE');
  // A used-looking descriptor (AVAIL == USED) in the middle.
  const usedLooking = popError((p) => {
    p.driver.writeDescriptor(1, d(AVAIL | USED | WRITE));
    p.driver.makeAvailableRaw([d(NEXT)]);
  });
  assert.equal(usedLooking, 'VIRTIO_PACKED_DESC_UNAVAILABLE');
});

test('malformed: a chain running round the ring onto slots in flight: VIRTIO_DESC_LOOP', () => {
  const code = popError((p) => {
    p.driver.makeAvailableRaw([d(WRITE, 0)]);
    assert.ok(p.queue.popChain(p.mem, p.chain)); // slot 0 in flight: 7 slots of room
    // A hostile driver rewrites slots 1..7 and the in-flight slot 0 (with wrap-0 bits) as one NEXT-linked list.
    p.driver.makeAvailableRaw([d(NEXT), d(NEXT), d(NEXT), d(NEXT), d(NEXT), d(NEXT), d(NEXT), d(WRITE, 1)]);
  });
  assert.equal(code, 'VIRTIO_DESC_LOOP');
  // A ring entirely in flight: a descriptor that looks available at the avail position is the same.
  const full = popError((p) => {
    for (let i = 0; i < 8; i++) p.driver.makeAvailableRaw([d(WRITE, i)]);
    assert.deepEqual(pops(p).length, 8);
    p.driver.makeAvailableRaw([d(WRITE, 0)]);
  });
  assert.equal(full, 'VIRTIO_DESC_LOOP');
});

test('a chain of exactly the ring size (all free slots) is valid', () => {
  const p = packedPair({ size: 5 });
  p.driver.addChain([r(1), r(1), w(1), w(1), w(1)], 'all');
  p.driver.publish();
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.chain.count, 5);
  assert.equal(p.queue.getBase(), 0x0000);
});

test('malformed: buffer addresses at or above 2^53, or ending past 2^53: VIRTIO_DESC_ADDRESS_INVALID (zero length too)', () => {
  for (const [addr, len] of [
    [2n ** 53n, 0],
    [2n ** 64n - 1n, 1],
    [2n ** 53n - 1n, 2],
  ] as const) {
    assert.equal(popError(raw([d(WRITE, 0, addr, len)])), 'VIRTIO_DESC_ADDRESS_INVALID');
    assert.equal(popError(raw([d(NEXT), d(WRITE, 0, addr, len)])), 'VIRTIO_DESC_ADDRESS_INVALID');
    assert.equal(popError(raw([d(INDIRECT, 0, addr, 16)])), 'VIRTIO_DESC_ADDRESS_INVALID');
    assert.equal(
      popError((p) => {
        PackedQueueDriver.writeDescriptorAt(p.mem, TABLE, d(WRITE, 0, addr, len));
        p.driver.makeAvailableRaw([d(INDIRECT, 0, TABLE, 16)]);
      }),
      'VIRTIO_DESC_ADDRESS_INVALID',
    );
  }
  // Exactly up to 2^53 is fine.
  const p = packedPair();
  p.driver.makeAvailableRaw([d(WRITE, 0, 2n ** 53n - 4096n, 4096)]);
  assert.ok(p.queue.popChain(p.mem, p.chain));
});

test('malformed: a readable descriptor after a writable one: VIRTIO_WRITABLE_BEFORE_READABLE (ring and table)', () => {
  assert.equal(popError(raw([d(NEXT | WRITE), d(0)])), 'VIRTIO_WRITABLE_BEFORE_READABLE');
  const code = popError((p) => {
    PackedQueueDriver.writeDescriptorAt(p.mem, TABLE, d(WRITE));
    PackedQueueDriver.writeDescriptorAt(p.mem, TABLE + 16, d(0));
    p.driver.makeAvailableRaw([d(INDIRECT, 0, TABLE, 32)]);
  });
  assert.equal(code, 'VIRTIO_WRITABLE_BEFORE_READABLE');
});

test('malformed: more than 2^32 - 1 bytes: VIRTIO_CHAIN_TOO_LONG; exactly 2^32 - 1 is fine', () => {
  assert.equal(popError(raw([d(NEXT, 0, BUF_BASE, 0xffff_ffff), d(WRITE, 0, BUF_BASE, 1)])), 'VIRTIO_CHAIN_TOO_LONG');
  const p = packedPair();
  p.driver.makeAvailableRaw([d(NEXT, 0, BUF_BASE, 0xffff_fffe), d(WRITE, 0, BUF_BASE, 1)]);
  assert.ok(p.queue.popChain(p.mem, p.chain));
  const t = popError((q) => {
    PackedQueueDriver.writeDescriptorAt(q.mem, TABLE, d(0, 0, BUF_BASE, 0xffff_ffff));
    PackedQueueDriver.writeDescriptorAt(q.mem, TABLE + 16, d(WRITE, 0, BUF_BASE, 1));
    q.driver.makeAvailableRaw([d(INDIRECT, 0, TABLE, 32)]);
  });
  assert.equal(t, 'VIRTIO_CHAIN_TOO_LONG');
});

test('malformed indirect: bad length, nested, with NEXT, inside a NEXT list, not negotiated, too many entries', () => {
  for (const len of [0, 8, 17, 16 * 65536 + 16]) {
    assert.equal(popError(raw([d(INDIRECT, 0, TABLE, len)])), 'VIRTIO_INDIRECT_BAD_LENGTH', `len ${len}`);
  }
  const nested = popError((p) => {
    PackedQueueDriver.writeDescriptorAt(p.mem, TABLE, d(0));
    PackedQueueDriver.writeDescriptorAt(p.mem, TABLE + 16, d(INDIRECT, 0, TABLE + 0x100, 16));
    p.driver.makeAvailableRaw([d(INDIRECT, 0, TABLE, 32)]);
  });
  assert.equal(nested, 'VIRTIO_INDIRECT_NESTED');
  assert.equal(popError(raw([d(INDIRECT | NEXT, 0, TABLE, 16), d(WRITE)])), 'VIRTIO_INDIRECT_WITH_NEXT');
  assert.equal(popError(raw([d(NEXT), d(INDIRECT, 0, TABLE, 16)])), 'VIRTIO_PACKED_INDIRECT_IN_CHAIN');
  assert.equal(popError(raw([d(INDIRECT, 0, TABLE, 16)]), { indirect: false }), 'VIRTIO_INDIRECT_NOT_NEGOTIATED');
  // 1025 entries on a queue of 8 (maxChainLength 1024): too long; 1024 is fine.
  assert.equal(popError(raw([d(INDIRECT, 0, REGION_B, 16 * 1025)])), 'VIRTIO_CHAIN_TOO_LONG');
  const p = packedPair();
  p.driver.makeAvailableRaw([d(INDIRECT, 0, REGION_B, 16 * 1024)]);
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.chain.count, 1024);
});

test('error messages name the chain and the slot', () => {
  const p = packedPair();
  p.driver.makeAvailableRaw([d(NEXT), d(NEXT | WRITE), d(0)]);
  assert.throws(
    () => p.queue.popChain(p.mem, p.chain),
    (e: unknown) => e instanceof VirtioError && /chain at slot 0 \(wrap 1\): descriptor at slot 2/.test(e.message),
  );
});

test('an id in a descriptor other than the last one is ignored (even out of range)', () => {
  const p = packedPair();
  p.driver.makeAvailableRaw([d(NEXT, 0xffff), d(WRITE, 7)]);
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.chain.head, 7);
});

// ---------------------------------------------------------------------------------------------------------------
// resume / getBase / unpop.

test('resume and getBase: index | wrap << 15; the used position follows; nothing stays in flight', () => {
  const p = packedPair({ size: 5 });
  assert.equal(p.queue.getBase(), 0x8000, 'fresh queue: index 0, wrap counter 1');
  p.driver.resetPositions(0x0003);
  p.queue.resume(0x0003);
  assert.equal(p.queue.getBase(), 0x0003);
  assert.equal(p.queue.usedPosition, 0x0003);
  assert.equal(p.queue.seenAvailIdx, 0x0003);
  p.driver.addChain([w(1), w(1), w(1)], 'x'); // slots 3, 4, 0 (wrap 0 -> 1)
  p.driver.publish();
  // Slots 3, 4 in wrap 0 (USED set), slot 0 in wrap 1 (AVAIL set); slots 1, 2 still used in wrap 0 (flags 0).
  assert.deepEqual(image(p).map((s) => s.slice(-4)), ['0082', '0000', '0000', '8003', '8003']);
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.queue.getBase(), 0x8001);
  // A queue stopped with a chain in flight and resumed at its base forgets it (the frontend resends nothing).
  p.queue.resume(p.queue.getBase());
  assert.equal(p.queue.inFlightSlots, 0);
  assert.equal(p.queue.usedPosition, 0x8001);
  assert.equal(codeOf(() => p.queue.resume(0x8005)), 'VIRTIO_PACKED_BASE_INVALID');
  assert.equal(codeOf(() => p.queue.resume(0x7fff)), 'VIRTIO_PACKED_BASE_INVALID');
  assert.throws(() => p.queue.resume(0x10000), RangeError);
  assert.throws(() => p.queue.resume(-1), RangeError);
});

test('unpop across the wrap: the avail position and wrap counter go back by the chain\'s slots; LIFO, repeatable', () => {
  const p = packedPair({ size: 4 });
  p.driver.resetPositions(0x8002);
  p.queue.resume(0x8002);
  const a = p.driver.addChain([w(1)], 'a'); // slot 2
  const b = p.driver.addChain([w(1), w(2)], 'b'); // slots 3, 0 (straddles)
  p.driver.publish();
  assert.deepEqual(pops(p), [a, b]);
  assert.equal(p.queue.getBase(), 0x0001);
  assert.equal(p.queue.seenAvailIdx, 0x0001);
  p.queue.unpop();
  assert.equal(p.queue.getBase(), 0x8003);
  assert.equal(p.queue.inFlightSlots, 1);
  assert.equal(p.queue.seenAvailIdx, 0x0001, 'unpop does not move what the device has seen');
  p.queue.unpop();
  assert.equal(p.queue.getBase(), 0x8002);
  assert.throws(() => p.queue.unpop(), RangeError);
  assert.deepEqual(pops(p), [a, b], 'the same chains again');
  assert.equal(p.chain.count, 2);
  // A completed chain cannot be given back.
  p.queue.pushUsed(b, 1);
  assert.throws(() => p.queue.unpop(), RangeError);
  // Out of order: b completed first, its used descriptor at slot 2; then a.
  p.queue.pushUsed(a, 2);
  p.queue.publishUsed();
  assert.deepEqual(drain(p), ['b:1', 'a:2']);
});

// ---------------------------------------------------------------------------------------------------------------
// Event suppression, both directions, three modes.

test('packedNeedEvent: vring_need_event on the circle of 2 * size (offset, wrap) positions', () => {
  // size 5: linear 0..4 = wrap 1, 5..9 = wrap 0.
  assert.equal(packedNeedEvent(5, 0x8000, 1, 1), true); // moved 0 -> 1 past offset 0 wrap 1
  assert.equal(packedNeedEvent(5, 0x8001, 1, 1), false); // offset 1 not yet used
  assert.equal(packedNeedEvent(5, 0x8001, 2, 2), true);
  assert.equal(packedNeedEvent(5, 0x0001, 2, 2), false); // offset 1 in wrap 0 is a lap later
  assert.equal(packedNeedEvent(5, 0x0001, 7, 4), true); // 3 -> 7 (index 2 wrap 0) passes offset 1 wrap 0 (linear 6)
  // 8 -> 1 across the wrap (slots 8, 9, 0 used): passes offset 4 wrap 0 (linear 9) and offset 0 wrap 1, not 4 / 1.
  assert.equal(packedNeedEvent(5, 0x0004, 1, 3), true);
  assert.equal(packedNeedEvent(5, 0x8000, 1, 3), true);
  assert.equal(packedNeedEvent(5, 0x8004, 1, 3), false);
  assert.equal(packedNeedEvent(5, 0x8001, 1, 3), false);
  assert.equal(packedNeedEvent(5, 0x8001, 1, 10), true, 'a whole period passes everything');
  assert.equal(packedNeedEvent(5, 0x8000, 0, 0), false, 'nothing moved');
});

test('device -> driver (used buffer notifications), without event idx: ENABLE notifies, DISABLE does not', () => {
  const p = packedPair({ eventIdx: false });
  const complete = (): void => {
    p.driver.addChain([w(1)], 'x');
    p.driver.publish();
    assert.ok(p.queue.popChain(p.mem, p.chain));
    p.queue.pushUsed(p.chain.head, 1);
    p.queue.publishUsed();
  };
  assert.equal(p.queue.needsNotification(), false, 'nothing published');
  complete();
  assert.equal(ev(p.driver.readDriverEvent()), '0000/0');
  assert.equal(p.queue.needsNotification(), true);
  assert.equal(p.queue.needsNotification(), false, 'nothing new');
  p.driver.disableInterrupts();
  assert.equal(ev(p.driver.readDriverEvent()), '0000/1');
  complete();
  assert.equal(p.queue.needsNotification(), false);
  assert.equal(p.driver.enableInterrupts(), true, 'completions are pending: poll instead of waiting');
  assert.equal(ev(p.driver.readDriverEvent()), '0000/0');
  complete();
  assert.equal(p.queue.needsNotification(), true);
  // DESC without event idx negotiated is treated as ENABLE; the reserved value 3 too.
  p.driver.setDriverEvent(0x8005, VRING_PACKED_EVENT_FLAG_DESC);
  complete();
  assert.equal(p.queue.needsNotification(), true);
  p.driver.setDriverEvent(0, 3);
  complete();
  assert.equal(p.queue.needsNotification(), true);
});

test('device -> driver with event idx: DESC off_wrap, notified once the used position passes it, also across the wrap', () => {
  const p = packedPair({ size: 3, eventIdx: true });
  const complete = (): void => {
    p.driver.addChain([w(1)], 'x');
    p.driver.publish();
    assert.ok(p.queue.popChain(p.mem, p.chain));
    p.queue.pushUsed(p.chain.head, 1);
    p.queue.publishUsed();
    p.driver.pollUsed(() => undefined);
  };
  // The driver asks to be woken when the descriptor at index 1, wrap 0 is used (the 5th slot: linear 4).
  p.driver.setDriverEvent(0x0001, VRING_PACKED_EVENT_FLAG_DESC);
  assert.equal(ev(p.driver.readDriverEvent()), '0001/2');
  const got: boolean[] = [];
  for (let i = 0; i < 6; i++) {
    complete();
    got.push(p.queue.needsNotification());
  }
  assert.deepEqual(got, [false, false, false, false, true, false]);
  // enableInterrupts: off_wrap = the driver's next used position (index 0, wrap 1 after 6 slots), flags DESC.
  assert.equal(p.driver.enableInterrupts(), false);
  assert.equal(ev(p.driver.readDriverEvent()), '8000/2');
  complete();
  assert.equal(p.queue.needsNotification(), true);
  // A batch crossing the event notifies once.
  p.driver.enableInterrupts();
  for (let i = 0; i < 3; i++) p.driver.addChain([w(1)], 'b');
  p.driver.publish();
  for (const id of pops(p)) p.queue.pushUsed(id, 0);
  p.queue.publishUsed();
  assert.equal(p.queue.needsNotification(), true);
  assert.equal(p.queue.needsNotification(), false);
  // DISABLE wins over DESC.
  p.driver.disableInterrupts();
  drain(p);
  complete();
  assert.equal(p.queue.needsNotification(), false);
});

test('driver -> device (kicks), without event idx: the device area says ENABLE or DISABLE', () => {
  const p = packedPair({ eventIdx: false });
  assert.equal(ev(p.driver.readDeviceEvent()), '0000/0');
  p.driver.addChain([w(1)], 'a');
  p.driver.publish();
  assert.equal(p.driver.kickNeeded(), true);
  assert.equal(p.driver.kickNeeded(), false, 'nothing new published');
  p.queue.disableNotification();
  assert.equal(ev(p.driver.readDeviceEvent()), '0000/1');
  p.driver.addChain([w(1)], 'b');
  p.driver.publish();
  assert.equal(p.driver.kickNeeded(), false);
  assert.equal(p.queue.enableNotification(), true, 'two chains are waiting');
  assert.equal(ev(p.driver.readDeviceEvent()), '0000/0');
  assert.deepEqual(pops(p), [0, 1]);
  assert.equal(p.queue.enableNotification(), false);
  p.driver.addChain([w(1)], 'c');
  p.driver.publish();
  assert.equal(p.driver.kickNeeded(), true);
});

test('driver -> device with event idx: DESC off_wrap = the position the device waits at', () => {
  const p = packedPair({ size: 3, eventIdx: true });
  p.driver.addChain([w(1)], 'a');
  p.driver.publish();
  assert.equal(p.driver.kickNeeded(), true, 'fresh area: ENABLE');
  p.queue.disableNotification();
  assert.equal(ev(p.driver.readDeviceEvent()), '0000/1');
  assert.ok(p.queue.popChain(p.mem, p.chain));
  p.queue.pushUsed(p.chain.head, 0);
  p.queue.publishUsed();
  drain(p);
  assert.equal(p.queue.enableNotification(), false);
  assert.equal(ev(p.driver.readDeviceEvent()), '8001/2');
  // Two chains (slots 1 and 2): the first passes off_wrap 1 / wrap 1.
  p.driver.addChain([w(1)], 'b');
  p.driver.publish();
  assert.equal(p.driver.kickNeeded(), true);
  p.driver.addChain([w(1)], 'c');
  p.driver.publish();
  assert.equal(p.driver.kickNeeded(), false, 'the event was passed already');
  assert.deepEqual(pops(p), [0, 1]);
  for (const id of [0, 1]) p.queue.pushUsed(id, 0);
  p.queue.publishUsed();
  drain(p);
  // The device waits at index 0 wrap 0 (after the wrap).
  assert.equal(p.queue.enableNotification(), false);
  assert.equal(ev(p.driver.readDeviceEvent()), '0000/2');
  p.driver.addChain([w(1), w(1)], 'd'); // slots 0, 1 in wrap 0
  p.driver.publish();
  assert.equal(p.driver.kickNeeded(), true);
  // An off_wrap further on: not kicked until the driver gets there.
  assert.ok(p.queue.popChain(p.mem, p.chain));
  p.queue.enableNotification(0x8001); // index 1, wrap 1: one lap ahead of slot 2 wrap 0
  p.driver.addChain([w(1)], 'e'); // slot 2 wrap 0
  p.driver.publish();
  assert.equal(p.driver.kickNeeded(), false);
});

for (const eventIdx of [false, true]) {
  test(`enableNotification returns true when a chain raced in before it (eventIdx=${eventIdx})`, () => {
    const p = packedPair({ eventIdx });
    p.driver.addChain([w(1)], 'a');
    p.driver.publish();
    assert.equal(p.driver.kickNeeded(), true);
    p.queue.disableNotification();
    while (p.queue.popChain(p.mem, p.chain)) p.queue.pushUsed(p.chain.head, 0);
    p.queue.publishUsed();
    p.driver.addChain([w(1)], 'b');
    p.driver.publish();
    assert.equal(p.driver.kickNeeded(), false, 'notifications are off: no kick');
    assert.equal(p.queue.enableNotification(), true, 'the re-check finds what no kick announced');
    assert.ok(p.queue.popChain(p.mem, p.chain));
    assert.equal(p.queue.enableNotification(), false, 'drained: now it is safe to sleep');
    p.driver.addChain([w(1)], 'c');
    p.driver.publish();
    assert.equal(p.driver.kickNeeded(), true);
  });

  test(`a device short of buffers waits at seenAvailIdx, not at a fresh position (eventIdx=${eventIdx})`, () => {
    const p = packedPair({ eventIdx });
    p.queue.disableNotification();
    p.driver.addChain([w(8)], 'a');
    p.driver.publish();
    p.driver.kickNeeded();
    assert.ok(p.queue.popChain(p.mem, p.chain));
    assert.equal(p.queue.popChain(p.mem, p.chain), false, 'one buffer is not enough');
    p.queue.unpop();
    assert.equal(p.queue.seenAvailIdx, 0x8001);
    assert.equal(p.queue.availableSince(p.queue.seenAvailIdx), false);
    p.driver.addChain([w(8)], 'b');
    p.driver.publish();
    assert.equal(p.driver.kickNeeded(), false);
    assert.equal(p.queue.availableSince(p.queue.seenAvailIdx), true);
    assert.equal(p.queue.enableNotification(p.queue.seenAvailIdx), true, "'b' came after what the device saw: retry now");
    assert.deepEqual(pops(p), [0, 1]);
    assert.equal(p.queue.enableNotification(p.queue.seenAvailIdx), false);
    p.driver.addChain([w(8)], 'c');
    p.driver.publish();
    assert.equal(p.driver.kickNeeded(), true);
  });
}

test('the canonical device loop drains everything and sleeps only when safe', () => {
  for (const eventIdx of [false, true]) {
    const p = packedPair({ size: 5, eventIdx });
    let kicks = 0;
    let next = 0;
    const addSome = (n: number): void => {
      for (let i = 0; i < n; i++) {
        if (p.driver.addChain([w(4)], `c${next}`) < 0) break;
        next++;
      }
      p.driver.publish();
      if (p.driver.kickNeeded()) kicks++;
    };
    p.driver.enableInterrupts();
    addSome(3);
    let rounds = 0;
    let notifications = 0;
    do {
      p.queue.disableNotification();
      while (p.queue.popChain(p.mem, p.chain)) {
        p.queue.pushUsed(p.chain.head, 4);
        p.queue.publishUsed();
        if (p.queue.needsNotification()) notifications++;
        if (rounds++ === 1) addSome(2);
      }
    } while (p.queue.enableNotification());
    assert.deepEqual(drain(p), ['c0:4', 'c1:4', 'c2:4', 'c3:4', 'c4:4'], `eventIdx=${eventIdx}`);
    assert.equal(kicks, 1);
    assert.ok(notifications >= 1);
    assert.equal(p.queue.hasAvailable(), false);
  }
});

// ---------------------------------------------------------------------------------------------------------------
// Lifecycle, views, programming errors, the driver's own checks.

test('attach / detach / cacheViews false; programming errors are RangeErrors', () => {
  const mem = standardMemory();
  const layout = PackedQueueDriver.layout(8, RING_BASE);
  const q = new PackedQueue({ size: 8, ...layout, eventIdx: false, indirect: false });
  assert.equal(q.attached, false);
  assert.throws(() => q.popChain(mem, q.createChain()), (e: unknown) => e instanceof VhostError && e.code === 'VHOST_QUEUE_NOT_ATTACHED');
  q.attach(mem);
  assert.throws(() => q.popChain(mem, new DescriptorChain(8)), RangeError);
  assert.throws(() => q.pushUsed(8, 0), RangeError);
  assert.throws(() => q.pushUsed(0, 0), RangeError, 'not in flight');
  assert.throws(() => q.enableNotification(0x8008), RangeError);
  q.detach();
  assert.throws(() => q.hasAvailable(), VhostError);

  const p = packedPair({ cacheViews: false });
  p.driver.addChain([w(1)], 'a');
  p.driver.publish();
  const calls = p.mem.viewCalls;
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.ok(p.mem.viewCalls > calls, 'copy mode translates the ring through the memory');
  p.queue.pushUsed(p.chain.head, 1);
  p.queue.publishUsed();
  assert.deepEqual(drain(p), ['a:1']);
});

test('rings not in guest memory or misaligned: VIRTIO_RING_UNMAPPED / VIRTIO_RING_MISALIGNED', () => {
  const base = { size: 8, eventIdx: false, indirect: false };
  const layout = PackedQueueDriver.layout(8, RING_BASE);
  assert.equal(codeOf(() => new PackedQueue({ ...base, ...layout, descAddr: RING_BASE + 8 })), 'VIRTIO_RING_MISALIGNED');
  assert.equal(codeOf(() => new PackedQueue({ ...base, ...layout, driverAddr: layout.driverAddr + 2 })), 'VIRTIO_RING_MISALIGNED');
  assert.equal(codeOf(() => new PackedQueue({ ...base, ...layout, deviceAddr: -1 })), 'VIRTIO_RING_UNMAPPED');
  const q = new PackedQueue({ ...base, ...layout, deviceAddr: HOLE_AB + 0x100 });
  assert.equal(codeOf(() => q.attach(standardMemory())), 'VIRTIO_RING_UNMAPPED');
  const q2 = new PackedQueue({ ...base, ...layout, descAddr: HOLE_AB - 64 }); // runs into the hole
  assert.equal(codeOf(() => q2.attach(standardMemory())), 'VIRTIO_RING_UNMAPPED');
});

test('the driver side rejects a bogus used descriptor: VIRTIO_USED_ID_INVALID', () => {
  const p = packedPair();
  p.driver.addChain([w(1)], 'a');
  p.driver.publish();
  assert.ok(p.queue.popChain(p.mem, p.chain));
  p.driver.writeDescriptor(0, { addr: 0, len: 1, id: 5, flags: AVAIL | USED | WRITE });
  assert.equal(codeOf(() => p.driver.pollUsed(() => undefined)), 'VIRTIO_USED_ID_INVALID');
  p.driver.writeDescriptor(0, { addr: 0, len: 1, id: 9, flags: AVAIL | USED | WRITE });
  assert.equal(codeOf(() => p.driver.pollUsed(() => undefined)), 'VIRTIO_USED_ID_INVALID');
  // The event flag constants the test relies on.
  assert.deepEqual([VRING_PACKED_EVENT_FLAG_ENABLE, VRING_PACKED_EVENT_FLAG_DISABLE, VRING_PACKED_EVENT_FLAG_DESC], [0, 1, 2]);
});
