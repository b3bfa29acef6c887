// vhost-user-net end to end in this process: our TypeScript frontend and NetDriver (src/frontend) against our backend
// (VhostUserServer + NetDevice) over a real unix socket, with real memfd guest RAM and the queue worker threads.
// Loopback on two queue pairs, source and sink ports, three devices on one switch, a malformed receive chain that
// stops one queue while the other pair goes on, disconnect and reconnect; fds and mappings back to the baseline.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import { VhostUserServer } from '../../src/backend/server.js';
import { NET_S_LINK_UP } from '../../src/devices/net/constants.js';
import { NetDevice, type NetDeviceOptions } from '../../src/devices/net/net-device.js';
import { SwitchFabric } from '../../src/devices/net/ports/switch.js';
import { DeviceStatus, FrontendErrorCode, GuestRam, NetDriver, VhostUserFrontend, type TxLayout } from '../../src/frontend/index.js';
import * as native from '../../src/native/index.js';
import { FrontendRequest, VirtioFeature } from '../../src/protocol/constants.js';
import { vringFilePayload } from '../../src/protocol/payloads.js';
import { assertBaseline, settledBaseline } from '../helpers/fds.js';
import { testTempDir, type TempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const TIMEOUT = { timeout: 60_000 };

// ---- helpers ------------------------------------------------------------------------------------------------------


interface Backend {
  readonly server: VhostUserServer;
  readonly device: NetDevice;
  readonly socketPath: string;
  /** The backend's log lines (JSON). */
  readonly logs: Record<string, unknown>[];
}

function startBackend(dir: TempDir, name: string, options: NetDeviceOptions, busyPollUs = 0): Backend {
  const socketPath = dir.join(`${name}.sock`);
  const device = new NetDevice(options);
  const logs: Record<string, unknown>[] = [];
  const logger = pino({ level: 'info' }, { write: (line: string) => void logs.push(JSON.parse(line) as Record<string, unknown>) });
  const server = new VhostUserServer({ socketPath, device, logger, busyPollUs });
  server.listen();
  return { server, device, socketPath, logs };
}

async function stopBackend(b: Backend): Promise<void> {
  await b.server.close();
  b.device.close();
}

const BROADCAST = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff];

