// Dirty-page logging for live migration (VHOST_F_LOG_ALL, LOG_SHMFD), with the TypeScript frontend playing QEMU's
// migration: SET_LOG_BASE, SET_FEATURES | LOG_ALL, SET_VRING_ADDR | VHOST_VRING_F_LOG, the bitmap taken and cleared,
// GET_VRING_BASE, and a second backend started from the saved ring state.
// Bit-exact: every page the device wrote is logged, and no other page than those and the ring's own, for blk and net,
// split and packed rings, buffers that cross a region boundary, a hot-plugged region; a new log during load loses no
// bit and the old log gets none after the reply. Hostile: what a frontend may get wrong in SET_LOG_BASE is refused,
// nothing is written outside the log, and the device goes on.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { VhostUserServer } from '../../src/backend/server.js';
import { BlkDevice } from '../../src/devices/blk/blk-device.js';
import { BlkRequestType, BlkStatus } from '../../src/devices/blk/constants.js';
import { NetDevice } from '../../src/devices/net/net-device.js';
import { FrontendErrorCode, GuestRam, MigrationLog, VhostUserFrontend, type FrontendQueue } from '../../src/frontend/index.js';
import * as native from '../../src/native/index.js';
import { FrontendRequest, VirtioFeature, featureBit } from '../../src/protocol/constants.js';
import { logPayload, u64Payload } from '../../src/protocol/payloads.js';
import { copyFromGuest } from '../../src/queue/descriptor-chain.js';
import { descTableSize, PACKED_EVENT_SIZE, usedRingSize } from '../../src/queue/constants.js';
import { testTempDir, type TempDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const PAGE = 4096;
const TIMEOUT = { timeout: 60_000 };
const IMAGE_SIZE = 4 * MiB;
const QUEUE_SIZE = 64;
/** Two adjacent regions (different memfds): [0, 4 MiB) and [4 MiB, 8 MiB); buffers may cross 4 MiB. */
const REGION = 4 * MiB;
const VERSION_1 = featureBit(VirtioFeature.VERSION_1);
const PACKED = featureBit(VirtioFeature.RING_PACKED);
const LOG_ALL = featureBit(VirtioFeature.LOG_ALL);

// ---- helpers ------------------------------------------------------------------------------------------------------

/** Guest bytes [gpa, gpa + len), across regions. */
function read(ram: GuestRam, gpa: number, len: number): Buffer {
  const out = Buffer.alloc(len);
  copyFromGuest(ram, gpa, out, 0, len);
  return out;
}

function pagesOf(gpa: number, len: number): number[] {
  const out: number[] = [];
  for (let p = Math.floor(gpa / PAGE); p <= Math.floor((gpa + len - 1) / PAGE); p++) out.push(p);
  return out;
}

/** The pages the device may write besides buffers: its used ring (split), its descriptor ring and device area (packed). */
function ringPages(q: FrontendQueue): Set<number> {
  const l = q.layout;
  const areas = q.driver.packed
    ? [...pagesOf(l.descAddr, descTableSize(q.size)), ...pagesOf(l.usedAddr, PACKED_EVENT_SIZE)]
    : pagesOf(l.usedAddr, usedRingSize(q.size));
  return new Set(areas);
}

/** The image's initial content: each byte tells its offset. */
function imagePattern(size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = ((i >>> 9) * 7 + i) & 0xff;
  return b;
}

/** Polls `q` until `n` more completions came (tokens appended to `into`), or fails after 5 s. */
async function completions(q: FrontendQueue, n: number, into: number[] = []): Promise<number[]> {
  const want = into.length + n;
  for (let i = 0; i < 1000 && into.length < want; i++) {
    q.driver.pollUsed((token) => into.push(token));
    if (into.length < want) await sleep(5);
  }
  assert.equal(into.length, want, 'every request completes');
  return into;
}

/** Guest RAM of two adjacent regions, a frontend started on `socketPath` (regions described with ADD_MEM_REG). */
async function startFrontend(socketPath: string, features: bigint, queues: number[], queueNumUnit = 1): Promise<{ fe: VhostUserFrontend; ram: GuestRam }> {
  const memory = GuestRam.create(REGION);
  memory.addRegion({ gpa: REGION, size: REGION });
  const fe = await VhostUserFrontend.connect(socketPath);
  await fe.start({ features, memory, memoryMode: 'regions', queueNumUnit, queues: queues.map((index) => ({ index, size: QUEUE_SIZE })) });
  return { fe, ram: memory };
}

interface BlkRig {
  readonly dir: TempDir;
  readonly image: string;
  readonly server: VhostUserServer;
  readonly fe: VhostUserFrontend;
  readonly ram: GuestRam;
  readonly q: FrontendQueue;
  close(): Promise<void>;
}

async function blkRig(t: TestContext, packed: boolean, device: { io?: 'sync' | 'async'; completionDelayMs?: number } = {}): Promise<BlkRig> {
  const dir = await testTempDir(t, 'vu-migrate-');
  const image = dir.join('disk.img');
  writeFileSync(image, imagePattern(IMAGE_SIZE));
  const server = new VhostUserServer({ socketPath: dir.join('blk.sock'), device: new BlkDevice({ backend: { kind: 'file', path: image }, ...device }) });
  server.listen();
  const { fe, ram } = await startFrontend(server.socketPath, VERSION_1 | (packed ? PACKED : 0n), [0]);
  return {
    dir,
    image,
    server,
    fe,
    ram,
    q: fe.queue(0),
    close: async () => {
      fe.close();
      await server.close();
      ram.close();
    },
  };
}

interface NetRig {
  readonly fe: VhostUserFrontend;
  readonly ram: GuestRam;
  readonly rx: FrontendQueue;
  readonly tx: FrontendQueue;
  close(): Promise<void>;
}

/** A net device on a loopback port (a frame sent on tx comes back on rx), driven by a frontend with `features`. */
async function netRig(t: TestContext, features: bigint): Promise<NetRig> {
  const dir = await testTempDir(t, 'vu-migrate-net-');
  const server = new VhostUserServer({ socketPath: dir.join('net.sock'), device: new NetDevice({ port: { kind: 'loopback' } }) });
  server.listen();
  const { fe, ram } = await startFrontend(server.socketPath, features, [0, 1], 2);
  return {
    fe,
    ram,
    rx: fe.queue(0),
    tx: fe.queue(1),
    close: async () => {
      fe.close();
      await server.close();
      ram.close();
    },
  };
}

/** A blk request as raw descriptors: a header page, `data` (readable for OUT, writable for IN), a status byte. */
function addBlk(q: FrontendQueue, ram: GuestRam, token: number, o: { type: number; sector: number; data?: { gpa: number; len: number }; statusGpa: number; headerGpa: number }): void {
  const h = new DataView(ram.bytes(o.headerGpa, 16).buffer, ram.bytes(o.headerGpa, 16).byteOffset, 16);
  h.setUint32(0, o.type, true);
  h.setUint32(4, 0, true);
  h.setBigUint64(8, BigInt(o.sector), true);
  ram.bytes(o.statusGpa, 1)[0] = 0xff;
  const segments = [{ addr: o.headerGpa, len: 16, writable: false }];
  if (o.data !== undefined) segments.push({ addr: o.data.gpa, len: o.data.len, writable: o.type === BlkRequestType.IN });
  segments.push({ addr: o.statusGpa, len: 1, writable: true });
  assert.ok(q.driver.addChain(segments, token) >= 0);
}

/** Starts logging into a fresh log covering `ram` (SET_LOG_BASE, then LOG_ALL and the rings' F_LOG), cleared. */
async function startLogging(fe: VhostUserFrontend, ram: GuestRam): Promise<MigrationLog> {
  const end = Math.max(...ram.regions.map((r) => r.gpa + r.size));
  const log = MigrationLog.create(end);
  await fe.setLogBase(log);
  await fe.setLogging(true);
  log.takeDirty(); // what the rings wrote while logging started
  return log;
}

/** Checks that the dirty pages are exactly `expected` plus pages of `ring` (which must include at least one). */
function assertExactlyLogged(dirty: readonly number[], expected: readonly number[], ring: Set<number>, what: string): void {
  const got = new Set(dirty);
  for (const p of expected) assert.ok(got.has(p), `${what}: page ${p} was written but not logged (logged: ${[...got].join(', ')})`);
  const extra = [...got].filter((p) => !expected.includes(p) && !ring.has(p));
  assert.deepEqual(extra, [], `${what}: pages logged that the device did not write`);
  assert.ok([...got].some((p) => ring.has(p)), `${what}: the used ring's writes are logged`);
}

// ---- bit-exact ------------------------------------------------------------------------------------------------------

for (const packed of [false, true]) {
  const layout = packed ? 'packed' : 'split';

  test(`blk (${layout}): every page the device writes is logged, and no page it does not write`, TIMEOUT, async (t) => {
    const rig = await blkRig(t, packed);
    const { fe, ram, q } = rig;
    try {
      const log = await startLogging(fe, ram);
      const ring = ringPages(q);
      // Pages in region 0 from 3 MiB on, and around the boundary at 4 MiB: away from the rings (allocated first).
      const P = (n: number): number => 3 * MiB + n * PAGE;
      // 1. a 4 KiB read into one page; 2. a 12 KiB read that crosses into region 1; 3. a 4 KiB write (its data page is
      // only read); 4. a read past the end of the disk (fails: only the status byte is written); 5. 512 bytes into
      // the middle of a page. Headers each in a page of their own (read only), statuses too.
      const requests = [
        { type: BlkRequestType.IN, sector: 8, data: { gpa: P(0), len: 4 * KiB }, statusGpa: P(20), headerGpa: P(10) },
        { type: BlkRequestType.IN, sector: 16, data: { gpa: REGION - 4 * KiB, len: 12 * KiB }, statusGpa: P(21) + 100, headerGpa: P(11) },
        { type: BlkRequestType.OUT, sector: 64, data: { gpa: P(2), len: 4 * KiB }, statusGpa: P(22) + 4095, headerGpa: P(12) },
        { type: BlkRequestType.IN, sector: IMAGE_SIZE / 512, data: { gpa: P(3), len: 4 * KiB }, statusGpa: P(23), headerGpa: P(13) },
        { type: BlkRequestType.IN, sector: 3, data: { gpa: P(4) + 1024, len: 512 }, statusGpa: P(24), headerGpa: P(14) },
      ];
      ram.bytes(P(2), 4 * KiB).fill(0x5a);
      requests.forEach((r, i) => addBlk(q, ram, i, r));
      q.publishAndKick();
      await completions(q, requests.length);
      const expected = [
        ...pagesOf(P(0), 4 * KiB),
        ...pagesOf(REGION - 4 * KiB, 12 * KiB),
        ...[20, 21, 22, 23, 24].map((n) => P(n) / PAGE),
        P(4) / PAGE,
      ];
      assertExactlyLogged(log.takeDirty(), expected, ring, 'five requests');
      // The data is what the disk holds, and the statuses are right: the log is about real writes.
      const image = imagePattern(IMAGE_SIZE);
      assert.deepEqual(read(ram, REGION - 4 * KiB, 12 * KiB), image.subarray(16 * 512, 16 * 512 + 12 * KiB));
      assert.deepEqual(
        requests.map((r) => ram.bytes(r.statusGpa, 1)[0]),
        [BlkStatus.OK, BlkStatus.OK, BlkStatus.OK, BlkStatus.IOERR, BlkStatus.OK],
      );

      // Hot plug while logging: QEMU grows the log first (SET_LOG_BASE), then adds the region.
      const bigger = MigrationLog.create(16 * MiB);
      await fe.setLogBase(bigger);
      log.takeDirty(); // QEMU syncs the old log once more after the switch
      const added = ram.addRegion({ gpa: 12 * MiB, size: 4 * MiB });
      await fe.addMemoryRegion(added);
      addBlk(q, ram, 10, { type: BlkRequestType.IN, sector: 0, data: { gpa: 13 * MiB, len: 8 * KiB }, statusGpa: P(25), headerGpa: P(15) });
      q.publishAndKick();
      await completions(q, 1);
      assertExactlyLogged(bigger.takeDirty(), [...pagesOf(13 * MiB, 8 * KiB), P(25) / PAGE], ring, 'a hot-plugged region');
      assert.deepEqual(log.takeDirty(), [], 'nothing goes to the replaced log after SET_LOG_BASE was answered');

      // Logging off: nothing is logged any more.
      await fe.setLogging(false);
      addBlk(q, ram, 11, { type: BlkRequestType.IN, sector: 0, data: { gpa: P(5), len: 4 * KiB }, statusGpa: P(26), headerGpa: P(16) });
      q.publishAndKick();
      await completions(q, 1);
      assert.deepEqual(bigger.takeDirty(), [], 'nothing is logged with LOG_ALL off');
      log.close();
      bigger.close();
    } finally {
      await rig.close();
    }
  });

  test(`net (${layout}): a received frame's pages are logged, the transmitted frame's are not`, TIMEOUT, async (t) => {
    const rig = await netRig(t, VERSION_1 | (packed ? PACKED : 0n));
    const { fe, ram, rx, tx } = rig;
    try {
      const log = await startLogging(fe, ram);
      const ring = new Set([...ringPages(rx), ...ringPages(tx)]);
      const HDR = 12;
      const send = async (frameLen: number, rxGpa: number, txGpa: number): Promise<void> => {
        assert.ok(rx.driver.addChain([{ addr: rxGpa, len: 3 * PAGE, writable: true }], 1) >= 0); // 3 pages offered
        rx.publishAndKick();
        const frame = ram.bytes(txGpa, HDR + frameLen);
        frame.fill(0, 0, HDR);
        frame.fill(0xff, HDR, HDR + 6); // broadcast
        for (let i = HDR + 6; i < frame.length; i++) frame[i] = i & 0xff;
        assert.ok(tx.driver.addChain([{ addr: txGpa, len: HDR + frameLen, writable: false }], 2) >= 0);
        tx.publishAndKick();
        await completions(tx, 1);
        await completions(rx, 1);
        assert.deepEqual(read(ram, rxGpa + HDR, frameLen), Buffer.from(frame.subarray(HDR)), 'the frame came back');
      };
      // A 64-byte frame lands in the first page of the three; a 5000-byte one in the first two.
      await send(64, 3 * MiB, 3 * MiB + 10 * PAGE);
      assertExactlyLogged(log.takeDirty(), [3 * MiB / PAGE], ring, 'a small frame');
      await send(5000, REGION - PAGE, 3 * MiB + 12 * PAGE); // across the region boundary
      assertExactlyLogged(log.takeDirty(), [REGION / PAGE - 1, REGION / PAGE], ring, 'a frame across two regions');
      log.close();
    } finally {
      await rig.close();
    }
  });
}

test('net (MRG_RXBUF): a frame over three receive chains logs exactly their written pages', TIMEOUT, async (t) => {
  const rig = await netRig(t, VERSION_1 | featureBit(15 /* MRG_RXBUF */));
  const { fe, ram, rx, tx } = rig;
  try {
    const log = await startLogging(fe, ram);
    const ring = new Set([...ringPages(rx), ...ringPages(tx)]);
    // Three 4 KiB receive chains in pages far apart; a 9000-byte frame (+ 12-byte header) fills two and 820 bytes
    // of the third; a fourth chain stays unused.
    const rxPages = [3 * MiB, 3 * MiB + 8 * PAGE, REGION + 4 * PAGE, 3 * MiB + 16 * PAGE];
    rxPages.forEach((gpa, i) => assert.ok(rx.driver.addChain([{ addr: gpa, len: PAGE, writable: true }], i) >= 0));
    rx.publishAndKick();
    const frame = ram.bytes(3 * MiB + 20 * PAGE, 12 + 9000);
    frame.fill(0, 0, 12);
    frame.fill(0xff, 12, 18);
    for (let i = 18; i < frame.length; i++) frame[i] = (i * 7) & 0xff;
    assert.ok(tx.driver.addChain([{ addr: 3 * MiB + 20 * PAGE, len: frame.length, writable: false }], 9) >= 0);
    tx.publishAndKick();
    await completions(tx, 1);
    await completions(rx, 3);
    assertExactlyLogged(log.takeDirty(), rxPages.slice(0, 3).map((g) => g / PAGE), ring, 'a frame over three chains');
    log.close();
  } finally {
    await rig.close();
  }
});

test('a new log during load (SET_LOG_BASE while requests complete) loses no bit, and the old log gets none after the reply', TIMEOUT, async (t) => {
  const rig = await blkRig(t, false);
  const { fe, ram, q } = rig;
  try {
    let log = await startLogging(fe, ram);
    const dirty = new Set<number>();
    const take = (l: MigrationLog): void => {
      for (const p of l.takeDirty()) dirty.add(p);
    };
    const READS = 1200;
    const pageOf = (i: number): number => 2 * MiB + i * PAGE; // distinct pages in [2 MiB, 6.7 MiB): both regions
    const statusPage = 1 * MiB + 0x100; // shared status page (logged every time), header page read only
    const done: number[] = [];
    let issued = 0;
    const pump = (): void => {
      while (issued < READS && q.driver.inFlight < 16) {
        addBlk(q, ram, issued, { type: BlkRequestType.IN, sector: (issued * 8) % (IMAGE_SIZE / 512), data: { gpa: pageOf(issued), len: PAGE }, statusGpa: statusPage, headerGpa: 1 * MiB + PAGE * (1 + (issued % 16)) });
        issued++;
      }
      q.publishAndKick();
    };
    // Headers: one page each per slot in flight; reuse is fine (read only). Switch logs every 200 completions.
    let switches = 0;
    const retired: MigrationLog[] = [];
    while (done.length < READS) {
      pump();
      q.driver.pollUsed((token) => done.push(token));
      if (done.length >= (switches + 1) * 200 && switches < 5) {
        switches++;
        const next = MigrationLog.create(8 * MiB, switches * PAGE); // each a different size (QEMU's resizes)
        await fe.setLogBase(next);
        take(log); // QEMU's order: switch first, then sync and free the old log
        retired.push(log);
        log = next;
      }
      await sleep(0);
    }
    take(log);
    for (let i = 0; i < READS; i++) assert.ok(dirty.has(pageOf(i) / PAGE), `read ${i} (page ${pageOf(i) / PAGE}) was logged`);
    for (const old of retired) assert.deepEqual(old.takeDirty(), [], 'a replaced log got a bit after SET_LOG_BASE was answered');
    assert.equal(switches, 5);
    for (const l of [...retired, log]) l.close();
  } finally {
    await rig.close();
  }
});

// ---- stop, drain and a second backend ---------------------------------------------------------------------------------

test('GET_VRING_BASE completes, logs and flushes what is in flight before it answers; a second backend resumes from there', TIMEOUT, async (t) => {
  // Async I/O held 300 ms: the four writes are in flight when the migration stops the ring.
  const rig = await blkRig(t, false, { io: 'async', completionDelayMs: 300 });
  const { fe, ram, q, dir, image } = rig;
  const servers: VhostUserServer[] = [];
  try {
    const log = await startLogging(fe, ram);
    const statuses = [0, 1, 2, 3].map((i) => 3 * MiB + i * PAGE);
    for (let i = 0; i < 4; i++) {
      ram.bytes(2 * MiB + i * PAGE, PAGE).fill(0xa0 + i);
      addBlk(q, ram, i, { type: BlkRequestType.OUT, sector: 100 + 8 * i, data: { gpa: 2 * MiB + i * PAGE, len: PAGE }, statusGpa: statuses[i] as number, headerGpa: 1 * MiB + i * PAGE });
    }
    q.publishAndKick();
    await sleep(50); // taken by the backend, not completed
    // QEMU 7.2's stop: SET_STATUS 0 first, then GET_VRING_BASE; the ring's indices survive the status.
    await fe.setStatus(0);
    const bases = await fe.suspend();
    assert.deepEqual([...bases], [[0, 4]], 'GET_VRING_BASE answers with the next avail index after the four');
    const done = await completions(q, 4);
    assert.deepEqual(done.sort(), [0, 1, 2, 3], 'every request completed before the reply');
    assert.deepEqual(statuses.map((s) => ram.bytes(s, 1)[0]), [0, 0, 0, 0]);
    const dirty = log.takeDirty();
    for (const s of statuses) assert.ok(dirty.includes(s / PAGE), 'each status byte was logged before the reply');
    const disk = readFileSync(image);
    for (let i = 0; i < 4; i++) assert.ok(disk.subarray((100 + 8 * i) * 512, (100 + 8 * i) * 512 + PAGE).every((b) => b === 0xa0 + i), `write ${i} is on disk`);

    // The destination: another backend on the same image, a frontend on the same guest RAM, the ring adopted at the
    // base the source answered (as QEMU's destination sends it in SET_VRING_BASE).
    const dst = new VhostUserServer({ socketPath: dir.join('dst.sock'), device: new BlkDevice({ backend: { kind: 'file', path: image } }) });
    servers.push(dst);
    dst.listen();
    const fe2 = await VhostUserFrontend.connect(dst.socketPath);
    try {
      await fe2.start({ features: VERSION_1, memory: ram, memoryMode: 'regions', queues: [{ index: 0, size: QUEUE_SIZE, adopt: q, base: bases.get(0) as number }] });
      const q2 = fe2.queue(0);
      addBlk(q2, ram, 9, { type: BlkRequestType.IN, sector: 100, data: { gpa: 2 * MiB + 8 * PAGE, len: 4 * PAGE }, statusGpa: 3 * MiB + 9 * PAGE, headerGpa: 1 * MiB + 9 * PAGE });
      q2.publishAndKick();
      await completions(q2, 1);
      const back = ram.bytes(2 * MiB + 8 * PAGE, 4 * PAGE);
      for (let i = 0; i < 4; i++) assert.ok(back.subarray(i * PAGE, (i + 1) * PAGE).every((b) => b === 0xa0 + i), `the destination reads write ${i}`);
    } finally {
      fe2.close();
    }
    log.close();
  } finally {
    await rig.close();
    for (const s of servers) await s.close();
  }
});

// ---- hostile -------------------------------------------------------------------------------------------------------

test('hostile SET_LOG_BASE and LOG_ALL are refused; nothing is written outside the log; the device goes on', TIMEOUT, async (t) => {
  const rig = await blkRig(t, false);
  const { fe, ram, q, dir } = rig;
  const fds: number[] = [];
  try {
    const refuse = async (what: string, payload: Uint8Array, withFds: number[]): Promise<void> => {
      const reply = await fe.request(FrontendRequest.SET_LOG_BASE, payload, withFds);
      assert.equal(u64Payload.decode(reply.payload), 1n, `${what}: refused`);
    };
    const memfd = (size: number, seal = true): number => {
      const fd = native.memfdCreate('log', size);
      fds.push(fd);
      if (seal) native.addSeals(fd, native.F_SEAL_SHRINK | native.F_SEAL_GROW);
      return fd;
    };
    const log = (size: bigint, offset = 0n): Uint8Array => logPayload.encode({ mmapSize: size, mmapOffset: offset });
    // The memory table is 8 MiB: a log covers it from 256 bytes on (32 KiB per byte).
    await refuse('offset + size overflows (CVE-2020-10722)', log(16n, 2n ** 64n - 8n), [memfd(PAGE)]);
    await refuse('size 0', log(0n), [memfd(PAGE)]);
    await refuse('a log smaller than the memory table', log(8n), [memfd(PAGE)]);
    await refuse('past the end of its file', log(256n, BigInt(PAGE)), [memfd(PAGE)]);
    const file = dir.join('log.bin');
    writeFileSync(file, Buffer.alloc(PAGE));
    const { openSync } = await import('node:fs');
    const regular = openSync(file, 'r+');
    fds.push(regular);
    await refuse('a regular file', log(256n), [regular]);
    const efd = native.eventfdCreate(0, true);
    fds.push(efd);
    await refuse('an eventfd', log(256n), [efd]);
    await refuse('a truncatable memfd (sealing closed)', log(256n), [(() => {
      const fd = memfd(PAGE, false);
      native.addSeals(fd, native.F_SEAL_SEAL);
      return fd;
    })()]);
    await refuse('a short payload', new Uint8Array(8), [memfd(PAGE)]);
    // LOG_ALL while the ring runs and no log was accepted: refused, the features stay.
    await assert.rejects(fe.requestWithAck(FrontendRequest.SET_FEATURES, u64Payload.encode(fe.features | LOG_ALL)), { code: FrontendErrorCode.NACK });

    // A log at an offset inside a bigger memfd: the backend writes its bits there and nowhere else in the file.
    const fd = memfd(3 * PAGE);
    const before = new Uint8Array(native.mapShared(fd, 0, 3 * PAGE));
    before.fill(0);
    const reply = await fe.request(FrontendRequest.SET_LOG_BASE, log(BigInt(PAGE), BigInt(PAGE)), [fd]);
    assert.equal(u64Payload.decode(reply.payload), 0n, 'a good log is accepted');
    await fe.setLogging(true);
    addBlk(q, ram, 1, { type: BlkRequestType.IN, sector: 0, data: { gpa: 3 * MiB, len: PAGE }, statusGpa: 3 * MiB + PAGE, headerGpa: 3 * MiB + 2 * PAGE });
    q.publishAndKick();
    await completions(q, 1);
    assert.ok(before.subarray(0, PAGE).every((b) => b === 0) && before.subarray(2 * PAGE).every((b) => b === 0), 'nothing outside the log');
    const page = (3 * MiB) / PAGE;
    assert.ok((before[PAGE + Math.floor(page / 8)] as number) & (1 << page % 8), 'the read page is logged at the offset');
    native.revoke(before.buffer);
    assert.equal((await fe.getStatus()) & 0x40, 0, 'the device does not need a reset');
    // Without its fd the message cannot be framed (the fd count is part of the framing): the connection is dropped,
    // and the backend serves the next one (one frontend at a time: this one leaves first).
    fe.close();
    const other = await VhostUserFrontend.connect(rig.server.socketPath, { connectTimeoutMs: 5000 });
    other.send(FrontendRequest.SET_LOG_BASE, log(256n));
    assert.equal((await other.closed)?.code, FrontendErrorCode.DISCONNECTED);
    const again = await VhostUserFrontend.connect(rig.server.socketPath, { connectTimeoutMs: 5000 });
    again.close();
  } finally {
    for (const fd of fds) native.close(fd);
    await rig.close();
  }
});

test('LOG_ALL before a log (a device started during a migration): the ring waits for SET_LOG_BASE, then runs and logs', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-migrate-late-');
  const image = dir.join('disk.img');
  writeFileSync(image, imagePattern(IMAGE_SIZE));
  const server = new VhostUserServer({ socketPath: dir.join('blk.sock'), device: new BlkDevice({ backend: { kind: 'file', path: image } }) });
  server.listen();
  // QEMU's vhost_dev_start with logging on: SET_FEATURES with LOG_ALL, rings with F_LOG, SET_LOG_BASE after them.
  const { fe, ram } = await startFrontend(server.socketPath, VERSION_1 | LOG_ALL, [0]);
  try {
    const q = fe.queue(0);
    addBlk(q, ram, 1, { type: BlkRequestType.IN, sector: 0, data: { gpa: 3 * MiB, len: PAGE }, statusGpa: 3 * MiB + PAGE, headerGpa: 3 * MiB + 2 * PAGE });
    q.publishAndKick();
    await sleep(200);
    assert.equal(q.driver.pollUsed(() => undefined), 0, 'no request runs before there is a log');
    const log = MigrationLog.create(2 * REGION);
    await fe.setLogBase(log);
    await completions(q, 1);
    assert.ok(log.takeDirty().includes((3 * MiB) / PAGE), 'the request ran once the log came, and was logged');
    log.close();
  } finally {
    fe.close();
    await server.close();
    ram.close();
  }
});

