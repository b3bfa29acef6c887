// The backend's protocol state machine over a real unix socket, driven with raw wire bytes (hex): replies to GET_*,
// REPLY_ACK acks and nacks, malformed and unknown messages, fds where none belong, a ring that cannot be mapped,
// disconnects in the middle of a message. After each test every fd and mapping is released.
import { test, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { VhostUserServer } from '../../src/backend/server.js';
import { BlkDevice } from '../../src/devices/blk/blk-device.js';
import * as native from '../../src/native/index.js';
import { collectGarbage, openFdCount } from '../helpers/fds.js';

let dir = '';
let server: VhostUserServer;
let fdsBefore = 0;
let mappingsBefore = 0;

beforeEach(() => {
  fdsBefore = openFdCount();
  mappingsBefore = native.mappingCount();
  dir = mkdtempSync(join(tmpdir(), 'vhost-user-proto-'));
  const image = join(dir, 'disk.img');
  writeFileSync(image, Buffer.alloc(1024 * 1024));
  server = new VhostUserServer({ socketPath: join(dir, 'sock'), device: new BlkDevice({ backend: { kind: 'file', path: image }, queues: 2 }) });
  server.listen();
});

afterEach(async () => {
  await server.close();
  rmSync(dir, { recursive: true, force: true });
  assert.equal(openFdCount(), fdsBefore, 'fds leaked');
  for (let i = 0; i < 100 && native.mappingCount() > mappingsBefore; i++) {
    collectGarbage();
    await sleep(10);
  }
  assert.equal(native.mappingCount(), mappingsBefore, 'mappings leaked');
});

/** A u64 as little-endian hex. */
function u64(n: number): string {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b.toString('hex');
}

/** A raw client: send hex bytes (with fds), read back replies as hex. */
class RawClient {
  readonly fd = native.connectUnix(server.socketPath);
  readonly #buf = new Uint8Array(4096);

  send(hex: string, fds: number[] = []): void {
    const bytes = Buffer.from(hex.replace(/\s+/g, ''), 'hex');
    assert.equal(native.sendmsg(this.fd, bytes, fds), bytes.length);
  }

  /** Waits for `n` bytes (hex) or for the peer to close (returns 'closed'). */
  async read(n: number): Promise<string> {
    let got = Buffer.alloc(0);
    for (let i = 0; i < 500 && got.length < n; i++) {
      const r = native.recvmsg(this.fd, this.#buf.subarray(0, n - got.length), []);
      if (r === 0) return got.length === 0 ? 'closed' : got.toString('hex');
      if (r > 0) got = Buffer.concat([got, this.#buf.subarray(0, r)]);
      else await sleep(10);
    }
    return got.toString('hex');
  }

  close(): void {
    native.close(this.fd);
  }
}

// Headers: request u32 LE, flags u32 LE, size u32 LE. Flags 0x1 = version 1, 0x5 = reply, 0x9 = need reply.
const GET_FEATURES = '01000000 01000000 00000000';
const GET_PROTOCOL_FEATURES = '0f000000 01000000 00000000';
const SET_PROTOCOL_FEATURES_REPLY_ACK = '10000000 01000000 08000000 0800000000000000'; // REPLY_ACK (bit 3)

test('GET_FEATURES and GET_PROTOCOL_FEATURES are answered with the offered bits', async () => {
  const c = new RawClient();
  try {
    c.send(GET_FEATURES);
    // reply: request 1, flags 0x5, size 8, then VERSION_1 | RING_PACKED | PROTOCOL_FEATURES | EVENT_IDX | INDIRECT |
    // LOG_ALL | blk bits
    const reply = await c.read(20);
    assert.equal(reply.slice(0, 24), '010000000500000008000000');
    const features = Buffer.from(reply.slice(24), 'hex').readBigUInt64LE(0);
    for (const bit of [32n, 34n, 30n, 29n, 28n, 26n, 9n /* FLUSH */, 12n /* MQ */]) assert.ok(features & (1n << bit), `bit ${bit}`);
    c.send(GET_PROTOCOL_FEATURES);
    // MQ | LOG_SHMFD | REPLY_ACK | CONFIG | INFLIGHT_SHMFD (blk) | RESET_DEVICE | CONFIGURE_MEM_SLOTS | STATUS = 0x1b20b
    assert.equal(await c.read(20), '0f0000000500000008000000' + '0bb2010000000000');
  } finally {
    c.close();
  }
});

test('REPLY_ACK: success acks 0, a refused message acks 1 and the connection goes on', async () => {
  const c = new RawClient();
  try {
    c.send(SET_PROTOCOL_FEATURES_REPLY_ACK);
    c.send('03000000 09000000 00000000'); // SET_OWNER, need reply
    assert.equal(await c.read(20), '030000000500000008000000' + '0000000000000000');
    c.send('08000000 09000000 08000000 00000000 03000000'); // SET_VRING_NUM q0 num 3: not a power of two
    assert.equal(await c.read(20), '080000000500000008000000' + '0100000000000000');
    c.send('08000000 09000000 08000000 07000000 00010000'); // SET_VRING_NUM q7: no such queue
    assert.equal(await c.read(20), '080000000500000008000000' + '0100000000000000');
    c.send('63000000 09000000 00000000'); // unknown request 99
    assert.equal(await c.read(20), '630000000500000008000000' + '0100000000000000');
    c.send('02000000 09000000 08000000 0000000000000080'); // SET_FEATURES with a bit never offered (63)
    assert.equal(await c.read(20), '020000000500000008000000' + '0100000000000000');
    c.send('11000000 01000000 00000000'); // GET_QUEUE_NUM still answered
    assert.equal(await c.read(20), '110000000500000008000000' + '0200000000000000');
  } finally {
    c.close();
  }
});

test('GET_CONFIG returns the blk config space (capacity in sectors, num_queues)', async () => {
  const c = new RawClient();
  try {
    // offset 0, size 60, flags 0, then 60 bytes of zeroes
    c.send('18000000 01000000 48000000 00000000 3c000000 00000000' + '00'.repeat(60));
    const reply = Buffer.from(await c.read(12 + 72), 'hex');
    assert.equal(reply.subarray(0, 12).toString('hex'), '180000000500000048000000');
    const config = reply.subarray(24);
    assert.equal(config.readBigUInt64LE(0), 2048n, '1 MiB = 2048 sectors');
    assert.equal(config.readUInt32LE(20), 512, 'blk_size');
    assert.equal(config.readUInt16LE(34), 2, 'num_queues');
  } finally {
    c.close();
  }
});

test('without REPLY_ACK, a refused message drops the connection; the server accepts the next one', async () => {
  const c = new RawClient();
  c.send('08000000 01000000 08000000 00000000 03000000'); // SET_VRING_NUM num 3, no ack possible
  assert.equal(await c.read(1), 'closed');
  c.close();
  await server.idle();
  const d = new RawClient();
  try {
    d.send(GET_FEATURES);
    assert.equal((await d.read(20)).slice(0, 8), '01000000');
  } finally {
    d.close();
  }
});

test('framing errors disconnect: bad version, oversized payload, fds on a message that takes none', async () => {
  for (const [hex, fds] of [
    ['01000000 02000000 00000000', 0], // version 2
    ['01000000 01000000 00100100', 0], // payload of 0x11000 bytes
    ['03000000 01000000 00000000', 1], // SET_OWNER with an fd
  ] as const) {
    const c = new RawClient();
    const efd = native.eventfdCreate();
    try {
      c.send(hex, fds ? [efd] : []);
      assert.equal(await c.read(1), 'closed', hex);
    } finally {
      native.close(efd);
      c.close();
    }
    await server.idle();
  }
});

test('memory and rings: ADD_MEM_REG maps, a ring outside memory is refused, REM_MEM_REG unmaps', async () => {
  const c = new RawClient();
  const mem = native.memfdCreate('guest', 1024 * 1024);
  const kick = native.eventfdCreate();
  try {
    c.send(SET_PROTOCOL_FEATURES_REPLY_ACK);
    c.send('02000000 09000000 08000000' + u64(2 ** 32 + 2 ** 30)); // SET_FEATURES VERSION_1 | PROTOCOL_FEATURES
    assert.equal((await c.read(20)).slice(-16), '0000000000000000');
    // ADD_MEM_REG: padding u64, then gpa 0x0, size 1 MiB, uva 0x7f0000000000, mmap_offset 0
    const region = u64(0) + u64(0) + u64(0x100000) + u64(0x7f00_0000_0000) + u64(0);
    c.send('25000000 09000000 28000000' + region, [mem]);
    assert.equal(await c.read(20), '250000000500000008000000' + '0000000000000000');
    assert.equal(server.session?.memory.regions.length, 1);
    // SET_VRING_NUM 0 -> 256, then SET_VRING_ADDR with a descriptor table at uva 0x7f0000200000 (outside)
    c.send('08000000 09000000 08000000 00000000 00010000');
    assert.equal((await c.read(20)).slice(-16), '0000000000000000');
    // index 0, flags 0, desc / used / avail / log: the descriptor table is 1 MiB past the region's start
    const addr = '00000000 00000000' + u64(0x7f00_0020_0000) + u64(0x7f00_0000_2000) + u64(0x7f00_0000_1000) + u64(0);
    c.send('09000000 09000000 28000000' + addr);
    assert.equal((await c.read(20)).slice(-16), '0000000000000000', 'addresses are only checked when the ring starts');
    c.send('0c000000 09000000 08000000 0000000000000000', [kick]); // SET_VRING_KICK q0
    assert.equal((await c.read(20)).slice(-16), '0000000000000000');
    c.send('12000000 09000000 08000000 00000000 01000000'); // SET_VRING_ENABLE q0 -> the ring cannot start
    assert.equal((await c.read(20)).slice(-16), '0100000000000000');
    // REM_MEM_REG of a region that does not exist, then of the real one
    c.send('26000000 09000000 28000000' + u64(0) + u64(0) + u64(0x200000) + u64(0x7f00_0000_0000) + u64(0));
    assert.equal((await c.read(20)).slice(-16), '0100000000000000');
    c.send('26000000 09000000 28000000' + region);
    assert.equal((await c.read(20)).slice(-16), '0000000000000000');
    assert.equal(server.session?.memory.regions.length, 0);
  } finally {
    native.close(mem);
    native.close(kick);
    c.close();
  }
  await server.idle();
});

test('a frontend that disconnects mid-message is dropped cleanly', async () => {
  const c = new RawClient();
  const mem = native.memfdCreate('guest', 4096);
  c.send('05000000 01000000 28000000 01000000', [mem]); // SET_MEM_TABLE header and 4 bytes of 40, with its fd
  native.close(mem);
  await sleep(20);
  c.close();
  await server.idle();
});
