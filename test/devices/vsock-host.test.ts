// The host side of virtio-vsock (src/devices/vsock/): VsockHost against a fake guest that records every packet handed
// to toGuest (and can refuse them, as a full rx queue does), VsockStreams, and the hybrid unix-socket convention over
// real unix sockets in a temp dir.
//
// Headers in assertions are hex, one group per field (little endian), as hexHeader prints them:
//   src_cid(8) dst_cid(8) src_port(4) dst_port(4) len(4) type(2) op(2) flags(4) buf_alloc(4) fwd_cnt(4)
// e.g. ops: 0100 REQUEST, 0200 RESPONSE, 0300 RST, 0400 SHUTDOWN, 0500 RW, 0600 CREDIT_UPDATE, 0700 CREDIT_REQUEST.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import { createConnection, createServer, type Socket } from 'node:net';
import { setImmediate as immediate, setTimeout as sleep } from 'node:timers/promises';
import { VsockHdr, VsockOp, VsockShutdown, VsockType } from '../../src/devices/vsock/constants.js';
import { VsockHost, VSOCK_DETACHED_MAX, type VsockHostOptions } from '../../src/devices/vsock/host.js';
import { CONNECT_LINE_MAX, parseConnectLine } from '../../src/devices/vsock/hybrid.js';
import { readHeader, writeHeader, type VsockHeader } from '../../src/devices/vsock/packet.js';
import type { VsockStream } from '../../src/devices/vsock/stream.js';
import { testTempDir } from '../helpers/tmp.js';

const GUEST = 3;
const OP_NAMES = ['INVALID', 'REQUEST', 'RESPONSE', 'RST', 'SHUTDOWN', 'RW', 'CREDIT_UPDATE', 'CREDIT_REQUEST'];

/** A header as hex, one space-separated group per field. */
function hexHeader(b: Uint8Array): string {
  const hex = Buffer.from(b.buffer, b.byteOffset, VsockHdr.size).toString('hex');
  const widths = [8, 8, 4, 4, 4, 2, 2, 4, 4, 4];
  const parts: string[] = [];
  let at = 0;
  for (const w of widths) {
    parts.push(hex.slice(at * 2, (at + w) * 2));
    at += w;
  }
  return parts.join(' ');
}

/** A packet from the guest: header fields (defaults: from the guest's CID to the host, STREAM) and payload. */
function packet(fields: Partial<VsockHeader>, payload: Buffer | string = Buffer.alloc(0)): Uint8Array {
  const pl = typeof payload === 'string' ? Buffer.from(payload) : payload;
  const b = new Uint8Array(VsockHdr.size + pl.length);
  writeHeader(b, 0, {
    srcCid: GUEST,
    dstCid: 2,
    srcPort: 0,
    dstPort: 0,
    len: pl.length,
    type: VsockType.STREAM,
    op: 0,
    flags: 0,
    bufAlloc: 65536,
    fwdCnt: 0,
    ...fields,
  });
  b.set(pl, VsockHdr.size);
  return b;
}

interface Sent {
  h: VsockHeader;
  hex: string;
  payload: Buffer;
}

/** Records what toGuest is handed; `refuse` makes it report a full path. Checks that toGuest is never nested. */
class FakeGuest {
  readonly sent: Sent[] = [];
  refuse = false;
  depth = 0;
  maxDepth = 0;
  /** Called with each packet taken, inside toGuest (a guest answering at once). */
  onPacket: ((p: Sent) => void) | undefined;

  readonly toGuest = (header: Uint8Array, payload: Uint8Array | undefined): boolean => {
    this.depth++;
    this.maxDepth = Math.max(this.maxDepth, this.depth);
    try {
      if (this.refuse) return false;
      assert.equal(header.length, VsockHdr.size);
      const h = readHeader(header);
      assert.equal(h.len, payload?.length ?? 0, 'len is the payload length');
      const p = { h, hex: hexHeader(header), payload: Buffer.from(payload ?? []) };
      this.sent.push(p);
      this.onPacket?.(p);
      return true;
    } finally {
      this.depth--;
    }
  };

  take(): Sent[] {
    return this.sent.splice(0);
  }

  /** Op names of what was sent since the last take (taken). */
  ops(): string[] {
    return this.take().map((p) => OP_NAMES[p.h.op] ?? String(p.h.op));
  }
}

function setup(options: Partial<VsockHostOptions> = {}): { host: VsockHost; guest: FakeGuest } {
  const guest = new FakeGuest();
  const host = new VsockHost({ guestCid: GUEST, toGuest: guest.toGuest, ...options });
  return { host, guest };
}

/** The guest's end of one connection (guest port gp, host port hp), with the credit it advertises. */
class GuestConn {
  readonly host: VsockHost;
  readonly gp: number;
  readonly hp: number;
  bufAlloc: number;
  fwdCnt = 0;
  constructor(host: VsockHost, gp: number, hp: number, bufAlloc = 65536) {
    this.host = host;
    this.gp = gp;
    this.hp = hp;
    this.bufAlloc = bufAlloc;
  }
  send(op: number, extra: { flags?: number; payload?: Buffer | string; type?: number } = {}): void {
    const fields: Partial<VsockHeader> = { srcPort: this.gp, dstPort: this.hp, op, bufAlloc: this.bufAlloc, fwdCnt: this.fwdCnt, flags: extra.flags ?? 0 };
    if (extra.type !== undefined) fields.type = extra.type;
    this.host.fromGuest(packet(fields, extra.payload));
  }
}

/** A guest connection to a host listener on `hp`: REQUEST answered by RESPONSE; the stream and the guest end. */
function accepted(host: VsockHost, guest: FakeGuest, hp = 5000, gp = 1234, bufAlloc = 65536): { stream: VsockStream; g: GuestConn; errors: Error[] } {
  let stream: VsockStream | undefined;
  const l = host.listen(hp, (s) => (stream = s));
  const g = new GuestConn(host, gp, hp, bufAlloc);
  g.send(VsockOp.REQUEST);
  l.close();
  assert.ok(stream !== undefined, 'the listener got a stream');
  assert.deepEqual(guest.ops(), ['RESPONSE']);
  const errors: Error[] = [];
  stream.on('error', (e) => errors.push(e));
  return { stream, g, errors };
}

