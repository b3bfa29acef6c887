// Our vsock device driven by the TypeScript frontend as a guest at the packet level (VsockDriver): the connection
// handshake, data and shutdown as the spec writes them (headers as hex), then hostile packets: wrong CIDs, lengths
// that lie, unknown ops and types, packets for no connection, a sender that overruns its credit, chains that are
// not packets, and a flood of packets that ask for replies while the guest reads nothing. The device answers with
// RST or drops and counts; memory stays bounded; other connections go on working.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { VhostUserServer } from '../../src/backend/server.js';
import { VsockHdr, VsockOp, VsockShutdown } from '../../src/devices/vsock/constants.js';
import { VsockDevice } from '../../src/devices/vsock/vsock-device.js';
import type { VsockStream } from '../../src/devices/vsock/stream.js';
import { GuestRam, VhostUserFrontend, VsockDriver } from '../../src/frontend/index.js';
import { assertBaseline, settledBaseline } from '../helpers/fds.js';
import { testTempDir } from '../helpers/tmp.js';

const GUEST = 3;
const HOST = 2;

interface Fields {
  src?: number;
  dst?: number;
  srcPort: number;
  dstPort: number;
  len?: number;
  type?: number;
  op: number;
  flags?: number;
  bufAlloc?: number;
  fwdCnt?: number;
}

/** A packet from the guest: header (little endian) and payload. */
function packet(f: Fields, payload: Uint8Array = new Uint8Array(0)): Uint8Array {
  const b = new Uint8Array(VsockHdr.size + payload.length);
  const v = new DataView(b.buffer);
  v.setUint32(VsockHdr.srcCid, f.src ?? GUEST, true);
  v.setUint32(VsockHdr.dstCid, f.dst ?? HOST, true);
  v.setUint32(VsockHdr.srcPort, f.srcPort, true);
  v.setUint32(VsockHdr.dstPort, f.dstPort, true);
  v.setUint32(VsockHdr.len, f.len ?? payload.length, true);
  v.setUint16(VsockHdr.type, f.type ?? 1, true);
  v.setUint16(VsockHdr.op, f.op, true);
  v.setUint32(VsockHdr.flags, f.flags ?? 0, true);
  v.setUint32(VsockHdr.bufAlloc, f.bufAlloc ?? 65536, true);
  v.setUint32(VsockHdr.fwdCnt, f.fwdCnt ?? 0, true);
  b.set(payload, VsockHdr.size);
  return b;
}

const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');
const op = (p: Uint8Array): number => new DataView(p.buffer, p.byteOffset).getUint16(VsockHdr.op, true);
const ports = (p: Uint8Array): [number, number] => {
  const v = new DataView(p.buffer, p.byteOffset);
  return [v.getUint32(VsockHdr.srcPort, true), v.getUint32(VsockHdr.dstPort, true)];
};

interface Rig {
  device: VsockDevice;
  driver: VsockDriver;
  received: Uint8Array[];
  events: number[];
  /** Waits until a received packet matches. */
  next(match: (p: Uint8Array) => boolean, what: string): Promise<Uint8Array>;
  close(): Promise<void>;
}

async function rig(socketPath: string): Promise<Rig> {
  const device = new VsockDevice({ guestCid: GUEST });
  const server = new VhostUserServer({ socketPath, device });
  server.listen();
  const ram = GuestRam.create(64 * 1024 * 1024);
  const fe = await VhostUserFrontend.connect(socketPath, { connectTimeoutMs: 5000 });
  const received: Uint8Array[] = [];
  const events: number[] = [];
  const driver = await VsockDriver.start(fe, { memory: ram, queueSize: 256, onPacket: (p) => received.push(p), onEvent: (id) => events.push(id) });
  let seen = 0;
  return {
    device,
    driver,
    received,
    events,
    async next(match, what) {
      for (let i = 0; i < 500; i++) {
        for (; seen < received.length; seen++) {
          const p = received[seen] as Uint8Array;
          if (match(p)) {
            seen++;
            return p;
          }
        }
        await sleep(10);
      }
      throw new Error(`no ${what} from the device (got ${received.length} packets)`);
    },
    async close() {
      driver.close();
      fe.close();
      await server.close();
      device.close();
      ram.close();
    },
  };
}

