/**
 * Every way a driver can break a split virtqueue, each with its stable error code (VIRTIO 1.2 §2.7, and the checks of
 * Linux vhost, libvhost-user and rust-vmm listed in docs/anchors.md).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { VirtioError } from '../../src/errors.js';
import {
  SplitQueue,
  SplitQueueDriver,
  VRING_DESC_F_INDIRECT as INDIRECT,
  VRING_DESC_F_NEXT as NEXT,
  VRING_DESC_F_WRITE as WRITE,
} from '../../src/queue/index.js';
import { BUF_BASE, HOLE_AB, REGION_C, RING_BASE, codeOf, queuePair, standardMemory, type PairOptions, type QueuePair } from './test-memory.js';

const TABLE = 0x2_0000; // indirect tables go in region B

/** Builds a ring with `setup` (which publishes), pops once and returns the error code. */
function popError(setup: (p: QueuePair) => void, options: PairOptions = {}): string {
  const p = queuePair(options);
  p.chain.push(0x1234, 1, false); // junk from an earlier request: must not survive a failed pop
  setup(p);
  const before = p.queue.lastAvailIdx;
  const code = codeOf(() => p.queue.popChain(p.mem, p.chain));
  assert.equal(p.queue.lastAvailIdx, before, 'a failed pop consumes nothing');
  assert.equal(p.chain.count, 0, 'the chain is left cleared');
  return code;
}

/** Makes descriptor `head` the next available chain and publishes it. */
function offer(p: QueuePair, head: number): void {
  p.driver.pushAvailRaw(head);
  p.driver.publish();
}

function err(code: string, fn: () => unknown, message?: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof VirtioError, `expected a VirtioError, got ${String(e)}`);
    assert.equal(e.code, code);
    if (message !== undefined) assert.match(e.message, message);
    return true;
  });
}

test('avail.idx more than queue size ahead of last_avail_idx: VIRTIO_AVAIL_INDEX_INVALID', () => {
  const p = queuePair({ size: 8 });
  p.driver.setAvailIdx(9);
  err('VIRTIO_AVAIL_INDEX_INVALID', () => p.queue.availableCount(), /avail\.idx 9/);
  err('VIRTIO_AVAIL_INDEX_INVALID', () => p.queue.popChain(p.mem, p.chain));
  // Moving backwards is a jump of ~65535 ahead.
  const q = queuePair({ size: 8 });
  q.driver.resetPositions(100);
  q.queue.setBase(100);
  q.driver.setAvailIdx(99);
  err('VIRTIO_AVAIL_INDEX_INVALID', () => q.queue.popChain(q.mem, q.chain));
});

test('head index >= queue size: VIRTIO_DESC_INDEX_OUT_OF_RANGE', () => {
  const code = popError((p) => offer(p, 8), { size: 8 });
  assert.equal(code, 'VIRTIO_DESC_INDEX_OUT_OF_RANGE');
  err('VIRTIO_DESC_INDEX_OUT_OF_RANGE', () => {
    const p = queuePair({ size: 8 });
    offer(p, 0xffff);
    p.queue.popChain(p.mem, p.chain);
  }, /head 65535/);
});

test('next index >= queue size: VIRTIO_DESC_INDEX_OUT_OF_RANGE', () => {
  const code = popError((p) => {
    p.driver.writeDescriptor(0, { addr: BUF_BASE, len: 1, flags: NEXT, next: 8 });
    offer(p, 0);
  });
  assert.equal(code, 'VIRTIO_DESC_INDEX_OUT_OF_RANGE');
});

test('next index >= indirect table length: VIRTIO_DESC_INDEX_OUT_OF_RANGE', () => {
  const code = popError((p) => {
    SplitQueueDriver.writeDescriptorAt(p.mem, TABLE, { addr: BUF_BASE, len: 1, flags: NEXT, next: 2 });
    SplitQueueDriver.writeDescriptorAt(p.mem, TABLE + 16, { addr: BUF_BASE, len: 1, flags: 0, next: 0 });
    p.driver.writeDescriptor(0, { addr: TABLE, len: 32, flags: INDIRECT, next: 0 });
    offer(p, 0);
  });
  assert.equal(code, 'VIRTIO_DESC_INDEX_OUT_OF_RANGE');
});

