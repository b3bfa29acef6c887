// INFLIGHT_SHMFD with the TypeScript frontend playing QEMU's vhost-user-blk: GET_INFLIGHT_FD, SET_INFLIGHT_FD, the
// backend SIGKILLed with requests in flight (all of them, or every other one with the rest completed out of order,
// or inside a batch publication), a new backend handed the same region and the same rings: every request completes
// exactly once, with its data on disk, on split and packed rings; without the region the same crash loses requests.
// A VM reset's fresh region drops what the old one held. And what a hostile frontend sends in these messages is
// refused (NACK), with the connection and the device going on, nothing leaked.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { VhostUserServer } from '../../src/backend/server.js';
import { BlkDevice } from '../../src/devices/blk/blk-device.js';
import { BlkRequestType } from '../../src/devices/blk/constants.js';
import { FrontendErrorCode, GuestRam, VhostUserFrontend, type FrontendQueue } from '../../src/frontend/index.js';
import * as native from '../../src/native/index.js';
import { FrontendRequest, VirtioFeature, featureBit } from '../../src/protocol/constants.js';
import { inflightPayload } from '../../src/protocol/payloads.js';
import { jsonLogLines } from '../helpers/backend.js';
import { assertBaseline, settledBaseline } from '../helpers/fds.js';
import { hasExited, spawnOwned, testTempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const TIMEOUT = { timeout: 60_000 };
const FEATURES = featureBit(VirtioFeature.VERSION_1);
const REQUESTS = 8;

interface Backend {
  kill(): Promise<void>;
  alive(): boolean;
  /** Resolves when the process has exited (by itself or killed). */
  readonly exited: Promise<void>;
  logs(): Record<string, unknown>[];
}

/**
 * Our blk backend in a child process (test/helpers/delayed-blk-backend.ts): `delays` the completion delays in ms,
 * taken in turn ('5000,0': every other request held, out of order), or 'sync' for I/O in the queue worker.
 */
async function spawnBackend(socketPath: string, image: string, delays: string, env: Record<string, string> = {}): Promise<Backend> {
  const script = join(new URL('../helpers/', import.meta.url).pathname, 'delayed-blk-backend.js');
  const args = delays === 'sync' ? [socketPath, image, '0', 'sync'] : [socketPath, image, delays];
  const child = spawnOwned(process.execPath, [script, ...args], { env: { ...process.env, ...env } });
  let text = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (c: string) => (text += c));
  const logs = (): Record<string, unknown>[] => jsonLogLines(text);
  for (let i = 0; i < 300 && !logs().some((l) => l.msg === 'listening'); i++) await sleep(20);
  if (!existsSync(socketPath)) throw new Error(`backend did not start: ${text}`);
  const exited = new Promise<void>((resolve) => (hasExited(child) ? resolve() : child.once('exit', () => resolve())));
  return {
    kill: async () => {
      if (!hasExited(child)) child.kill('SIGKILL');
      await exited;
    },
    exited,
    alive: () => !hasExited(child),
    logs,
  };
}

/** A 4 KiB write of `fill` to sector `sector` as raw descriptors (header, data, status) in `ram`. */
function addWrite(q: FrontendQueue, ram: GuestRam, token: number, sector: number, fill: number): number {
  const base = ram.alloc(8192, { align: 4096 });
  const header = new DataView(ram.bytes(base, 16).buffer, ram.bytes(base, 16).byteOffset, 16);
  header.setUint32(0, BlkRequestType.OUT, true);
  header.setUint32(4, 0, true);
  header.setBigUint64(8, BigInt(sector), true);
  ram.bytes(base + 4096, 4096).fill(fill);
  ram.bytes(base + 16, 1)[0] = 0xff; // the status byte, overwritten by the device
  const head = q.driver.addChain(
    [
      { addr: base, len: 16, writable: false },
      { addr: base + 4096, len: 4096, writable: false },
      { addr: base + 16, len: 1, writable: true },
    ],
    token,
  );
  assert.ok(head >= 0);
  return base + 16;
}

interface RestartScenario {
  readonly packed: boolean;
  /** The first backend's completion delays (see spawnBackend). */
  readonly delays: string;
  /** With an inflight region (QEMU's vhost-user-blk), or without (every frontend that does not ask for one). */
  readonly inflight: boolean;
  /** The first backend kills itself (VHOST_USER_TEST_KILL) instead of being killed after 500 ms. */
  readonly killHook?: string;
  /** Changes the region (queue 0's part, as bytes) between the crash and the restart: a hostile frontend. */
  readonly corrupt?: (region: Uint8Array) => void;
}

