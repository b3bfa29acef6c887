// The NBD client's wire protocol (NetworkBlockDevice/nbd doc/proto.md, doc/uri.md) against an in-process fake server
// on a unix socket: URI parsing, the handshake byte by byte, and the transmission phase, where every reply the spec
// forbids must end the connection with the unfinished requests handed back and no byte written outside a request's
// buffers. Wire bytes are hex, spaced by field; all numbers are big endian.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server, type Socket } from 'node:net';
import { Duplex } from 'node:stream';
import { setImmediate as tick } from 'node:timers/promises';
import { VhostError } from '../../src/errors.js';
import { parseNbdUri, type NbdTarget } from '../../src/devices/blk/nbd/uri.js';
import { connectNbd, type NbdConnectOptions, type NbdExportInfo } from '../../src/devices/blk/nbd/handshake.js';
import {
  copyToScatter,
  NbdConnection,
  zeroScatter,
  type NbdRequest,
} from '../../src/devices/blk/nbd/connection.js';
import { NbdErrno, NbdFlag } from '../../src/devices/blk/nbd/constants.js';
import { testTempDir } from '../helpers/tmp.js';

// ------------------------------------------------------------------------------------------ hex helpers

function hex(text: string): Buffer {
  const clean = text.replace(/\s+/g, '');
  if (clean.length % 2 !== 0 || /[^0-9a-f]/i.test(clean)) throw new Error(`bad hex: ${text}`);
  return Buffer.from(clean, 'hex');
}
const clean = (text: string): string => text.replace(/\s+/g, '').toLowerCase();
const u16 = (n: number): string => n.toString(16).padStart(4, '0');
const u32 = (n: number): string => n.toString(16).padStart(8, '0');
const u64 = (n: number): string => n.toString(16).padStart(16, '0');
/** `n` bytes of a recognizable pattern starting with `seed`, as hex. */
function patternHex(n: number, seed: number): string {
  return Buffer.from(Array.from({ length: n }, (_, i) => (seed + i * 7) & 0xff)).toString('hex');
}
function pattern(n: number, seed: number): Buffer {
  return Buffer.from(patternHex(n, seed), 'hex');
}

// Handshake bytes (spec "Newstyle negotiation", "Fixed newstyle negotiation").
const NBDMAGIC = '4e42444d41474943';
const IHAVEOPT = '49484156454f5054';
const REPLY_MAGIC = '0003e889045565a9';
const OPT_STARTTLS = 5;
const OPT_GO = 7;
const OPT_SR = 8;
const REP_ACK = 1;
const REP_INFO = 3;
const ERR = (n: number): number => 0x8000_0000 + n;
const optionReply = (option: number, type: number, payload = ''): string =>
  `${REPLY_MAGIC} ${u32(option)} ${u32(type)} ${u32(clean(payload).length / 2)} ${payload}`;
const infoExport = (size: number, flags: number): string => optionReply(OPT_GO, REP_INFO, `0000 ${u64(size)} ${u16(flags)}`);
const infoBlock = (min: number, pref: number, max: number): string =>
  optionReply(OPT_GO, REP_INFO, `0003 ${u32(min)} ${u32(pref)} ${u32(max)}`);
/** The client's NBD_OPT_GO for `name` with info requests EXPORT (0) and BLOCK_SIZE (3). */
function goRequest(name: string): string {
  const n = Buffer.from(name, 'utf8').toString('hex');
  const data = `${u32(n.length / 2)} ${n} 0002 0000 0003`;
  return `${IHAVEOPT} ${u32(OPT_GO)} ${u32(clean(data).length / 2)} ${data}`;
}

// Transmission bytes (spec "Simple reply message", "Structured reply chunk message").
const DONE = 1;
const T_NONE = 0;
const T_DATA = 1;
const T_HOLE = 2;
const T_ERROR = 0x8001;
const T_ERROR_OFFSET = 0x8002;
const simple = (cookie: string, error = 0, dataHex = ''): string => `67446698 ${u32(error)} ${cookie} ${dataHex}`;
const chunk = (cookie: string, flags: number, type: number, payload = ''): string =>
  `668e33ef ${u16(flags)} ${u16(type)} ${cookie} ${u32(clean(payload).length / 2)} ${payload}`;
const dataChunk = (cookie: string, flags: number, offset: number, dataHex: string): string =>
  chunk(cookie, flags, T_DATA, `${u64(offset)} ${dataHex}`);
const holeChunk = (cookie: string, flags: number, offset: number, size: number): string =>
  chunk(cookie, flags, T_HOLE, `${u64(offset)} ${u32(size)}`);
const errorChunk = (cookie: string, flags: number, error: number, message: string): string => {
  const m = Buffer.from(message).toString('hex');
  return chunk(cookie, flags, T_ERROR, `${u32(error)} ${u16(m.length / 2)} ${m}`);
};
const noneDone = (cookie: string): string => chunk(cookie, DONE, T_NONE);

// ------------------------------------------------------------------------------------------ fake server

/** The server's end of a connection: exact reads, hex writes. */
class Peer {
  readonly socket: Socket;
  readonly closed: Promise<void>;
  #chunks: Buffer[] = [];
  #length = 0;
  #isClosed = false;
  #wake: (() => void) | undefined;