test('a loop a -> b -> a: VIRTIO_DESC_LOOP', () => {
  const code = popError((p) => {
    p.driver.writeDescriptor(2, { addr: BUF_BASE, len: 1, flags: NEXT, next: 5 });
    p.driver.writeDescriptor(5, { addr: BUF_BASE, len: 1, flags: NEXT, next: 2 });
    offer(p, 2);
  });
  assert.equal(code, 'VIRTIO_DESC_LOOP');
});

test('a self-loop: VIRTIO_DESC_LOOP', () => {
  const code = popError((p) => {
    p.driver.writeDescriptor(3, { addr: BUF_BASE, len: 1, flags: NEXT, next: 3 });
    offer(p, 3);
  });
  assert.equal(code, 'VIRTIO_DESC_LOOP');
});

test('a loop inside an indirect table: VIRTIO_DESC_LOOP', () => {
  const code = popError((p) => {
    SplitQueueDriver.writeDescriptorAt(p.mem, TABLE, { addr: BUF_BASE, len: 1, flags: NEXT, next: 1 });
    SplitQueueDriver.writeDescriptorAt(p.mem, TABLE + 16, { addr: BUF_BASE, len: 1, flags: NEXT, next: 0 });
    p.driver.writeDescriptor(0, { addr: TABLE, len: 32, flags: INDIRECT, next: 0 });
    offer(p, 0);
  });
  assert.equal(code, 'VIRTIO_DESC_LOOP');
});

test('a loop through a long chain of a big queue stays bounded (ttl = queue size)', () => {
  const p = queuePair({ size: 1024, base: 0x2_0000 });
  for (let i = 0; i < 1024; i++) p.driver.writeDescriptor(i, { addr: BUF_BASE, len: 1, flags: NEXT, next: (i + 1) % 1024 });
  offer(p, 0);
  err('VIRTIO_DESC_LOOP', () => p.queue.popChain(p.mem, p.chain));
});

test('an indirect descriptor inside an indirect table: VIRTIO_INDIRECT_NESTED', () => {
  const code = popError((p) => {
    SplitQueueDriver.writeDescriptorAt(p.mem, TABLE, { addr: TABLE + 0x100, len: 16, flags: INDIRECT, next: 0 });
    SplitQueueDriver.writeDescriptorAt(p.mem, TABLE + 0x100, { addr: BUF_BASE, len: 1, flags: 0, next: 0 });
    p.driver.writeDescriptor(0, { addr: TABLE, len: 16, flags: INDIRECT, next: 0 });
    offer(p, 0);
  });
  assert.equal(code, 'VIRTIO_INDIRECT_NESTED');
});

for (const len of [17, 0, 8, 16 * 65536 + 16]) {
  test(`an indirect table of ${len} bytes: VIRTIO_INDIRECT_BAD_LENGTH`, () => {
    const code = popError((p) => {
      p.driver.writeDescriptor(0, { addr: TABLE, len, flags: INDIRECT, next: 0 });
      offer(p, 0);
    });
    assert.equal(code, 'VIRTIO_INDIRECT_BAD_LENGTH');
  });
}

test('VRING_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC: VIRTIO_INDIRECT_NOT_NEGOTIATED', () => {
  const code = popError(
    (p) => {
      SplitQueueDriver.writeDescriptorAt(p.mem, TABLE, { addr: BUF_BASE, len: 1, flags: 0, next: 0 });
      p.driver.writeDescriptor(0, { addr: TABLE, len: 16, flags: INDIRECT, next: 0 });
      offer(p, 0);
    },
    { indirect: false },
  );
  assert.equal(code, 'VIRTIO_INDIRECT_NOT_NEGOTIATED');
});

