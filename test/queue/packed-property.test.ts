/**
 * Property tests (fast-check) of the packed virtqueue: random driver and device operations (chains with random
 * segment counts, some indirect, completions in random order, published in batches or later, unpops, notification
 * toggles on both sides) through `PackedQueueDriver` and `PackedQueue` over test memory, checked against an
 * independent model:
 * - the device pops chains in the order the driver added them, with the segments that were added;
 * - the driver gets back exactly the (token, length) pairs the device completed, in the order it completed them,
 *   each once, and only once they were published;
 * - no wakeup is lost: a sleeping device (re-armed with `enableNotification` that said "nothing") is kicked when
 *   a chain becomes available, a sleeping driver is notified when a used descriptor is published;
 * - positions agree on both sides across many wraps of small rings whose sizes are not powers of two.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  PackedQueue,
  PackedQueueDriver,
  VRING_PACKED_DESC_F_AVAIL,
  VRING_PACKED_DESC_F_USED,
} from '../../src/queue/index.js';
import { REGION_B, RING_BASE, standardMemory } from './test-memory.js';

type Seg = { addr: number; len: number; writable: boolean };

type Op =
  | { readonly t: 'add'; readonly readable: number; readonly writable: number; readonly indirect: boolean; readonly seed: number }
  | { readonly t: 'pop'; readonly n: number; readonly unpop: boolean }
  | { readonly t: 'complete'; readonly picks: readonly number[]; readonly lens: readonly number[]; readonly publish: boolean }
  | { readonly t: 'devSleep' }
  | { readonly t: 'devDisable' }
  | { readonly t: 'drvPoll' }
  | { readonly t: 'drvSleep' }
  | { readonly t: 'drvDisable' };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc.record({
      t: fc.constant('add' as const),
      readable: fc.nat({ max: 3 }),
      writable: fc.nat({ max: 3 }),
      indirect: fc.boolean(),
      seed: fc.nat({ max: 0xffff }),
    }),
  },
  { weight: 4, arbitrary: fc.record({ t: fc.constant('pop' as const), n: fc.integer({ min: 1, max: 4 }), unpop: fc.boolean() }) },
  {
    weight: 4,
    arbitrary: fc.record({
      t: fc.constant('complete' as const),
      picks: fc.array(fc.nat({ max: 31 }), { minLength: 1, maxLength: 4 }),
      lens: fc.array(fc.nat({ max: 0xffff }), { minLength: 4, maxLength: 4 }),
      publish: fc.oneof({ weight: 3, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
    }),
  },
  { weight: 1, arbitrary: fc.constant({ t: 'devSleep' as const }) },
  { weight: 1, arbitrary: fc.constant({ t: 'devDisable' as const }) },
  { weight: 3, arbitrary: fc.constant({ t: 'drvPoll' as const }) },
  { weight: 1, arbitrary: fc.constant({ t: 'drvSleep' as const }) },
  { weight: 1, arbitrary: fc.constant({ t: 'drvDisable' as const }) },
);

interface Added {
  readonly token: string;
  readonly id: number;
  readonly segs: Seg[];
  readonly indirect: boolean;
  /** Ring slots the chain takes. */
  readonly slots: number;
}

function segmentsOf(chain: { count: number; addr: Float64Array; len: Uint32Array; writable: Uint8Array }): Seg[] {
  const out: Seg[] = [];
  for (let i = 0; i < chain.count; i++) out.push({ addr: chain.addr[i] ?? NaN, len: chain.len[i] ?? NaN, writable: chain.writable[i] === 1 });
  return out;
}