// The work runs in functions of their own: a suspended async function keeps its dead locals (and so the guest
// memory's mapping) alive, which would spoil the resource check.

async function specWalk(socketPath: string): Promise<void> {
  const r = await rig(socketPath);
  try {
    for (let i = 0; i < 100 && r.events.length === 0; i++) await sleep(10);
    assert.deepEqual(r.events, [0], 'TRANSPORT_RESET when the event queue starts');
    assert.equal(r.driver.guestCid, GUEST);
    const streams: VsockStream[] = [];
    r.device.listen(1234, (s) => streams.push(s.on('error', () => undefined)));
    await r.driver.send(packet({ srcPort: 5555, dstPort: 1234, op: VsockOp.REQUEST }));
    const response = await r.next((p) => op(p) === VsockOp.RESPONSE, 'RESPONSE');
    // src 2:1234 -> dst 3:5555, len 0, STREAM, RESPONSE, flags 0, buf_alloc 256 KiB, fwd_cnt 0
    assert.equal(hex(response), '0200000000000000' + '0300000000000000' + 'd2040000' + 'b3150000' + '00000000' + '0100' + '0200' + '00000000' + '00000400' + '00000000');
    assert.equal(streams.length, 1);
    const stream = streams[0] as VsockStream;
    const got: Buffer[] = [];
    stream.on('data', (c: Buffer) => got.push(c));
    await r.driver.send(packet({ srcPort: 5555, dstPort: 1234, op: VsockOp.RW }, Buffer.from('hello')));
    for (let i = 0; i < 100 && got.length === 0; i++) await sleep(10);
    assert.equal(Buffer.concat(got).toString(), 'hello');
    stream.write('world');
    const rw = await r.next((p) => op(p) === VsockOp.RW, 'RW');
    assert.deepEqual(ports(rw), [1234, 5555]);
    assert.equal(Buffer.from(rw.subarray(VsockHdr.size)).toString(), 'world');
    stream.end();
    const shutdown = await r.next((p) => op(p) === VsockOp.SHUTDOWN, 'SHUTDOWN');
    assert.equal(new DataView(shutdown.buffer).getUint32(VsockHdr.flags, true) & VsockShutdown.SEND, VsockShutdown.SEND);
    const closed = new Promise<void>((resolve) => stream.once('close', () => resolve()));
    await r.driver.send(packet({ srcPort: 5555, dstPort: 1234, op: VsockOp.RST }));
    await closed;
    assert.equal(r.device.stats().connections, 0);
  } finally {
    await r.close();
  }
}

test('a connection as the spec writes it: REQUEST/RESPONSE, data both ways, SHUTDOWN, RST; a TRANSPORT_RESET event at start', { timeout: 60_000 }, async (t) => {
  const dir = await testTempDir(t, 'vu-vsockfe-');
  const baseline = await settledBaseline();
  await specWalk(dir.join('v.sock'));
  await assertBaseline(baseline);
});

