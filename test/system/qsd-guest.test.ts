// System tests of the guest harness, with qemu-storage-daemon as the vhost-user-blk backend. They boot a
// real Linux guest under TCG (a few seconds each). Later the same tests run against our own backend.
import { existsSync } from 'node:fs';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { bootGuest, GUEST_TOOLS, GuestError, guestScript, repoRoot, startGuest } from '../helpers/guest.js';
import { qmp } from '../helpers/qmp.js';
import { startQsd, QSD_TOOLS } from '../helpers/qsd.js';
import { DEBIAN_TEST_PACKAGES, requireTools } from '../helpers/require-tool.js';
import { testTempDir } from '../helpers/tmp.js';
import { md5, pattern, result } from '../helpers/patterns.js';

const MiB = 1024 * 1024;
const TOOLS = [...GUEST_TOOLS, ...QSD_TOOLS];
// The first test may build the guest image (about 10 s); boots take 2-5 s under TCG.
const TIMEOUT = { timeout: 5 * 60_000 };

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

test('guest reads and writes a qemu-storage-daemon disk over vhost-user-blk (O_DIRECT)', TIMEOUT, async (t) => {
  if (!requireTools(t, TOOLS)) return;
  const dir = await testTempDir(t);
  const image = dir.join('disk.img');
  const hostPattern = pattern('vhost-user-blk host pattern fedcba9876543210', MiB);
  const guestPattern = pattern('vhost-user-blk guest pattern 0123456789abcdef', 4 * MiB);
  await writeFile(image, hostPattern);
  await truncate(image, 64 * MiB);

  const qsd = await startQsd({ image, socketPath: dir.join('blk.sock') });
  t.after(() => qsd.stop());
  const r = await bootGuest({
    blk: [{ socketPath: qsd.socketPath }],
    script: { file: guestScript('blk-pattern.sh') },
    serialLog: dir.join('serial.log'),
    signal: t.signal,
  });
  t.diagnostic(`guest: ${r.durationMs} ms (kernel ${r.kernel})`);
  assert.equal(r.exitCode, 0, r.serial);
  assert.ok(r.results.includes('PASS'), r.serial);
  assert.equal(result(r.results, '/dev/vda', 'sectors'), String((64 * MiB) / 512));
  assert.equal(result(r.results, 'host-pattern', 'md5'), md5(hostPattern), 'guest read the host pattern');
  assert.equal(result(r.results, 'guest-pattern readback', 'md5'), md5(guestPattern));

  await qsd.stop();
  const data = await readFile(image);
  assert.equal(data.length, 64 * MiB);
  assert.equal(md5(data.subarray(0, MiB)), md5(hostPattern), 'host pattern untouched');
  assert.equal(md5(data.subarray(MiB, 5 * MiB)), md5(guestPattern), 'image holds the guest pattern');
  assert.ok(data.subarray(5 * MiB).every((b) => b === 0), 'nothing written past the guest pattern');
});

test('two disks, one with 2 queues: ext2 round trip on /dev/vdb', TIMEOUT, async (t) => {
  if (!requireTools(t, TOOLS)) return;
  const dir = await testTempDir(t);
  const imageA = dir.join('a.img');
  const imageB = dir.join('b.img');
  await writeFile(imageA, pattern('vhost-user-blk host pattern fedcba9876543210', MiB));
  await truncate(imageA, 16 * MiB);
  await writeFile(imageB, '');
  await truncate(imageB, 32 * MiB);
  const qsdA = await startQsd({ image: imageA, socketPath: dir.join('a.sock') });
  t.after(() => qsdA.stop());
  const qsdB = await startQsd({ image: imageB, socketPath: dir.join('b.sock'), numQueues: 2 });
  t.after(() => qsdB.stop());
  const token = `fs-token-${process.pid}-${Date.now()}`;

  const r = await bootGuest({
    blk: [{ socketPath: qsdA.socketPath }, { socketPath: qsdB.socketPath, numQueues: 2 }],
    smp: 2,
    files: [{ file: guestScript('blk-pattern.sh') }, { file: guestScript('fs-roundtrip.sh'), name: 'fs.sh' }],
    env: { FS_TEXT: token },
    script: [
      'DEV=/dev/vda sh /guest/blk-pattern.sh || exit 1',
      'echo "GUEST-RESULT: vdb queues=$(ls /sys/block/vdb/mq | wc -l)"',
      'DEV=/dev/vdb sh /guest/fs.sh',
    ].join('\n'),
    signal: t.signal,
  });
  t.diagnostic(`guest: ${r.durationMs} ms`);
  assert.equal(r.exitCode, 0, r.serial);
  assert.equal(result(r.results, 'vdb', 'queues'), '2', r.serial);
  assert.equal(result(r.results, 'fs readback', 'md5'), result(r.results, 'fs written', 'md5'));
  assert.equal(r.results.filter((l) => l === 'PASS').length, 2, r.serial);

  await qsdB.stop();
  const b = await readFile(imageB);
  assert.ok(b.includes(`${token}\n${token}\n`), 'the file written in the guest is in the image');
});

test('the harness kills QEMU and removes its run dir (kill, timeout)', TIMEOUT, async (t) => {
  if (!requireTools(t, GUEST_TOOLS)) return;
  const guest = await startGuest({
    script: 'echo "GUEST-MARK: idle"; sleep 600',
    memory: { size: '512M', slots: 4, maxmem: '2G' },
    signal: t.signal,
  });
  const line = await guest.waitForMarker('GUEST-MARK: idle', 60_000);
  assert.equal(line, 'GUEST-MARK: idle');
  assert.deepEqual(await qmp(guest.qmpSocket, 'query-memory-size-summary'), {
    'base-memory': 512 * MiB,
    'plugged-memory': 0,
  });
  assert.ok(existsSync(join(guest.runDir, 'qemu.pid')));
  assert.equal((await readFile(join(guest.runDir, 'qemu.pid'), 'utf8')).trim(), String(guest.pid), 'pid is QEMU');
  await guest.kill();
  await assert.rejects(guest.done, (e: unknown) => e instanceof GuestError && e.reason === 'killed');
  assert.equal(isAlive(guest.pid), false);
  assert.equal(existsSync(guest.runDir), false);

  const slow = await startGuest({ script: 'sleep 600', timeoutMs: 1000 });
  await assert.rejects(slow.done, (e: unknown) => e instanceof GuestError && e.reason === 'timeout');
  assert.equal(isAlive(slow.pid), false);
  assert.equal(existsSync(slow.runDir), false);
});

test('.ci/run installs DEBIAN_TEST_PACKAGES', async () => {
  const script = await readFile(join(repoRoot(), '.ci', 'run'), 'utf8');
  const list = script.match(/^PACKAGES=\(([^)]*)\)/m)?.[1];
  assert.ok(list !== undefined, '.ci/run has a PACKAGES=(...) line');
  assert.deepEqual(list.trim().split(/\s+/).sort(), [...DEBIAN_TEST_PACKAGES].sort());
});