test('VRING_DESC_F_INDIRECT together with VRING_DESC_F_NEXT (§2.7.5.3.1): VIRTIO_INDIRECT_WITH_NEXT', () => {
  const code = popError((p) => {
    SplitQueueDriver.writeDescriptorAt(p.mem, TABLE, { addr: BUF_BASE, len: 1, flags: 0, next: 0 });
    p.driver.writeDescriptor(0, { addr: TABLE, len: 16, flags: INDIRECT | NEXT, next: 1 });
    p.driver.writeDescriptor(1, { addr: BUF_BASE, len: 1, flags: WRITE, next: 0 });
    offer(p, 0);
  });
  assert.equal(code, 'VIRTIO_INDIRECT_WITH_NEXT');
});

test('a readable descriptor after a writable one: VIRTIO_WRITABLE_BEFORE_READABLE', () => {
  assert.equal(
    popError((p) => {
      p.driver.writeDescriptor(0, { addr: BUF_BASE, len: 1, flags: NEXT | WRITE, next: 1 });
      p.driver.writeDescriptor(1, { addr: BUF_BASE, len: 1, flags: 0, next: 0 });
      offer(p, 0);
    }),
    'VIRTIO_WRITABLE_BEFORE_READABLE',
  );
  // Inside an indirect table.
  assert.equal(
    popError((p) => {
      SplitQueueDriver.writeDescriptorAt(p.mem, TABLE, { addr: BUF_BASE, len: 1, flags: NEXT | WRITE, next: 1 });
      SplitQueueDriver.writeDescriptorAt(p.mem, TABLE + 16, { addr: BUF_BASE, len: 1, flags: 0, next: 0 });
      p.driver.writeDescriptor(0, { addr: TABLE, len: 32, flags: INDIRECT, next: 0 });
      offer(p, 0);
    }),
    'VIRTIO_WRITABLE_BEFORE_READABLE',
  );
  // A writable direct descriptor, then a readable one in the indirect table it leads to.
  assert.equal(
    popError((p) => {
      SplitQueueDriver.writeDescriptorAt(p.mem, TABLE, { addr: BUF_BASE, len: 1, flags: 0, next: 0 });
      p.driver.writeDescriptor(0, { addr: BUF_BASE, len: 1, flags: NEXT | WRITE, next: 1 });
      p.driver.writeDescriptor(1, { addr: TABLE, len: 16, flags: INDIRECT, next: 0 });
      offer(p, 0);
    }),
    'VIRTIO_WRITABLE_BEFORE_READABLE',
  );
});

test('a chain longer than 2^32 - 1 bytes in total (§2.7.5.2): VIRTIO_CHAIN_TOO_LONG', () => {
  const code = popError((p) => {
    p.driver.writeDescriptor(0, { addr: BUF_BASE, len: 0xffff_ffff, flags: NEXT, next: 1 });
    p.driver.writeDescriptor(1, { addr: BUF_BASE, len: 1, flags: WRITE, next: 0 });
    offer(p, 0);
  });
  assert.equal(code, 'VIRTIO_CHAIN_TOO_LONG');
  // Many large descriptors in an indirect table.
  assert.equal(
    popError((p) => {
      for (let i = 0; i < 3; i++) {
        SplitQueueDriver.writeDescriptorAt(p.mem, TABLE + 16 * i, { addr: 0, len: 0x6000_0000, flags: NEXT, next: i + 1 });
      }
      SplitQueueDriver.writeDescriptorAt(p.mem, TABLE + 48, { addr: 0, len: 0x6000_0000, flags: 0, next: 0 });
      p.driver.writeDescriptor(0, { addr: TABLE, len: 64, flags: INDIRECT, next: 0 });
      offer(p, 0);
    }),
    'VIRTIO_CHAIN_TOO_LONG',
  );
});