/** An Ethernet frame of `len` bytes from `src` to `dst`, EtherType 0x88b5, whose payload tells `tag` and the offset. */
function frame(len: number, tag: number, dst: readonly number[] = BROADCAST, src: readonly number[] = [0x52, 0x54, 0, 0, 0, 1]): Uint8Array {
  const f = new Uint8Array(len);
  f.set(dst);
  f.set(src, 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  for (let i = 14; i < len; i++) f[i] = (tag * 7 + i) & 0xff;
  return f;
}

/** Resolves when `fd` becomes readable (watched on the event loop, not polled). */
function readable(fd: number): Promise<void> {
  return new Promise((resolve) => {
    const id = native.watch(fd, native.WATCH_READABLE, () => {
      native.unwatch(id);
      resolve();
    });
  });
}

/** Sends `frames` on `pair` (all at once), then waits for as many on the same pair and returns them. */
async function roundTrip(net: NetDriver, pair: number, frames: readonly Uint8Array[], layouts: readonly TxLayout[] = ['single']): Promise<Uint8Array[]> {
  const got = net.receive(pair, frames.length);
  await Promise.all(frames.map((f, i) => net.send(pair, f, layouts[i % layouts.length])));
  return got;
}

// ---- tests --------------------------------------------------------------------------------------------------------

// The last variant runs the workers in polling mode (a short window: the worker spins, then sleeps).
for (const { packed, busyPollUs } of [
  { packed: false, busyPollUs: 0 },
  { packed: true, busyPollUs: 0 },
  { packed: false, busyPollUs: 200 },
]) {
  const rings = (packed ? 'packed rings, 50 entries' : 'split rings') + (busyPollUs > 0 ? `, --busy-poll ${busyPollUs}` : '');
  test(`loopback on 2 queue pairs (${rings}): frames come back intact on the pair they were sent on; counters`, TIMEOUT, async (t) => {
    const dir = await testTempDir(t, 'vu-net-');
    const baseline = await settledBaseline();
    await (async () => {
      const backend = startBackend(dir, 'loop', { port: { kind: 'loopback' }, queuePairs: 2, mac: '52:54:00:ab:cd:ef' }, busyPollUs);
      const ram = GuestRam.create(8 * MiB);
      const fe = await VhostUserFrontend.connect(backend.socketPath);
      try {
        assert.equal(fe.queueNum, 2, 'GET_QUEUE_NUM counts queue pairs');
        // Small receive buffers in two descriptors each: large frames are merged from several chains.
        const net = await NetDriver.start(fe, { memory: ram, queuePairs: 2, queueSize: packed ? 50 : 64, rxBufferSize: 512, rxSegments: 2, packed });
        assert.deepEqual(net.config, { mac: [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef], status: NET_S_LINK_UP, maxVirtqueuePairs: 2, mtu: 1500 });
        assert.equal(net.pairCount, 2);
        assert.equal(net.mergeable, true);
        assert.equal(net.headerSize, 12);
        assert.ok(fe.hasFeature(VirtioFeature.RING_EVENT_IDX) && fe.hasFeature(VirtioFeature.RING_INDIRECT_DESC));
        assert.equal(fe.hasFeature(VirtioFeature.RING_PACKED), packed);

        const lengths = [60, 14, 1514, 4000, 9014, 500, 501, 488, 489];
        const layouts: TxLayout[] = ['single', 'split', 'indirect'];
        let frames = 0;
        let bytes = 0;
        for (let round = 0; round < 3; round++) {
          const sent = [0, 1].map((pair) => lengths.map((len, i) => frame(len, 100 * pair + 10 * round + i)));
          const got = await Promise.all([0, 1].map((pair) => roundTrip(net, pair, sent[pair] as Uint8Array[], layouts)));
          for (const pair of [0, 1]) {
            assert.equal(got[pair]?.length, lengths.length);
            got[pair]?.forEach((g, i) => assert.deepEqual(g, sent[pair]?.[i], `pair ${pair}, round ${round}, frame ${i}`));
          }
          frames += 2 * lengths.length;
          bytes += 2 * lengths.reduce((a, b) => a + b, 0);
        }
        assert.deepEqual(backend.device.stats(), {
          rxFrames: frames,
          rxBytes: bytes,
          rxDropped: 0,
          txFrames: frames,
          txBytes: bytes,
          txErrors: 0,
          txDropped: 0,
          checked: 0,
          corrupt: 0,
          txGso: 0,
          rxGso: 0,
          rxSegmented: 0,
          rxChecksummed: 0,
        });
        assert.equal((await fe.getStatus()) & DeviceStatus.NEEDS_RESET, 0);
        net.close();
      } finally {
        fe.close();
        ram.close();
        await stopBackend(backend);
      }
    })();
    await assertBaseline(baseline);
  });
}

test('source: numbered frames reach the driver, echoed ones are checked; sink: frames are counted', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-net-');
  const baseline = await settledBaseline();
  await (async () => {
    const source = startBackend(dir, 'source', { port: { kind: 'source', frameLen: 128 } });
    const sink = startBackend(dir, 'sink', { port: { kind: 'sink' } });
    const rams = [GuestRam.create(4 * MiB), GuestRam.create(4 * MiB)] as const;
    const fes: VhostUserFrontend[] = [];
    try {
      const fs = await VhostUserFrontend.connect(source.socketPath);
      fes.push(fs);
      const src = await NetDriver.start(fs, { memory: rams[0], queueSize: 32 });
      const got = await src.receive(0, 100);
      got.forEach((f, seq) => {
        assert.equal(f.length, 128);
        // broadcast <- the device's MAC (52:54:00:12:34:56), 88b5, "VUSR", the sequence number, then the pattern
        assert.equal(Buffer.from(f.subarray(0, 22)).toString('hex'), `ffffffffffff52540012345688b556555352${seq.toString(16).padStart(8, '0')}`);
        f.subarray(22).forEach((b, i) => assert.equal(b, (seq + i) & 0xff));
      });
      // Echo ten back (as testpmd's io mode would), one of them damaged.
      const echo = got.slice(0, 10).map((f) => f.slice());
      const damaged = echo[3];
      assert.ok(damaged);
      damaged[100] = (damaged[100] ?? 0) ^ 0xff;
      for (const f of echo) await src.send(0, f);
      const s = source.device.stats();
      assert.equal(s.checked, 10);
      assert.equal(s.corrupt, 1);
      assert.ok(s.rxFrames >= 100, 'the source keeps the receive ring busy');
      src.close();

      const fk = await VhostUserFrontend.connect(sink.socketPath);
      fes.push(fk);
      const snk = await NetDriver.start(fk, { memory: rams[1], queueSize: 32, txLayout: 'split' });
      await Promise.all(Array.from({ length: 200 }, (_, i) => snk.send(0, frame(60 + (i % 3), i))));
      let bytes = 0;
      for (let i = 0; i < 200; i++) bytes += 60 + (i % 3);
      const k = sink.device.stats();
      assert.deepEqual([k.txFrames, k.txBytes, k.txErrors, k.rxFrames], [200, bytes, 0, 0]);
      assert.deepEqual(snk.takeReceived(0), []);
      snk.close();
    } finally {
      for (const fe of fes) fe.close();
      for (const ram of rams) ram.close();
      await stopBackend(source);
      await stopBackend(sink);
    }
  })();
  await assertBaseline(baseline);
});

