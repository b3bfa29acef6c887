// virtio-rng over vhost-user with the TypeScript frontend as the VMM: buffers come back filled (not the pattern the
// driver left in them), the used length is what was written, a request larger than --max-bytes gets that much, a
// buffer split over two descriptors is filled across both, a chain with nothing writable completes with length 0;
// on split and packed rings.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { VhostUserServer } from '../../src/backend/server.js';
import { readQueueStats } from '../../src/devices/queue-stats.js';
import { RngDevice, VIRTIO_ID_RNG } from '../../src/devices/rng/rng-device.js';
import { GuestRam, VhostUserFrontend, type FrontendQueue } from '../../src/frontend/index.js';
import { VirtioFeature, featureBit } from '../../src/protocol/constants.js';
import { testTempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;

/** Polls until `n` completions came (or 2 s): token -> used length. */
async function collect(q: FrontendQueue, n: number): Promise<Map<number, number>> {
  const done = new Map<number, number>();
  for (let i = 0; i < 200 && done.size < n; i++) {
    q.driver.pollUsed((token, len) => done.set(token, len));
    if (done.size < n) await sleep(10);
  }
  return done;
}

for (const packed of [false, true]) {
  test(`rng (${packed ? 'packed' : 'split'} ring): buffers filled from the CSPRNG, lengths as written, capped per request`, { timeout: 30_000 }, async (t) => {
    const dir = await testTempDir(t, 'vu-rng-');
    const device = new RngDevice({ maxBytesPerRequest: 4096 });
    assert.equal(device.deviceId, VIRTIO_ID_RNG);
    const server = new VhostUserServer({ socketPath: dir.join('rng.sock'), device });
    server.listen();
    const ram = GuestRam.create(4 * MiB);
    const fe = await VhostUserFrontend.connect(server.socketPath);
    try {
      const features = featureBit(VirtioFeature.VERSION_1) | (packed ? featureBit(VirtioFeature.RING_PACKED) : 0n);
      await fe.start({ features, memory: ram, queues: [{ index: 0, size: 16 }] });
      const q = fe.queue(0);
      const buf = (len: number): number => {
        const gpa = ram.alloc(len, { align: 64 });
        ram.bytes(gpa, len).fill(0xa5);
        return gpa;
      };
      const a = buf(64);
      const b1 = buf(100);
      const b2 = buf(28);
      const c = buf(8192);
      const d = buf(16);
      q.driver.addChain([{ addr: a, len: 64, writable: true }], 1);
      q.driver.addChain([{ addr: b1, len: 100, writable: true }, { addr: b2, len: 28, writable: true }], 2);
      q.driver.addChain([{ addr: c, len: 8192, writable: true }], 3);
      q.driver.addChain([{ addr: d, len: 16, writable: false }], 4);
      q.publishAndKick();
      const done = await collect(q, 4);
      assert.deepEqual([...done.entries()].sort((x, y) => x[0] - y[0]), [[1, 64], [2, 128], [3, 4096], [4, 0]]);
      const untouched = (gpa: number, len: number): number => ram.bytes(gpa, len).filter((x) => x === 0xa5).length;
      // Random bytes equal 0xa5 now and then (1 in 256): far fewer than all of them.
      assert.ok(untouched(a, 64) < 16, 'the first buffer is filled');
      assert.ok(untouched(b1, 100) < 20 && untouched(b2, 28) < 8, 'both parts of the second are filled');
      assert.ok(untouched(c, 4096) < 64, 'the third is filled up to the cap');
      assert.equal(untouched(c + 4096, 4096), 4096, 'and not past it');
      assert.equal(untouched(d, 16), 16, 'a device-readable buffer is not written');
      assert.notDeepEqual([...ram.bytes(a, 64)], [...ram.bytes(b1, 64)], 'different requests get different bytes');
      const stats = readQueueStats(server.queueStats, 0);
      assert.equal(stats.requests, 4);
      assert.equal(stats.bytesRead, 64 + 128 + 4096, 'bytes given to the driver');
      assert.equal(stats.errors, 1, 'the chain with nothing to fill');
    } finally {
      fe.close();
      await server.close();
      ram.close();
    }
  });
}

test('rng with a rate limit: the period\'s bytes at once, later requests wait for the next periods, in order', { timeout: 30_000 }, async (t) => {
  const dir = await testTempDir(t, 'vu-rng-');
  // 3000 bytes per 200 ms: of eight 1000-byte requests, three complete at once, then three per period.
  const server = new VhostUserServer({ socketPath: dir.join('rng.sock'), device: new RngDevice({ rateLimit: { bytes: 3000, periodMs: 200 } }) });
  server.listen();
  const ram = GuestRam.create(4 * MiB);
  const fe = await VhostUserFrontend.connect(server.socketPath);
  try {
    await fe.start({ features: featureBit(VirtioFeature.VERSION_1), memory: ram, queues: [{ index: 0, size: 16 }] });
    const q = fe.queue(0);
    const start = performance.now();
    for (let i = 1; i <= 8; i++) q.driver.addChain([{ addr: ram.alloc(1000), len: 1000, writable: true }], i);
    q.publishAndKick();
    const order: number[] = [];
    const at: number[] = [];
    for (let i = 0; i < 300 && order.length < 8; i++) {
      q.driver.pollUsed((token, len) => {
        assert.equal(len, 1000);
        order.push(token);
        at.push(performance.now() - start);
      });
      if (order.length < 8) await sleep(5);
    }
    t.diagnostic(`completed at ${at.map((ms) => ms.toFixed(0)).join(', ')} ms`);
    assert.deepEqual(order, [1, 2, 3, 4, 5, 6, 7, 8], 'every request, in order');
    // Functional bounds, not timing: a request of the second period cannot complete before the first period ended,
    // nor one of the third before the second (each period starts at least 200 ms after the one before).
    assert.ok((at[3] as number) >= 195, `request 4 waited for the second period (${at[3]} ms)`);
    assert.ok((at[6] as number) >= 395, `request 7 waited for the third period (${at[6]} ms)`);
    assert.equal(readQueueStats(server.queueStats, 0).bytesRead, 8000);
  } finally {
    fe.close();
    await server.close();
    ram.close();
  }
  assert.throws(() => new RngDevice({ rateLimit: { bytes: 0, periodMs: 10 } }), /rate limit/);
});