interface RestartOutcome {
  /** Tokens completed by the first backend, then by the second (once each, in completion order). */
  readonly before: number[];
  readonly after: number[];
  /** Completions of the second backend for requests not in flight (VIRTIO_USED_ID_INVALID at the driver). */
  readonly duplicates: number;
  /** The second backend's 'requests in flight before the restart are taken again' log line, if any. */
  readonly recovered: Record<string, unknown> | undefined;
  readonly statusOk: boolean[];
  readonly onDisk: boolean[];
  /** The second backend: its log lines, whether it still runs, its device status at the end. */
  readonly logs: Record<string, unknown>[];
  readonly alive: boolean;
  readonly deviceStatus: number;
}

/**
 * The TypeScript frontend plays QEMU's vhost-user-blk: REQUESTS writes, the first backend dies with some of them in
 * flight, a second backend gets the same rings (split: SET_VRING_BASE = used.idx, as QEMU restores it; packed: the
 * stale 0x8000, QEMU cannot restore a packed ring) and, with `inflight`, the same region.
 */
async function crashAndRestart(t: TestContext, o: RestartScenario): Promise<RestartOutcome> {
  const dir = await testTempDir(t, 'vu-inflight-');
  const image = dir.join('disk.img');
  writeFileSync(image, Buffer.alloc(4 * MiB));
  const features = FEATURES | (o.packed ? featureBit(VirtioFeature.RING_PACKED) : 0n);
  const ram = GuestRam.create(16 * MiB);
  const backends: Backend[] = [];
  const frontends: VhostUserFrontend[] = [];
  let regionFd = -1;
  try {
    const first = await spawnBackend(dir.join('a.sock'), image, o.delays, o.killHook !== undefined ? { VHOST_USER_TEST_KILL: o.killHook } : {});
    backends.push(first);
    const fe1 = await VhostUserFrontend.connect(dir.join('a.sock'));
    frontends.push(fe1);
    let region: Awaited<ReturnType<VhostUserFrontend['getInflightFd']>> | undefined;
    if (o.inflight) {
      await fe1.setFeatures(features); // the region's layout follows the features (QEMU: vhost_dev_prepare_inflight)
      region = await fe1.getInflightFd(1, 128);
      regionFd = region.fd;
      assert.ok(region.mmapSize > 0n && regionFd >= 0, 'the backend made a region');
      await fe1.setInflightFd(region);
    }
    await fe1.start({ features, memory: ram, queues: [{ index: 0, size: 32 }] });
    const q1 = fe1.queue(0);
    const status: number[] = [];
    for (let i = 0; i < REQUESTS; i++) status.push(addWrite(q1, ram, i, 8 * i, 0x10 + i));
    q1.publishAndKick();
    const before: number[] = [];
    if (o.killHook !== undefined) await first.exited;
    else await sleep(500);
    q1.driver.pollUsed((token) => before.push(token));
    await first.kill();
    assert.equal((await fe1.closed)?.code, FrontendErrorCode.DISCONNECTED);
    if (o.corrupt !== undefined && region !== undefined) {
      const mapping = native.mapShared(region.fd, 0, Number(region.mmapSize));
      o.corrupt(new Uint8Array(mapping));
      native.revoke(mapping);
    }

    const second = await spawnBackend(dir.join('b.sock'), image, '0');
    backends.push(second);
    const fe2 = await VhostUserFrontend.connect(dir.join('b.sock'));
    frontends.push(fe2);
    if (region !== undefined) {
      await fe2.setFeatures(features);
      await fe2.setInflightFd(region);
    }
    await fe2.start({ features, memory: ram, queues: [{ index: 0, size: 32, adopt: q1 }] });
    const q2 = fe2.queue(0);
    const after: number[] = [];
    let duplicates = 0;
    // Until every request has completed, or 1.5 s (a lost request never does).
    for (let i = 0; i < 150 && before.length + after.length < REQUESTS; i++) {
      try {
        q2.driver.pollUsed((token) => after.push(token));
      } catch (err) {
        assert.equal((err as { code?: string }).code, 'VIRTIO_USED_ID_INVALID', String(err));
        duplicates++;
      }
      await sleep(10);
    }
    await sleep(100);
    try {
      q2.driver.pollUsed((token) => after.push(token));
    } catch {
      duplicates++;
    }
    const disk = readFileSync(image);
    const deviceStatus = await fe2.getStatus();
    return {
      before,
      after,
      duplicates,
      recovered: second.logs().find((l) => l.msg === 'inflight region: requests in flight before the restart are taken again'),
      statusOk: status.map((s) => ram.bytes(s, 1)[0] === 0),
      onDisk: [...Array(REQUESTS).keys()].map((i) => disk.subarray(8 * i * 512, 8 * i * 512 + 4096).every((b) => b === 0x10 + i)),
      logs: second.logs(),
      alive: second.alive(),
      deviceStatus,
    };
  } finally {
    for (const f of frontends) f.close();
    for (const b of backends) await b.kill();
    if (regionFd >= 0) native.close(regionFd);
    ram.close();
  }
}