async function hostile(socketPath: string): Promise<void> {
  const r = await rig(socketPath);
  try {
    const streams = new Map<number, VsockStream>();
    r.device.listen(1000, (s) => streams.set(s.remotePort, s.on('error', () => undefined)));
    const connectFrom = async (port: number): Promise<void> => {
      await r.driver.send(packet({ srcPort: port, dstPort: 1000, op: VsockOp.REQUEST }));
      await r.next((p) => op(p) === VsockOp.RESPONSE && ports(p)[1] === port, `RESPONSE to ${port}`);
    };
    const before = r.device.stats();
    // A packet for no connection gets RST back.
    await r.driver.send(packet({ srcPort: 7, dstPort: 1000, op: VsockOp.RW }, Buffer.from('x')));
    const rst = await r.next((p) => op(p) === VsockOp.RST, 'RST for a packet of no connection');
    assert.deepEqual(ports(rst), [1000, 7]);
    // Malformed: wrong source CID, wrong destination CID, len beyond the payload, len on a REQUEST, an unknown op,
    // op 0, SEQPACKET: none opens anything.
    const bad = [
      packet({ src: 9, srcPort: 8, dstPort: 1000, op: VsockOp.REQUEST }),
      packet({ dst: 77, srcPort: 8, dstPort: 1000, op: VsockOp.REQUEST }),
      packet({ srcPort: 8, dstPort: 1000, op: VsockOp.RW, len: 4096 }, Buffer.from('short')),
      packet({ srcPort: 8, dstPort: 1000, op: VsockOp.REQUEST, len: 3 }, Buffer.from('abc')),
      packet({ srcPort: 8, dstPort: 1000, op: 99 }),
      packet({ srcPort: 8, dstPort: 1000, op: 0 }),
      packet({ srcPort: 8, dstPort: 1000, op: VsockOp.REQUEST, type: 2 }),
      new Uint8Array(10), // not even a header: the queue drops the chain
    ];
    for (const p of bad) await r.driver.send(p);
    await sleep(200);
    assert.equal(streams.size, 0, 'nothing was accepted');
    assert.ok((r.device.stats().malformed ?? 0) - (before.malformed ?? 0) >= 6, JSON.stringify(r.device.stats()));

    // Credit: the host side does not read; the guest sends past the 256 KiB it was given: RST, memory released.
    await connectFrom(100);
    const slow = streams.get(100) as VsockStream;
    slow.pause();
    const chunk = new Uint8Array(60 * 1024).fill(1);
    for (let i = 0; i < 6; i++) await r.driver.send(packet({ srcPort: 100, dstPort: 1000, op: VsockOp.RW }, chunk));
    await r.next((p) => op(p) === VsockOp.RST && ports(p)[1] === 100, 'RST after the credit overrun');
    assert.ok((r.device.stats().creditOverruns ?? 0) >= 1);

    // A flood of packets that each ask for an RST while the guest reads nothing: bounded, the excess dropped.
    r.driver.pauseRx(true);
    const flood = Array.from({ length: 20_000 }, (_, i) => packet({ srcPort: 20_000 + (i % 1000), dstPort: 999, op: VsockOp.RW }, Buffer.from('y')));
    for (let i = 0; i < flood.length; i += 256) await Promise.all(flood.slice(i, i + 256).map((p) => r.driver.send(p)));
    await sleep(300);
    const flooded = r.device.stats();
    assert.ok((flooded.controlDropped ?? 0) > 0, `replies beyond the bounds are dropped: ${JSON.stringify(flooded)}`);
    r.driver.pauseRx(false);

    // Still serving: a new connection, data through it.
    await connectFrom(200);
    const ok = streams.get(200) as VsockStream;
    const got: Buffer[] = [];
    ok.on('data', (c: Buffer) => got.push(c));
    await r.driver.send(packet({ srcPort: 200, dstPort: 1000, op: VsockOp.RW }, Buffer.from('still here')));
    for (let i = 0; i < 200 && got.length === 0; i++) await sleep(10);
    assert.equal(Buffer.concat(got).toString(), 'still here');
  } finally {
    await r.close();
  }
}

test('hostile packets: RST or dropped and counted; credit overrun resets the connection; a flood stays bounded; others go on', { timeout: 120_000 }, async (t) => {
  const dir = await testTempDir(t, 'vu-vsockfe-');
  const baseline = await settledBaseline();
  await hostile(dir.join('v.sock'));
  await assertBaseline(baseline);
});
