/**
 * The split virtqueue, driver and device together (VIRTIO 1.2 §2.7): the driver offers buffers, the device pops,
 * fills and completes them, the driver sees the completions.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { VhostError } from '../../src/errors.js';
import {
  ChainReader,
  ChainWriter,
  DescriptorChain,
  SplitQueue,
  SplitQueueDriver,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_USED_F_NO_NOTIFY,
  vringNeedEvent,
} from '../../src/queue/index.js';
import {
  BUF_BASE,
  REGION_B,
  REGION_C,
  RING_BASE,
  codeOf,
  queuePair,
  segmentsOf,
  standardMemory,
} from './test-memory.js';

const enc = new TextEncoder();

test('a request round trip: driver adds, device pops, reads, writes and completes, driver sees the completion', () => {
  const { mem, driver, queue, chain } = queuePair();
  mem.write(BUF_BASE, enc.encode('hello device'));
  const head = driver.addChain(
    [
      { addr: BUF_BASE, len: 12, writable: false },
      { addr: BUF_BASE + 0x100, len: 64, writable: true },
      { addr: BUF_BASE + 0x200, len: 1, writable: true },
    ],
    'req-1',
  );
  assert.equal(head, 0);
  assert.equal(queue.popChain(mem, chain), false, 'nothing is visible before publish');
  driver.publish();
  assert.equal(queue.availableCount(), 1);

  assert.equal(queue.popChain(mem, chain), true);
  assert.equal(chain.head, head);
  assert.deepEqual(segmentsOf(chain), [
    { addr: BUF_BASE, len: 12, writable: false },
    { addr: BUF_BASE + 0x100, len: 64, writable: true },
    { addr: BUF_BASE + 0x200, len: 1, writable: true },
  ]);
  assert.equal(chain.readableCount, 1);
  assert.equal(chain.readableBytes, 12);
  assert.equal(chain.writableBytes, 65);
  assert.equal(chain.indirect, false);
  assert.equal(queue.lastAvailIdx, 1);
  assert.equal(queue.popChain(mem, chain), false);

  const req = new Uint8Array(12);
  new ChainReader().reset(mem, chain).readExact(req);
  assert.equal(new TextDecoder().decode(req), 'hello device');
  const w = new ChainWriter().reset(mem, chain);
  w.writeExact(enc.encode('reply'));
  w.skip(59);
  w.writeExact(Uint8Array.of(0x5a));
  assert.equal(w.remaining, 0);

  queue.addUsed(chain.head, w.written);
  assert.equal(driver.readUsedIdx(), 1);
  const seen: [string, number][] = [];
  assert.equal(
    driver.pollUsed((t, len) => seen.push([t, len])),
    1,
  );
  assert.deepEqual(seen, [['req-1', 65]]);
  assert.equal(new TextDecoder().decode(mem.read(BUF_BASE + 0x100, 5)), 'reply');
  assert.equal(mem.read(BUF_BASE + 0x200, 1)[0], 0x5a);
  assert.equal(driver.freeCount, 8);
  assert.equal(driver.inFlight, 0);
});

test('a batch: several pushUsed are published by one store of used.idx', () => {
  const { mem, driver, queue, chain } = queuePair();
  for (let i = 0; i < 5; i++) driver.addChain([{ addr: BUF_BASE + i * 0x10, len: 16, writable: true }], `t${i}`);
  driver.publish();
  assert.equal(queue.availableCount(), 5);
  const heads: number[] = [];
  while (queue.popChain(mem, chain)) heads.push(chain.head);
  assert.equal(heads.length, 5);
  // Complete out of order.
  for (const h of heads.reverse()) queue.pushUsed(h, h);
  assert.equal(driver.readUsedIdx(), 0, 'pushUsed alone publishes nothing');
  queue.publishUsed();
  assert.equal(driver.readUsedIdx(), 5);
  const seen: string[] = [];
  driver.pollUsed((t, len) => seen.push(`${t}:${len}`));
  assert.deepEqual(seen, ['t4:4', 't3:3', 't2:2', 't1:1', 't0:0']);
});

test('the driver runs out of descriptors and gets them back on completion', () => {
  const { mem, driver, queue, chain } = queuePair({ size: 4 });
  assert.equal(driver.addChain([{ addr: BUF_BASE, len: 1, writable: false }, { addr: BUF_BASE, len: 1, writable: true }], 'a'), 0);
  assert.equal(driver.addChain([{ addr: BUF_BASE, len: 1, writable: false }, { addr: BUF_BASE, len: 1, writable: true }], 'b'), 2);
  assert.equal(driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'c'), -1);
  driver.publish();
  assert.ok(queue.popChain(mem, chain));
  queue.addUsed(chain.head, 0);
  driver.pollUsed(() => undefined);
  assert.equal(driver.freeCount, 2);
  assert.notEqual(driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'c'), -1);
});

test('16-bit indices wrap: both sides start at 65530 (SET_VRING_BASE) and run past 65535', () => {
  const { mem, driver, queue, chain } = queuePair({ size: 4 });
  driver.resetPositions(65530);
  queue.setBase(65530);
  assert.equal(queue.getBase(), 65530);
  let completed = 0;
  for (let round = 0; round < 6; round++) {
    // Batches of up to 3 chains per round.
    const n = 1 + (round % 3);
    for (let i = 0; i < n; i++) driver.addChain([{ addr: BUF_BASE, len: 8, writable: true }], `r${round}.${i}`);
    driver.publish();
    assert.equal(queue.availableCount(), n);
    while (queue.popChain(mem, chain)) queue.pushUsed(chain.head, 8);
    queue.publishUsed();
    completed += driver.pollUsed(() => undefined);
  }
  assert.equal(completed, 12);
  assert.equal(queue.lastAvailIdx, (65530 + 12) & 0xffff);
  assert.equal(queue.usedIdx, 6);
  assert.equal(driver.readUsedIdx(), 6);
  assert.equal(queue.getBase(), 6);
  assert.equal(driver.freeCount, 4);
});

test('resyncToUsed: SET_VRING_BASE 0 on a ring whose used.idx is 300 (DPDK virtio_user after a reconnect) resumes at 300', () => {
  const { mem, driver, queue, chain } = queuePair({ size: 4 });
  driver.resetPositions(300); // avail.idx = used.idx = 300: 300 chains were completed before the reconnect
  queue.resume(0);
  assert.equal(queue.resyncToUsed(), 0, 'moved from the SET_VRING_BASE value');
  assert.equal(queue.getBase(), 300);
  assert.equal(queue.resyncToUsed(), -1, 'nothing to do once they agree');
  driver.addChain([{ addr: BUF_BASE, len: 8, writable: true }], 'next');
  driver.publish();
  assert.ok(queue.popChain(mem, chain), 'the next chain is the one after used.idx, not 300 stale ones');
  assert.equal(queue.availableCount(), 0);
});

test('an avail index exactly queue-size entries ahead is valid, also across the wrap', () => {
  const { mem, driver, queue, chain } = queuePair({ size: 4 });
  driver.resetPositions(65534);
  queue.setBase(65534);
  for (let i = 0; i < 4; i++) driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], `${i}`);
  driver.publish();
  assert.equal(driver.availPosition, 2);
  assert.equal(queue.availableCount(), 4);
  let n = 0;
  while (queue.popChain(mem, chain)) n++;
  assert.equal(n, 4);
});

test('indirect descriptors (§2.7.5.3): the driver puts the chain in a table, the device walks it', () => {
  const { mem, driver, queue, chain } = queuePair({ indirect: true });
  const table = BUF_BASE + 0x1000;
  const head = driver.addChain(
    [
      { addr: BUF_BASE, len: 16, writable: false },
      { addr: BUF_BASE + 0x10, len: 512, writable: true },
      { addr: BUF_BASE + 0x400, len: 1, writable: true },
    ],
    'ind',
    { indirectAddr: table },
  );
  assert.equal(driver.freeCount, 7, 'one ring descriptor for the whole chain');
  assert.deepEqual(driver.readDescriptor(head), { addr: BigInt(table), len: 48, flags: VRING_DESC_F_INDIRECT, next: 0 });
  driver.publish();
  assert.ok(queue.popChain(mem, chain));
  assert.equal(chain.indirect, true);
  assert.equal(chain.head, head);
  assert.deepEqual(segmentsOf(chain), [
    { addr: BUF_BASE, len: 16, writable: false },
    { addr: BUF_BASE + 0x10, len: 512, writable: true },
    { addr: BUF_BASE + 0x400, len: 1, writable: true },
  ]);
  queue.addUsed(head, 1);
  const got: string[] = [];
  driver.pollUsed((t) => got.push(t));
  assert.deepEqual(got, ['ind']);
  assert.equal(driver.freeCount, 8);
});

test('direct descriptors followed by an indirect one are accepted; the WRITE flag of the indirect descriptor is ignored', () => {
  const { mem, driver, queue, chain } = queuePair();
  const table = BUF_BASE + 0x1000;
  driver.writeDescriptor(0, { addr: BUF_BASE, len: 4, flags: VRING_DESC_F_NEXT, next: 5 });
  driver.writeDescriptor(5, { addr: table, len: 32, flags: VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE, next: 0 });
  SplitQueueDriver.writeDescriptorAt(mem, table, { addr: BUF_BASE + 4, len: 4, flags: VRING_DESC_F_NEXT, next: 1 });
  SplitQueueDriver.writeDescriptorAt(mem, table + 16, { addr: BUF_BASE + 8, len: 4, flags: VRING_DESC_F_WRITE, next: 0 });
  driver.pushAvailRaw(0);
  driver.publish();
  assert.ok(queue.popChain(mem, chain));
  assert.deepEqual(segmentsOf(chain), [
    { addr: BUF_BASE, len: 4, writable: false },
    { addr: BUF_BASE + 4, len: 4, writable: false },
    { addr: BUF_BASE + 8, len: 4, writable: true },
  ]);
});

test('an indirect table crossing into an adjacent region is read entry by entry', () => {
  const { mem, driver, queue, chain } = queuePair();
  // 4 entries: the second straddles the B/C boundary (8 bytes in each region).
  const table = REGION_C - 24;
  for (let i = 0; i < 4; i++) {
    SplitQueueDriver.writeDescriptorAt(mem, table + 16 * i, {
      addr: REGION_B + 0x100 * i,
      len: 0x10 + i,
      flags: i < 3 ? VRING_DESC_F_NEXT : VRING_DESC_F_WRITE,
      next: i + 1,
    });
  }
  driver.writeDescriptor(3, { addr: table, len: 64, flags: VRING_DESC_F_INDIRECT, next: 0 });
  driver.pushAvailRaw(3);
  driver.publish();
  assert.ok(queue.popChain(mem, chain));
  assert.deepEqual(segmentsOf(chain), [
    { addr: REGION_B, len: 0x10, writable: false },
    { addr: REGION_B + 0x100, len: 0x11, writable: false },
    { addr: REGION_B + 0x200, len: 0x12, writable: false },
    { addr: REGION_B + 0x300, len: 0x13, writable: true },
  ]);
});

test('an indirect table running into a hole: fine if the chain stays in the mapped part, GUEST_MEMORY_UNMAPPED if not', () => {
  const { mem, driver, queue, chain } = queuePair();
  const table = 0x1_0000 - 32; // the last two entries of region A, then the hole
  SplitQueueDriver.writeDescriptorAt(mem, table, { addr: BUF_BASE, len: 1, flags: VRING_DESC_F_NEXT, next: 1 });
  SplitQueueDriver.writeDescriptorAt(mem, table + 16, { addr: BUF_BASE, len: 1, flags: 0, next: 0 });
  driver.writeDescriptor(0, { addr: table, len: 64, flags: VRING_DESC_F_INDIRECT, next: 0 });
  driver.pushAvailRaw(0);
  driver.publish();
  assert.ok(queue.popChain(mem, chain));
  assert.equal(chain.count, 2);
  // Now the second entry links to entry 2, which is in the hole.
  SplitQueueDriver.writeDescriptorAt(mem, table + 16, { addr: BUF_BASE, len: 1, flags: VRING_DESC_F_NEXT, next: 2 });
  driver.pushAvailRaw(0);
  driver.publish();
  assert.equal(codeOf(() => queue.popChain(mem, chain)), 'GUEST_MEMORY_UNMAPPED');
  // An indirect table whose start is unmapped.
  const q2 = queuePair();
  q2.driver.writeDescriptor(0, { addr: 0x1_8000, len: 16, flags: VRING_DESC_F_INDIRECT, next: 0 });
  q2.driver.pushAvailRaw(0);
  q2.driver.publish();
  assert.equal(codeOf(() => q2.queue.popChain(q2.mem, q2.chain)), 'GUEST_MEMORY_UNMAPPED');
});

test('zero-length buffers are passed through (the spec does not forbid them)', () => {
  const { mem, driver, queue, chain } = queuePair();
  driver.addChain([{ addr: BUF_BASE, len: 0, writable: false }, { addr: BUF_BASE, len: 0, writable: true }], 'z');
  driver.publish();
  assert.ok(queue.popChain(mem, chain));
  assert.deepEqual(segmentsOf(chain), [
    { addr: BUF_BASE, len: 0, writable: false },
    { addr: BUF_BASE, len: 0, writable: true },
  ]);
});

test('a chain of exactly queue-size descriptors and exactly 2^32 - 1 bytes is valid', () => {
  const { mem, driver, queue, chain } = queuePair({ size: 4 });
  const lens = [0xffff_fffc, 1, 1, 1];
  driver.addChain(lens.map((len) => ({ addr: BUF_BASE, len, writable: true })), 'big');
  driver.publish();
  assert.ok(queue.popChain(mem, chain));
  assert.equal(chain.count, 4);
  assert.equal(chain.writableBytes, 0xffff_ffff);
});

test('unpop gives the last chain back', () => {
  const { mem, driver, queue, chain } = queuePair();
  driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'a');
  driver.publish();
  assert.ok(queue.popChain(mem, chain));
  queue.unpop();
  assert.equal(queue.lastAvailIdx, 0);
  assert.ok(queue.popChain(mem, chain));
  assert.equal(chain.head, 0);
  assert.equal(queue.popChain(mem, chain), false);
});

test('setBase with a separate used index (resume after reconnect) and ringUsedIdx', () => {
  const { mem, driver, queue, chain } = queuePair();
  for (let i = 0; i < 3; i++) driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], `${i}`);
  driver.publish();
  for (let i = 0; i < 3; i++) assert.ok(queue.popChain(mem, chain));
  queue.addUsed(0, 1);
  // A new backend resumes with last_avail_idx = 3 (GET_VRING_BASE) and the used index found in the ring.
  const q2 = new SplitQueue({ size: 8, ...SplitQueueDriver.layout(8, RING_BASE), eventIdx: false, indirect: false });
  q2.attach(mem);
  q2.setBase(queue.getBase(), q2.ringUsedIdx());
  assert.equal(q2.usedIdx, 1);
  q2.addUsed(1, 1);
  q2.addUsed(2, 1);
  assert.equal(driver.pollUsed(() => undefined), 3);
  assert.throws(() => queue.setBase(65536), RangeError);
});

test('without event idx: VRING_AVAIL_F_NO_INTERRUPT suppresses used buffer notifications', () => {
  const { mem, driver, queue, chain } = queuePair({ eventIdx: false });
  driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'a');
  driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'b');
  driver.publish();
  queue.popChain(mem, chain);
  queue.addUsed(chain.head, 1);
  assert.equal(queue.needsNotification(), true);
  driver.disableInterrupts();
  queue.popChain(mem, chain);
  queue.addUsed(chain.head, 1);
  assert.equal(queue.needsNotification(), false);
  assert.equal(driver.enableInterrupts(), true, 'completions are pending: poll instead of waiting');
  assert.equal(queue.needsNotification(), true);
});

test('without event idx: VRING_USED_F_NO_NOTIFY suppresses available buffer notifications (kicks)', () => {
  const { driver, queue } = queuePair({ eventIdx: false });
  driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'a');
  driver.publish();
  assert.equal(driver.kickNeeded(), true);
  assert.equal(driver.kickNeeded(), false, 'nothing new published');
  queue.disableNotification();
  assert.equal(driver.readUsedFlags() & VRING_USED_F_NO_NOTIFY, VRING_USED_F_NO_NOTIFY);
  driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'b');
  driver.publish();
  assert.equal(driver.kickNeeded(), false);
  assert.equal(queue.enableNotification(), true, 'two chains are waiting');
  assert.equal(driver.readUsedFlags() & VRING_USED_F_NO_NOTIFY, 0);
  driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'c');
  driver.publish();
  assert.equal(driver.kickNeeded(), true);
});

test('vring_need_event is the wrapping comparison of §2.7.7.2', () => {
  assert.equal(vringNeedEvent(0, 1, 0), true); // moved from 0 to 1 past event 0
  assert.equal(vringNeedEvent(1, 1, 0), false); // event 1 not yet passed (passed when idx becomes 2)
  assert.equal(vringNeedEvent(5, 10, 3), true);
  assert.equal(vringNeedEvent(10, 10, 3), false);
  assert.equal(vringNeedEvent(2, 3, 3), false); // nothing new
  assert.equal(vringNeedEvent(65535, 2, 65534), true); // across the wrap
  assert.equal(vringNeedEvent(1, 0, 65534), false);
});

test('event idx: the device notifies only when used.idx passes used_event', () => {
  const { mem, driver, queue, chain } = queuePair({ eventIdx: true });
  const complete = (): void => {
    assert.ok(queue.popChain(mem, chain));
    queue.addUsed(chain.head, 0);
  };
  for (let i = 0; i < 6; i++) driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], `${i}`);
  driver.publish();
  complete();
  assert.equal(queue.needsNotification(), true, 'the first check after setup always notifies');
  // The driver asks to be woken after the 4th completion (used_event = 3: notify when used.idx moves past 3).
  driver.setUsedEvent(3);
  complete(); // used.idx 2
  assert.equal(queue.needsNotification(), false);
  complete(); // 3
  assert.equal(queue.needsNotification(), false);
  complete(); // 4: passed 3
  assert.equal(queue.needsNotification(), true);
  complete(); // 5
  assert.equal(queue.needsNotification(), false, 'no second notification for the same used_event');
  // enableInterrupts sets used_event to the driver's last used index (it consumed nothing yet: 0).
  assert.equal(driver.enableInterrupts(), true);
  assert.equal(driver.pollUsed(() => undefined), 5);
  assert.equal(driver.enableInterrupts(), false);
  complete(); // 6: passes used_event 5
  assert.equal(queue.needsNotification(), true);
});

test('event idx: a batch published at once notifies once if it crosses used_event', () => {
  const { mem, driver, queue, chain } = queuePair({ eventIdx: true });
  queue.needsNotification(); // consume the "first call" notification
  driver.setUsedEvent(1);
  for (let i = 0; i < 4; i++) driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], `${i}`);
  driver.publish();
  while (queue.popChain(mem, chain)) queue.pushUsed(chain.head, 0);
  queue.publishUsed();
  assert.equal(queue.needsNotification(), true);
  assert.equal(queue.needsNotification(), false);
});

test('event idx: avail_event tells the driver when to kick', () => {
  const { mem, driver, queue, chain } = queuePair({ eventIdx: true });
  // Fresh rings: avail_event = 0, so the first chain (avail.idx 0 -> 1) is kicked.
  driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'a');
  driver.publish();
  assert.equal(driver.kickNeeded(), true);
  // The device processes while leaving avail_event behind (disableNotification does nothing with event idx).
  queue.disableNotification();
  assert.ok(queue.popChain(mem, chain));
  driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'b');
  driver.publish();
  assert.equal(driver.kickNeeded(), false, 'avail_event 0 was already passed');
  assert.equal(queue.enableNotification(), true, "'b' is available");
  assert.equal(driver.readAvailEvent(), 1);
  assert.ok(queue.popChain(mem, chain));
  assert.equal(queue.enableNotification(), false);
  assert.equal(driver.readAvailEvent(), 2);
  driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'c');
  driver.publish();
  assert.equal(driver.kickNeeded(), true, 'avail.idx moved past avail_event 2');
});

for (const eventIdx of [false, true]) {
  test(`enableNotification returns true when a buffer raced in before it (eventIdx=${eventIdx})`, () => {
    const { mem, driver, queue, chain } = queuePair({ eventIdx });
    driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'a');
    driver.publish();
    assert.equal(driver.kickNeeded(), true);
    // Device: notifications off, drain the ring.
    queue.disableNotification();
    while (queue.popChain(mem, chain)) queue.addUsed(chain.head, 0);
    // Driver: adds a buffer and checks whether to kick; the device has not re-enabled notifications yet, so the
    // driver reads "don't notify" and does not kick.
    driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'b');
    driver.publish();
    assert.equal(driver.kickNeeded(), false);
    // Device: re-enables notifications, and the re-read of avail.idx finds the buffer that no kick announced.
    assert.equal(queue.enableNotification(), true);
    assert.ok(queue.popChain(mem, chain));
    assert.equal(queue.enableNotification(), false, 'drained: now it is safe to sleep');
    // Later additions are kicked.
    driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'c');
    driver.publish();
    assert.equal(driver.kickNeeded(), true);
  });
}

for (const eventIdx of [false, true]) {
  test(`a device short of buffers waits past seenAvailIdx, not past a fresh read (eventIdx=${eventIdx})`, () => {
    // The story (found with DPDK testpmd on the net receive queue): the device needs two buffers for a frame, finds
    // one, gives it back and re-arms. Had it re-armed at a fresh read of avail.idx, a buffer the driver added between
    // the failed pop and that read would count as "already seen": no kick would come for it, and the device would
    // sleep with enough buffers in the ring.
    const { mem, driver, queue, chain } = queuePair({ eventIdx });
    queue.disableNotification();
    driver.addChain([{ addr: BUF_BASE, len: 8, writable: true }], 'a');
    driver.publish();
    driver.kickNeeded(); // the driver checks after every publish (the first one of fresh rings is kicked)
    assert.ok(queue.popChain(mem, chain));
    assert.equal(queue.popChain(mem, chain), false, 'one buffer is not enough');
    queue.unpop();
    assert.equal(queue.seenAvailIdx, 1, 'the failed pop saw avail.idx 1');
    // The driver adds a buffer before the device re-arms; notifications are off, so it does not kick.
    driver.addChain([{ addr: BUF_BASE + 8, len: 8, writable: true }], 'b');
    driver.publish();
    assert.equal(driver.kickNeeded(), false);
    assert.equal(queue.enableNotification(queue.seenAvailIdx), true, "'b' came after what the device saw: retry now");
    assert.ok(queue.popChain(mem, chain));
    assert.ok(queue.popChain(mem, chain), 'two buffers: the frame fits');
    // Short again with nothing new: re-arming at what the pop saw says sleep, and the next buffer is kicked.
    assert.equal(queue.popChain(mem, chain), false);
    assert.equal(queue.enableNotification(queue.seenAvailIdx), false);
    driver.addChain([{ addr: BUF_BASE + 16, len: 8, writable: true }], 'c');
    driver.publish();
    assert.equal(driver.kickNeeded(), true);
  });
}

test('the chain walk does one GuestMemory call per indirect table and none for direct descriptors', () => {
  const { mem, driver, queue, chain } = queuePair({ size: 16 });
  driver.addChain(
    Array.from({ length: 15 }, (_, i) => ({ addr: BUF_BASE + i, len: 1, writable: i >= 8 })),
    'direct',
  );
  driver.addChain(
    Array.from({ length: 100 }, (_, i) => ({ addr: BUF_BASE + i, len: 1, writable: false })),
    'indirect',
    { indirectAddr: 0x2_0000 },
  );
  driver.publish();
  const before = mem.viewCalls;
  assert.ok(queue.popChain(mem, chain));
  assert.equal(chain.count, 15);
  assert.equal(mem.viewCalls, before);
  assert.ok(queue.popChain(mem, chain));
  assert.equal(chain.count, 100);
  assert.equal(mem.viewCalls, before + 1);
});

test('ChainReader and ChainWriter copy across segment and region boundaries', () => {
  const { mem, driver, queue, chain } = queuePair();
  // A readable segment crossing from region B into region C, then a tiny one; a writable one crossing too.
  const data = Uint8Array.from({ length: 40 }, (_, i) => i);
  mem.write(REGION_C - 20, data.subarray(0, 30));
  mem.write(BUF_BASE, data.subarray(30));
  driver.addChain(
    [
      { addr: REGION_C - 20, len: 30, writable: false },
      { addr: BUF_BASE, len: 10, writable: false },
      { addr: REGION_C - 3, len: 6, writable: true },
    ],
    'x',
  );
  driver.publish();
  assert.ok(queue.popChain(mem, chain));
  const r = new ChainReader().reset(mem, chain);
  const head = new Uint8Array(7);
  r.readExact(head);
  assert.deepEqual([...head], [0, 1, 2, 3, 4, 5, 6]);
  assert.equal(r.skip(20), 20);
  const rest = new Uint8Array(64);
  assert.equal(r.read(rest), 13);
  assert.deepEqual([...rest.subarray(0, 13)], Array.from({ length: 13 }, (_, i) => 27 + i));
  assert.equal(r.remaining, 0);
  assert.equal(r.consumed, 40);
  assert.equal(r.read(rest), 0);
  assert.equal(codeOf(() => r.readExact(Uint8Array.of(0))), 'VIRTIO_CHAIN_TOO_SHORT');

  const w = new ChainWriter().reset(mem, chain);
  assert.equal(w.write(Uint8Array.of(9, 8, 7, 6, 5, 4, 3, 2)), 6);
  assert.deepEqual([...mem.read(REGION_C - 3, 6)], [9, 8, 7, 6, 5, 4]);
  assert.equal(w.written, 6);
  assert.equal(codeOf(() => new ChainWriter().reset(mem, chain).writeExact(new Uint8Array(7))), 'VIRTIO_CHAIN_TOO_SHORT');
});

test('ChainReader reports a segment in a hole as GUEST_MEMORY_UNMAPPED (the queue does not translate buffers)', () => {
  const { mem, driver, queue, chain } = queuePair();
  driver.addChain([{ addr: 0x1_0000 - 4, len: 8, writable: false }], 'hole');
  driver.publish();
  assert.ok(queue.popChain(mem, chain), 'popChain accepts it: addresses are validated, not translated');
  const r = new ChainReader().reset(mem, chain);
  const buf = new Uint8Array(8);
  assert.equal(codeOf(() => r.read(buf)), 'GUEST_MEMORY_UNMAPPED');
  assert.equal(r.consumed, 0, 'the failing step is not consumed');
});

test('using a queue before attach or with a too small chain is a programming error', () => {
  const mem = standardMemory();
  const layout = SplitQueueDriver.layout(8, RING_BASE);
  const q = new SplitQueue({ size: 8, ...layout, eventIdx: false, indirect: false });
  assert.equal(q.attached, false);
  assert.throws(
    () => q.popChain(mem, q.createChain()),
    (err: unknown) => err instanceof VhostError && err.code === 'VHOST_QUEUE_NOT_ATTACHED',
  );
  q.attach(mem);
  assert.equal(q.maxChainLength, 1024);
  assert.throws(() => q.popChain(mem, new DescriptorChain(8)), RangeError);
  assert.throws(() => q.addUsed(8, 0), RangeError);
  assert.throws(() => q.addUsed(0, 2 ** 32), RangeError);
  q.detach();
  assert.throws(() => q.availableCount(), VhostError);
});

test('layout: the 1.x layout packs the rings, the legacy one aligns the used ring to 4096', () => {
  assert.deepEqual(SplitQueueDriver.layout(256, 0x1001), {
    descAddr: 0x1010,
    availAddr: 0x2010,
    usedAddr: 0x2218,
    end: 0x2a1e,
  });
  assert.equal(SplitQueueDriver.layout(256, 0).usedAddr, 0x1208);
  assert.equal(SplitQueueDriver.layout(256, 0, { legacy: true }).usedAddr, 0x2000);
  assert.equal(new SplitQueue({ size: 2048, ...SplitQueueDriver.layout(2048, 0), eventIdx: false, indirect: true }).maxChainLength, 2048);
});

test('the canonical device loop of the SplitQueue docs drains everything and sleeps only when safe', () => {
  for (const eventIdx of [false, true]) {
    const { mem, driver, queue, chain } = queuePair({ size: 8, eventIdx });
    let notifications = 0;
    let kicks = 0;
    let next = 0;
    const completed: string[] = [];
    const addSome = (n: number): void => {
      for (let i = 0; i < n; i++) {
        if (driver.addChain([{ addr: BUF_BASE, len: 4, writable: true }], `c${next}`) < 0) return;
        next++;
      }
      driver.publish();
      if (driver.kickNeeded()) kicks++;
    };
    driver.enableInterrupts();
    addSome(3);
    // One "kick handler" run; the driver adds more while the device is in the middle of it.
    let rounds = 0;
    do {
      queue.disableNotification();
      while (queue.popChain(mem, chain)) {
        queue.addUsed(chain.head, 4);
        if (queue.needsNotification()) notifications++;
        if (rounds++ === 1) addSome(2); // raced in while notifications are off
      }
    } while (queue.enableNotification());
    driver.pollUsed((t) => completed.push(t));
    assert.deepEqual(completed, ['c0', 'c1', 'c2', 'c3', 'c4'], `eventIdx=${eventIdx}`);
    assert.equal(kicks, 1, 'the buffers added during processing were not kicked: the loop found them itself');
    assert.ok(notifications >= 1);
    assert.equal(queue.availableCount(), 0);
  }
});

test('rings laid out so that used.flags is avail.idx: the worker loop ends (a re-check that says "more" takes a chain or fails)', () => {
  // The story (found by `npm run fuzz -- --seconds 180`): the used ring 2 bytes after the avail ring, so the
  // device's own stores of used.flags (VRING_USED_F_NO_NOTIFY off in enableNotification, on in
  // disableNotification) rewrite avail.idx. The worker's loop (pop until empty, re-enable, re-check, disable) ran
  // forever: the re-check read avail.idx = 0 ("more", the device had seen 1), disableNotification made it 1 again,
  // the pop re-read it, found nothing, and so on. That worker never came back to its other queues, to memory
  // changes or to poll(). Now the index the re-check reads is the one the next pop uses (and is checked as every
  // read of avail.idx is), and the worker ends a turn after BATCH_LIMIT rounds whatever the ring says.
  const mem = standardMemory();
  const size = 8;
  const availAddr = RING_BASE + 0x102; // 2-byte aligned, as the avail ring must be
  const queue = new SplitQueue({ size, descAddr: RING_BASE, availAddr, usedAddr: availAddr + 2, eventIdx: false, indirect: true });
  queue.attach(mem);
  const chain = queue.createChain();
  let rounds = 0;
  let code: string | undefined;
  try {
    queue.disableNotification();
    for (; rounds < 1000; rounds++) {
      while (queue.popChain(mem, chain)) queue.pushUsed(chain.head, 0);
      queue.publishUsed();
      if (!queue.enableNotification()) break;
      queue.disableNotification();
    }
  } catch (err) {
    code = codeOf(() => {
      throw err;
    });
  }
  assert.ok(rounds < 4, `the loop ended after ${rounds} rounds`);
  assert.equal(code, 'VIRTIO_AVAIL_INDEX_INVALID', 'avail.idx moved back (our own store): the queue stops');
});