const ALL = [...Array(REQUESTS).keys()];
const EVEN = ALL.filter((i) => i % 2 === 0);
const ODD = ALL.filter((i) => i % 2 === 1);
const sorted = (a: readonly number[]): number[] => [...a].sort((x, y) => x - y);

/** Every request completed exactly once, with its status and its data on disk. */
function assertExactlyOnce(r: RestartOutcome): void {
  assert.deepEqual(sorted([...r.before, ...r.after]), ALL, `each request completed once (before ${r.before.join()}, after ${r.after.join()})`);
  assert.equal(r.duplicates, 0, 'and only once');
  assert.ok(r.statusOk.every(Boolean), 'status OK');
  assert.ok(r.onDisk.every(Boolean), 'every write is on disk');
}

for (const packed of [false, true]) {
  const ring = packed ? 'packed' : 'split';

  test(`${ring}: SIGKILL with every request in flight: the restarted backend takes them again from the inflight region, each completes once`, TIMEOUT, async (t) => {
    const r = await crashAndRestart(t, { packed, delays: '5000', inflight: true });
    assert.deepEqual(r.before, [], 'nothing completed before the kill');
    assertExactlyOnce(r);
    assert.equal(r.recovered?.resubmitted, REQUESTS, 'the requests came from the inflight region, not from the avail ring');
  });

  test(`${ring}: out-of-order completion (every other request held), SIGKILL: with the region the held ones complete once, nothing twice`, TIMEOUT, async (t) => {
    const r = await crashAndRestart(t, { packed, delays: '5000,0', inflight: true });
    assert.deepEqual(sorted(r.before), ODD, 'the first backend completed the odd requests, out of order');
    assertExactlyOnce(r);
    assert.deepEqual(sorted(r.after), EVEN);
    assert.equal(r.recovered?.resubmitted, EVEN.length);
  });

  test(`${ring}: the same without an inflight region loses the held requests${packed ? '' : ' and completes others twice'} (what the region buys)`, TIMEOUT, async (t) => {
    const r = await crashAndRestart(t, { packed, delays: '5000,0', inflight: false });
    assert.deepEqual(sorted(r.before), ODD);
    const lost = EVEN.filter((i) => !r.after.includes(i));
    assert.ok(lost.length > 0, `held requests never complete (after: ${r.after.join()})`);
    // Split: QEMU resumes at used.idx = 4, so avail entries 4..7 are taken again: 0 and 2 are lost, 5 and 7
    // (completed before) complete a second time, which the driver refuses (and stops reading the used ring there).
    // Packed: the ring holds used descriptors where QEMU's stale base points, so nothing is taken again at all.
    if (packed) assert.deepEqual(r.after, [], 'nothing resumes');
    else {
      assert.ok(lost.includes(0) && lost.includes(2), `0 and 2 are lost (lost: ${lost.join()})`);
      assert.ok(r.duplicates > 0, 'completions for requests that were not in flight');
    }
  });

  test(`${ring}: killed inside a batch publication, before the used index store: the batch is taken again, each completes once`, TIMEOUT, async (t) => {
    const r = await crashAndRestart(t, { packed, delays: 'sync', inflight: true, killHook: `before-publish:${REQUESTS}` });
    assert.deepEqual(r.before, [], 'the driver saw none of the batch');
    assertExactlyOnce(r);
    assert.equal(r.recovered?.resubmitted, REQUESTS);
  });

  test(`${ring}: killed right after the used index store, before the region's commit: the batch is not redone`, TIMEOUT, async (t) => {
    const r = await crashAndRestart(t, { packed, delays: 'sync', inflight: true, killHook: `after-publish:${REQUESTS}` });
    assertExactlyOnce(r);
    assert.deepEqual(r.after, [], 'nothing completed a second time');
    assert.equal(r.recovered?.resubmitted, 0);
    assert.ok((r.recovered?.repaired as number) > 0, 'the half-committed batch was repaired');
  });
}

