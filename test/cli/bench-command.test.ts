// `vhost-user bench blk`, the load generator: its histogram and /proc accounting, brief runs against the in-process
// loopback device, against our backend (null device and an image, every access pattern) and against
// qemu-storage-daemon when it is installed, the zero-copy `submitRaw` path of the blk driver, and the CLI itself.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { VhostUserServer } from '../../src/backend/server.js';
import { Histogram, processCpuSeconds, runBlkLoad, type BlkLoadResult } from '../../src/cli/bench-command.js';
import { BlkDevice } from '../../src/devices/blk/blk-device.js';
import { BlkStatus } from '../../src/devices/blk/constants.js';
import { RAW_FAILED } from '../../src/frontend/blk-driver.js';
import { BlkDriver, GuestRam, VhostUserFrontend } from '../../src/frontend/index.js';
import { repoRoot } from '../helpers/guest.js';
import { startQsd } from '../helpers/qsd.js';
import { findBinary } from '../helpers/require-tool.js';
import { testTempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const TIMEOUT = { timeout: 60_000 };

function checkResult(r: BlkLoadResult, what: string): void {
  assert.ok(r.ios > 0, `${what}: no request completed`);
  assert.equal(r.errors, 0, `${what}: error statuses`);
  assert.equal(r.reads + r.writes, r.ios);
  assert.ok(r.iops > 0 && Number.isFinite(r.mbps));
  assert.ok(r.latencyUs.p50 > 0 && r.latencyUs.p50 <= r.latencyUs.p99 && r.latencyUs.p99 <= r.latencyUs.p999, `${what}: latency order`);
  assert.ok(r.latencyUs.p999 <= r.latencyUs.max * 1.02, `${what}: p99.9 within max`);
  assert.ok(r.generatorCpuUsPerIo > 0);
}

test('the histogram keeps values within 1/64 and reports percentiles', () => {
  const h = new Histogram();
  for (let v = 1; v <= 100_000; v++) h.record(v * 10); // 10 ns .. 1 ms, uniform
  assert.equal(h.count, 100_000);
  assert.equal(h.max, 1_000_000);
  for (const [p, want] of [[50, 500_000], [99, 990_000], [99.9, 999_000]] as const) {
    const got = h.percentile(p);
    assert.ok(Math.abs(got - want) / want < 1 / 64, `p${p}: ${got} vs ${want}`);
  }
  for (let v = 0; v < 128; v++) assert.ok(Histogram.bucketValue(Histogram.bucket(v)) === v, `${v} is exact`);
  for (const v of [1000, 65_537, 123_456_789, 0xffff_ffff]) {
    const lo = Histogram.bucketValue(Histogram.bucket(v));
    const hi = Histogram.bucketValue(Histogram.bucket(v) + 1);
    assert.ok(lo <= v && v < hi && (hi - lo) / lo <= 1 / 64, `bucket of ${v}: [${lo}, ${hi})`);
  }
  h.reset();
  assert.ok(Number.isNaN(h.percentile(50)));
});

test('processCpuSeconds reads utime + stime of a process (all threads)', () => {
  const before = processCpuSeconds(process.pid);
  const t = performance.now();
  let x = 0;
  while (performance.now() - t < 150) x += Math.sqrt(x + 1);
  const after = processCpuSeconds(process.pid);
  assert.ok(x > 0 && after - before >= 0.05, `CPU time grew by ${after - before} s`);
  assert.throws(() => processCpuSeconds(2 ** 22 + 1), /ENOENT/);
});

test('loopback: the generator alone, every pattern, one and two queues', TIMEOUT, async () => {
  for (const rw of ['randread', 'randwrite', 'read', 'write', 'mixed'] as const) {
    const r = await runBlkLoad('loopback', { rw, bs: 4096, iodepth: 8, queues: rw === 'mixed' ? 2 : 1, seconds: 0.15, rampSeconds: 0.05 });
    checkResult(r, `loopback ${rw}`);
    if (rw === 'mixed') assert.ok(r.reads > 0 && r.writes > 0, 'mixed does both');
    else assert.equal(rw.includes('read') ? r.writes : r.reads, 0);
  }
});

test('against our backend: null device and image, with its CPU time from /proc', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-bench-');
  const image = dir.join('disk.img');
  writeFileSync(image, Buffer.alloc(8 * MiB));
  for (const backend of [{ kind: 'null' as const, size: 64 * MiB }, { kind: 'file' as const, path: image }]) {
    const server = new VhostUserServer({ socketPath: dir.join(`${backend.kind}.sock`), device: new BlkDevice({ backend, queues: 2 }) });
    server.listen();
    try {
      for (const [rw, bs, iodepth, queues] of [['randread', 4096, 16, 1], ['randwrite', 4096, 4, 2], ['read', 128 * 1024, 4, 1], ['mixed', 8192, 8, 1]] as const) {
        const r = await runBlkLoad(server.socketPath, { rw, bs, iodepth, queues, seconds: 0.2, rampSeconds: 0.05, backendPid: process.pid });
        checkResult(r, `${backend.kind} ${rw}`);
        assert.equal(r.eventIdx, true);
        assert.ok(r.backendCpuUsPerIo !== undefined && r.backendCpuUsPerIo >= 0);
      }
    } finally {
      await server.close();
    }
  }
  // The writes reached the image: zero-copy from the generator's slot buffers, whose pattern is non-zero.
  assert.ok(readFileSync(image).some((b) => b !== 0), 'writes reached the image');
});