test('SEND_RARP (net): a RARP frame from the MAC goes out on the port; RARP and GUEST_ANNOUNCE are offered', TIMEOUT, async (t) => {
  const rig = await netRig(t, VERSION_1);
  const { fe, ram, rx } = rig;
  try {
    assert.ok(fe.backendFeatures & (1n << 21n), 'VIRTIO_NET_F_GUEST_ANNOUNCE is offered');
    assert.ok(fe.backendProtocolFeatures & (1n << 2n), 'VHOST_USER_PROTOCOL_F_RARP is offered');
    assert.ok(rx.driver.addChain([{ addr: 3 * MiB, len: 2 * PAGE, writable: true }], 1) >= 0);
    rx.publishAndKick();
    // The payload is a u64 whose first 6 bytes are the MAC (QEMU's vhost_user_migration_done).
    const mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
    const payload = new Uint8Array(8);
    payload.set(mac);
    await fe.requestWithAck(FrontendRequest.SEND_RARP, payload);
    await completions(rx, 1);
    const frame = read(ram, 3 * MiB + 12, 60); // after the 12-byte virtio-net header (loopback: it comes back)
    // dst ff:ff:ff:ff:ff:ff, src MAC, type 0x8035 (RARP); htype 1, ptype 0x0800, hlen 6, plen 4, op 3 (reverse
    // request), sender MAC, sender IP 0, target MAC, target IP 0; zero padding to 60 bytes.
    const hex = (b: number[]): string => Buffer.from(b).toString('hex');
    assert.equal(
      frame.toString('hex'),
      'ffffffffffff' + hex(mac) + '8035' + '0001' + '0800' + '06' + '04' + '0003' + hex(mac) + '00000000' + hex(mac) + '00000000' + '00'.repeat(18),
    );
  } finally {
    await rig.close();
  }
});