test('three devices on one switch: unicast reaches only its destination, broadcast every other port', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-net-');
  const baseline = await settledBaseline();
  await (async () => {
    const fabric = new SwitchFabric(3);
    const macs = ['52:54:00:00:00:0a', '52:54:00:00:00:0b', '52:54:00:00:00:0c'];
    const backends = macs.map((mac, index) => startBackend(dir, `sw${index}`, { port: { kind: 'switch', fabric: fabric, index }, mac }));
    const rams: GuestRam[] = [];
    const fes: VhostUserFrontend[] = [];
    const nets: NetDriver[] = [];
    try {
      for (const b of backends) {
        const ram = GuestRam.create(4 * MiB);
        rams.push(ram);
        const fe = await VhostUserFrontend.connect(b.socketPath);
        fes.push(fe);
        nets.push(await NetDriver.start(fe, { memory: ram, queueSize: 32 }));
      }
      const [a, b, c] = nets as [NetDriver, NetDriver, NetDriver];
      const [macA, macB] = [a.config.mac, b.config.mac];
      assert.deepEqual(macA, [0x52, 0x54, 0, 0, 0, 0x0a]);

      // A broadcasts (the switch learns A): B and C get it.
      const hello = frame(100, 1, BROADCAST, macA);
      const atB = b.receive(0);
      const atC = c.receive(0);
      await a.send(0, hello);
      assert.deepEqual(await atB, [hello]);
      assert.deepEqual(await atC, [hello]);
      // B answers A (the switch learns B): only A gets it.
      const reply = frame(200, 2, macA, macB);
      const atA = a.receive(0);
      await b.send(0, reply);
      assert.deepEqual(await atA, [reply]);
      // A -> B, then A broadcasts again: B gets both in order; C only the broadcast (frames from one port stay in order,
      // so had C got the unicast it would come first); A gets nothing back of its own.
      const unicast = frame(1514, 3, macB, macA);
      const again = frame(64, 4, BROADCAST, macA);
      const atB2 = b.receive(0, 2);
      const atC2 = c.receive(0);
      await a.send(0, unicast);
      await a.send(0, again);
      assert.deepEqual(await atB2, [unicast, again]);
      assert.deepEqual(await atC2, [again]);
      const last = frame(60, 5, macA, macB);
      const atA2 = a.receive(0);
      await b.send(0, last);
      assert.deepEqual(await atA2, [last], 'A saw none of its own frames');
      assert.deepEqual(c.takeReceived(0), []);

      const [sa, sb, sc] = backends.map((x) => x.device.stats());
      assert.deepEqual([sa?.txFrames, sb?.txFrames, sc?.txFrames], [3, 2, 0]);
      assert.deepEqual([sa?.rxFrames, sb?.rxFrames, sc?.rxFrames], [2, 3, 2]);
      for (const n of nets) n.close();
    } finally {
      for (const fe of fes) fe.close();
      for (const ram of rams) ram.close();
      for (const b of backends) await stopBackend(b);
      fabric.close();
    }
  })();
  await assertBaseline(baseline);
});

