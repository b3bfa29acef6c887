// Every limit on hostile input has a clear error (and nothing else breaks): memory regions, queue size, message size,
// chain length (descriptors and bytes). The limit on outstanding requests (the queue size) is in regressions.test.ts
// (a head made available again while in flight is not refused).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { VirtioError } from '../../src/errors.js';
import { GuestRam } from '../../src/frontend/guest-ram.js';
import { VhostUserFrontend } from '../../src/frontend/frontend.js';
import { FrontendRequest, VirtioFeature, featureBit } from '../../src/protocol/constants.js';
import { vringStatePayload } from '../../src/protocol/payloads.js';
import { SplitQueue } from '../../src/queue/split-queue.js';
import { SplitQueueDriver } from '../../src/queue/split-queue-driver.js';
import { RawClient, encodeRaw, leftOver, settledBaseline, startServer } from './backend-harness.js';
import { GuardedMemory } from './guarded-memory.js';

const MiB = 1024 * 1024;

function logged(lines: Record<string, unknown>[], pattern: RegExp): boolean {
  return lines.some((l) => {
    const message = (l.err as { message?: unknown } | undefined)?.message;
    return typeof message === 'string' && pattern.test(message);
  });
}

test('regions: --mem-slots N accepts N regions, the next ADD_MEM_REG is refused with a clear error; all released', async () => {
  const baseline = await settledBaseline();
  await (async () => {
    const backend = startServer({ queues: 1, memSlots: 4 });
    const ram = GuestRam.create(4 * MiB);
    const fe = await VhostUserFrontend.connect(backend.socketPath);
    try {
      assert.equal(fe.maxMemSlots, 4);
      await fe.start({ features: featureBit(VirtioFeature.VERSION_1), queues: [{ index: 0, size: 16 }], memory: ram, memoryMode: 'regions' });
      for (let i = 1; i < 4; i++) await fe.addMemoryRegion(ram.addRegion({ gpa: i * 0x1_0000_0000, size: MiB }));
      await assert.rejects(fe.addMemoryRegion(ram.addRegion({ gpa: 9 * 0x1_0000_0000, size: MiB })), { code: 'VHOST_FRONTEND_NACK' });
      assert.ok(logged(backend.lines, /all 4 memory slots are in use/), 'the log says why');
      assert.equal(backend.server.session?.memory.regions.length, 4);
      assert.equal((await fe.getStatus()) & 0x40, 0, 'a refused region is not a device error');
    } finally {
      fe.close();
      ram.close();
      await backend.close();
    }
  })();
  assert.equal(await leftOver(baseline), undefined);
});

test('queue size: above the device maximum or not a power of two is refused; the largest one is accepted', async () => {
  const backend = startServer({ queues: 1, maxQueueSize: 32768 });
  const ram = GuestRam.create(4 * MiB);
  const fe = await VhostUserFrontend.connect(backend.socketPath);
  try {
    for (const [num, ok] of [[32768, true], [65536, false], [3, false], [0, false], [0xffff_ffff, false]] as const) {
      const p = fe.requestWithAck(FrontendRequest.SET_VRING_NUM, vringStatePayload.encode({ index: 0, num }));
      if (ok) await p;
      else await assert.rejects(p, { code: 'VHOST_FRONTEND_NACK' }, `num ${num}`);
    }
    assert.ok(logged(backend.lines, /queue size 65536 is not a power of two up to 32768/));
  } finally {
    fe.close();
    ram.close();
    await backend.close();
  }
});

test('message size: a 4096-byte payload is read (and refused as a payload), 4097 bytes end the connection', async () => {
  const backend = startServer({ queues: 1 });
  try {
    const c = new RawClient(backend.socketPath);
    c.send(encodeRaw(FrontendRequest.SET_STATUS, 1, new Uint8Array(4096))); // framed; a bad u64: no ack wanted, so dropped
    c.send(encodeRaw(FrontendRequest.GET_FEATURES, 1, new Uint8Array(0)));
    assert.ok(await c.until(() => c.closed, 2000));
    assert.ok(logged(backend.lines, /u64: expected 8 bytes, got 4096/), 'the 4096-byte payload reached the handler');
    c.close();
    await backend.server.idle();
    const d = new RawClient(backend.socketPath);
    d.send(encodeRaw(FrontendRequest.GET_FEATURES, 1, new Uint8Array(4097)));
    assert.ok(await d.until(() => d.closed, 2000), '4097 bytes: disconnected');
    assert.equal(d.replies.length, 0);
    assert.ok(backend.lines.some((l) => l.msg === 'malformed message stream: disconnecting'));
    d.close();
  } finally {
    await backend.close();
  }
});

test('chain length: 1024 descriptors through an indirect table pass, 1025 are VIRTIO_CHAIN_TOO_LONG; so is 2^32 bytes', () => {
  const mem = new GuardedMemory([{ gpa: 0, size: 0x10_0000 }, { gpa: 0x10_0000, size: 0x10_0000 }]);
  const layout = SplitQueueDriver.layout(8, 0x1000);
  const driver = new SplitQueueDriver<number>(mem, { size: 8, ...layout });
  const queue = new SplitQueue({ size: 8, ...layout, eventIdx: false, indirect: true });
  queue.attach(mem);
  const chain = queue.createChain();
  const table = 0x10_0000;
  const offer = (n: number, len: (i: number) => number): void => {
    for (let i = 0; i < n; i++) {
      SplitQueueDriver.writeDescriptorAt(mem, table + 16 * i, { addr: 0x8000, len: len(i), flags: i < n - 1 ? 1 : 2, next: i + 1 });
    }
    driver.writeDescriptor(0, { addr: table, len: 16 * n, flags: 4, next: 0 });
    driver.pushAvailRaw(0);
    driver.publish();
  };
  offer(1024, () => 1);
  assert.ok(queue.popChain(mem, chain));
  assert.equal(chain.count, 1024);
  offer(1025, () => 1);
  assert.throws(() => queue.popChain(mem, chain), (e: unknown) => e instanceof VirtioError && e.code === 'VIRTIO_CHAIN_TOO_LONG' && /at most 1024/.test(e.message));
  queue.setBase(queue.lastAvailIdx + 1);
  offer(2, () => 0x8000_0000); // 2^32 bytes in total
  assert.throws(() => queue.popChain(mem, chain), (e: unknown) => e instanceof VirtioError && e.code === 'VIRTIO_CHAIN_TOO_LONG' && /2\^32 - 1 bytes/.test(e.message));
});
