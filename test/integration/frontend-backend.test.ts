// The TypeScript frontend (src/frontend) against our own backend, in process: handshake, memory, rings, block I/O
// on two queues, error statuses, reconnect, two regions from one memfd (mmap_offset != 0), ADD_MEM_REG, and a
// return to the baseline of fds and mappings after everything is closed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { VhostUserServer } from '../../src/backend/server.js';
import { BlkDevice } from '../../src/devices/blk/blk-device.js';
import { BlkStatus } from '../../src/devices/blk/constants.js';
import { VhostError } from '../../src/errors.js';
import { BlkDriver, FrontendErrorCode, GuestRam, VhostUserFrontend, packedRingFeature, parseBlkConfig } from '../../src/frontend/index.js';
import { FrontendRequest, ProtocolFeature, VirtioFeature, featureBit, hasFeature } from '../../src/protocol/constants.js';
import { vringStatePayload } from '../../src/protocol/payloads.js';
import { assertBaseline, settledBaseline } from '../helpers/fds.js';
import { testTempDir, type TempDir } from '../helpers/tmp.js';
import { splitDriver } from '../helpers/split-driver.js';
import { imagePattern, prng, randomPieces } from '../helpers/blk-io.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const IMAGE_SIZE = 8 * MiB;
const TIMEOUT = { timeout: 60_000 };

// ---- helpers ------------------------------------------------------------------------------------------------------

function randomBytes(rand: () => number, length: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; i += 4) {
    const v = (rand() * 0x1_0000_0000) >>> 0;
    b[i] = v & 0xff;
    b[i + 1] = (v >>> 8) & 0xff;
    b[i + 2] = (v >>> 16) & 0xff;
    b[i + 3] = v >>> 24;
  }
  return b;
}


interface Backend {
  server: VhostUserServer;
  socketPath: string;
  image: string;
}

function startBackend(dir: TempDir, options: { readOnly?: boolean; name?: string } = {}): Backend {
  const name = options.name ?? 'disk';
  const image = dir.join(`${name}.img`);
  writeFileSync(image, imagePattern(IMAGE_SIZE));
  const socketPath = dir.join(`${name}.sock`);
  const device = new BlkDevice({
    backend: { kind: 'file', path: image },
    queues: 2,
    ...(options.readOnly === true ? { readOnly: true } : {}),
  });
  const server = new VhostUserServer({ socketPath, device });
  server.listen();
  return { server, socketPath, image };
}

/** Writes pieces of [start, end) on alternating queues, all submitted at once; updates `model`. */
async function writeAll(blk: BlkDriver, rand: () => number, model: Buffer, start: number, end: number): Promise<number> {
  const pieces = randomPieces(rand, start, end, blk.maxRequestBytes);
  const statuses = await Promise.all(
    pieces.map((p, i) => {
      const data = randomBytes(rand, p.length);
      model.set(data, p.offset);
      return blk.write(p.offset / 512, data, i % blk.queueCount);
    }),
  );
  assert.ok(statuses.every((s) => s === BlkStatus.OK), `write statuses: ${[...new Set(statuses)].join(',')}`);
  return pieces.length;
}

/** Reads [start, end) back in other random pieces on alternating queues and compares with `model`. */
async function verifyAll(blk: BlkDriver, rand: () => number, model: Buffer, start: number, end: number): Promise<void> {
  const pieces = randomPieces(rand, start, end, blk.maxRequestBytes);
  const results = await Promise.all(pieces.map((p, i) => blk.read(p.offset / 512, p.length, (i + 1) % blk.queueCount)));
  results.forEach((r, i) => {
    const p = pieces[i] as { offset: number; length: number };
    assert.equal(r.status, BlkStatus.OK);
    if (!Buffer.from(r.data).equals(model.subarray(p.offset, p.offset + p.length))) {
      assert.fail(`data mismatch in [${p.offset}, +${p.length})`);
    }
  });
}

// ---- tests --------------------------------------------------------------------------------------------------------