  constructor(socket: Socket) {
    this.socket = socket;
    socket.on('data', (c: Buffer) => {
      this.#chunks.push(c);
      this.#length += c.length;
      this.#wake?.();
    });
    socket.on('error', () => {});
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        this.#isClosed = true;
        this.#wake?.();
        resolve();
      }),
    );
  }

  /** Bytes received and not read yet. */
  get buffered(): number {
    return this.#length;
  }

  async read(n: number): Promise<Buffer> {
    while (this.#length < n) {
      if (this.#isClosed) throw new Error(`peer: connection closed with ${this.#length} of ${n} bytes`);
      await new Promise<void>((resolve) => (this.#wake = resolve));
      this.#wake = undefined;
    }
    const all = Buffer.concat(this.#chunks);
    this.#chunks = all.length > n ? [all.subarray(n)] : [];
    this.#length -= n;
    return all.subarray(0, n);
  }

  /** Reads as many bytes as `text` has and checks they are `text`. */
  async expect(text: string, what = 'bytes from the client'): Promise<void> {
    const want = clean(text);
    const got = await this.read(want.length / 2);
    assert.equal(got.toString('hex'), want, what);
  }

  send(text: string | Buffer): void {
    this.socket.write(typeof text === 'string' ? hex(text) : text);
  }

  /** One request header (28 bytes) and, for a write, its data. */
  async request(): Promise<{ flags: number; type: number; cookie: string; offset: number; length: number; data: Buffer }> {
    const h = await this.read(28);
    assert.equal(h.readUInt32BE(0), 0x25609513, 'request magic');
    const type = h.readUInt16BE(6);
    const length = h.readUInt32BE(24);
    const data = type === 1 ? await this.read(length) : Buffer.alloc(0);
    return {
      flags: h.readUInt16BE(4),
      type,
      cookie: h.subarray(8, 16).toString('hex'),
      offset: Number(h.readBigUInt64BE(16)),
      length,
      data,
    };
  }
}

interface FakeServer {
  target: NbdTarget;
  /** The next connection the client makes. */
  accept(): Promise<Peer>;
}

async function fakeServer(t: import('node:test').TestContext): Promise<FakeServer> {
  const dir = await testTempDir(t, 'nbd-wire-');
  const path = dir.join('nbd.sock');
  const peers: Peer[] = [];
  const waiting: Peer[] = [];
  let wake: (() => void) | undefined;
  const server: Server = createServer((sock) => {
    const peer = new Peer(sock);
    peers.push(peer);
    waiting.push(peer);
    wake?.();
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  t.after(async () => {
    for (const p of peers) p.socket.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return {
    target: { address: { kind: 'unix', path }, exportName: 'disk', tls: false },
    async accept(): Promise<Peer> {
      while (waiting.length === 0) {
        await new Promise<void>((resolve) => (wake = resolve));
        wake = undefined;
      }
      return waiting.shift()!;
    },
  };
}

interface Serve {
  /** Handshake flags (default FIXED_NEWSTYLE | NO_ZEROES). */
  handshakeFlags?: number;
  /** Acknowledge NBD_OPT_STRUCTURED_REPLY (default true). */
  sr?: boolean;
  size?: number;
  flags?: number;
  block?: [number, number, number];
}

const FLAGS_ALL =
  NbdFlag.HAS_FLAGS | NbdFlag.SEND_FLUSH | NbdFlag.SEND_FUA | NbdFlag.SEND_TRIM | NbdFlag.SEND_WRITE_ZEROES | NbdFlag.CAN_MULTI_CONN;

/** The server's side of a successful handshake, checking every byte the client sends. */
async function serveHandshake(peer: Peer, s: Serve = {}, askSr = true): Promise<void> {
  const hflags = s.handshakeFlags ?? 3;
  peer.send(`${NBDMAGIC} ${IHAVEOPT} ${u16(hflags)}`);
  await peer.expect(u32(hflags & 3), 'client flags');
  if (askSr) {
    await peer.expect(`${IHAVEOPT} ${u32(OPT_SR)} 00000000`, 'NBD_OPT_STRUCTURED_REPLY');
    peer.send(optionReply(OPT_SR, (s.sr ?? true) ? REP_ACK : ERR(1)));
  }
  await peer.expect(goRequest('disk'), 'NBD_OPT_GO');
  peer.send(infoExport(s.size ?? 1 << 20, s.flags ?? FLAGS_ALL));
  if (s.block !== undefined) peer.send(infoBlock(...s.block));
  peer.send(optionReply(OPT_GO, REP_ACK));
}

/** connectNbd against `serve`, which plays the server on the accepted connection. */
async function handshake(
  srv: FakeServer,
  serve: (peer: Peer) => Promise<void>,
  options?: NbdConnectOptions,
  target: NbdTarget = srv.target,
): Promise<{ result: Awaited<ReturnType<typeof connectNbd>>; peer: Peer }> {
  const connecting = connectNbd(target, options);
  const peer = await srv.accept();
  const [result] = await Promise.all([connecting, serve(peer)]);
  return { result, peer };
}

/** connectNbd that must fail: the error (a VhostError), and the peer (whose socket the client must have closed). */
async function handshakeError(
  srv: FakeServer,
  serve: (peer: Peer) => Promise<void>,
  options?: NbdConnectOptions,
  target: NbdTarget = srv.target,
): Promise<{ error: VhostError; peer: Peer }> {
  const connecting = connectNbd(target, options).then(
    () => assert.fail('connectNbd resolved'),
    (e: unknown) => e,
  );
  const peer = await srv.accept();
  await serve(peer).catch(() => {}); // the client may hang up before the script ends
  const error = await connecting;
  assert.ok(error instanceof VhostError, `a VhostError: ${String(error)}`);
  await peer.closed; // the client destroyed its socket
  return { error, peer };
}

// ------------------------------------------------------------------------------------------ transmission harness

interface Closed {
  reason: VhostError;
  unfinished: NbdRequest[];
}

interface Harness {
  conn: NbdConnection;
  peer: Peer;
  info: NbdExportInfo;
  /** Resolves at the first onClose; `closeCount` counts them all. */
  closed: Promise<Closed>;
  closeCount: () => number;
}

async function open(t: import('node:test').TestContext, s: Serve = {}): Promise<Harness> {
  const srv = await fakeServer(t);
  const { result, peer } = await handshake(srv, (p) => serveHandshake(p, s));
  let count = 0;
  let resolveClosed!: (c: Closed) => void;
  const closed = new Promise<Closed>((resolve) => (resolveClosed = resolve));
  const conn = new NbdConnection(result.socket, result.info, result.leftover, (reason, unfinished) => {
    count++;
    resolveClosed({ reason, unfinished });
  });
  t.after(() => conn.close());
  return { conn, peer, info: result.info, closed, closeCount: () => count };
}

/** A request with a `done` that records its calls. */
interface Tracked {
  req: NbdRequest;
  calls: number[];
  done: Promise<number>;
}

function track(r: Omit<NbdRequest, 'done' | 'buffers'> & { buffers?: readonly Uint8Array[] }): Tracked {
  const calls: number[] = [];
  let resolve!: (e: number) => void;
  const done = new Promise<number>((res) => (resolve = res));
  const req: NbdRequest = {
    buffers: [],
    ...r,
    done: (e) => {
      calls.push(e);
      resolve(e);
    },
  };
  return { req, calls, done };
}

const GUARD = 64;
const SENTINEL = 0xa5;
const FILL = 0xee;

/**
 * A request buffer inside a larger SharedArrayBuffer, with sentinel bytes on both sides; split into a scatter list
 * at `cuts` (offsets into the request buffer). The request's bytes start as FILL.
 */
function guarded(length: number, cuts: number[] = []): {
  buffers: Uint8Array[];
  bytes: () => Buffer;
  assertGuards: () => void;
} {
  const all = new Uint8Array(new SharedArrayBuffer(length + 2 * GUARD)).fill(SENTINEL);
  const region = all.subarray(GUARD, GUARD + length).fill(FILL);
  const points = [0, ...cuts, length];
  const buffers = points.slice(1).map((end, i) => region.subarray(points[i], end));
  return {
    buffers,
    bytes: () => Buffer.from(region),
    assertGuards: () => {
      assert.ok(all.subarray(0, GUARD).every((b) => b === SENTINEL), 'guard before the buffer untouched');
      assert.ok(all.subarray(GUARD + length).every((b) => b === SENTINEL), 'guard after the buffer untouched');
    },
  };
}

/** A Duplex standing in for a socket, to feed replies in exact chunks. */
class FakeSocket extends Duplex {
  readonly written: Buffer[] = [];
  override _read(): void {}
  override _write(c: Buffer, _e: BufferEncoding, cb: (error?: Error | null) => void): void {
    this.written.push(c);
    cb();
  }
}

function infoFor(s: Partial<NbdExportInfo> = {}): NbdExportInfo {
  return {
    size: 1 << 20,
    flags: FLAGS_ALL,
    readOnly: false,
    canFlush: true,
    canFua: true,
    canTrim: true,
    canWriteZeroes: true,
    canMultiConn: true,
    minBlock: 1,
    preferredBlock: 4096,
    maxBlock: 32 << 20,
    structuredReplies: true,
    ...s,
  };
}

/** Every test ends within this (a missed violation would otherwise wait for onClose forever). */
const LIMIT = { timeout: 30_000 };

/** `p`, or a failure naming `what` after `ms`. */
async function within<T>(p: Promise<T>, what: string, ms = 5000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

const COOKIE1 = u64(1);
const COOKIE2 = u64(2);

// ================================================================================================= URIs

test('parseNbdUri: the URI spec examples and the four schemes', () => {
  const tcp = (host: string, port: number, exportName: string, tls = false): NbdTarget => ({
    address: { kind: 'tcp', host, port },
    exportName,
    tls,
  });
  assert.deepEqual(parseNbdUri('nbd://example.com/disk'), tcp('example.com', 10809, 'disk'));
  assert.deepEqual(parseNbdUri('nbd://example.com/'), tcp('example.com', 10809, ''));
  assert.deepEqual(parseNbdUri('nbd://example.com'), tcp('example.com', 10809, ''));
  assert.deepEqual(parseNbdUri('nbd://example.com//disk'), tcp('example.com', 10809, '/disk'));
  assert.deepEqual(parseNbdUri('nbd://example.com/hello%20world'), tcp('example.com', 10809, 'hello world'));
  assert.deepEqual(parseNbdUri('nbd://127.0.0.1:10810/x'), tcp('127.0.0.1', 10810, 'x'));
  assert.deepEqual(parseNbdUri('nbd://host:/x'), tcp('host', 10809, 'x'), 'an empty port is the default');
  assert.deepEqual(parseNbdUri('nbds://[::1]:1234/a/b'), tcp('::1', 1234, 'a/b', true));
  assert.deepEqual(parseNbdUri('nbd://[fe80::1%25eth0]/'), tcp('fe80::1%eth0', 10809, ''));
  assert.deepEqual(parseNbdUri('NBDS://Example.COM/Disk'), tcp('Example.COM', 10809, 'Disk', true));
  assert.deepEqual(parseNbdUri('nbd://example.com/%E2%82%AC'), tcp('example.com', 10809, '\u20ac'));
  assert.deepEqual(parseNbdUri('nbd+unix:///disk?socket=/run/nbd.sock'), {
    address: { kind: 'unix', path: '/run/nbd.sock' },
    exportName: 'disk',
    tls: false,
  });
  assert.deepEqual(parseNbdUri('nbds+unix:///?socket=%2Ftmp%2Fa%2Bb%20c.sock'), {
    address: { kind: 'unix', path: '/tmp/a+b c.sock' },
    exportName: '',
    tls: true,
  });
  assert.deepEqual(parseNbdUri('nbd+unix://?socket=a+b.sock'), {
    address: { kind: 'unix', path: 'a+b.sock' },
    exportName: '',
    tls: false,
  }, '"+" is not a space in a URI');
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=%00/abstract').address, { kind: 'unix', path: '\0/abstract' });
});

test('parseNbdUri: tls-* parameters are accepted; tls-hostname is returned', () => {
  assert.deepEqual(parseNbdUri('nbds://h/x?tls-type=x509&tls-verify-peer=1&tls-hostname=srv.example'), {
    address: { kind: 'tcp', host: 'h', port: 10809 },
    exportName: 'x',
    tls: true,
    tlsHostname: 'srv.example',
  });
  assert.equal(parseNbdUri('nbds+unix:///x?socket=/s&tls-verify-peer=0').tls, true);
  assert.equal(parseNbdUri('nbd://h/x?&tls-type=anon&').exportName, 'x');
});

test('parseNbdUri rejects everything else with VHOST_NBD_BAD_URI', () => {
  const bad = [
    '',
    'disk',
    'http://example.com/disk',
    'nbd:/disk',
    'nbd:disk',
    'nbd:///disk', // no host
    'nbd://:10809/disk',
    'nbd+unix:///disk', // no socket
    'nbd+unix:///disk?socket=',
    'nbd+unix://localhost/disk?socket=/s', // authority on a unix URI
    'nbd+unix:///disk?socket=/a&socket=/b',
    'nbd+unix:///disk?socket=/a%00b',
    'nbd://h/disk?socket=/s', // socket on a tcp URI
    'nbd://h/disk?foo=1',
    'nbd://h/disk?x-experimental=1',
    'nbd://h:0/',
    'nbd://h:65536/',
    'nbd://h:12ab/',
    'nbd://h:-1/',
    'nbd://[::1/',
    'nbd://[zz]/',
    'nbd://[::1]x/',
    'nbd://::1/',
    'nbd://user@h/',
    'nbd://h/disk#frag',
    'nbd://h/%zz',
    'nbd://h/%ff', // not UTF-8
    'nbd://h/a%00b',
    'nbd://h/a b',
    'nbd://h/a<b',
    `nbd://h/${'a'.repeat(4097)}`,
    'nbd://h%2Fx/',
  ];
  for (const uri of bad) {
    assert.throws(() => parseNbdUri(uri), { name: 'VhostError', code: 'VHOST_NBD_BAD_URI' }, uri);
  }
  assert.doesNotThrow(() => parseNbdUri(`nbd://h/${'a'.repeat(4096)}`));
});

// ================================================================================================= handshake

test('handshake byte by byte: greeting, client flags, STRUCTURED_REPLY, GO with INFO_EXPORT and INFO_BLOCK_SIZE', LIMIT, async (t) => {
  const srv = await fakeServer(t);
  const { result } = await handshake(srv, async (peer) => {
    // S: NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE | NO_ZEROES
    peer.send('4e42444d41474943 49484156454f5054 0003');
    // C: client flags FIXED_NEWSTYLE | NO_ZEROES
    await peer.expect('00000003');
    // C: IHAVEOPT, NBD_OPT_STRUCTURED_REPLY (8), no data
    await peer.expect('49484156454f5054 00000008 00000000');
    // S: reply magic, option 8, NBD_REP_ACK, length 0
    peer.send('0003e889045565a9 00000008 00000001 00000000');
    // C: NBD_OPT_GO (7), 14 bytes: name length 4, "disk", 2 info requests: EXPORT (0), BLOCK_SIZE (3)
    await peer.expect('49484156454f5054 00000007 0000000e 00000004 6469736b 0002 0000 0003');
    // S: NBD_REP_INFO NBD_INFO_NAME (ignored), then EXPORT: size 1 GiB, flags 0x016d; BLOCK_SIZE 512/4096/1 MiB
    peer.send('0003e889045565a9 00000007 00000003 00000006 0001 6469736b');
    peer.send('0003e889045565a9 00000007 00000003 0000000c 0000 0000000040000000 016d');
    peer.send('0003e889045565a9 00000007 00000003 0000000e 0003 00000200 00001000 00100000');
    peer.send('0003e889045565a9 00000007 00000003 00000005 0002 616263'); // NBD_INFO_DESCRIPTION "abc"
    peer.send('0003e889045565a9 00000007 00000003 00000004 00ff 0000'); // an unknown info type
    // S: NBD_REP_ACK: transmission
    peer.send('0003e889045565a9 00000007 00000001 00000000');
  });
  assert.deepEqual(result.info, {
    size: 1 << 30,
    flags: 0x16d,
    readOnly: false,
    canFlush: true,
    canFua: true,
    canTrim: true,
    canWriteZeroes: true,
    canMultiConn: true,
    minBlock: 512,
    preferredBlock: 4096,
    maxBlock: 1 << 20,
    structuredReplies: true,
  });
  assert.equal(result.leftover.length, 0);
  assert.equal(result.socket.listenerCount('data'), 0, 'no data listener left');
  assert.equal(result.socket.listenerCount('error'), 0);
  assert.equal(result.socket.listenerCount('readable'), 0);
  assert.ok(result.socket.isPaused(), 'the socket is paused');
  result.socket.destroy();
});

test('handshake: no NO_ZEROES offered, structured replies refused, defaults without INFO_BLOCK_SIZE', LIMIT, async (t) => {
  const srv = await fakeServer(t);
  const { result } = await handshake(srv, async (peer) => {
    peer.send(`${NBDMAGIC} ${IHAVEOPT} 0001`);
    await peer.expect('00000001', 'client flags: FIXED_NEWSTYLE only');
    await peer.expect(`${IHAVEOPT} 00000008 00000000`);
    peer.send(optionReply(OPT_SR, ERR(1), Buffer.from('no').toString('hex'))); // NBD_REP_ERR_UNSUP
    await peer.expect(goRequest('disk'));
    peer.send(infoExport(5 * 512, NbdFlag.HAS_FLAGS | NbdFlag.READ_ONLY));
    peer.send(optionReply(OPT_GO, REP_ACK));
  });
  const i = result.info;
  assert.equal(i.size, 2560);
  assert.equal(i.flags, 3);
  assert.deepEqual(
    [i.readOnly, i.canFlush, i.canFua, i.canTrim, i.canWriteZeroes, i.canMultiConn, i.structuredReplies],
    [true, false, false, false, false, false, false],
  );
  assert.deepEqual([i.minBlock, i.preferredBlock, i.maxBlock], [1, 4096, 32 << 20]);
  result.socket.destroy();
});

test('handshake: structuredReplies false skips the option; a 0xffffffff maximum block is capped at 32 MiB', LIMIT, async (t) => {
  const srv = await fakeServer(t);
  const { result } = await handshake(
    srv,
    async (peer) => {
      peer.send(`${NBDMAGIC} ${IHAVEOPT} 0003`);
      await peer.expect('00000003');
      await peer.expect(goRequest('disk'), 'GO comes right after the client flags');
      peer.send(infoBlock(1, 512, 0xffff_ffff));
      peer.send(infoExport(1 << 20, 1));
      peer.send(optionReply(OPT_GO, REP_ACK));
    },
    { structuredReplies: false },
  );
  assert.equal(result.info.structuredReplies, false);
  assert.equal(result.info.maxBlock, 32 << 20);
  assert.equal(result.info.preferredBlock, 512);
  result.socket.destroy();
});

test('handshake: NBD_OPT_GO unsupported falls back to NBD_OPT_EXPORT_NAME (with and without the 124 zeroes)', LIMIT, async (t) => {
  for (const noZeroes of [true, false]) {
    const srv = await fakeServer(t);
    const { result } = await handshake(srv, async (peer) => {
      peer.send(`${NBDMAGIC} ${IHAVEOPT} ${noZeroes ? '0003' : '0001'}`);
      await peer.expect(noZeroes ? '00000003' : '00000001');
      await peer.expect(`${IHAVEOPT} 00000008 00000000`);
      peer.send(optionReply(OPT_SR, ERR(1)));
      await peer.expect(goRequest('disk'));
      peer.send(optionReply(OPT_GO, ERR(1))); // NBD_REP_ERR_UNSUP
      // C: NBD_OPT_EXPORT_NAME (1), the name as data
      await peer.expect(`${IHAVEOPT} 00000001 00000004 6469736b`);
      peer.send(`${u64(3 << 20)} 0005 ${noZeroes ? '' : '00'.repeat(124)}`);
    });
    assert.equal(result.info.size, 3 << 20);
    assert.equal(result.info.canFlush, true);
    assert.equal(result.info.structuredReplies, false);
    assert.equal(result.leftover.length, 0);
    result.socket.destroy();
  }
});

test('handshake: bytes after NBD_REP_ACK are handed over as leftover', LIMIT, async (t) => {
  const srv = await fakeServer(t);
  const { result } = await handshake(srv, async (peer) => {
    peer.send(`${NBDMAGIC} ${IHAVEOPT} 0003`);
    await peer.expect('00000003');
    await peer.expect(`${IHAVEOPT} 00000008 00000000`);
    peer.send(optionReply(OPT_SR, REP_ACK));
    await peer.expect(goRequest('disk'));
    peer.send(infoExport(1 << 20, 1) + optionReply(OPT_GO, REP_ACK) + '67446698 0102');
  });
  assert.equal(result.leftover.toString('hex'), '674466980102');
  result.socket.destroy();
});

test('handshake: NBD_REP_ERR_* to GO is VHOST_NBD_EXPORT naming the error and the server text', LIMIT, async (t) => {
  const srv = await fakeServer(t);
  const { error } = await handshakeError(srv, async (peer) => {
    await serveUntilGo(peer);
    peer.send(optionReply(OPT_GO, ERR(6), Buffer.from('no such export\n').toString('hex'))); // NBD_REP_ERR_UNKNOWN
  });
  assert.equal(error.code, 'VHOST_NBD_EXPORT');
  assert.match(error.message, /NBD_REP_ERR_UNKNOWN/);
  assert.match(error.message, /no such export\?/, 'server text, control characters replaced');

  const { error: e2 } = await handshakeError(srv, async (peer) => {
    await serveUntilGo(peer);
    peer.send(infoExport(1 << 20, 1));
    peer.send(optionReply(OPT_GO, ERR(7))); // NBD_REP_ERR_SHUTDOWN
  });
  assert.equal(e2.code, 'VHOST_NBD_EXPORT');
  assert.match(e2.message, /NBD_REP_ERR_SHUTDOWN/);
});

/** Greeting, flags and an acknowledged STRUCTURED_REPLY; the client's GO has been read. */
async function serveUntilGo(peer: Peer): Promise<void> {
  peer.send(`${NBDMAGIC} ${IHAVEOPT} 0003`);
  await peer.expect('00000003');
  await peer.expect(`${IHAVEOPT} 00000008 00000000`);
  peer.send(optionReply(OPT_SR, REP_ACK));
  await peer.expect(goRequest('disk'));
}

test('handshake: a server that requires TLS refuses a client without it (VHOST_NBD_TLS)', LIMIT, async (t) => {
  const srv = await fakeServer(t);
  // FORCEDTLS: every option but STARTTLS gets NBD_REP_ERR_TLS_REQD.
  const { error } = await handshakeError(srv, async (peer) => {
    peer.send(`${NBDMAGIC} ${IHAVEOPT} 0003`);
    await peer.expect('00000003');
    await peer.expect(`${IHAVEOPT} 00000008 00000000`);
    peer.send(optionReply(OPT_SR, ERR(5), Buffer.from('TLS first').toString('hex')));
  });
  assert.equal(error.code, 'VHOST_NBD_TLS');
  assert.match(error.message, /NBD_REP_ERR_TLS_REQD: TLS first/);

  // SELECTIVETLS: the export needs TLS, GO fails.
  const { error: e2 } = await handshakeError(
    srv,
    async (peer) => {
      peer.send(`${NBDMAGIC} ${IHAVEOPT} 0003`);
      await peer.expect('00000003');
      await peer.expect(goRequest('disk'));
      peer.send(optionReply(OPT_GO, ERR(5)));
    },
    { structuredReplies: false },
  );
  assert.equal(e2.code, 'VHOST_NBD_TLS');
});

test('handshake: nbds sends STARTTLS first; a refusal is VHOST_NBD_TLS (no fallback to plain text)', LIMIT, async (t) => {
  const srv = await fakeServer(t);
  const { error } = await handshakeError(
    srv,
    async (peer) => {
      peer.send(`${NBDMAGIC} ${IHAVEOPT} 0003`);
      await peer.expect('00000003');
      await peer.expect(`${IHAVEOPT} ${u32(OPT_STARTTLS)} 00000000`, 'NBD_OPT_STARTTLS, before anything else');
      peer.send(optionReply(OPT_STARTTLS, ERR(2))); // NBD_REP_ERR_POLICY
    },
    {},
    { ...srv.target, tls: true },
  );
  assert.equal(error.code, 'VHOST_NBD_TLS');
  assert.match(error.message, /NBD_REP_ERR_POLICY/);

  // Data after the STARTTLS ACK, before the TLS handshake, is a handshake error.
  const { error: e2 } = await handshakeError(
    srv,
    async (peer) => {
      peer.send(`${NBDMAGIC} ${IHAVEOPT} 0003`);
      await peer.expect('00000003');
      await peer.expect(`${IHAVEOPT} ${u32(OPT_STARTTLS)} 00000000`);
      peer.send(optionReply(OPT_STARTTLS, REP_ACK) + 'deadbeef');
    },
    {},
    { ...srv.target, tls: true },
  );
  assert.equal(e2.code, 'VHOST_NBD_HANDSHAKE');
});

test('handshake errors: magic, oldstyle, no FIXED_NEWSTYLE, malformed and foreign option replies (VHOST_NBD_HANDSHAKE)', LIMIT, async (t) => {
  const srv = await fakeServer(t);
  const afterSr = (reply: string) => async (peer: Peer): Promise<void> => {
    peer.send(`${NBDMAGIC} ${IHAVEOPT} 0003`);
    await peer.expect('00000003');
    await peer.expect(`${IHAVEOPT} 00000008 00000000`);
    peer.send(reply);
  };
  const afterGo = (reply: string) => async (peer: Peer): Promise<void> => {
    await serveUntilGo(peer);
    peer.send(reply);
  };
  const just = (bytes: string) => (peer: Peer): Promise<void> => {
    peer.send(bytes);
    return Promise.resolve();
  };
  const cases: [string, (peer: Peer) => Promise<void>, RegExp][] = [
    ['bad magic', just(`4e42444d41474945 ${IHAVEOPT} 0003`), /bad magic/],
    ['oldstyle server', just(`${NBDMAGIC} 0000420281861253 ${u64(1 << 20)} 00000001 ${'00'.repeat(124)}`), /oldstyle/],
    ['bad second magic', just(`${NBDMAGIC} ${u64(42)} 0003`), /newstyle magic/],
    ['no FIXED_NEWSTYLE', just(`${NBDMAGIC} ${IHAVEOPT} 0002`), /fixed newstyle/],
    ['bad option reply magic', afterSr(`0003e889045565aa 00000008 00000001 00000000`), /reply magic/],
    ['reply for another option', afterSr(optionReply(OPT_GO, REP_ACK)), /NBD_OPT_GO while waiting for NBD_OPT_STRUCTURED_REPLY/],
    ['reply over 64 KiB', afterSr(`${REPLY_MAGIC} 00000008 80000001 00010001`), /65537 bytes/],
    ['ACK with data', afterSr(optionReply(OPT_SR, REP_ACK, '00')), /ACK with data/],
    ['unexpected reply type', afterSr(optionReply(OPT_SR, 2, '00000000')), /unexpected NBD_REP_SERVER/],
    ['INFO_EXPORT of 11 bytes', afterGo(optionReply(OPT_GO, REP_INFO, `0000 ${u64(1)} 00`)), /NBD_INFO_EXPORT of 11 bytes/],
    ['INFO of 1 byte', afterGo(optionReply(OPT_GO, REP_INFO, '00')), /NBD_REP_INFO of 1 bytes/],
    ['INFO_BLOCK_SIZE of 12 bytes', afterGo(optionReply(OPT_GO, REP_INFO, `0003 ${u32(1)} ${u32(1)} 0000`)), /NBD_INFO_BLOCK_SIZE of 12/],
    ['ACK without INFO_EXPORT', afterGo(optionReply(OPT_GO, REP_ACK)), /without NBD_INFO_EXPORT/],
    ['no HAS_FLAGS', afterGo(infoExport(4096, 0x04) + optionReply(OPT_GO, REP_ACK)), /NBD_FLAG_HAS_FLAGS/],
    ['minimum block not a power of 2', afterGo(infoExport(4096, 1) + infoBlock(3, 4096, 4096) + optionReply(OPT_GO, REP_ACK)), /minimum/],
    ['minimum block over 64 KiB', afterGo(infoExport(4096, 1) + infoBlock(1 << 17, 1 << 17, 1 << 20) + optionReply(OPT_GO, REP_ACK)), /minimum/],
    ['preferred under the minimum', afterGo(infoExport(4096, 1) + infoBlock(4096, 512, 1 << 20) + optionReply(OPT_GO, REP_ACK)), /preferred/],
    ['maximum not a multiple', afterGo(infoExport(4096, 1) + infoBlock(512, 4096, 1000) + optionReply(OPT_GO, REP_ACK)), /maximum/],
  ];
  for (const [name, serve, message] of cases) {
    const { error } = await handshakeError(srv, serve);
    assert.equal(error.code, 'VHOST_NBD_HANDSHAKE', name);
    assert.match(error.message, message, name);
  }
});

test('handshake: an export over 2^53 - 1 bytes is VHOST_NBD_EXPORT', LIMIT, async (t) => {
  const srv = await fakeServer(t);
  const { error } = await handshakeError(srv, async (peer) => {
    await serveUntilGo(peer);
    peer.send(`${optionReply(OPT_GO, REP_INFO, `0000 0020000000000000 0001`)} ${optionReply(OPT_GO, REP_ACK)}`);
  });
  assert.equal(error.code, 'VHOST_NBD_EXPORT');
  assert.match(error.message, /9007199254740992/);
});

test('handshake: connection errors, a server hanging up, and the timeout', LIMIT, async (t) => {
  const dir = await testTempDir(t, 'nbd-wire-');
  await assert.rejects(
    connectNbd({ address: { kind: 'unix', path: dir.join('missing.sock') }, exportName: '', tls: false }),
    (e: unknown) => e instanceof VhostError && e.code === 'VHOST_NBD_CONNECT' && (e.cause as NodeJS.ErrnoException).code === 'ENOENT',
  );
  // A free TCP port: nothing listens there once this server is closed.
  const probe = createServer();
  await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const port = (probe.address() as { port: number }).port;
  await new Promise<void>((resolve) => probe.close(() => resolve()));
  await assert.rejects(
    connectNbd({ address: { kind: 'tcp', host: '127.0.0.1', port }, exportName: '', tls: false }),
    (e: unknown) => e instanceof VhostError && e.code === 'VHOST_NBD_CONNECT' && (e.cause as NodeJS.ErrnoException).code === 'ECONNREFUSED',
  );

  const srv = await fakeServer(t);
  const { error } = await handshakeError(srv, (peer) => {
    peer.send(`${NBDMAGIC} ${IHAVEOPT}`); // half a greeting, then hang up
    peer.socket.end();
    return Promise.resolve();
  });
  assert.equal(error.code, 'VHOST_NBD_CONNECT');

  const started = Date.now();
  const { error: timeout } = await handshakeError(
    srv,
    async (peer) => {
      await serveUntilGo(peer);
      peer.send(infoExport(4096, 1)); // and never the ACK
    },
    { timeoutMs: 200 },
  );
  assert.equal(timeout.code, 'VHOST_NBD_TIMEOUT');
  assert.ok(Date.now() - started < 5000);
});

// ================================================================================================= transmission

test('requests on the wire: read, write (data from the views), flush, trim + FUA, write-zeroes + NO_HOLE, DISC', LIMIT, async (t) => {
  const h = await open(t, { size: 2 ** 34 });
  const read = track({ command: 'read', offset: 4096, length: 8, buffers: [new Uint8Array(8)] });
  h.conn.submit(read.req);
  await h.peer.expect('25609513 0000 0000 0000000000000001 0000000000001000 00000008', 'NBD_CMD_READ');

  const w = guarded(10, [3, 3, 7]); // an empty view in the middle
  w.buffers.forEach((b, i) => b.fill(0x10 + i));
  const write = track({ command: 'write', offset: 2 ** 33, length: 10, buffers: w.buffers, fua: true });
  h.conn.submit(write.req);
  await h.peer.expect('25609513 0001 0001 0000000000000002 0000000200000000 0000000a 101010 12121212 131313', 'NBD_CMD_WRITE + FUA');

  h.conn.submit(track({ command: 'flush', offset: 0, length: 0, buffers: [] }).req);
  await h.peer.expect('25609513 0000 0003 0000000000000003 0000000000000000 00000000', 'NBD_CMD_FLUSH');
  h.conn.submit(track({ command: 'trim', offset: 512, length: 1024, fua: true }).req);
  await h.peer.expect('25609513 0001 0004 0000000000000004 0000000000000200 00000400', 'NBD_CMD_TRIM + FUA');
  h.conn.submit(track({ command: 'write-zeroes', offset: 0, length: 65536, noHole: true }).req);
  await h.peer.expect('25609513 0002 0006 0000000000000005 0000000000000000 00010000', 'NBD_CMD_WRITE_ZEROES + NO_HOLE');
  assert.equal(h.conn.inFlight, 5);

  for (let cookie = 1; cookie <= 5; cookie++) h.peer.send(cookie === 1 ? dataChunk(u64(1), DONE, 4096, '0102030405060708') : simple(u64(cookie)));
  assert.equal(await read.done, 0);
  assert.equal(await write.done, 0);
  assert.equal(h.conn.inFlight, 0);
  assert.deepEqual([...(read.req.buffers[0] ?? [])], [1, 2, 3, 4, 5, 6, 7, 8]);

  h.conn.close();
  await h.peer.expect('25609513 0000 0002 0000000000000006 0000000000000000 00000000', 'NBD_CMD_DISC when idle');
  await h.peer.closed;
  const closed = await h.closed;
  assert.equal(closed.reason.code, 'VHOST_NBD_CLOSED');
  assert.deepEqual(closed.unfinished, []);
  h.conn.close();
  assert.equal(h.closeCount(), 1, 'close() is idempotent');
  assert.throws(() => h.conn.submit(track({ command: 'flush', offset: 0, length: 0 }).req), { code: 'VHOST_NBD_CLOSED' });
});

test('a read served by a simple reply lands across the scatter list, nothing outside it', LIMIT, async (t) => {
  const h = await open(t, { sr: false });
  assert.equal(h.info.structuredReplies, false);
  const g = guarded(1000, [1, 500, 999]);
  const r = track({ command: 'read', offset: 8192, length: 1000, buffers: g.buffers });
  h.conn.submit(r.req);
  const req = await h.peer.request();
  assert.deepEqual([req.type, req.offset, req.length], [0, 8192, 1000]);
  // Header and data split oddly across writes.
  const reply = hex(simple(req.cookie, 0, patternHex(1000, 3)));
  h.peer.send(reply.subarray(0, 10));
  await tick();
  h.peer.send(reply.subarray(10, 500));
  await tick();
  h.peer.send(reply.subarray(500));
  assert.equal(await r.done, 0);
  assert.deepEqual(g.bytes(), pattern(1000, 3));
  g.assertGuards();
  // Errors: a simple reply with an error has no data.
  const r2 = track({ command: 'read', offset: 0, length: 512, buffers: guarded(512).buffers });
  h.conn.submit(r2.req);
  h.peer.send(simple((await h.peer.request()).cookie, NbdErrno.EIO));
  assert.equal(await r2.done, NbdErrno.EIO);
  const w = track({ command: 'write', offset: 0, length: 4, buffers: [new Uint8Array(4)] });
  h.conn.submit(w.req);
  h.peer.send(simple((await h.peer.request()).cookie, NbdErrno.ENOSPC));
  assert.equal(await w.done, NbdErrno.ENOSPC);
});

test('a read served by OFFSET_DATA chunks out of order and an OFFSET_HOLE, then NONE with DONE', LIMIT, async (t) => {
  const h = await open(t);
  const g = guarded(4096, [100, 2048, 2049]);
  const r = track({ command: 'read', offset: 1 << 16, length: 4096, buffers: g.buffers });
  h.conn.submit(r.req);
  const c = (await h.peer.request()).cookie;
  const base = 1 << 16;
  h.peer.send(dataChunk(c, 0, base + 3072, patternHex(1024, 30)));
  h.peer.send(holeChunk(c, 0, base + 1024, 1024));
  h.peer.send(dataChunk(c, 0, base, patternHex(1024, 0)));
  h.peer.send(dataChunk(c, 0, base + 2048, patternHex(1024, 20)));
  await tick();
  assert.deepEqual(r.calls, [], 'not done before NBD_REPLY_FLAG_DONE');
  h.peer.send(noneDone(c));
  assert.equal(await r.done, 0);
  const want = Buffer.concat([pattern(1024, 0), Buffer.alloc(1024), pattern(1024, 20), pattern(1024, 30)]);
  assert.deepEqual(g.bytes(), want);
  g.assertGuards();

  // DONE on the last content chunk itself, and chunks of two reads interleaved.
  const a = guarded(512);
  const b = guarded(512);
  const ra = track({ command: 'read', offset: 0, length: 512, buffers: a.buffers });
  const rb = track({ command: 'read', offset: 512, length: 512, buffers: b.buffers });
  h.conn.submit(ra.req);
  h.conn.submit(rb.req);
  const ca = (await h.peer.request()).cookie;
  const cb = (await h.peer.request()).cookie;
  h.peer.send(
    dataChunk(cb, 0, 512, patternHex(256, 1)) +
      dataChunk(ca, 0, 256, patternHex(256, 2)) +
      holeChunk(cb, DONE, 768, 256) +
      dataChunk(ca, DONE, 0, patternHex(256, 3)),
  );
  assert.equal(await rb.done, 0);
  assert.equal(await ra.done, 0);
  assert.deepEqual(a.bytes(), Buffer.concat([pattern(256, 3), pattern(256, 2)]));
  assert.deepEqual(b.bytes(), Buffer.concat([pattern(256, 1), Buffer.alloc(256)]));
  assert.equal(h.closeCount(), 0);
});

test('error chunks: the first error is reported at DONE; content after an error still lands in range', LIMIT, async (t) => {
  const h = await open(t);
  const g = guarded(1024);
  const r = track({ command: 'read', offset: 0, length: 1024, buffers: g.buffers });
  h.conn.submit(r.req);
  const c = (await h.peer.request()).cookie;
  h.peer.send(errorChunk(c, 0, NbdErrno.EIO, 'disk on fire'));
  h.peer.send(dataChunk(c, 0, 512, patternHex(512, 9)));
  // ERROR_OFFSET: error, message length, message, offset.
  h.peer.send(chunk(c, 0, T_ERROR_OFFSET, `${u32(NbdErrno.ENOSPC)} 0002 6869 ${u64(100)}`));
  h.peer.send(noneDone(c));
  assert.equal(await r.done, NbdErrno.EIO, 'the first error wins');
  assert.deepEqual(g.bytes().subarray(512), pattern(512, 9));
  g.assertGuards();

  // An error chunk with DONE; an unknown error type (bit 15) with a longer payload; errors on writes and flushes.
  const w = track({ command: 'write', offset: 0, length: 2, buffers: [new Uint8Array(2)] });
  h.conn.submit(w.req);
  h.peer.send(errorChunk((await h.peer.request()).cookie, DONE, NbdErrno.EPERM, 'read-only'));
  assert.equal(await w.done, NbdErrno.EPERM);
  const f = track({ command: 'flush', offset: 0, length: 0 });
  h.conn.submit(f.req);
  h.peer.send(chunk((await h.peer.request()).cookie, DONE, 0x8123, `${u32(NbdErrno.ESHUTDOWN)} 0000 ffffffff`));
  assert.equal(await f.done, NbdErrno.ESHUTDOWN);
  const z = track({ command: 'write-zeroes', offset: 4096, length: 4096 });
  h.conn.submit(z.req);
  const cz = (await h.peer.request()).cookie;
  h.peer.send(chunk(cz, 0, T_ERROR_OFFSET, `${u32(NbdErrno.ENOTSUP)} 0000 ${u64(4096)}`) + noneDone(cz));
  assert.equal(await z.done, NbdErrno.ENOTSUP);
  // With structured replies, a simple reply is still fine for a non-read, and an error simple reply for a read.
  const t2 = track({ command: 'trim', offset: 0, length: 512 });
  h.conn.submit(t2.req);
  h.peer.send(simple((await h.peer.request()).cookie, 0));
  assert.equal(await t2.done, 0);
  const r2 = track({ command: 'read', offset: 0, length: 512, buffers: guarded(512).buffers });
  h.conn.submit(r2.req);
  h.peer.send(simple((await h.peer.request()).cookie, NbdErrno.EINVAL));
  assert.equal(await r2.done, NbdErrno.EINVAL);
  assert.equal(h.closeCount(), 0);
});

/** One violation case: what to submit (the first request is the one the bad reply is for) and what the server sends. */
interface Violation {
  name: string;
  sr?: boolean;
  command?: 'read' | 'write' | 'flush';
  /** Reply bytes, given the first request's cookie and the second's (an innocent read, also unfinished). */
  reply: (c: string, other: string) => string;
  message: RegExp;
  /** The first request is answered correctly before the violation (done(0)); only the second is handed back. */
  firstCompletes?: boolean;
}

const R_OFF = 0x10000;
const R_LEN = 4096;
const VIOLATIONS: Violation[] = [
  { name: 'simple reply for an unknown cookie', reply: () => simple(u64(99), 0), message: /unknown cookie 99/ },
  { name: 'chunk for an unknown cookie', reply: () => noneDone(u64(1 << 20)), message: /unknown cookie/ },
  { name: 'bad magic', reply: (c) => `67446699 00000000 ${c}`, message: /bad reply magic 0x67446699/ },
  { name: 'a structured chunk without structured replies', sr: false, reply: (c) => noneDone(c), message: /not negotiated/ },
  { name: 'an unknown non-error chunk type', reply: (c) => chunk(c, DONE, 3, '00'), message: /unexpected structured chunk type 3/ },
  { name: 'BLOCK_STATUS never asked for', reply: (c) => chunk(c, DONE, 5, `${u32(0)} ${u32(4096)} ${u32(0)}`), message: /type 5/ },
  { name: 'OFFSET_DATA before the read', reply: (c) => dataChunk(c, DONE, R_OFF - 8, patternHex(16, 1)), message: /OFFSET_DATA .* outside/ },
  { name: 'OFFSET_DATA past the read', reply: (c) => dataChunk(c, DONE, R_OFF + R_LEN - 8, patternHex(16, 1)), message: /outside/ },
  { name: 'OFFSET_DATA at a huge offset', reply: (c) => dataChunk(c, DONE, 2 ** 53 + 2 ** 40, patternHex(16, 1)), message: /outside/ },
  { name: 'OFFSET_HOLE past the read', reply: (c) => holeChunk(c, DONE, R_OFF + 1, R_LEN), message: /OFFSET_HOLE .* outside/ },
  { name: 'OFFSET_HOLE before the read', reply: (c) => holeChunk(c, DONE, R_OFF - 1, 2), message: /outside/ },
  { name: 'OFFSET_HOLE of size 0', reply: (c) => holeChunk(c, DONE, R_OFF, 0), message: /size 0/ },
  { name: 'OFFSET_HOLE of 13 bytes', reply: (c) => chunk(c, DONE, T_HOLE, `${u64(R_OFF)} ${u32(8)} 00`), message: /13-byte/ },
  { name: 'OFFSET_DATA of 8 bytes', reply: (c) => chunk(c, DONE, T_DATA, u64(R_OFF)), message: /8-byte/ },
  { name: 'OFFSET_DATA for a write', command: 'write', reply: (c) => dataChunk(c, DONE, R_OFF, '00'), message: /non-read/ },
  { name: 'OFFSET_HOLE for a flush', command: 'flush', reply: (c) => holeChunk(c, DONE, 0, 1), message: /non-read/ },
  { name: 'NONE with a payload', reply: (c) => chunk(c, DONE, T_NONE, '00'), message: /NONE chunk with a 1-byte/ },
  { name: 'NONE without DONE', reply: (c) => chunk(c, 0, T_NONE), message: /without NBD_REPLY_FLAG_DONE/ },
  { name: 'ERROR of 5 bytes', reply: (c) => chunk(c, DONE, T_ERROR, `${u32(5)} 00`), message: /5-byte payload/ },
  { name: 'ERROR_OFFSET of 13 bytes', reply: (c) => chunk(c, DONE, T_ERROR_OFFSET, `${u32(5)} 0000 ${u64(R_OFF).slice(2)}`), message: /13-byte/ },
  { name: 'error message longer than the payload', reply: (c) => chunk(c, DONE, T_ERROR, `${u32(5)} 0003 6162`), message: /message of 3 bytes/ },
  { name: 'ERROR_OFFSET message over its room', reply: (c) => chunk(c, DONE, T_ERROR_OFFSET, `${u32(5)} 0002 6162 ${u64(R_OFF).slice(4)}`), message: /message of 2 bytes/ },
  { name: 'error chunk with error 0', reply: (c) => errorChunk(c, DONE, 0, 'fine?'), message: /error 0/ },
  { name: 'unknown error type with error 0', reply: (c) => chunk(c, DONE, 0x8abc, `${u32(0)} 0000`), message: /error 0/ },
  { name: 'ERROR_OFFSET outside the read', reply: (c) => chunk(c, DONE, T_ERROR_OFFSET, `${u32(5)} 0000 ${u64(R_OFF + R_LEN)}`), message: /ERROR_OFFSET .* outside/ },
  { name: 'a chunk over 32 MiB + 8', reply: (c) => `668e33ef 0001 0001 ${c} 02000009`, message: /33554441 bytes/ },
  { name: 'read DONE with too few bytes', reply: (c) => dataChunk(c, 0, R_OFF, patternHex(R_LEN - 1, 1)) + noneDone(c), message: /4095 of 4096/ },
  {
    name: 'read DONE with too many bytes (a chunk sent twice)',
    reply: (c) => dataChunk(c, 0, R_OFF, patternHex(R_LEN, 1)) + holeChunk(c, DONE, R_OFF, 1),
    message: /covers 4097 bytes/,
  },
  { name: 'a simple reply with error 0 to a read, with structured replies', reply: (c) => simple(c, 0), message: /error 0 to a read/ },
  { name: 'a simple reply after structured chunks', reply: (c) => dataChunk(c, 0, R_OFF, '00') + simple(c, 5), message: /already got structured/ },
  {
    name: 'a simple read reply with more data than asked',
    sr: false,
    reply: (c) => simple(c, 0, patternHex(R_LEN, 1)) + patternHex(16, 2),
    message: /bad reply magic/,
    firstCompletes: true,
  },
];

test('every protocol violation: socket destroyed, onClose(VHOST_NBD_PROTOCOL) with every unfinished request, no byte outside the buffers', LIMIT, async (t) => {
  for (const v of VIOLATIONS) {
    const h = await open(t, { sr: v.sr ?? true, size: 1 << 20 });
    const command = v.command ?? 'read';
    const g = guarded(command === 'flush' ? 0 : R_LEN, [1000, 3000]);
    const first = track(
      command === 'flush'
        ? { command, offset: 0, length: 0 }
        : { command, offset: R_OFF, length: R_LEN, buffers: g.buffers },
    );
    const other = guarded(512);
    const second = track({ command: 'read', offset: 0, length: 512, buffers: other.buffers });
    h.conn.submit(first.req);
    h.conn.submit(second.req);
    const c1 = (await h.peer.request()).cookie;
    const c2 = (await h.peer.request()).cookie;
    h.peer.send(v.reply(c1, c2));
    const closed = await within(h.closed, `${v.name}: onClose`);
    assert.equal(closed.reason.code, 'VHOST_NBD_PROTOCOL', v.name);
    assert.match(closed.reason.message, v.message, v.name);
    if (v.firstCompletes === true) {
      assert.deepEqual(closed.unfinished, [second.req], `${v.name}: the unanswered read handed back`);
      assert.deepEqual(first.calls, [0], `${v.name}: answered before the violation`);
      assert.deepEqual(g.bytes(), pattern(R_LEN, 1));
    } else {
      assert.deepEqual(new Set(closed.unfinished), new Set([first.req, second.req]), `${v.name}: both handed back`);
      assert.deepEqual(first.calls, [], `${v.name}: done not called`);
    }
    assert.deepEqual(second.calls, [], `${v.name}: done not called`);
    g.assertGuards();
    other.assertGuards();
    assert.ok(other.bytes().every((b) => b === FILL), `${v.name}: the other read untouched`);
    await within(h.peer.closed, `${v.name}: the socket closed`); // the client destroyed the socket
    assert.equal(h.closeCount(), 1, v.name);
    assert.equal(h.conn.inFlight, 0);
    assert.throws(() => h.conn.submit(track({ command: 'flush', offset: 0, length: 0 }).req), { code: 'VHOST_NBD_CLOSED' });
  }
});

test('leftover bytes from the handshake are a violation (no request was sent yet)', LIMIT, async () => {
  const sock = new FakeSocket();
  const closes: Closed[] = [];
  const conn = new NbdConnection(sock as unknown as Socket, infoFor(), hex('67446698'), (reason, unfinished) =>
    closes.push({ reason, unfinished }),
  );
  assert.equal(closes.length, 0, 'not from inside the constructor');
  await tick();
  assert.equal(closes.length, 1);
  assert.equal(closes[0]?.reason.code, 'VHOST_NBD_PROTOCOL');
  assert.ok(sock.destroyed);
  assert.equal(conn.inFlight, 0);
});

test('replies split into 1-byte chunks parse the same (headers gathered across chunks)', LIMIT, async () => {
  for (const sr of [true, false]) {
    const sock = new FakeSocket();
    const closes: Closed[] = [];
    const conn = new NbdConnection(sock as unknown as Socket, infoFor({ structuredReplies: sr }), Buffer.alloc(0), (reason, unfinished) =>
      closes.push({ reason, unfinished }),
    );
    await tick();
    const g = guarded(64, [5, 40]);
    const r = track({ command: 'read', offset: 128, length: 64, buffers: g.buffers });
    const f = track({ command: 'flush', offset: 0, length: 0 });
    conn.submit(r.req);
    conn.submit(f.req);
    const reply = hex(
      sr
        ? simple(COOKIE2, 0) +
            dataChunk(COOKIE1, 0, 160, patternHex(32, 5)) +
            errorChunk(COOKIE1, 0, NbdErrno.EIO, 'x') +
            chunk(COOKIE1, 0, T_ERROR_OFFSET, `${u32(NbdErrno.EINVAL)} 0001 79 ${u64(130)}`) +
            holeChunk(COOKIE1, 0, 128, 32) +
            noneDone(COOKIE1)
        : simple(COOKIE2, 0) + simple(COOKIE1, 0, patternHex(64, 5)),
    );
    for (const byte of reply) sock.push(Buffer.from([byte]));
    await tick();
    assert.deepEqual(f.calls, [0]);
    assert.deepEqual(r.calls, [sr ? NbdErrno.EIO : 0]);
    assert.deepEqual(g.bytes(), sr ? Buffer.concat([Buffer.alloc(32), pattern(32, 5)]) : pattern(64, 5));
    g.assertGuards();
    assert.equal(closes.length, 0);
    assert.equal(conn.inFlight, 0);
  }
});

test('after a violation, the rest of the same chunk is not parsed: no buffer is touched again', LIMIT, async () => {
  const sock = new FakeSocket();
  const closes: Closed[] = [];
  const conn = new NbdConnection(sock as unknown as Socket, infoFor(), Buffer.alloc(0), (reason, unfinished) =>
    closes.push({ reason, unfinished }),
  );
  await tick();
  const a = guarded(256);
  const b = guarded(256);
  const ra = track({ command: 'read', offset: 0, length: 256, buffers: a.buffers });
  const rb = track({ command: 'read', offset: 256, length: 256, buffers: b.buffers });
  conn.submit(ra.req);
  conn.submit(rb.req);
  // One chunk: half of a's data, a violation, then a complete valid reply for b.
  const bytes = hex(
    dataChunk(COOKIE1, 0, 0, patternHex(128, 1)) +
      dataChunk(COOKIE1, DONE, 1024, patternHex(8, 1)) +
      dataChunk(COOKIE2, DONE, 256, patternHex(256, 2)),
  );
  sock.push(bytes);
  await tick();
  assert.equal(closes.length, 1);
  assert.equal(closes[0]?.reason.code, 'VHOST_NBD_PROTOCOL');
  assert.ok(sock.destroyed, 'destroyed before onClose returned');
  assert.ok(b.bytes().every((x) => x === FILL), 'b untouched');
  assert.deepEqual(a.bytes().subarray(128), Buffer.alloc(128, FILL), 'a untouched past the valid chunk');
  assert.deepEqual(rb.calls, []);
  a.assertGuards();
  b.assertGuards();
  sock.push(bytes); // nothing happens any more
  await tick();
  assert.equal(closes.length, 1);
});

test('close() from inside done(): the rest of the chunk is not parsed, the other read is handed back untouched', LIMIT, async () => {
  const sock = new FakeSocket();
  const closes: Closed[] = [];
  const conn = new NbdConnection(sock as unknown as Socket, infoFor(), Buffer.alloc(0), (reason, unfinished) =>
    closes.push({ reason, unfinished }),
  );
  await tick();
  const b = guarded(256);
  const rb = track({ command: 'read', offset: 256, length: 256, buffers: b.buffers });
  const fa = track({ command: 'flush', offset: 0, length: 0 });
  const calls: number[] = [];
  conn.submit({ ...fa.req, done: (e) => (calls.push(e), conn.close()) });
  conn.submit(rb.req);
  sock.push(hex(simple(COOKIE1, 0) + dataChunk(COOKIE2, DONE, 256, patternHex(256, 2))));
  await tick();
  assert.deepEqual(calls, [0]);
  assert.equal(closes.length, 1);
  assert.equal(closes[0]?.reason.code, 'VHOST_NBD_CLOSED');
  assert.deepEqual(closes[0]?.unfinished, [rb.req]);
  assert.deepEqual(rb.calls, []);
  assert.ok(b.bytes().every((x) => x === FILL), 'b untouched');
  b.assertGuards();
});

test('the server hanging up or a socket error: onClose(VHOST_NBD_CLOSED) once, with the unfinished requests', LIMIT, async (t) => {
  const h = await open(t);
  const r = track({ command: 'read', offset: 0, length: 4096, buffers: guarded(4096).buffers });
  const w = track({ command: 'write', offset: 0, length: 1, buffers: [new Uint8Array(1)] });
  h.conn.submit(r.req);
  h.conn.submit(w.req);
  const c = (await h.peer.request()).cookie;
  await h.peer.request();
  h.peer.send(clean(dataChunk(c, 0, 0, patternHex(100, 1))).slice(0, 60)); // 30 bytes: mid-chunk
  await tick();
  h.peer.socket.end();
  const closed = await h.closed;
  assert.equal(closed.reason.code, 'VHOST_NBD_CLOSED');
  assert.deepEqual(new Set(closed.unfinished), new Set([r.req, w.req]));
  assert.deepEqual([r.calls, w.calls], [[], []]);
  await tick();
  assert.equal(h.closeCount(), 1);

  const sock = new FakeSocket();
  const closes: Closed[] = [];
  const conn = new NbdConnection(sock as unknown as Socket, infoFor(), Buffer.alloc(0), (reason, unfinished) =>
    closes.push({ reason, unfinished }),
  );
  const f = track({ command: 'flush', offset: 0, length: 0 });
  conn.submit(f.req);
  const cause = Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' });
  sock.destroy(cause);
  await tick();
  await tick();
  assert.equal(closes.length, 1);
  assert.equal(closes[0]?.reason.code, 'VHOST_NBD_CLOSED');
  assert.equal(closes[0]?.reason.cause, cause);
  assert.deepEqual(closes[0]?.unfinished, [f.req]);
});

test('close() with requests in flight: no DISC, socket destroyed, requests handed back and never completed', LIMIT, async (t) => {
  const h = await open(t);
  const g = guarded(512);
  const r = track({ command: 'read', offset: 0, length: 512, buffers: g.buffers });
  h.conn.submit(r.req);
  const c = (await h.peer.request()).cookie;
  h.conn.close();
  const closed = await h.closed;
  assert.equal(closed.reason.code, 'VHOST_NBD_CLOSED');
  assert.deepEqual(closed.unfinished, [r.req]);
  h.peer.send(dataChunk(c, DONE, 0, patternHex(512, 1))); // too late
  await h.peer.closed;
  assert.equal(h.peer.buffered, 0, 'no NBD_CMD_DISC with requests in flight');
  assert.deepEqual(r.calls, []);
  assert.ok(g.bytes().every((x) => x === FILL));
  h.conn.close();
  assert.equal(h.closeCount(), 1);
});

test('submit validates against the export (VHOST_NBD_BAD_REQUEST) and sends nothing', LIMIT, async (t) => {
  const h = await open(t, { size: 1 << 20, flags: NbdFlag.HAS_FLAGS | NbdFlag.SEND_FLUSH, block: [512, 4096, 65536] });
  const buf = (n: number): Uint8Array[] => [new Uint8Array(n)];
  const bad: [string, Omit<NbdRequest, 'done'>][] = [
    ['past the end', { command: 'read', offset: (1 << 20) - 512, length: 1024, buffers: buf(1024) }],
    ['offset past the end', { command: 'read', offset: 1 << 21, length: 512, buffers: buf(512) }],
    ['over maxBlock', { command: 'read', offset: 0, length: 65536 + 512, buffers: buf(65536 + 512) }],
    ['unaligned offset', { command: 'read', offset: 100, length: 512, buffers: buf(512) }],
    ['unaligned length', { command: 'write', offset: 0, length: 500, buffers: buf(500) }],
    ['length 0', { command: 'read', offset: 0, length: 0, buffers: [] }],
    ['negative offset', { command: 'read', offset: -512, length: 512, buffers: buf(512) }],
    ['fractional offset', { command: 'read', offset: 0.5, length: 512, buffers: buf(512) }],
    ['buffers too short', { command: 'read', offset: 0, length: 1024, buffers: buf(512) }],
    ['buffers too long', { command: 'write', offset: 0, length: 512, buffers: [new Uint8Array(512), new Uint8Array(1)] }],
    ['trim not offered', { command: 'trim', offset: 0, length: 512, buffers: [] }],
    ['write-zeroes not offered', { command: 'write-zeroes', offset: 0, length: 512, buffers: [] }],
    ['FUA not offered', { command: 'write', offset: 0, length: 512, buffers: buf(512), fua: true }],
    ['flush with a length', { command: 'flush', offset: 0, length: 512, buffers: [] }],
    ['flush with buffers', { command: 'flush', offset: 0, length: 0, buffers: buf(0) }],
    ['noHole on a write', { command: 'write', offset: 0, length: 512, buffers: buf(512), noHole: true }],
    ['unknown command', { command: 'cache' as 'read', offset: 0, length: 512, buffers: buf(512) }],
  ];
  for (const [name, r] of bad) {
    assert.throws(() => h.conn.submit({ ...r, done: () => assert.fail(name) }), { code: 'VHOST_NBD_BAD_REQUEST' }, name);
  }
  const h2 = await open(t); // FUA offered: still only for write, write-zeroes and trim
  assert.throws(
    () => h2.conn.submit({ command: 'read', offset: 0, length: 512, buffers: buf(512), fua: true, done: () => {} }),
    { code: 'VHOST_NBD_BAD_REQUEST' },
  );
  assert.equal(h.conn.inFlight, 0);
  // Then a good request goes out as the first one on the wire (cookie 1).
  h.conn.submit(track({ command: 'flush', offset: 0, length: 0 }).req);
  await h.peer.expect('25609513 0000 0003 0000000000000001 0000000000000000 00000000');
  assert.equal(h.peer.buffered, 0);
  assert.equal(h.closeCount(), 0);
});

test('copyToScatter and zeroScatter stay inside the list', () => {
  const g = guarded(10, [0, 4, 4, 9]);
  copyToScatter(g.buffers, 2, hex('0102030405060708'), 1, 7);
  assert.equal(g.bytes().toString('hex'), 'eeee020304050607eeee');
  zeroScatter(g.buffers, 3, 6);
  assert.equal(g.bytes().toString('hex'), 'eeee02000000000000ee');
  copyToScatter(g.buffers, 8, hex('aabbccdd'), 0, 4); // clipped at the end of the list
  zeroScatter(g.buffers, 9, 5);
  assert.equal(g.bytes().toString('hex'), 'eeee020000000000aa00');
  g.assertGuards();
});