async function waitFor(cond: () => boolean, what: string, ms = 3000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** A listener for streams the test does not look at (close() destroys them with an error). */
function ignore(stream: VsockStream): void {
  stream.on('error', () => {});
}

function codeOf(e: unknown): string | undefined {
  return (e as { code?: string }).code;
}

/** Everything a socket receives, as text. */
function collect(socket: Socket): { text: () => string; ended: () => boolean; closed: () => boolean } {
  let text = '';
  let ended = false;
  let closed = false;
  socket.setEncoding('latin1');
  socket.on('data', (s: string) => (text += s));
  socket.on('end', () => (ended = true));
  socket.on('close', () => (closed = true));
  socket.on('error', () => {});
  return { text: () => text, ended: () => ended, closed: () => closed };
}

// ------------------------------------------------------------------------------------------ packet codec

test('packet: the 44-byte header round-trips, little endian; a CID with its upper half set reads above 2^32-1', () => {
  const h: VsockHeader = { srcCid: 2, dstCid: 3, srcPort: 5000, dstPort: 1234, len: 0, type: 1, op: 2, flags: 0, bufAlloc: 262144, fwdCnt: 0 };
  const b = new Uint8Array(44);
  writeHeader(b, 0, h);
  assert.equal(hexHeader(b), '0200000000000000 0300000000000000 88130000 d2040000 00000000 0100 0200 00000000 00000400 00000000');
  assert.deepEqual(readHeader(b), h);
  const all: VsockHeader = { srcCid: 0xfffffffe, dstCid: 2, srcPort: 0xffffffff, dstPort: 1, len: 65536, type: 2, op: 7, flags: 3, bufAlloc: 0xffffffff, fwdCnt: 0x80000001 };
  const off = new Uint8Array(50);
  writeHeader(off, 3, all);
  assert.equal(hexHeader(off.subarray(3)), 'feffffff00000000 0200000000000000 ffffffff 01000000 00000100 0200 0700 03000000 ffffffff 01000080');
  assert.deepEqual(readHeader(off, 3), all);
  b[12] = 1; // dst_cid's upper half
  assert.ok(readHeader(b).dstCid > 0xffffffff);
  assert.throws(() => readHeader(new Uint8Array(43)), RangeError);
  assert.throws(() => writeHeader(new Uint8Array(44), 1, h), RangeError);
});

// ------------------------------------------------------------------------------------------ connections

test('REQUEST to a listening port: RESPONSE with our buf_alloc, and a stream with the ports', () => {
  const { host, guest } = setup();
  const streams: VsockStream[] = [];
  host.listen(5000, (s) => {
    ignore(s);
    streams.push(s);
  });
  host.fromGuest(packet({ srcPort: 1234, dstPort: 5000, op: VsockOp.REQUEST, bufAlloc: 65536 }));
  const sent = guest.take();
  assert.deepEqual(
    sent.map((p) => p.hex),
    ['0200000000000000 0300000000000000 88130000 d2040000 00000000 0100 0200 00000000 00000400 00000000'],
  );
  assert.equal(streams.length, 1);
  const s = streams[0]!;
  assert.deepEqual([s.localCid, s.localPort, s.remoteCid, s.remotePort], [2, 5000, 3, 1234]);
  assert.equal(host.stats().connections, 1);
  assert.equal(host.stats().connectionsOpened, 1);
  assert.throws(() => host.listen(5000, () => {}), (e) => codeOf(e) === 'VHOST_VSOCK_PORT_IN_USE');
  host.close();
});

test('REQUEST to a port nobody listens on (and no udsPath): RST, nothing kept', () => {
  const { host, guest } = setup();
  host.fromGuest(packet({ srcPort: 1234, dstPort: 5001, op: VsockOp.REQUEST }));
  assert.deepEqual(
    guest.take().map((p) => p.hex),
    ['0200000000000000 0300000000000000 89130000 d2040000 00000000 0100 0300 00000000 00000000 00000000'],
  );
  assert.equal(host.stats().connections, 0);
  assert.equal(host.stats().connectionsRefused, 1);
  host.close();
});

test('RW both ways: payloads, byte counts, fwd_cnt counts what the stream consumed', async () => {
  const { host, guest } = setup();
  const { stream, g } = accepted(host, guest);
  const got: Buffer[] = [];
  stream.on('data', (d: Buffer) => got.push(d));
  await immediate();
  g.send(VsockOp.RW, { payload: 'hello' });
  g.send(VsockOp.RW, { payload: ' there' });
  await immediate();
  assert.equal(Buffer.concat(got).toString(), 'hello there');
  let written = false;
  stream.write('world', () => (written = true));
  const [rw] = guest.take();
  assert.equal(rw!.hex, '0200000000000000 0300000000000000 88130000 d2040000 05000000 0100 0500 00000000 00000400 0b000000');
  assert.equal(rw!.payload.toString(), 'world');
  await immediate();
  assert.ok(written, 'the write callback ran once the bytes went to the guest');
  const st = host.stats();
  assert.equal(st.bytesFromGuest, 11);
  assert.equal(st.bytesToGuest, 5);
  assert.equal(st.packetsFromGuest, 3);
  assert.equal(st.packetsToGuest, 2);
  host.close();
});

test('credit: the host stops at the guest buf_alloc, asks once (CREDIT_REQUEST), resumes on CREDIT_UPDATE', async () => {
  const { host, guest } = setup();
  const { stream, g } = accepted(host, guest, 5000, 1234, 100);
  let done = false;
  stream.write(Buffer.alloc(250, 0x61), () => (done = true));
  let sent = guest.take();
  assert.deepEqual(sent.map((p) => [OP_NAMES[p.h.op], p.h.len]), [['RW', 100], ['CREDIT_REQUEST', 0]]);
  // The guest's answer gives no credit (its reader is slow): no second CREDIT_REQUEST.
  g.send(VsockOp.CREDIT_UPDATE);
  assert.deepEqual(guest.ops(), []);
  // It read 100: 100 more.
  g.fwdCnt = 100;
  g.send(VsockOp.CREDIT_UPDATE);
  sent = guest.take();
  assert.deepEqual(sent.map((p) => [OP_NAMES[p.h.op], p.h.len]), [['RW', 100], ['CREDIT_REQUEST', 0]]);
  await immediate();
  assert.equal(done, false, 'the write waits until all of it went');
  // It read 50 more: credit 50, exactly what is left. Credit comes from any packet (here a RW of its own).
  g.fwdCnt = 150;
  g.send(VsockOp.RW, { payload: 'x' });
  sent = guest.take();
  assert.deepEqual(sent.map((p) => [OP_NAMES[p.h.op], p.h.len]), [['RW', 50]]);
  await immediate();
  assert.equal(done, true);
  assert.equal(host.stats().bytesToGuest, 250);
  host.close();
});

test('credit: u32 wrap-around of tx_cnt / fwd_cnt, and a lying fwd_cnt gives no credit', () => {
  const { host, guest } = setup();
  const { stream, g } = accepted(host, guest, 5000, 1234, 0);
  // buf_alloc 0: nothing goes; a CREDIT_REQUEST does.
  stream.write(Buffer.alloc(10));
  assert.deepEqual(guest.ops(), ['CREDIT_REQUEST']);
  // fwd_cnt "ahead" of what we sent (in flight would be negative, i.e. huge as u32): no credit either.
  g.bufAlloc = 100;
  g.fwdCnt = 5;
  g.send(VsockOp.CREDIT_UPDATE);
  assert.deepEqual(guest.ops(), []);
  g.fwdCnt = 0;
  g.send(VsockOp.CREDIT_UPDATE);
  assert.deepEqual(guest.take().map((p) => p.h.len), [10]);
  host.close();
});

test('RW payloads are split at maxPayload (64 KiB by default, or the option)', () => {
  for (const [maxPayload, expect] of [
    [undefined, [65536, 4464]],
    [4096, [...Array<number>(17).fill(4096), 70000 - 17 * 4096]],
  ] as const) {
    const { host, guest } = setup(maxPayload === undefined ? {} : { maxPayload });
    const { stream } = accepted(host, guest, 5000, 1234, 1 << 20);
    stream.write(Buffer.alloc(70000, 1));
    assert.deepEqual(guest.take().map((p) => p.h.len), expect);
    host.close();
  }
});

test('a slow host reader: fwd_cnt stays, the guest may fill buf_alloc; one byte more is an overrun: RST, memory released', async () => {
  const { host, guest } = setup({ bufAlloc: 4096 });
  const { stream, g, errors } = accepted(host, guest);
  for (let i = 0; i < 4; i++) g.send(VsockOp.RW, { payload: Buffer.alloc(1000, i) });
  g.send(VsockOp.RW, { payload: Buffer.alloc(96, 9) });
  await immediate();
  assert.equal(stream.pendingBytes, 4096, 'nobody reads: the stream holds it, not consumed');
  g.send(VsockOp.CREDIT_REQUEST);
  assert.deepEqual(
    guest.take().map((p) => p.hex),
    ['0200000000000000 0300000000000000 88130000 d2040000 00000000 0100 0600 00000000 00100000 00000000'],
  );
  g.send(VsockOp.RW, { payload: 'z' });
  assert.deepEqual(
    guest.take().map((p) => p.hex),
    ['0200000000000000 0300000000000000 88130000 d2040000 00000000 0100 0300 00000000 00100000 00000000'],
  );
  await immediate();
  assert.equal(errors.length, 1);
  assert.equal(codeOf(errors[0]), 'VHOST_VSOCK_RESET');
  assert.ok(stream.destroyed);
  assert.equal(stream.pendingBytes, 0);
  const st = host.stats();
  assert.equal(st.creditOverruns, 1);
  assert.equal(st.connections, 0);
  assert.equal(st.connectionsReset, 1);
  host.close();
});

test('reading gives credit back: CREDIT_UPDATE each bufAlloc/4 consumed, and the guest may send bufAlloc again', async () => {
  const { host, guest } = setup({ bufAlloc: 4096 });
  const { stream, g, errors } = accepted(host, guest);
  for (let i = 0; i < 4; i++) g.send(VsockOp.RW, { payload: Buffer.alloc(1024, i) });
  assert.deepEqual(guest.ops(), []);
  let got = 0;
  stream.on('data', (d: Buffer) => (got += d.length));
  await immediate();
  await immediate();
  assert.equal(got, 4096);
  const updates = guest.take();
  assert.deepEqual(updates.map((p) => [OP_NAMES[p.h.op], p.h.fwdCnt]), [
    ['CREDIT_UPDATE', 1024],
    ['CREDIT_UPDATE', 2048],
    ['CREDIT_UPDATE', 3072],
    ['CREDIT_UPDATE', 4096],
  ]);
  for (let i = 0; i < 4; i++) g.send(VsockOp.RW, { payload: Buffer.alloc(1024, i) });
  await immediate();
  await immediate();
  assert.equal(got, 8192);
  assert.deepEqual(errors, []);
  assert.equal(host.stats().creditOverruns, 0);
  host.close();
});

test('bulk both ways with a guest that follows the credit rules as Linux does, a pausing host reader: every byte, no stall', async () => {
  const HOST_BUF = 8192;
  const G_BUF = 16384;
  const TOTAL = 300_000;
  const { host, guest } = setup({ bufAlloc: HOST_BUF, maxPayload: 4096 });
  const { stream, g, errors } = accepted(host, guest, 5000, 1234, G_BUF);
  const pattern = (n: number, salt: number): Buffer => Buffer.from(Array.from({ length: n }, (_, i) => (i * 31 + salt) & 0xff));
  const toHost = pattern(TOTAL, 7);
  const toGuest = pattern(TOTAL, 11);

  // The guest: its view of our credit (from every header we send), its receive buffer and reader.
  let hostBufAlloc = 0;
  let hostFwdCnt = 0;
  let gTxCnt = 0;
  const gRx: Buffer[] = [];
  let gRxBytes = 0;
  let gLastSentFwd = 0;
  let creditAsked = false;
  const atGuest: Buffer[] = [];
  let maxHostBuffered = 0;
  guest.onPacket = (p) => {
    hostBufAlloc = p.h.bufAlloc;
    hostFwdCnt = p.h.fwdCnt;
    maxHostBuffered = Math.max(maxHostBuffered, (gTxCnt - p.h.fwdCnt) >>> 0);
    if (p.h.op === VsockOp.RW) {
      assert.ok(gRxBytes + p.h.len <= G_BUF, 'the host respects the credit the guest gave');
      gRx.push(p.payload);
      gRxBytes += p.h.len;
    }
    if (p.h.op === VsockOp.CREDIT_REQUEST) creditAsked = true;
  };
  const guestSend = (op: number, payload?: Buffer): void => {
    gLastSentFwd = g.fwdCnt;
    g.send(op, payload === undefined ? {} : { payload });
  };
  const guestStep = (): void => {
    // Send what our credit allows, in 4 KiB packets.
    for (let i = 0; i < 4; i++) {
      const credit = hostBufAlloc - ((gTxCnt - hostFwdCnt) >>> 0);
      const n = Math.min(credit, 4096, TOTAL - gTxCnt);
      if (n <= 0) break;
      const chunk = toHost.subarray(gTxCnt, gTxCnt + n);
      gTxCnt += n;
      guestSend(VsockOp.RW, chunk);
    }
    // Read up to 3000 bytes; a CREDIT_UPDATE when its free space fell below a quarter (Linux: below 64 KiB of 256).
    let budget = 3000;
    while (budget > 0 && gRx.length > 0) {
      const head = gRx[0]!;
      const n = Math.min(budget, head.length);
      atGuest.push(head.subarray(0, n));
      if (n === head.length) gRx.shift();
      else gRx[0] = head.subarray(n);
      gRxBytes -= n;
      g.fwdCnt = (g.fwdCnt + n) >>> 0;
      budget -= n;
    }
    if (G_BUF - ((g.fwdCnt - gLastSentFwd) >>> 0) < G_BUF / 4 || creditAsked) {
      creditAsked = false;
      guestSend(VsockOp.CREDIT_UPDATE);
    }
  };

  // The host: writes with backpressure, reads with pauses.
  const atHost: Buffer[] = [];
  let atHostBytes = 0;
  let chunks = 0;
  stream.on('data', (d: Buffer) => {
    atHost.push(d);
    atHostBytes += d.length;
    if (++chunks % 5 === 0) {
      stream.pause();
      setTimeout(() => stream.resume(), 2);
    }
  });
  let written = 0;
  const writeMore = (): void => {
    while (written < TOTAL) {
      const n = Math.min(5000, TOTAL - written);
      const ok = stream.write(toGuest.subarray(written, written + n));
      written += n;
      if (!ok) return void stream.once('drain', writeMore);
    }
  };
  writeMore();

  const atGuestBytes = (): number => atGuest.reduce((n, b) => n + b.length, 0);
  const deadline = Date.now() + 20_000;
  while (atHostBytes < TOTAL || atGuestBytes() < TOTAL) {
    assert.ok(Date.now() < deadline, `stalled: host got ${atHostBytes}, guest got ${atGuestBytes()} of ${TOTAL}`);
    guestStep();
    await immediate();
  }
  guest.onPacket = undefined;
  assert.ok(Buffer.concat(atHost).equals(toHost), 'guest -> host bytes intact');
  assert.ok(Buffer.concat(atGuest).equals(toGuest), 'host -> guest bytes intact');
  assert.ok(maxHostBuffered <= HOST_BUF, `guest bytes the host had not consumed: at most buf_alloc (${maxHostBuffered})`);
  assert.deepEqual(errors, []);
  const st = host.stats();
  assert.equal(st.creditOverruns, 0);
  assert.equal(st.connections, 1);
  assert.equal(st.bytesFromGuest, TOTAL);
  assert.equal(st.bytesToGuest, TOTAL);
  host.close();
});

test('SHUTDOWN(SEND) from the guest: the stream ends after the data; the host still writes; its end is SHUTDOWN then RST', async () => {
  const { host, guest } = setup();
  const { stream, g, errors } = accepted(host, guest);
  let text = '';
  let ended = false;
  let closed = false;
  stream.setEncoding('latin1');
  stream.on('data', (s: string) => (text += s));
  stream.on('end', () => (ended = true));
  stream.on('close', () => (closed = true));
  g.send(VsockOp.RW, { payload: 'abc' });
  g.send(VsockOp.SHUTDOWN, { flags: VsockShutdown.SEND });
  await waitFor(() => ended, "the stream's end");
  assert.equal(text, 'abc');
  g.send(VsockOp.RW, { payload: 'late' }); // after its SHUTDOWN(SEND): dropped
  assert.equal(host.stats().malformed, 1);
  stream.end('reply');
  await waitFor(() => closed, "the stream's close");
  const sent = guest.take();
  assert.deepEqual(sent.map((p) => [OP_NAMES[p.h.op], p.h.flags]), [
    ['RW', 0],
    ['SHUTDOWN', VsockShutdown.SEND],
    ['SHUTDOWN', VsockShutdown.BOTH],
    ['RST', 0],
  ]);
  assert.equal(sent[0]!.payload.toString(), 'reply');
  assert.deepEqual(errors, []);
  assert.equal(host.stats().connections, 0);
  assert.equal(host.stats().connectionsClosed, 1);
  host.close();
});

test('SHUTDOWN(RCV) from the guest: what the host writes goes nowhere, the guest still sends', async () => {
  const { host, guest } = setup();
  const { stream, g, errors } = accepted(host, guest, 5000, 1234, 3);
  stream.write('abcdef'); // 3 go, 3 wait for credit
  assert.deepEqual(guest.ops(), ['RW', 'CREDIT_REQUEST']);
  g.send(VsockOp.SHUTDOWN, { flags: VsockShutdown.RCV });
  let cb = false;
  stream.write('dropped', () => (cb = true));
  await immediate();
  assert.ok(cb);
  assert.deepEqual(guest.ops(), []);
  assert.equal(host.stats().bytesDiscarded, 3 + 7);
  let text = '';
  stream.setEncoding('latin1');
  stream.on('data', (s: string) => (text += s));
  g.send(VsockOp.RW, { payload: 'still' });
  await waitFor(() => text === 'still', 'the data');
  assert.deepEqual(errors, []);
  assert.equal(host.stats().connections, 1);
  host.close();
});

test('SHUTDOWN(both) from the guest: RST once the host consumed what was buffered; the stream ends cleanly', async () => {
  const { host, guest } = setup();
  const { stream, g, errors } = accepted(host, guest);
  g.send(VsockOp.RW, { payload: 'bye' });
  g.send(VsockOp.SHUTDOWN, { flags: VsockShutdown.BOTH });
  await immediate();
  assert.deepEqual(guest.ops(), [], 'not before the host side read it');
  let text = '';
  let closed = false;
  stream.setEncoding('latin1');
  stream.on('data', (s: string) => (text += s));
  stream.on('close', () => (closed = true));
  await waitFor(() => closed, "the stream's close");
  assert.equal(text, 'bye');
  assert.deepEqual(
    guest.take().map((p) => p.hex),
    ['0200000000000000 0300000000000000 88130000 d2040000 00000000 0100 0300 00000000 00000400 03000000'],
  );
  assert.deepEqual(errors, []);
  assert.equal(host.stats().connectionsClosed, 1);
  host.close();
});

test('SHUTDOWN(SEND) then SHUTDOWN(RCV), nothing buffered: RST at the second; flags are permanent (a 0 clears nothing)', async () => {
  const { host, guest } = setup();
  const { stream, g, errors } = accepted(host, guest);
  stream.resume();
  g.send(VsockOp.SHUTDOWN, { flags: VsockShutdown.SEND });
  g.send(VsockOp.SHUTDOWN, { flags: 0 });
  assert.deepEqual(guest.ops(), []);
  g.send(VsockOp.SHUTDOWN, { flags: VsockShutdown.RCV });
  assert.deepEqual(guest.ops(), ['RST']);
  await waitFor(() => stream.destroyed, 'the stream closed');
  assert.deepEqual(errors, []);
  host.close();
});

test('the host side ends: SHUTDOWN(SEND) only after its data went (credit permitting); destroy: SHUTDOWN(both) and RST', async () => {
  const { host, guest } = setup();
  const { stream, g } = accepted(host, guest, 5000, 1234, 2);
  let finished = false;
  stream.on('finish', () => (finished = true));
  stream.end('last');
  await immediate();
  assert.deepEqual(guest.take().map((p) => [OP_NAMES[p.h.op], p.payload.toString()]), [['RW', 'la'], ['CREDIT_REQUEST', '']]);
  assert.equal(finished, false);
  g.fwdCnt = 2;
  g.send(VsockOp.CREDIT_UPDATE);
  await waitFor(() => finished, "the stream's finish");
  assert.deepEqual(guest.take().map((p) => [OP_NAMES[p.h.op], p.payload.toString(), p.h.flags]), [['RW', 'st', 0], ['SHUTDOWN', '', VsockShutdown.SEND]]);

  const other = accepted(host, guest, 5001, 1235);
  other.stream.destroy();
  await immediate();
  assert.deepEqual(guest.take().map((p) => [OP_NAMES[p.h.op], p.h.flags, p.h.srcPort]), [['SHUTDOWN', VsockShutdown.BOTH, 5001], ['RST', 0, 5001]]);
  assert.equal(host.stats().connections, 1);
  host.close();
});

test('RST from the guest: the stream errors (VHOST_VSOCK_RESET) at once; after its SHUTDOWN(SEND) it just ends', async () => {
  const { host, guest } = setup();
  const a = accepted(host, guest, 5000, 1234);
  a.g.send(VsockOp.RST);
  assert.deepEqual(guest.ops(), [], 'no answer to an RST');
  await immediate();
  assert.ok(a.stream.destroyed);
  assert.deepEqual(a.errors.map(codeOf), ['VHOST_VSOCK_RESET']);

  const b = accepted(host, guest, 5000, 1235);
  let text = '';
  let ended = false;
  b.stream.setEncoding('latin1');
  b.g.send(VsockOp.RW, { payload: 'done' });
  b.g.send(VsockOp.SHUTDOWN, { flags: VsockShutdown.SEND });
  b.g.send(VsockOp.RST);
  b.stream.on('data', (s: string) => (text += s));
  b.stream.on('end', () => (ended = true));
  await waitFor(() => ended, 'the end');
  assert.equal(text, 'done');
  assert.deepEqual(b.errors, []);
  assert.equal(host.stats().connections, 0);
  host.close();
});

test('a packet for a connection that does not exist gets RST, except an RST', () => {
  const { host, guest } = setup();
  host.fromGuest(packet({ srcPort: 7, dstPort: 8, op: VsockOp.RW }, 'data'));
  host.fromGuest(packet({ srcPort: 7, dstPort: 8, op: VsockOp.CREDIT_UPDATE }));
  host.fromGuest(packet({ srcPort: 7, dstPort: 8, op: VsockOp.SHUTDOWN, flags: 3 }));
  host.fromGuest(packet({ srcPort: 7, dstPort: 8, op: VsockOp.RESPONSE }));
  host.fromGuest(packet({ srcPort: 7, dstPort: 8, op: VsockOp.RST }));
  const sent = guest.take();
  assert.equal(sent.length, 4);
  for (const p of sent) assert.equal(p.hex, '0200000000000000 0300000000000000 08000000 07000000 00000000 0100 0300 00000000 00000000 00000000');
  host.close();
});

test('malformed packets: dropped and counted (RST where the spec says), never a throw', () => {
  const { host, guest } = setup();
  const { g } = accepted(host, guest, 5000, 1234);
  const stats0 = host.stats().malformed!;
  const q = { srcPort: 1234, dstPort: 5000 };
  host.fromGuest(new Uint8Array(43)); // short
  host.fromGuest(packet({ ...q, op: VsockOp.RW, srcCid: 4 }, 'x')); // another CID
  host.fromGuest(packet({ ...q, op: VsockOp.RW, srcCid: GUEST + 2 ** 32 }, 'x')); // the upper half set
  host.fromGuest(packet({ ...q, op: VsockOp.RW, dstCid: 5 }, 'x')); // not for the host
  host.fromGuest(packet({ ...q, op: VsockOp.RW, dstCid: 2 + 2 ** 32 }, 'x'));
  const short = packet({ ...q, op: VsockOp.RW, len: 10 }, 'abcde'); // len beyond the payload
  host.fromGuest(short);
  host.fromGuest(packet({ ...q, op: VsockOp.RW }, Buffer.alloc(65537))); // more than 64 KiB
  host.fromGuest(packet({ ...q, op: VsockOp.CREDIT_UPDATE }, 'x')); // len on a non-RW op, live connection
  host.fromGuest(packet({ ...q, op: 9 })); // unknown op, live connection
  host.fromGuest(packet({ ...q, op: 0 }));
  assert.deepEqual(guest.ops(), [], 'nothing answered, the connection untouched');
  assert.equal(host.stats().connections, 1);
  assert.equal(host.stats().malformed! - stats0, 10);
  // For no connection: RST.
  host.fromGuest(packet({ srcPort: 99, dstPort: 5000, op: 9 }));
  host.fromGuest(packet({ srcPort: 99, dstPort: 5000, op: VsockOp.REQUEST }, 'x'));
  assert.deepEqual(guest.ops(), ['RST', 'RST']);
  // SEQPACKET (or an unknown type): RST with that type (§5.10.6, "Receive and Transmit"), but not for an RST.
  host.fromGuest(packet({ srcPort: 99, dstPort: 5000, op: VsockOp.REQUEST, type: VsockType.SEQPACKET }));
  host.fromGuest(packet({ srcPort: 99, dstPort: 5000, op: VsockOp.RST, type: 7 }));
  assert.deepEqual(
    guest.take().map((p) => p.hex),
    ['0200000000000000 0300000000000000 88130000 63000000 00000000 0200 0300 00000000 00000000 00000000'],
  );
  // The connection still works.
  g.send(VsockOp.CREDIT_REQUEST);
  assert.deepEqual(guest.ops(), ['CREDIT_UPDATE']);
  // Garbage: random bytes, and random headers with the right CIDs. Nothing throws.
  let seed = 12345;
  const rnd = (): number => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
  for (let i = 0; i < 3000; i++) {
    const b = new Uint8Array(Math.floor(rnd() * 120));
    for (let j = 0; j < b.length; j++) b[j] = Math.floor(rnd() * 256);
    if (b.length >= 44 && rnd() < 0.7) {
      const dv = new DataView(b.buffer);
      dv.setUint32(0, GUEST, true);
      dv.setUint32(4, 0, true);
      dv.setUint32(8, 2, true);
      dv.setUint32(12, 0, true);
      dv.setUint16(28, 1, true);
      dv.setUint16(30, 1 + Math.floor(rnd() * 7), true);
      dv.setUint32(24, Math.floor(rnd() * (b.length - 40)), true);
      dv.setUint32(16, Math.floor(rnd() * 4), true);
      dv.setUint32(20, 5000 + Math.floor(rnd() * 2), true);
    }
    host.fromGuest(b);
  }
  host.close();
});

test('maxConnections: a REQUEST beyond it gets RST, a connect() beyond it is rejected (VHOST_VSOCK_LIMIT)', async () => {
  const { host, guest } = setup({ maxConnections: 2 });
  host.listen(5000, ignore);
  for (const gp of [1, 2, 3]) host.fromGuest(packet({ srcPort: gp, dstPort: 5000, op: VsockOp.REQUEST }));
  assert.deepEqual(guest.take().map((p) => [OP_NAMES[p.h.op], p.h.dstPort]), [['RESPONSE', 1], ['RESPONSE', 2], ['RST', 3]]);
  await assert.rejects(host.connect(7), (e) => codeOf(e) === 'VHOST_VSOCK_LIMIT');
  assert.equal(host.stats().connections, 2);
  host.close();
});

test('connect(): REQUEST from host port 1024 up; RESPONSE resolves; RST refuses; no answer times out (and RST)', async () => {
  const { host, guest } = setup();
  const p1 = host.connect(7);
  const p2 = host.connect(7);
  const sent = guest.take();
  assert.deepEqual(sent.map((p) => p.hex), [
    '0200000000000000 0300000000000000 00040000 07000000 00000000 0100 0100 00000000 00000400 00000000',
    '0200000000000000 0300000000000000 01040000 07000000 00000000 0100 0100 00000000 00000400 00000000',
  ]);
  host.fromGuest(packet({ srcPort: 7, dstPort: 1024, op: VsockOp.RESPONSE, bufAlloc: 1000 }));
  const s1 = await p1;
  ignore(s1);
  assert.deepEqual([s1.localPort, s1.remotePort, s1.remoteCid], [1024, 7, 3]);
  s1.write('hi');
  assert.deepEqual(guest.take().map((p) => [OP_NAMES[p.h.op], p.payload.toString()]), [['RW', 'hi']]);
  host.fromGuest(packet({ srcPort: 7, dstPort: 1025, op: VsockOp.RST }));
  await assert.rejects(p2, (e) => codeOf(e) === 'VHOST_VSOCK_REFUSED');
  assert.deepEqual(guest.ops(), []);
  // Ports go on upward (1025 is free again, 1024 is live with guest port 7): 1026.
  const p3 = host.connect(7, { timeoutMs: 30 });
  assert.deepEqual(guest.take().map((p) => p.h.srcPort), [1026]);
  await assert.rejects(p3, (e) => codeOf(e) === 'VHOST_VSOCK_TIMEOUT');
  assert.deepEqual(guest.take().map((p) => [OP_NAMES[p.h.op], p.h.srcPort]), [['RST', 1026]]);
  assert.equal(host.stats().connections, 1);
  host.close();
});

test('a full path: nothing lost, control first (in order) on writable(), then data; toGuest never nested', () => {
  const { host, guest } = setup();
  const { stream, g } = accepted(host, guest);
  guest.refuse = true;
  host.listen(6000, ignore);
  host.fromGuest(packet({ srcPort: 2000, dstPort: 6000, op: VsockOp.REQUEST })); // RESPONSE waits
  stream.write('data'); // waits behind it
  g.send(VsockOp.CREDIT_REQUEST); // CREDIT_UPDATE
  host.fromGuest(packet({ srcPort: 9, dstPort: 9, op: VsockOp.RW }, 'x')); // RST for no connection
  assert.equal(guest.sent.length, 0);
  guest.refuse = false;
  host.writable();
  assert.deepEqual(guest.take().map((p) => [OP_NAMES[p.h.op], p.h.dstPort]), [
    ['RST', 9],
    ['RESPONSE', 2000],
    ['CREDIT_UPDATE', 1234],
    ['RW', 1234],
  ]);

  // A guest that answers inside toGuest: every RW is at once acknowledged with a CREDIT_UPDATE (credit for one more).
  const tight = accepted(host, guest, 7000, 3000, 10);
  guest.onPacket = (p) => {
    if (p.h.op !== VsockOp.RW || p.h.srcPort !== 7000) return;
    tight.g.fwdCnt += p.h.len;
    tight.g.send(VsockOp.CREDIT_UPDATE);
  };
  tight.stream.write(Buffer.alloc(1000, 7));
  guest.onPacket = undefined;
  const rws = guest.take().filter((p) => p.h.op === VsockOp.RW);
  assert.equal(rws.length, 100);
  assert.equal(guest.maxDepth, 1, 'toGuest was never called from inside toGuest');

  // Packets of gone connections while the path is full: bounded, replies dropped first, counted.
  guest.refuse = true;
  for (let i = 0; i < VSOCK_DETACHED_MAX + 44; i++) host.fromGuest(packet({ srcPort: 10_000 + i, dstPort: 1, op: VsockOp.RW }, 'x'));
  assert.equal(host.stats().controlDropped, 44);
  tight.g.send(VsockOp.RST);
  stream.destroy(); // SHUTDOWN + RST of a live connection: displace replies
  assert.equal(host.stats().controlDropped, 46);
  guest.refuse = false;
  host.writable();
  const out = guest.take();
  assert.equal(out.length, VSOCK_DETACHED_MAX);
  assert.deepEqual(out.slice(-2).map((p) => [OP_NAMES[p.h.op], p.h.srcPort]), [['SHUTDOWN', 5000], ['RST', 5000]]);
  host.close();
});

test('reset(): every connection gone (streams error VHOST_VSOCK_RESET, connects rejected), nothing sent', async () => {
  const { host, guest } = setup();
  const a = accepted(host, guest, 5000, 1);
  const b = accepted(host, guest, 5000, 2);
  const pending = host.connect(40);
  guest.refuse = true;
  a.stream.write('queued');
  host.fromGuest(packet({ srcPort: 9, dstPort: 9, op: VsockOp.RW }, 'x')); // a reply RST queued
  host.reset();
  await assert.rejects(pending, (e) => codeOf(e) === 'VHOST_VSOCK_RESET');
  await immediate();
  assert.deepEqual(a.errors.map(codeOf), ['VHOST_VSOCK_RESET']);
  assert.deepEqual(b.errors.map(codeOf), ['VHOST_VSOCK_RESET']);
  guest.refuse = false;
  guest.take();
  host.writable();
  assert.deepEqual(guest.ops(), []);
  assert.equal(host.stats().connections, 0);
  // Listeners stay: a new connection works.
  const l = host.listen(5000, ignore);
  host.fromGuest(packet({ srcPort: 3, dstPort: 5000, op: VsockOp.REQUEST }));
  assert.deepEqual(guest.ops(), ['RESPONSE']);
  l.close();
  host.close();
});

test('close(): RST for each open connection, streams error VHOST_VSOCK_CLOSED; afterwards the guest is ignored', async () => {
  const { host, guest } = setup();
  const a = accepted(host, guest, 5000, 1);
  const pending = host.connect(41);
  guest.take();
  host.close();
  assert.deepEqual(guest.take().map((p) => [OP_NAMES[p.h.op], p.h.srcPort, p.h.dstPort]), [['RST', 5000, 1], ['RST', 1024, 41]]);
  await assert.rejects(pending, (e) => codeOf(e) === 'VHOST_VSOCK_CLOSED');
  await immediate();
  assert.deepEqual(a.errors.map(codeOf), ['VHOST_VSOCK_CLOSED']);
  host.fromGuest(packet({ srcPort: 1, dstPort: 5000, op: VsockOp.RW }, 'x'));
  assert.deepEqual(guest.ops(), []);
  await assert.rejects(host.connect(1), (e) => codeOf(e) === 'VHOST_VSOCK_CLOSED');
});

// ------------------------------------------------------------------------------------------ hybrid unix sockets

test('hybrid: parseConnectLine', () => {
  assert.equal(parseConnectLine('CONNECT 52'), 52);
  assert.equal(parseConnectLine('connect 0'), 0);
  assert.equal(parseConnectLine('Connect\t4294967295 \r'), 0xffffffff);
  for (const bad of ['CONNECT 4294967296', 'CONNECT -1', 'CONNECT', 'CONNECT 5 6', 'CONNECTX 5', ' CONNECT 5', 'OK 5', 'CONNECT 0x10', '']) {
    assert.equal(parseConnectLine(bad), undefined, bad);
  }
});

test('hybrid: a host program reaches the guest (CONNECT / OK), bytes both ways, shutdown both ways', async (t) => {
  const dir = await testTempDir(t, 'vsock-');
  const uds = dir.join('v.sock');
  const { host, guest } = setup({ udsPath: uds });
  t.after(() => host.close());
  await host.ready();
  const prog = createConnection({ path: uds, allowHalfOpen: true });
  const seen = collect(prog);
  await once(prog, 'connect');
  prog.write('CONNECT 52\nearly');
  await waitFor(() => guest.sent.length > 0, 'the REQUEST');
  assert.deepEqual(
    guest.take().map((p) => p.hex),
    ['0200000000000000 0300000000000000 00040000 34000000 00000000 0100 0100 00000000 00000400 00000000'],
  );
  const g = new GuestConn(host, 52, 1024);
  g.send(VsockOp.RESPONSE);
  await waitFor(() => seen.text() === 'OK 1024\n', 'OK');
  // The bytes written after the line are the connection's first.
  await waitFor(() => guest.sent.length > 0, 'the early bytes');
  assert.deepEqual(guest.take().map((p) => [OP_NAMES[p.h.op], p.payload.toString()]), [['RW', 'early']]);
  prog.write('ping');
  await waitFor(() => guest.sent.length > 0, 'ping');
  assert.deepEqual(guest.take().map((p) => p.payload.toString()), ['ping']);
  g.send(VsockOp.RW, { payload: 'pong' });
  await waitFor(() => seen.text() === 'OK 1024\npong', 'pong');
  // Written and drained: fwd_cnt 4 in the next header.
  await sleep(20);
  g.send(VsockOp.CREDIT_REQUEST);
  assert.deepEqual(guest.take().map((p) => [OP_NAMES[p.h.op], p.h.fwdCnt]), [['CREDIT_UPDATE', 4]]);
  // The program's end of writing: SHUTDOWN(SEND); the guest's close(): RST, the socket ends.
  prog.end();
  await waitFor(() => guest.sent.length > 0, 'the SHUTDOWN');
  assert.deepEqual(guest.take().map((p) => [OP_NAMES[p.h.op], p.h.flags]), [['SHUTDOWN', VsockShutdown.SEND]]);
  g.send(VsockOp.SHUTDOWN, { flags: VsockShutdown.BOTH });
  assert.deepEqual(guest.take().map((p) => OP_NAMES[p.h.op]), ['RST']);
  await waitFor(() => seen.closed(), 'the socket closed');
  assert.ok(seen.ended());
  assert.equal(host.stats().connections, 0);
});

test('hybrid: the guest reaches ${udsPath}_${port} (a net.Server), bytes both ways; no such socket: RST', async (t) => {
  const dir = await testTempDir(t, 'vsock-');
  const uds = dir.join('v.sock');
  const { host, guest } = setup({ udsPath: uds });
  t.after(() => host.close());
  await host.ready();
  let peer: Socket | undefined;
  let peerText = '';
  let peerEnded = false;
  const server = createServer({ allowHalfOpen: true }, (s) => {
    peer = s;
    s.setEncoding('latin1');
    s.on('data', (d: string) => (peerText += d));
    s.on('end', () => {
      peerEnded = true;
      s.end();
    });
  });
  server.listen(`${uds}_80`);
  await once(server, 'listening');
  t.after(() => server.close());

  const g = new GuestConn(host, 4000, 80);
  g.send(VsockOp.REQUEST);
  assert.deepEqual(guest.ops(), [], 'RESPONSE only once the unix connect succeeded');
  await waitFor(() => guest.sent.length > 0, 'RESPONSE');
  assert.deepEqual(
    guest.take().map((p) => p.hex),
    ['0200000000000000 0300000000000000 50000000 a00f0000 00000000 0100 0200 00000000 00000400 00000000'],
  );
  g.send(VsockOp.RW, { payload: 'GET /' });
  await waitFor(() => peerText === 'GET /', 'the request at the server');
  peer!.write('200 OK');
  await waitFor(() => guest.sent.length > 0, 'the answer');
  assert.deepEqual(guest.take().map((p) => [OP_NAMES[p.h.op], p.payload.toString()]), [['RW', '200 OK']]);
  // The guest's close(): the server sees the end, the guest gets RST.
  g.send(VsockOp.SHUTDOWN, { flags: VsockShutdown.BOTH });
  await waitFor(() => peerEnded, 'the end at the server');
  await waitFor(() => guest.sent.length > 0, 'the RST');
  assert.deepEqual(guest.ops(), ['RST']);

  // Nobody at ${uds}_81.
  new GuestConn(host, 4001, 81).send(VsockOp.REQUEST);
  await waitFor(() => guest.sent.length > 0, 'the RST');
  assert.deepEqual(guest.take().map((p) => [OP_NAMES[p.h.op], p.h.srcPort, p.h.dstPort]), [['RST', 81, 4001]]);
  assert.equal(host.stats().connections, 0);
});

test('hybrid: a unix peer that stops reading stops the guest (fwd_cnt counts bytes written and drained), then catches up', async (t) => {
  const dir = await testTempDir(t, 'vsock-');
  const uds = dir.join('v.sock');
  const BUF = 65536;
  const TOTAL = 4 << 20;
  const { host, guest } = setup({ udsPath: uds, bufAlloc: BUF });
  t.after(() => host.close());
  await host.ready();
  let peer: Socket | undefined;
  let received = 0;
  let check = 0;
  const server = createServer((s) => {
    peer = s;
    s.pause();
    s.on('data', (d: Buffer) => {
      for (let i = 0; i < d.length; i++) if (d[i] !== ((received + i) & 0xff)) check++;
      received += d.length;
    });
  });
  server.listen(`${uds}_90`);
  await once(server, 'listening');
  t.after(() => server.close());
  const g = new GuestConn(host, 4100, 90);
  let hostBufAlloc = 0;
  let hostFwdCnt = 0;
  guest.onPacket = (p) => {
    hostBufAlloc = p.h.bufAlloc;
    hostFwdCnt = p.h.fwdCnt;
  };
  g.send(VsockOp.REQUEST);
  await waitFor(() => hostBufAlloc > 0, 'RESPONSE');
  const data = Buffer.from(Array.from({ length: 4096 }, (_, i) => i & 0xff));
  let sent = 0;
  /** Sends what the credit allows; true if it sent anything. */
  const push = (): boolean => {
    let any = false;
    for (;;) {
      const credit = hostBufAlloc - ((sent - hostFwdCnt) >>> 0);
      if (credit < 4096 || sent >= TOTAL) return any;
      g.send(VsockOp.RW, { payload: data });
      sent += 4096;
      any = true;
    }
  };
  // The peer reads nothing: the guest stalls once the kernel and our buffer are full.
  let idle = 0;
  while (idle < 40 && sent < TOTAL) {
    idle = push() ? 0 : idle + 1;
    await sleep(5);
  }
  assert.ok(sent < TOTAL, `the guest stalled (sent ${sent})`);
  assert.ok(((sent - hostFwdCnt) >>> 0) <= BUF);
  assert.equal(host.stats().creditOverruns, 0);
  assert.equal(received, 0);
  // It reads again: everything arrives.
  peer!.resume();
  const deadline = Date.now() + 20_000;
  while (received < TOTAL) {
    assert.ok(Date.now() < deadline, `stalled at ${received}`);
    push();
    await sleep(1);
  }
  guest.onPacket = undefined;
  assert.equal(check, 0, 'bytes intact and in order');
  assert.equal(received, TOTAL);
  assert.equal(host.stats().creditOverruns, 0);
  assert.equal(guest.sent.filter((p) => p.h.op === VsockOp.RST).length, 0);
});

test('hybrid: a bad CONNECT line, an overlong one, a refusing guest and the guest RST close the unix socket', async (t) => {
  const dir = await testTempDir(t, 'vsock-');
  const uds = dir.join('v.sock');
  const { host, guest } = setup({ udsPath: uds });
  await host.ready();
  const open = async (line: string): Promise<ReturnType<typeof collect>> => {
    const s = createConnection({ path: uds, allowHalfOpen: true });
    const seen = collect(s);
    await once(s, 'connect');
    s.write(line);
    return seen;
  };
  for (const line of ['HELLO 5\n', 'CONNECT 99999999999\n', 'x'.repeat(CONNECT_LINE_MAX), `CONNECT ${' '.repeat(60)}5\n`]) {
    const seen = await open(line);
    await waitFor(() => seen.ended(), `the end after ${JSON.stringify(line.slice(0, 12))}`);
    assert.equal(seen.text(), '');
  }
  assert.deepEqual(guest.ops(), []);

  const refused = await open('connect 60\n');
  await waitFor(() => guest.sent.length > 0, 'the REQUEST');
  const [req] = guest.take();
  host.fromGuest(packet({ srcPort: 60, dstPort: req!.h.srcPort, op: VsockOp.RST }));
  await waitFor(() => refused.ended(), 'the end after RST');
  assert.equal(refused.text(), '');

  const live = await open('CONNECT 61\n');
  await waitFor(() => guest.sent.length > 0, 'the REQUEST');
  const g = new GuestConn(host, 61, guest.take()[0]!.h.srcPort);
  g.send(VsockOp.RESPONSE);
  await waitFor(() => live.text().startsWith('OK '), 'OK');
  g.send(VsockOp.RST);
  await waitFor(() => live.ended(), 'the end after RST');
  assert.equal(host.stats().connections, 0);

  host.close();
  assert.equal(existsSync(uds), false, 'the listener socket is removed');
});