test('handshake: features, protocol features, queue count, memory slots and config space', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-fe-');
  const baseline = await settledBaseline();
  await (async () => {
    const backend = startBackend(dir);
    const fe = await VhostUserFrontend.connect(backend.socketPath);
    try {
      assert.ok(hasFeature(fe.backendFeatures, VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES));
      assert.ok(hasFeature(fe.backendFeatures, VirtioFeature.VERSION_1));
      for (const bit of ['MQ', 'REPLY_ACK', 'CONFIG', 'CONFIGURE_MEM_SLOTS', 'STATUS', 'RESET_DEVICE'] as const) {
        assert.ok(fe.hasProtocolFeature(ProtocolFeature[bit]), `${bit} negotiated`);
      }
      assert.equal(fe.protocolFeatures & ~fe.backendProtocolFeatures, 0n);
      assert.equal(fe.queueNum, 2);
      assert.equal(fe.maxMemSlots, 509);
      const config = parseBlkConfig(fe.config);
      assert.equal(config.capacity, IMAGE_SIZE / 512);
      assert.equal(config.blkSize, 512);
      assert.equal(config.numQueues, 2);
      assert.ok(config.segMax > 0);
      assert.deepEqual(await fe.getConfig(0, 8), fe.config.subarray(0, 8));
      assert.equal(fe.features, 0n, 'nothing acknowledged before start');
    } finally {
      fe.close();
      await backend.server.close();
    }
  })();
  await assertBaseline(baseline);
});

test('a masked protocol feature is not negotiated; without REPLY_ACK setup is confirmed by GET_FEATURES', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-fe-');
  const baseline = await settledBaseline();
  await (async () => {
    const backend = startBackend(dir);
    const ram = GuestRam.create(4 * MiB);
    const mask = featureBit(ProtocolFeature.REPLY_ACK) | featureBit(ProtocolFeature.STATUS);
    const fe = await VhostUserFrontend.connect(backend.socketPath, { maskProtocolFeatures: mask });
    try {
      assert.ok(!fe.hasProtocolFeature(ProtocolFeature.REPLY_ACK));
      assert.ok(!fe.hasProtocolFeature(ProtocolFeature.STATUS));
      assert.ok(fe.hasProtocolFeature(ProtocolFeature.MQ));
      const blk = await BlkDriver.start(fe, { memory: ram, queueSize: 16, maxRequestBytes: 64 * KiB, ownMemory: true });
      const data = randomBytes(prng(1), 64 * KiB);
      assert.equal(await blk.write(100, data), BlkStatus.OK);
      const r = await blk.read(100, 64 * KiB);
      assert.equal(r.status, BlkStatus.OK);
      assert.deepEqual(r.data, data);
      await assert.rejects(fe.getStatus(), { code: FrontendErrorCode.UNSUPPORTED });
      blk.close();
      fe.close();
      assert.ok(ram.closed, 'ownMemory: the frontend closed the guest RAM');
    } finally {
      fe.close();
      ram.close();
      await backend.server.close();
    }
  })();
  await assertBaseline(baseline);
});