test('a receive chain with a device-readable descriptor stops that queue (NEEDS_RESET); the other pair goes on', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-net-');
  const baseline = await settledBaseline();
  await (async () => {
    const backend = startBackend(dir, 'bad', { port: { kind: 'loopback' }, queuePairs: 2 });
    const ram = GuestRam.create(8 * MiB);
    const fe = await VhostUserFrontend.connect(backend.socketPath);
    const errFds = [native.eventfdCreate(0, true), native.eventfdCreate(0, true)] as const;
    try {
      const net = await NetDriver.start(fe, { memory: ram, queuePairs: 2, queueSize: 32, fillRx: false });
      for (const [i, queue] of [0, 2].entries()) {
        await fe.requestWithAck(FrontendRequest.SET_VRING_ERR, vringFilePayload.encode({ index: queue, noFd: false }), [errFds[i] as number]);
      }
      // Receive queue 0: first a chain whose first descriptor is device-readable, then the driver's good buffers.
      const bad = ram.alloc(4096);
      const rx0 = fe.queue(0);
      assert.ok(rx0.driver.addChain([
        { addr: bad, len: 12, writable: false },
        { addr: bad + 64, len: 2048, writable: true },
      ], 10_000) >= 0);
      rx0.publishAndKick();
      net.fillRx(0);
      net.fillRx(1);

      const failed = readable(errFds[0]);
      await net.send(0, frame(60, 1)); // looped back to receive queue 0, which finds the bad chain first
      await failed;
      assert.equal(native.eventfdRead(errFds[0]), 1);
      let status = await fe.getStatus();
      // The worker writes the err eventfd, then tells the control thread: that message may come later (the worker
      // may be preempted in between on a loaded machine: 50 event-loop turns were not always enough). Bounded in time.
      for (const deadline = Date.now() + 5000; (status & DeviceStatus.NEEDS_RESET) === 0 && Date.now() < deadline; ) {
        await new Promise((resolve) => setTimeout(resolve, 2));
        status = await fe.getStatus();
      }
      assert.equal(status & DeviceStatus.NEEDS_RESET, DeviceStatus.NEEDS_RESET);
      const errors = backend.logs.filter((l) => l.msg === 'queue stopped by an error: device needs reset');
      assert.deepEqual(errors.map((l) => [l.queue, l.code]), [[0, 'VIRTIO_NET_RX_READABLE']]);
      assert.equal(backend.device.stats().rxFrames, 0);

      // Pair 1 is not affected; pair 0's transmit queue still takes frames.
      const sent = [60, 1514, 3000].map((len, i) => frame(len, 10 + i));
      assert.deepEqual(await roundTrip(net, 1, sent, ['single', 'indirect']), sent);
      await net.send(0, frame(60, 2));
      assert.equal(native.eventfdRead(errFds[1]), 0, "queue 2's err eventfd did not fire");
      const s = backend.device.stats();
      assert.equal(s.txFrames, 5);
      assert.equal(s.rxFrames, 3);

      // RESET_DEVICE clears NEEDS_RESET; started again, both pairs work.
      net.close();
      await fe.resetDevice();
      assert.equal((await fe.getStatus()) & DeviceStatus.NEEDS_RESET, 0);
      const net2 = await NetDriver.start(fe, { memory: ram, queuePairs: 2, queueSize: 32 });
      for (const pair of [0, 1]) {
        const f = [frame(100, 20 + pair)];
        assert.deepEqual(await roundTrip(net2, pair, f), f);
      }
      net2.close();
    } finally {
      fe.close();
      ram.close();
      await stopBackend(backend);
      for (const fd of errFds) native.close(fd);
    }
  })();
  await assertBaseline(baseline);
});

test('disconnect and reconnect: frames queued in the port do not leak into the next session; backend gone', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-net-');
  const baseline = await settledBaseline();
  await (async () => {
    const backend = startBackend(dir, 'again', { port: { kind: 'loopback' } });
    try {
      // First session: three frames loop back but the driver never posts receive buffers; then it leaves.
      {
        const ram = GuestRam.create(4 * MiB);
        const fe = await VhostUserFrontend.connect(backend.socketPath);
        try {
          const net = await NetDriver.start(fe, { memory: ram, queueSize: 16, fillRx: false });
          for (let i = 0; i < 3; i++) await net.send(0, frame(60, i));
          assert.equal(backend.device.stats().txFrames, 3);
          net.close();
        } finally {
          fe.close();
          ram.close();
        }
        await backend.server.idle();
      }
      // Second session, a legacy driver: no VERSION_1, no MRG_RXBUF (10-byte header), no EVENT_IDX, no indirect.
      const ram = GuestRam.create(4 * MiB);
      const fe = await VhostUserFrontend.connect(backend.socketPath);
      try {
        const net = await NetDriver.start(fe, { memory: ram, queueSize: 16, version1: false, mrgRxbuf: false, eventIdx: false, indirect: false });
        assert.equal(net.headerSize, 10);
        assert.equal(net.mergeable, false);
        const sent = [frame(60, 7), frame(1514, 8), frame(2038, 9)]; // 10 + 2038: exactly one 2048-byte buffer
        assert.deepEqual(await roundTrip(net, 0, sent, ['single', 'split']), sent, 'only this session\'s frames');
        // Too large for one buffer without MRG_RXBUF: dropped; the next frame still arrives.
        const next = [frame(100, 10)];
        const got = net.receive(0, 1);
        await net.send(0, frame(2039, 11));
        await net.send(0, next[0] as Uint8Array);
        assert.deepEqual(await got, next);
        const s = backend.device.stats();
        assert.equal(s.rxDropped, 1);
        assert.equal(s.rxFrames, 4);
        assert.equal(s.txFrames, 8);

        // The backend goes away: the frontend sees it and waiting receives fail instead of hanging.
        // (The expectation is attached before the close: a rejection left unhandled for a tick fails the test.)
        const pending = assert.rejects(net.receive(0, 1), { code: FrontendErrorCode.DISCONNECTED });
        await backend.server.close();
        assert.equal((await fe.closed)?.code, FrontendErrorCode.DISCONNECTED);
        await pending;
        await assert.rejects(net.send(0, frame(60, 12)), { code: FrontendErrorCode.DISCONNECTED });
        net.close();
      } finally {
        fe.close();
        ram.close();
      }
    } finally {
      await stopBackend(backend);
    }
  })();
  await assertBaseline(baseline);
});