function run(size: number, eventIdx: boolean, indirect: boolean, start: number, ops: readonly Op[]): void {
  const mem = standardMemory();
  const layout = PackedQueueDriver.layout(size, RING_BASE);
  const driver = new PackedQueueDriver<string>(mem, { size, ...layout, eventIdx });
  const queue = new PackedQueue({ size, ...layout, eventIdx, indirect });
  queue.attach(mem);
  driver.resetPositions(start);
  queue.resume(start);
  const chain = queue.createChain();

  // The model.
  const published: Added[] = []; // added, not yet popped (FIFO: ring order)
  const inFlight = new Map<number, Added>(); // popped by the device, not completed; by id
  const idsOut = new Set<number>(); // ids the driver has out (added, not yet returned)
  const idOfToken = new Map<string, number>();
  const pushedUnpublished: [string, number][] = [];
  const expectedBack: [string, number][] = []; // published completions the driver has not consumed, in order
  let deviceAwake = true;
  let driverAwake = true;
  let tokens = 0;
  let returned = 0;
  let addedSlots = 0; // slots ever made available (for the position check)

  const usedVisible = (): boolean => {
    if (driver.inFlight === 0) return false;
    const pos = driver.usedPosition;
    const wrap = (pos & 0x8000) !== 0;
    const f = driver.readDescriptor(pos & 0x7fff).flags;
    return ((f & VRING_PACKED_DESC_F_AVAIL) !== 0) === wrap && ((f & VRING_PACKED_DESC_F_USED) !== 0) === wrap;
  };
  const poll = (): void => {
    driver.pollUsed((token, len) => {
      const exp = expectedBack.shift();
      assert.ok(exp !== undefined, `the driver got ${token}:${len}, which was not published`);
      assert.deepEqual([token, len], exp, 'completions come back in the order the device made them');
      idsOut.delete(idOfToken.get(token) ?? -1);
      idOfToken.delete(token);
      returned++;
    });
    assert.equal(expectedBack.length, 0, 'every published completion is visible to the driver');
  };
  const publish = (): void => {
    queue.publishUsed();
    expectedBack.push(...pushedUnpublished.splice(0));
    if (queue.needsNotification()) driverAwake = true;
    assert.ok(driverAwake || !usedVisible(), 'lost used buffer notification: the driver sleeps with used descriptors pending');
  };
  const popOne = (): Added | undefined => {
    if (!queue.popChain(mem, chain)) {
      assert.equal(published.length, 0, 'the device found nothing while the driver had published chains');
      return undefined;
    }
    const exp = published.shift();
    assert.ok(exp !== undefined, 'popped a chain the driver never added');
    assert.equal(chain.head, exp.id, 'chains come out in ring order');
    assert.deepEqual(segmentsOf(chain), exp.segs);
    assert.equal(chain.indirect, exp.indirect);
    inFlight.set(exp.id, exp);
    return exp;
  };
  const inFlightSlots = (): number => [...inFlight.values()].reduce((a, c) => a + c.slots, 0);

  for (const op of ops) {
    switch (op.t) {
      case 'add': {
        const segs: Seg[] = [];
        for (let i = 0; i < op.readable; i++) segs.push({ addr: 0x8000 + ((op.seed * 7 + i * 13) % 0x7000), len: (op.seed + i) % 300, writable: false });
        for (let i = 0; i < op.writable; i++) segs.push({ addr: 0x8000 + ((op.seed * 11 + i * 17) % 0x7000), len: (op.seed * 3 + i) % 500, writable: true });
        if (segs.length === 0) segs.push({ addr: 0x9000, len: 1, writable: true });
        const useIndirect = indirect && (op.indirect || segs.length > size);
        const token = `t${tokens}`;
        const id = driver.addChain(segs, token, useIndirect ? { indirectAddr: REGION_B + 0x100 * (tokens % 200) } : {});
        if (id < 0) {
          assert.ok(driver.freeCount < (useIndirect ? 1 : segs.length), 'addChain refused with enough free slots');
          break;
        }
        tokens++;
        assert.ok(id < size && !idsOut.has(id), `id ${id} handed out twice`);
        idsOut.add(id);
        idOfToken.set(token, id);
        const slots = useIndirect ? 1 : segs.length;
        addedSlots += slots;
        published.push({ token, id, segs, indirect: useIndirect, slots });
        driver.publish();
        if (driver.kickNeeded()) deviceAwake = true;
        assert.ok(deviceAwake || !queue.hasAvailable(), 'lost kick: the device sleeps with chains available');
        break;
      }
      case 'pop': {
        if (!deviceAwake) break;
        const before = queue.getBase();
        const got: Added[] = [];
        for (let i = 0; i < op.n; i++) {
          const c = popOne();
          if (c === undefined) break;
          got.push(c);
        }
        if (op.unpop && got.length > 0) {
          for (let i = got.length - 1; i >= 0; i--) {
            queue.unpop();
            const c = got[i] as Added;
            inFlight.delete(c.id);
            published.unshift(c);
          }
          assert.equal(queue.getBase(), before, 'unpop rewinds to where the pops started');
        }
        assert.equal(queue.inFlightSlots, inFlightSlots());
        break;
      }
      case 'complete': {
        // Completions may come at any time (asynchronous I/O), also while the device sleeps.
        op.picks.forEach((pick, k) => {
          const ids = [...inFlight.keys()];
          if (ids.length === 0) return;
          const id = ids[pick % ids.length] as number;
          const c = inFlight.get(id) as Added;
          const writableBytes = c.segs.filter((s) => s.writable).reduce((a, s) => a + s.len, 0);
          const len = writableBytes === 0 ? 0 : (op.lens[k] ?? 0) % (writableBytes + 1);
          queue.pushUsed(id, len);
          inFlight.delete(id);
          pushedUnpublished.push([c.token, len]);
        });
        if (op.publish) publish();
        assert.equal(queue.inFlightSlots, inFlightSlots());
        break;
      }
      case 'devSleep':
        if (deviceAwake && !queue.enableNotification()) deviceAwake = false;
        if (!deviceAwake) assert.equal(queue.hasAvailable(), false);
        break;
      case 'devDisable':
        if (deviceAwake) queue.disableNotification();
        break;
      case 'drvPoll':
        if (driverAwake) poll();
        break;
      case 'drvSleep':
        if (driverAwake && !driver.enableInterrupts()) driverAwake = false;
        break;
      case 'drvDisable':
        if (driverAwake) driver.disableInterrupts();
        break;
      default: {
        const never: never = op;
        throw new Error(`unknown op ${String(never)}`);
      }
    }
  }

  // Drain: both sides awake (the device's state is not consulted below), the device processes everything, the
  // driver takes everything back.
  driverAwake = true;
  for (let round = 0; round < 4 * size + 4 && (published.length > 0 || inFlight.size > 0 || pushedUnpublished.length > 0); round++) {
    while (popOne() !== undefined);
    for (const [id, c] of [...inFlight]) {
      queue.pushUsed(id, 0);
      inFlight.delete(id);
      pushedUnpublished.push([c.token, 0]);
    }
    publish();
    poll();
  }
  publish();
  poll();
  assert.equal(published.length + inFlight.size + pushedUnpublished.length + expectedBack.length, 0);
  assert.equal(returned, tokens, 'every chain added came back exactly once');
  assert.equal(idsOut.size, 0);
  assert.equal(driver.inFlight, 0);
  assert.equal(driver.freeCount, size);
  assert.equal(queue.inFlightSlots, 0);
  // Positions: both sides agree, and they moved by exactly the slots made available (modulo 2 * size).
  const expected = (start & 0x7fff) + ((start & 0x8000) !== 0 ? 0 : size) + addedSlots;
  const lin = expected % (2 * size);
  const pos = lin < size ? lin | 0x8000 : lin - size;
  assert.equal(queue.getBase(), pos);
  assert.equal(queue.usedPosition, pos);
  assert.equal(driver.availPosition, pos);
  assert.equal(driver.usedPosition, pos);
}