test('write, read back and verify several MiB on queues 0 and 1; flush, GET_ID, reconnect', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-fe-');
  const baseline = await settledBaseline();
  await (async () => {
    const backend = startBackend(dir);
    const model = imagePattern(IMAGE_SIZE);
    const rand = prng(42);
    try {
      // First frontend: indirect descriptors and EVENT_IDX (the defaults).
      {
        const ram = GuestRam.create(40 * MiB);
        const fe = await VhostUserFrontend.connect(backend.socketPath);
        try {
          const blk = await BlkDriver.start(fe, { memory: ram, queues: 2, queueSize: 64, slotsPerQueue: 32 });
          assert.ok(fe.hasFeature(VirtioFeature.RING_EVENT_IDX));
          assert.ok(fe.hasFeature(VirtioFeature.RING_INDIRECT_DESC));
          assert.ok(fe.hasFeature(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES), 'bit 30 is kept in SET_FEATURES');
          assert.equal(blk.indirect, true);
          assert.equal(blk.slotsPerQueue, 32);
          assert.equal(blk.capacityBytes, IMAGE_SIZE);
          assert.equal(await fe.getStatus(), 0x0f);

          // The initial pattern is there.
          await verifyAll(blk, rand, model, 0, 512 * KiB);
          // Several MiB of writes, more requests than slots: some wait for a slot.
          const n = await writeAll(blk, rand, model, 0, 3 * MiB);
          assert.ok(n > 2 * blk.slotsPerQueue, `${n} requests: more than the slots`);
          await verifyAll(blk, rand, model, 0, 3 * MiB);
          assert.equal(await blk.flush(), BlkStatus.OK);
          assert.equal(await blk.flush(1), BlkStatus.OK);
          assert.ok(readFileSync(backend.image).equals(model), 'the image file holds what was written');

          const id = await blk.getId(1);
          assert.equal(id.status, BlkStatus.OK);
          assert.equal(id.id, 'vhost-user-ts');
          assert.equal(blk.inFlight(0) + blk.inFlight(1), 0);
          blk.close();
        } finally {
          fe.close();
          ram.close();
        }
      }
      // Second frontend, after the first disconnected: direct descriptors, no EVENT_IDX; it sees the data.
      {
        const ram = GuestRam.create(16 * MiB);
        const fe = await VhostUserFrontend.connect(backend.socketPath);
        try {
          const blk = await BlkDriver.start(fe, { memory: ram, queues: 2, queueSize: 32, indirect: false, eventIdx: false });
          assert.ok(!fe.hasFeature(VirtioFeature.RING_EVENT_IDX));
          assert.equal(blk.indirect, false);
          assert.equal(blk.slotsPerQueue, 10);
          await verifyAll(blk, rand, model, 0, 3 * MiB);
          await writeAll(blk, rand, model, 5 * MiB, 6 * MiB);
          await verifyAll(blk, rand, model, 5 * MiB, 6 * MiB);
          assert.equal((await blk.getId()).id, 'vhost-user-ts');
          blk.close();
        } finally {
          fe.close();
          ram.close();
        }
      }
    } finally {
      await backend.server.close();
    }
  })();
  await assertBaseline(baseline);
});

test('error statuses: read-only device rejects writes, out-of-range sectors, bad lengths', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-fe-');
  const baseline = await settledBaseline();
  await (async () => {
    const rw = startBackend(dir, { name: 'rw' });
    const ro = startBackend(dir, { name: 'ro', readOnly: true });
    const rams: GuestRam[] = [];
    const fes: VhostUserFrontend[] = [];
    try {
      const lastSector = IMAGE_SIZE / 512 - 1;
      {
        const ram = GuestRam.create(8 * MiB);
        rams.push(ram);
        const fe = await VhostUserFrontend.connect(rw.socketPath);
        fes.push(fe);
        const blk = await BlkDriver.start(fe, { memory: ram, queues: 2, queueSize: 16, maxRequestBytes: 8 * KiB });
        assert.equal(blk.readOnly, false);
        assert.equal((await blk.read(lastSector, 512)).status, BlkStatus.OK);
        assert.equal((await blk.read(lastSector + 1, 512)).status, BlkStatus.IOERR);
        assert.equal((await blk.read(lastSector, 1024)).status, BlkStatus.IOERR, 'a read across the end');
        assert.equal(await blk.write(lastSector + 1, new Uint8Array(512), 1), BlkStatus.IOERR);
        assert.equal(await blk.write(2 ** 40, new Uint8Array(512)), BlkStatus.IOERR);
        assert.equal(await blk.write(0, new Uint8Array(100)), BlkStatus.IOERR, 'not a multiple of 512');
        assert.equal(await blk.writeZeroes(lastSector, 2), BlkStatus.IOERR);
        // write zeroes and discard inside the device
        assert.equal(await blk.writeZeroes(16, 4), BlkStatus.OK);
        const zeroed = await blk.read(16, 2048);
        assert.deepEqual(zeroed.data, new Uint8Array(2048));
        assert.equal(await blk.discard(32, 8), BlkStatus.OK);
        await assert.rejects(blk.read(0, 16 * KiB), RangeError);
        await assert.rejects(blk.write(-1, new Uint8Array(512)), RangeError);
        // The ring is still fine after all the errors.
        const ok = await blk.read(0, 512, 1);
        assert.deepEqual(Buffer.from(ok.data), imagePattern(512));
        blk.close();
      }
      {
        const ram = GuestRam.create(8 * MiB);
        rams.push(ram);
        const fe = await VhostUserFrontend.connect(ro.socketPath);
        fes.push(fe);
        const blk = await BlkDriver.start(fe, { memory: ram, queueSize: 16, maxRequestBytes: 8 * KiB });
        assert.equal(blk.readOnly, true);
        assert.equal(await blk.write(0, new Uint8Array(4096).fill(1)), BlkStatus.IOERR);
        assert.equal(await blk.writeZeroes(0, 8), BlkStatus.IOERR);
        const r = await blk.read(0, 4096);
        assert.equal(r.status, BlkStatus.OK);
        assert.deepEqual(Buffer.from(r.data), imagePattern(4096), 'the failed write changed nothing');
        assert.equal(await blk.flush(), BlkStatus.OK);
        blk.close();
      }
      assert.ok(readFileSync(ro.image).equals(imagePattern(IMAGE_SIZE)));
    } finally {
      for (const fe of fes) fe.close();
      for (const ram of rams) ram.close();
      await rw.server.close();
      await ro.server.close();
    }
  })();
  await assertBaseline(baseline);
});