/** Entries of queue 0's region (queue_size 128) marked in flight, oldest first: [entry, counter]. */
function markedEntries(region: Uint8Array, packed: boolean): [number, bigint][] {
  const base = packed ? 32 : 16; // the header
  const stride = packed ? 32 : 16; // a descriptor state
  const view = new DataView(region.buffer, region.byteOffset, region.byteLength);
  const found: [number, bigint][] = [];
  for (let e = 0; e < 128; e++) {
    if (region[base + stride * e] === 1) found.push([e, view.getBigUint64(base + stride * e + 8, true)]);
  }
  return found.sort((a, b) => (a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0));
}

test('split: a region corrupted after the crash (an index past the ring, a repeated counter, a bad flag): ignored per entry, nothing runs twice, the queue stops (NEEDS_RESET)', TIMEOUT, async (t) => {
  const r = await crashAndRestart(t, {
    packed: false,
    delays: '5000',
    inflight: true,
    corrupt: (region) => {
      const view = new DataView(region.buffer, region.byteOffset, region.byteLength);
      const marked = markedEntries(region, false);
      assert.equal(marked.length, REQUESTS);
      const [, c0] = marked[0] as [number, bigint];
      const [h1] = marked[1] as [number, bigint];
      const [h2] = marked[2] as [number, bigint];
      view.setBigUint64(16 + 16 * h1 + 8, c0, true); // request 1 repeats request 0's counter
      region[16 + 16 * h2] = 2; // request 2's flag is neither 0 nor 1
      region[16 + 16 * 100] = 1; // head 100 of a ring of 32
      view.setBigUint64(16 + 16 * 100 + 8, 7n, true);
    },
  });
  assert.ok(r.alive, 'the backend runs on');
  const anomalies = r.recovered?.anomalies as Record<string, number>;
  assert.deepEqual(Object.keys(anomalies).sort(), ['bad-inflight-value', 'duplicate-counter', 'index-out-of-range']);
  assert.equal(r.recovered?.resubmitted, REQUESTS - 2, 'the bad entries are not taken again');
  // With two real requests dropped, the region's count puts the avail position at used.idx + 6: the ring's next
  // chains are requests 6 and 7 again, whose heads are still in flight. That is refused like any chain made
  // available twice (nothing completes twice): the queue stops and the device needs a reset.
  assert.equal(r.duplicates, 0);
  assert.ok(
    r.logs.some((l) => l.msg === 'queue stopped by an error: device needs reset' && l.code === 'VIRTIO_HEAD_IN_FLIGHT'),
    'a head taken again while in flight is refused',
  );
  assert.equal(r.deviceStatus & 0x40, 0x40, 'NEEDS_RESET');
});

test('packed: a saved descriptor corrupted after the crash is validated like any chain: the queue stops (NEEDS_RESET), the backend runs on', TIMEOUT, async (t) => {
  const r = await crashAndRestart(t, {
    packed: true,
    delays: '5000',
    inflight: true,
    corrupt: (region) => {
      const view = new DataView(region.buffer, region.byteOffset, region.byteLength);
      const [e0] = markedEntries(region, true)[0] as [number, bigint];
      view.setBigUint64(32 + 32 * e0 + 24, 1n << 60n, true); // request 0's header buffer far past 2^53
    },
  });
  assert.ok(r.alive, 'the backend runs on');
  assert.deepEqual(r.after, [], 'nothing completes on the stopped queue');
  assert.ok(
    r.logs.some((l) => l.msg === 'queue stopped by an error: device needs reset' && l.code === 'VIRTIO_DESC_ADDRESS_INVALID'),
    'the restored chain failed validation',
  );
  assert.equal(r.deviceStatus & 0x40, 0x40, 'NEEDS_RESET');
});