test('submitRaw: no copy in or out, callback completion, RAW_FAILED after close', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-bench-');
  const image = dir.join('disk.img');
  writeFileSync(image, Buffer.alloc(MiB));
  const server = new VhostUserServer({ socketPath: dir.join('s.sock'), device: new BlkDevice({ backend: { kind: 'file', path: image } }) });
  server.listen();
  const memory = GuestRam.create(4 * MiB);
  const frontend = await VhostUserFrontend.connect(server.socketPath);
  try {
    const driver = await BlkDriver.start(frontend, { memory, maxRequestBytes: 4096, slotsPerQueue: 2 });
    const done = (write: boolean, sector: number, token: number): Promise<[number, number]> =>
      new Promise((resolve) => driver.submitRaw(0, write, sector, 4096, token, (status, tok) => resolve([status, tok])));
    // Slot 1 is handed out first (a stack of free slots): fill both with a pattern, write it at sector 8.
    for (const s of [0, 1]) driver.slotBuffer(0, s).fill(0x5a, 0, 4096);
    assert.deepEqual(await done(true, 8, 41), [BlkStatus.OK, 41]);
    assert.ok(readFileSync(image).subarray(4096, 8192).every((b) => b === 0x5a), 'the slot buffer was written as is');
    // A raw read leaves its data in the slot buffer; the Promise API copies it out.
    for (const s of [0, 1]) driver.slotBuffer(0, s).fill(0);
    assert.deepEqual(await done(false, 8, 42), [BlkStatus.OK, 42]);
    assert.ok([0, 1].some((s) => driver.slotBuffer(0, s).subarray(0, 4096).every((b) => b === 0x5a)));
    const r = await driver.read(8, 4096);
    assert.ok(r.status === BlkStatus.OK && r.data.every((b) => b === 0x5a));
    assert.throws(() => driver.submitRaw(0, false, 0, 4097, 0, () => undefined), RangeError);
    assert.throws(() => driver.submitRaw(0, false, 0, 8192, 0, () => undefined), RangeError);
    // Three raw requests on two slots: one waits; close() fails all of them with RAW_FAILED, once each.
    const statuses: number[] = [];
    for (let k = 0; k < 3; k++) driver.submitRaw(0, false, k, 4096, k, (status) => statuses.push(status));
    driver.close();
    assert.ok(driver.error !== undefined);
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(statuses.length, 3);
    assert.ok(statuses.every((s) => s === RAW_FAILED || s === BlkStatus.OK));
    assert.ok(statuses.includes(RAW_FAILED));
    let after = 0;
    driver.submitRaw(0, false, 0, 4096, 7, (status, token) => (after = status === RAW_FAILED && token === 7 ? 1 : 2));
    assert.equal(after, 1, 'called synchronously once the driver has failed');
  } finally {
    frontend.close();
    memory.close();
    await server.close();
  }
});

function haveQsd(t: TestContext): boolean {
  if (findBinary('qemu-storage-daemon') !== undefined) return true;
  if (process.env.CI === 'true') throw new Error('CI=true and qemu-storage-daemon is missing: apt-get install -y qemu-system-common');
  t.skip('needs Debian package qemu-system-common');
  return false;
}