test('two regions from one memfd (mmap_offset != 0) with the rings in the second region', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-fe-');
  const baseline = await settledBaseline();
  await (async () => {
    const backend = startBackend(dir);
    const model = imagePattern(IMAGE_SIZE);
    const rand = prng(7);
    try {
      for (const memoryMode of ['table', 'regions'] as const) {
        const ram = GuestRam.split({ lowSize: 8 * MiB, highSize: 8 * MiB, highGpa: 0x1_0000_0000 });
        const fe = await VhostUserFrontend.connect(backend.socketPath);
        try {
          const [low, high] = ram.regions;
          assert.ok(low !== undefined && high !== undefined);
          assert.equal(low.file, high.file, 'one memfd');
          assert.equal(high.fileOffset, 8 * MiB);
          assert.equal(high.uva - low.uva, 8 * MiB, 'UVAs as one mapping of the memfd');
          const blk = await BlkDriver.start(fe, {
            memory: ram,
            queues: 2,
            queueSize: 32,
            maxRequestBytes: 64 * KiB,
            ringRegion: high.gpa,
            bufferRegion: memoryMode === 'table' ? low.gpa : high.gpa,
            memoryMode,
          });
          for (const q of fe.queues.values()) {
            assert.equal(ram.findRegion(q.layout.descAddr), high);
            assert.equal(ram.findRegion(q.layout.usedAddr), high);
          }
          const session = backend.server.session;
          assert.ok(session !== undefined);
          const regions = session.memory.regions;
          assert.equal(regions.length, 2);
          assert.equal(regions[1]?.gpa, high.gpa);
          assert.equal(regions[1]?.fileOffset, 8 * MiB);
          assert.equal(regions[1]?.uva, high.uva);

          const base = memoryMode === 'table' ? 0 : 4 * MiB;
          await writeAll(blk, rand, model, base, base + 2 * MiB);
          await verifyAll(blk, rand, model, base, base + 2 * MiB);
          blk.close();
        } finally {
          fe.close();
          ram.close();
        }
      }
    } finally {
      await backend.server.close();
    }
  })();
  await assertBaseline(baseline);
});