/** Writes an indirect table of `entries` descriptors chained 0 -> 1 -> ... at TABLE and descriptor 0 referring to it. */
function linearTable(p: QueuePair, entries: number): void {
  const bytes = new Uint8Array(16 * entries);
  const dv = new DataView(bytes.buffer);
  for (let i = 0; i < entries; i++) {
    dv.setUint32(16 * i, BUF_BASE + i, true);
    dv.setUint32(16 * i + 8, 1, true);
    dv.setUint16(16 * i + 12, i < entries - 1 ? NEXT : 0, true);
    dv.setUint16(16 * i + 14, i + 1, true);
  }
  p.mem.write(TABLE, bytes);
  p.driver.writeDescriptor(0, { addr: TABLE, len: 16 * entries, flags: INDIRECT, next: 0 });
}

test('a chain of more than max(queue size, 1024) descriptors: VIRTIO_CHAIN_TOO_LONG; exactly the bound is fine', () => {
  assert.equal(
    popError((p) => {
      linearTable(p, 1025);
      offer(p, 0);
    }),
    'VIRTIO_CHAIN_TOO_LONG',
  );
  const p = queuePair();
  linearTable(p, 1024);
  offer(p, 0);
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.chain.count, 1024);
  // The bound counts direct descriptors too: 1 direct + 1024 indirect is too many.
  assert.equal(
    popError((q) => {
      linearTable(q, 1024);
      q.driver.writeDescriptor(1, { addr: BUF_BASE, len: 1, flags: NEXT, next: 0 });
      offer(q, 1);
    }),
    'VIRTIO_CHAIN_TOO_LONG',
  );
});

test('a buffer address at or above 2^53, or ending past 2^53: VIRTIO_DESC_ADDRESS_INVALID', () => {
  for (const [addr, len] of [
    [2n ** 53n, 1],
    // Regression (found by the property test): a zero-length buffer at exactly 2^53 ends "at 2^53" but starts at an
    // address GuestMemory never maps; it is rejected like any address >= 2^53.
    [2n ** 53n, 0],
    [2n ** 64n - 1n, 1],
    [2n ** 53n - 10n, 11],
  ] as const) {
    const code = popError((p) => {
      p.driver.writeDescriptor(0, { addr, len, flags: 0, next: 0 });
      offer(p, 0);
    });
    assert.equal(code, 'VIRTIO_DESC_ADDRESS_INVALID', `addr ${addr} len ${len}`);
  }
  // Ending exactly at 2^53 is representable (and left for GuestMemory to reject as unmapped).
  const p = queuePair();
  p.driver.writeDescriptor(0, { addr: 2n ** 53n - 10n, len: 10, flags: 0, next: 0 });
  offer(p, 0);
  assert.ok(p.queue.popChain(p.mem, p.chain));
  assert.equal(p.chain.addr[0], 2 ** 53 - 10);
  // The address of an indirect table.
  assert.equal(
    popError((q) => {
      q.driver.writeDescriptor(0, { addr: 2n ** 60n, len: 16, flags: INDIRECT, next: 0 });
      offer(q, 0);
    }),
    'VIRTIO_DESC_ADDRESS_INVALID',
  );
});

test('rings not in guest memory: VIRTIO_RING_UNMAPPED', () => {
  const mem = standardMemory();
  const ok = SplitQueueDriver.layout(8, RING_BASE);
  const attach = (cfg: Partial<typeof ok>): void =>
    new SplitQueue({ size: 8, ...ok, ...cfg, eventIdx: false, indirect: false }).attach(mem);
  err('VIRTIO_RING_UNMAPPED', () => attach({ descAddr: HOLE_AB }), /descriptor table/);
  err('VIRTIO_RING_UNMAPPED', () => attach({ availAddr: HOLE_AB + 0x100 }), /available ring/);
  err('VIRTIO_RING_UNMAPPED', () => attach({ usedAddr: 0x5_0000 }), /used ring/);
  // Crossing the end of a region into a hole, or into the next region.
  err('VIRTIO_RING_UNMAPPED', () => attach({ descAddr: HOLE_AB - 64 }), /one memory region/);
  err('VIRTIO_RING_UNMAPPED', () => attach({ usedAddr: REGION_C - 32 }), /one memory region/);
  // Addresses u64ToAddress could not represent (-1), or that end past 2^53.
  err('VIRTIO_RING_UNMAPPED', () => attach({ descAddr: -1 }));
  err('VIRTIO_RING_UNMAPPED', () => attach({ usedAddr: 2 ** 53 - 16 }));
  // The driver side checks the same way.
  err('VIRTIO_RING_UNMAPPED', () => new SplitQueueDriver(mem, { size: 8, ...ok, availAddr: HOLE_AB }));
});