test('against qemu-storage-daemon (null-co), with its CPU time', TIMEOUT, async (t) => {
  if (!haveQsd(t)) return;
  const dir = await testTempDir(t, 'vu-bench-');
  const qsd = await startQsd({ blockdev: { driver: 'null-co', size: 64 * MiB }, socketPath: dir.join('qsd.sock'), numQueues: 2 });
  try {
    for (const [rw, queues] of [['randread', 1], ['randwrite', 2]] as const) {
      const r = await runBlkLoad(qsd.socketPath, { rw, bs: 4096, iodepth: 16, queues, seconds: 0.2, rampSeconds: 0.05, backendPid: qsd.pid });
      checkResult(r, `qsd ${rw}`);
      assert.ok(r.backendCpuUsPerIo !== undefined && r.backendCpuUsPerIo > 0);
    }
  } finally {
    await qsd.stop();
  }
});

test('--logging: the backend logs into the generator\'s dirty log, which is taken during the run (ours, qemu-storage-daemon)', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-bench-');
  const server = new VhostUserServer({ socketPath: dir.join('ours.sock'), device: new BlkDevice({ backend: { kind: 'null', size: 64 * MiB }, queues: 2 }) });
  server.listen();
  try {
    for (const packed of [false, true]) {
      const r = await runBlkLoad(server.socketPath, { rw: 'randread', bs: 4096, iodepth: 8, queues: 2, seconds: 0.3, rampSeconds: 0.05, packed, logging: true, logTakeMs: 20 });
      checkResult(r, `ours logging${packed ? ' packed' : ''}`);
      assert.ok(r.dirtyLog !== undefined && r.dirtyLog.takes >= 5, `takes: ${JSON.stringify(r.dirtyLog)}`);
      // Every take finds the pages the reads wrote since the last one: at least one data page each.
      assert.ok(r.dirtyLog.pages >= r.dirtyLog.takes, `pages: ${JSON.stringify(r.dirtyLog)}`);
    }
    const off = await runBlkLoad(server.socketPath, { rw: 'randread', bs: 4096, iodepth: 8, queues: 1, seconds: 0.1, rampSeconds: 0.05 });
    assert.equal(off.dirtyLog, undefined);
  } finally {
    await server.close();
  }
  await assert.rejects(runBlkLoad('loopback', { rw: 'randread', bs: 4096, iodepth: 1, queues: 1, seconds: 0.1, logging: true }), /logging needs a backend/);
  if (findBinary('qemu-storage-daemon') === undefined) return; // the rest needs it (see haveQsd)
  // libvhost-user answers SET_LOG_BASE with its mmap_size echoed back as the u64: an acceptance, not a refusal.
  const qsd = await startQsd({ blockdev: { driver: 'null-co', size: 64 * MiB }, socketPath: dir.join('qsd.sock'), numQueues: 1 });
  try {
    const r = await runBlkLoad(qsd.socketPath, { rw: 'randread', bs: 4096, iodepth: 8, queues: 1, seconds: 0.3, rampSeconds: 0.05, logging: true, logTakeMs: 20 });
    checkResult(r, 'qsd logging');
    assert.ok(r.dirtyLog !== undefined && r.dirtyLog.pages >= r.dirtyLog.takes && r.dirtyLog.takes >= 5, JSON.stringify(r.dirtyLog));
  } finally {
    await qsd.stop();
  }
});

test('the CLI: --loopback --json, and a usage error', TIMEOUT, () => {
  const bin = join(repoRoot(), 'bin', 'vhost-user.js');
  const ok = spawnSync(process.execPath, [bin, 'bench', 'blk', '--loopback', '--seconds', '0.2', '--ramp', '0.05', '--iodepth', '4', '--json'], {
    encoding: 'utf8',
  });
  assert.equal(ok.status, 0, ok.stderr);
  const r = JSON.parse(ok.stdout) as BlkLoadResult;
  checkResult(r, 'cli');
  assert.equal(r.target, 'loopback');
  assert.match(ok.stderr, /IOPS/, 'a progress line');
  const bad = spawnSync(process.execPath, [bin, 'bench', 'blk', '--seconds', '0.1'], { encoding: 'utf8' });
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /--connect SOCK or --loopback/);
});