test('memory hot-plug: ADD_MEM_REG and REM_MEM_REG of a region while the queues run', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-fe-');
  const baseline = await settledBaseline();
  await (async () => {
    const backend = startBackend(dir);
    const ram = GuestRam.create(4 * MiB);
    const fe = await VhostUserFrontend.connect(backend.socketPath);
    try {
      const blk = await BlkDriver.start(fe, { memory: ram, queueSize: 16, maxRequestBytes: 8 * KiB });
      const added = ram.addRegion({ gpa: 0x2_0000_0000, size: 2 * MiB });
      await fe.addMemoryRegion(added);
      assert.equal(backend.server.session?.memory.regions.length, 2);
      // A request whose buffers live in the added region, sent with the queue's own ring.
      const q = fe.queue(0);
      const hdr = ram.alloc(16, { region: added });
      const data = ram.alloc(4096, { region: added, align: 4096 });
      const status = ram.alloc(1, { region: added });
      // alloc zeroes: the header already says IN (0) at sector 0.
      ram.bytes(status, 1)[0] = 0xff;
      // Token 1000 cannot collide with the driver's slot numbers (0..15); drain it ourselves.
      assert.ok(q.driver.addChain(
        [
          { addr: hdr, len: 16, writable: false },
          { addr: data, len: 4096, writable: true },
          { addr: status, len: 1, writable: true },
        ],
        1000,
      ) >= 0);
      q.watchCall(undefined); // the blk driver must not consume this completion
      q.publishAndKick();
      for (let i = 0; i < 500 && splitDriver(q).readUsedIdx() === 0; i++) await sleep(5);
      let token = -1;
      q.driver.pollUsed((tok) => (token = tok));
      assert.equal(token, 1000);
      assert.equal(ram.bytes(status, 1)[0], BlkStatus.OK);
      assert.deepEqual(Buffer.from(ram.bytes(data, 4096)), imagePattern(4096));

      await fe.removeMemoryRegion(added);
      assert.equal(backend.server.session?.memory.regions.length, 1);
      ram.removeRegion(added);
      assert.equal(ram.regions.length, 1);
      blk.close();
    } finally {
      fe.close();
      ram.close();
      await backend.server.close();
    }
  })();
  await assertBaseline(baseline);
});

test('NACK, GET_VRING_BASE / restart, RESET_DEVICE and restart, disconnect', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-fe-');
  const baseline = await settledBaseline();
  await (async () => {
    const backend = startBackend(dir);
    const ram = GuestRam.create(8 * MiB);
    const fe = await VhostUserFrontend.connect(backend.socketPath);
    try {
      let blk = await BlkDriver.start(fe, { memory: ram, queues: 2, queueSize: 16, maxRequestBytes: 4 * KiB });
      // A refused request gets a NACK; the connection stays usable.
      await assert.rejects(
        fe.requestWithAck(FrontendRequest.SET_VRING_NUM, vringStatePayload.encode({ index: 7, num: 16 })),
        (err: unknown) => err instanceof VhostError && err.code === FrontendErrorCode.NACK,
      );
      assert.equal((await blk.read(0, 512)).status, BlkStatus.OK);

      // Stop queue 1: its base is the number of requests it took; restart it and go on.
      for (let i = 0; i < 5; i++) assert.equal((await blk.read(i, 512, 1)).status, BlkStatus.OK);
      assert.equal(await fe.stopQueue(1), 5);
      assert.equal(fe.queue(1).running, false);
      await fe.restartQueue(1);
      assert.equal((await blk.read(8, 512, 1)).status, BlkStatus.OK);
      assert.equal(await fe.stopQueue(1), 6);
      await fe.restartQueue(1);

      // Reset, then start again with new rings.
      blk.close();
      await fe.resetDevice();
      assert.equal(fe.queues.size, 0);
      blk = await BlkDriver.start(fe, { memory: ram, queueSize: 16, maxRequestBytes: 4 * KiB });
      const r = await blk.read(0, 4096);
      assert.equal(r.status, BlkStatus.OK);
      assert.deepEqual(Buffer.from(r.data), imagePattern(4096));

      // The backend goes away: the frontend sees it, requests fail instead of hanging.
      await backend.server.close();
      const err = await fe.closed;
      assert.equal(err?.code, FrontendErrorCode.DISCONNECTED);
      await assert.rejects(blk.read(0, 512), { code: FrontendErrorCode.DISCONNECTED });
      await assert.rejects(fe.getStatus(), { code: FrontendErrorCode.DISCONNECTED });
      blk.close();
    } finally {
      fe.close();
      ram.close();
      await backend.server.close();
    }
  })();
  await assertBaseline(baseline);
});