test('VM reset after a crash: a fresh GET_INFLIGHT_FD replaces the region handed back, nothing stale is taken again', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-inflight-');
  const image = dir.join('disk.img');
  writeFileSync(image, Buffer.alloc(4 * MiB));
  const ram = GuestRam.create(16 * MiB);
  const backends: Backend[] = [];
  const frontends: VhostUserFrontend[] = [];
  const fds: number[] = [];
  try {
    const first = await spawnBackend(dir.join('a.sock'), image, '5000');
    backends.push(first);
    const fe1 = await VhostUserFrontend.connect(dir.join('a.sock'));
    frontends.push(fe1);
    const old = await fe1.getInflightFd(1, 128);
    fds.push(old.fd);
    await fe1.setInflightFd(old);
    await fe1.start({ features: FEATURES, memory: ram, queues: [{ index: 0, size: 32 }] });
    for (let i = 0; i < REQUESTS; i++) addWrite(fe1.queue(0), ram, i, 8 * i, 0x10 + i);
    fe1.queue(0).publishAndKick();
    await sleep(500);
    await first.kill();

    // The backend comes back; QEMU hands the old region back, then the VM resets: a fresh region and fresh rings.
    const second = await spawnBackend(dir.join('b.sock'), image, '0');
    backends.push(second);
    const fe2 = await VhostUserFrontend.connect(dir.join('b.sock'));
    frontends.push(fe2);
    await fe2.setInflightFd(old);
    const fresh = await fe2.getInflightFd(1, 128);
    fds.push(fresh.fd);
    await fe2.setInflightFd(fresh);
    await fe2.start({ features: FEATURES, memory: ram, queues: [{ index: 0, size: 32 }] });
    const q = fe2.queue(0);
    const status = addWrite(q, ram, 99, 800, 0x77);
    q.publishAndKick();
    const done: number[] = [];
    for (let i = 0; i < 100 && done.length === 0; i++) {
      q.driver.pollUsed((token) => done.push(token));
      await sleep(10);
    }
    await sleep(100);
    q.driver.pollUsed((token) => done.push(token));
    assert.deepEqual(done, [99], 'the new request completes, nothing of before the reset');
    assert.equal(ram.bytes(status, 1)[0], 0);
    assert.equal(second.logs().find((l) => l.msg === 'inflight region: requests in flight before the restart are taken again'), undefined);
  } finally {
    for (const f of frontends) f.close();
    for (const b of backends) await b.kill();
    for (const fd of fds) native.close(fd);
    ram.close();
  }
});

test('hostile GET/SET_INFLIGHT_FD: each bad field is refused, the connection and the device go on, nothing leaks', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-inflight-');
  const baseline = await settledBaseline();
  await (async () => {
    const image = dir.join('disk.img');
    writeFileSync(image, Buffer.alloc(MiB));
    const server = new VhostUserServer({ socketPath: dir.join('s.sock'), device: new BlkDevice({ backend: { kind: 'file', path: image }, queues: 2 }) });
    server.listen();
    // GET_INFLIGHT_FD answers with its own payload: a refusal drops the connection (a NACK would be read as it).
    for (const [numQueues, queueSize] of [[0, 128], [3, 128], [1, 0], [1, 40000]] as const) {
      const f = await VhostUserFrontend.connect(server.socketPath);
      await assert.rejects(f.getInflightFd(numQueues, queueSize), `num_queues ${numQueues}, queue_size ${queueSize}`);
      f.close();
      await server.idle();
    }
    const fe = await VhostUserFrontend.connect(server.socketPath);
    try {
      const nack = { code: FrontendErrorCode.NACK };
      // Repeated GET: each replaces the last, no fd or mapping left behind (CVE-2020-10726, CVE-2022-0669).
      const regions = [];
      for (let i = 0; i < 5; i++) regions.push(await fe.getInflightFd(2, 64));
      const good = regions[4] as (typeof regions)[number];
      for (const r of regions.slice(0, 4)) native.close(r.fd);
      const set = (fields: Partial<{ mmapSize: bigint; mmapOffset: bigint; numQueues: number; queueSize: number }>, fds: number[]): Promise<void> =>
        fe.requestWithAck(
          FrontendRequest.SET_INFLIGHT_FD,
          inflightPayload.encode({ mmapSize: good.mmapSize, mmapOffset: 0n, numQueues: 2, queueSize: 64, ...fields }),
          fds,
        );
      await assert.rejects(set({ numQueues: 0 }, [good.fd]), nack);
      await assert.rejects(set({ numQueues: 3 }, [good.fd]), nack, 'more queues than the device has');
      await assert.rejects(set({ queueSize: 40000 }, [good.fd]), nack);
      await assert.rejects(set({ mmapSize: good.mmapSize - 64n }, [good.fd]), nack, 'region smaller than its queues');
      await assert.rejects(set({ mmapOffset: 100n }, [good.fd]), nack, 'offset not page-aligned');
      await assert.rejects(set({ mmapOffset: 4096n }, [good.fd]), nack, 'region past the end of the file');
      const efd = native.eventfdCreate(0, false);
      await assert.rejects(set({}, [efd]), nack, 'an eventfd is no region');
      native.close(efd);
      await set({}, [good.fd]); // the good one is taken
      assert.equal((await fe.getStatus()) & 0x40, 0, 'the device is not broken');
      await assert.rejects(set({}, []), { code: FrontendErrorCode.DISCONNECTED }, 'no fd: the message is malformed');
      native.close(good.fd);
    } finally {
      fe.close();
      await server.close();
    }
  })();
  await assertBaseline(baseline);
});
