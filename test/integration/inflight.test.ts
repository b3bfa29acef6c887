// INFLIGHT_SHMFD with the TypeScript frontend playing QEMU's vhost-user-blk: GET_INFLIGHT_FD, SET_INFLIGHT_FD, the
// backend SIGKILLed with requests in flight, a new backend handed the same region and the same rings (SET_VRING_BASE
// = used.idx, as QEMU restores it): every request completes exactly once, with its data on disk. And what a hostile
// frontend sends in these messages is refused (NACK), with the connection and the device going on, nothing leaked.
import { test } from 'node:test';
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

/** Our blk backend in a child process whose requests complete `delayMs` after their I/O. */
async function spawnBackend(socketPath: string, image: string, delayMs: number): Promise<{ kill(): Promise<void>; logs(): Record<string, unknown>[] }> {
  const script = join(new URL('../helpers/', import.meta.url).pathname, 'delayed-blk-backend.js');
  const child = spawnOwned(process.execPath, [script, socketPath, image, String(delayMs)]);
  let text = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (c: string) => (text += c));
  const logs = (): Record<string, unknown>[] => jsonLogLines(text);
  for (let i = 0; i < 300 && !logs().some((l) => l.msg === 'listening'); i++) await sleep(20);
  if (!existsSync(socketPath)) throw new Error(`backend did not start: ${text}`);
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  return {
    kill: async () => {
      if (!hasExited(child)) child.kill('SIGKILL');
      await exited;
    },
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

test('SIGKILL with requests in flight: the restarted backend takes them again from the inflight region, each completes once', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-inflight-');
  const image = dir.join('disk.img');
  writeFileSync(image, Buffer.alloc(4 * MiB));
  const ram = GuestRam.create(16 * MiB);
  let first: Awaited<ReturnType<typeof spawnBackend>> | undefined;
  let second: Awaited<ReturnType<typeof spawnBackend>> | undefined;
  let fe1: VhostUserFrontend | undefined;
  let fe2: VhostUserFrontend | undefined;
  let regionFd = -1;
  try {
    // The first backend completes each request 5 s after its I/O: all of them are in flight when it is killed.
    first = await spawnBackend(dir.join('a.sock'), image, 5000);
    fe1 = await VhostUserFrontend.connect(dir.join('a.sock'));
    const region = await fe1.getInflightFd(1, 128);
    regionFd = region.fd;
    assert.ok(region.mmapSize > 0n && regionFd >= 0, 'the backend made a region');
    await fe1.setInflightFd(region);
    await fe1.start({ features: FEATURES, memory: ram, queues: [{ index: 0, size: 32 }] });
    const q1 = fe1.queue(0);
    const status: number[] = [];
    for (let i = 0; i < REQUESTS; i++) status.push(addWrite(q1, ram, i, 8 * i, 0x10 + i));
    q1.publishAndKick();
    await sleep(500);
    assert.equal(q1.driver.pollUsed(() => assert.fail('a request completed before the kill')), 0);
    await first.kill();
    first = undefined;
    assert.equal((await fe1.closed)?.code, FrontendErrorCode.DISCONNECTED);

    // QEMU: a new connection, SET_INFLIGHT_FD with the region it kept, the rings where they are, base = used.idx.
    second = await spawnBackend(dir.join('b.sock'), image, 0);
    fe2 = await VhostUserFrontend.connect(dir.join('b.sock'));
    await fe2.setInflightFd(region);
    await fe2.start({ features: FEATURES, memory: ram, queues: [{ index: 0, size: 32, adopt: q1 }] });
    const q2 = fe2.queue(0);
    const done: number[] = [];
    for (let i = 0; i < 500 && done.length < REQUESTS; i++) {
      q2.driver.pollUsed((token) => done.push(token));
      await sleep(10);
    }
    assert.deepEqual([...done].sort((a, b) => a - b), [...Array(REQUESTS).keys()], 'each request completed once');
    await sleep(100);
    assert.equal(q2.driver.pollUsed(() => undefined), 0, 'and only once');
    for (const s of status) assert.equal(ram.bytes(s, 1)[0], 0, 'status OK');
    const disk = readFileSync(image);
    for (let i = 0; i < REQUESTS; i++) assert.ok(disk.subarray(8 * i * 512, 8 * i * 512 + 4096).every((b) => b === 0x10 + i), `write ${i} is on disk`);
    const recovered = second.logs().find((l) => l.msg === 'inflight region: requests in flight before the restart are taken again');
    assert.equal(recovered?.resubmitted, REQUESTS, 'the requests came from the inflight region, not from the avail ring');
  } finally {
    fe1?.close();
    fe2?.close();
    await first?.kill();
    await second?.kill();
    if (regionFd >= 0) native.close(regionFd);
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