test('packed rings: any queue size, verified I/O on 2 queues, GET_VRING_BASE / restart across the wrap', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-fe-');
  const baseline = await settledBaseline();
  await (async () => {
    const backend = startBackend(dir);
    const model = imagePattern(IMAGE_SIZE);
    const rand = prng(7);
    try {
      // 50 entries (not a power of two), indirect and EVENT_IDX: more requests than slots, so ids are reused.
      {
        const ram = GuestRam.create(24 * MiB);
        const fe = await VhostUserFrontend.connect(backend.socketPath);
        try {
          const blk = await BlkDriver.start(fe, { memory: ram, queues: 2, queueSize: 50, slotsPerQueue: 20, packed: true });
          assert.ok(fe.hasFeature(VirtioFeature.RING_PACKED));
          assert.ok(fe.queue(0).driver.packed);
          await verifyAll(blk, rand, model, 0, 256 * KiB);
          await writeAll(blk, rand, model, 0, 2 * MiB);
          await verifyAll(blk, rand, model, 0, 2 * MiB);
          assert.equal(await blk.flush(1), BlkStatus.OK);
          assert.ok(readFileSync(backend.image).equals(model), 'the image file holds what was written');
          blk.close();
        } finally {
          fe.close();
          ram.close();
        }
      }
      // 3 entries, direct descriptors (3 slots a request), no EVENT_IDX: every request wraps the ring.
      {
        const ram = GuestRam.create(8 * MiB);
        const fe = await VhostUserFrontend.connect(backend.socketPath);
        try {
          const blk = await BlkDriver.start(fe, { memory: ram, queues: 2, queueSize: 3, indirect: false, eventIdx: false, maxRequestBytes: 4 * KiB, packed: true });
          for (let i = 0; i < 5; i++) assert.equal((await blk.read(i, 512, 1)).status, BlkStatus.OK);
          // 5 requests of 3 slots: 15 slots = 2 laps and 9 -> index 0 after 5 wraps, wrap counter 0.
          assert.equal(await fe.stopQueue(1), 0x0000);
          await fe.restartQueue(1);
          assert.equal((await blk.read(8, 512, 1)).status, BlkStatus.OK);
          assert.equal(await fe.stopQueue(1), 0x8000, 'one more lap: wrap counter 1');
          await fe.restartQueue(1);
          await writeAll(blk, rand, model, 4 * MiB, 4 * MiB + 64 * KiB);
          await verifyAll(blk, rand, model, 4 * MiB, 4 * MiB + 64 * KiB);
          blk.close();
        } finally {
          fe.close();
          ram.close();
        }
      }
      // A backend that offers no packed rings: asking for them is an error, not split rings in disguise.
      assert.equal(packedRingFeature(1n << 34n, 'VHOST_TEST'), 1n << 34n);
      assert.throws(() => packedRingFeature(0n, 'VHOST_TEST'), { code: 'VHOST_TEST' });
    } finally {
      await backend.server.close();
    }
  })();
  await assertBaseline(baseline);
});

test('a backend that never replies: the request times out and the connection is dropped', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-fe-');
  const baseline = await settledBaseline();
  const socketPath = dir.join('mute.sock');
  const sockets: import('node:net').Socket[] = [];
  const server = createServer((s) => sockets.push(s.on('data', () => undefined)));
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  try {
    const started = Date.now();
    await assert.rejects(VhostUserFrontend.connect(socketPath, { timeoutMs: 200 }), { code: FrontendErrorCode.TIMEOUT });
    assert.ok(Date.now() - started >= 190);
    await assert.rejects(VhostUserFrontend.connect(dir.join('missing.sock')), { code: 'ENOENT' });
  } finally {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
  await assertBaseline(baseline);
});