test('random driver/device operations against a model: chains, completions, notifications and positions', () => {
  fc.assert(
    fc.property(
      fc.constantFrom(1, 3, 5, 6, 7, 12),
      fc.boolean(),
      fc.boolean(),
      fc.nat({ max: 0x7fff }),
      fc.boolean(),
      fc.array(opArb, { minLength: 1, maxLength: 150 }),
      (size, eventIdx, indirect, startIndex, startWrap, ops) => {
        run(size, eventIdx, indirect, (startIndex % size) | (startWrap ? 0x8000 : 0), ops);
      },
    ),
    { numRuns: 250 },
  );
});

test('many wraps of a ring of 3 with chains of 1..3 slots: positions stay consistent (long deterministic run)', () => {
  const ops: Op[] = [];
  for (let i = 0; i < 3000; i++) {
    ops.push({ t: 'add', readable: i % 2, writable: 1 + (i % 3 === 0 ? 1 : 0), indirect: i % 5 === 0, seed: i });
    ops.push({ t: 'pop', n: 2, unpop: i % 7 === 0 });
    ops.push({ t: 'complete', picks: [i, i + 1], lens: [i, i, i, i], publish: i % 4 !== 0 });
    if (i % 3 === 0) ops.push({ t: 'drvPoll' });
    if (i % 11 === 0) ops.push({ t: 'devSleep' }, { t: 'drvSleep' });
    if (i % 13 === 0) ops.push({ t: 'devDisable' }, { t: 'drvDisable' });
  }
  for (const eventIdx of [false, true]) run(3, eventIdx, true, 0x8000, ops);
});