test('misaligned rings: VIRTIO_RING_MISALIGNED', () => {
  const ok = SplitQueueDriver.layout(8, RING_BASE);
  const make = (cfg: Partial<typeof ok>): SplitQueue => new SplitQueue({ size: 8, ...ok, ...cfg, eventIdx: false, indirect: false });
  err('VIRTIO_RING_MISALIGNED', () => make({ descAddr: ok.descAddr + 8 }), /descriptor table.*16-byte/);
  err('VIRTIO_RING_MISALIGNED', () => make({ availAddr: ok.availAddr + 1 }), /available ring.*2-byte/);
  err('VIRTIO_RING_MISALIGNED', () => make({ usedAddr: ok.usedAddr + 2 }), /used ring.*4-byte/);
  make({ availAddr: ok.availAddr + 2, usedAddr: ok.usedAddr + 4 }); // the minimum alignments are enough
});

for (const size of [0, 3, 65536, 32769, 1.5, -4]) {
  test(`queue size ${size}: VIRTIO_QUEUE_SIZE_INVALID`, () => {
    err('VIRTIO_QUEUE_SIZE_INVALID', () => new SplitQueue({ size, descAddr: 0, availAddr: 0, usedAddr: 0, eventIdx: false, indirect: false }));
    err('VIRTIO_QUEUE_SIZE_INVALID', () => new SplitQueueDriver(standardMemory(), { size, descAddr: 0, availAddr: 0, usedAddr: 0 }));
  });
}

test('queue sizes 1 and 32768 are valid', () => {
  const one = queuePair({ size: 1 });
  one.driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'x');
  one.driver.publish();
  assert.ok(one.queue.popChain(one.mem, one.chain));
  one.queue.addUsed(0, 1);
  assert.equal(one.driver.pollUsed(() => undefined), 1);
  const big = new SplitQueue({ size: 32768, ...SplitQueueDriver.layout(32768, 0), eventIdx: true, indirect: true });
  assert.equal(big.maxChainLength, 32768);
});

test('error messages name the descriptor', () => {
  const p = queuePair();
  SplitQueueDriver.writeDescriptorAt(p.mem, TABLE, { addr: BUF_BASE, len: 1, flags: NEXT, next: 7 });
  p.driver.writeDescriptor(4, { addr: TABLE, len: 32, flags: INDIRECT, next: 0 });
  offer(p, 4);
  err('VIRTIO_DESC_INDEX_OUT_OF_RANGE', () => p.queue.popChain(p.mem, p.chain), /chain 4: indirect entry 0 \(table at descriptor 4\) has next 7/);
});

test('the driver side rejects a bogus used ring: VIRTIO_USED_INDEX_INVALID, VIRTIO_USED_ID_INVALID', () => {
  const p = queuePair();
  p.driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'a');
  p.driver.publish();
  assert.ok(p.queue.popChain(p.mem, p.chain));
  p.queue.addUsed(p.chain.head, 1);
  p.queue.addUsed(p.chain.head, 1); // completes twice: used.idx 2 with one chain in flight
  err('VIRTIO_USED_INDEX_INVALID', () => p.driver.pollUsed(() => undefined));

  const q = queuePair();
  q.driver.addChain([{ addr: BUF_BASE, len: 1, writable: true }], 'a');
  q.driver.publish();
  assert.ok(q.queue.popChain(q.mem, q.chain));
  q.queue.addUsed(5, 1); // a head that is not in flight
  err('VIRTIO_USED_ID_INVALID', () => q.driver.pollUsed(() => undefined));
});
