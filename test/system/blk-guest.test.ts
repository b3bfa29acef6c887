// A real QEMU + Linux guest whose disks are served by our backend, started through the real CLI. The guest
// writes and reads patterns with O_DIRECT and does an ext2 round trip; the host checks the image files. SeaBIOS
// starts and stops the device before Linux takes over, so every boot also exercises a device restart.
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startBackend } from '../helpers/backend.js';
import { bootGuest, GUEST_TOOLS, guestScript } from '../helpers/guest.js';
import { GUEST_PATTERN_TEXT, HOST_PATTERN_TEXT, md5, pattern, result } from '../helpers/patterns.js';
import { requireTools } from '../helpers/require-tool.js';
import { testTempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const TIMEOUT = { timeout: 5 * 60_000 };

test('a Linux guest uses our backend as its disk: O_DIRECT patterns, firmware restart, clean exit', TIMEOUT, async (t) => {
  if (!requireTools(t, GUEST_TOOLS)) return;
  const dir = await testTempDir(t);
  const image = dir.join('disk.img');
  const hostPattern = pattern(HOST_PATTERN_TEXT, MiB);
  const guestPattern = pattern(GUEST_PATTERN_TEXT, 4 * MiB);
  await writeFile(image, hostPattern);
  await truncate(image, 64 * MiB);

  const backend = await startBackend({ socketPath: dir.join('blk.sock'), args: ['--image', image] });
  t.after(() => backend.stop());
  const r = await bootGuest({
    blk: [{ socketPath: backend.socketPath }],
    script: { file: guestScript('blk-pattern.sh') },
    serialLog: dir.join('serial.log'),
    signal: t.signal,
  });
  t.diagnostic(`guest: ${r.durationMs} ms`);
  assert.equal(r.exitCode, 0, r.serial);
  assert.ok(r.results.includes('PASS'), r.serial);
  assert.equal(result(r.results, '/dev/vda', 'sectors'), String((64 * MiB) / 512));
  assert.equal(result(r.results, 'host-pattern', 'md5'), md5(hostPattern), 'the guest read the host pattern');
  assert.equal(result(r.results, 'guest-pattern readback', 'md5'), md5(guestPattern));

  // The firmware started the device, stopped it, and Linux started it again: two starts of queue 0, each stop
  // answered GET_VRING_BASE, and the guest's disconnect released everything.
  const logs = backend.logs();
  const starts = logs.filter((l) => l.msg === 'ring started' && l.queue === 0);
  assert.ok(starts.length >= 2, `queue 0 started ${starts.length} times`);
  assert.ok(logs.some((l) => l.msg === 'frontend disconnected'));
  assert.deepEqual(logs.filter((l) => (l.level as number) >= 40), [], 'no warnings or errors');

  assert.equal(await backend.stop(), 0, 'SIGTERM: exit code 0');
  const data = await readFile(image);
  assert.equal(data.length, 64 * MiB);
  assert.equal(md5(data.subarray(0, MiB)), md5(hostPattern), 'host pattern untouched');
  assert.equal(md5(data.subarray(MiB, 5 * MiB)), md5(guestPattern), 'the image holds the guest pattern');
  assert.ok(data.subarray(5 * MiB).every((b) => b === 0), 'nothing written past the guest pattern');
});

for (const packed of [false, true]) {
  const rings = packed ? 'packed virtqueues' : 'split virtqueues';
  test(`two disks on our backend (${rings}), one with 2 queues and 2 vCPUs: O_DIRECT patterns, ext2 round trip`, TIMEOUT, async (t) => {
    if (!requireTools(t, GUEST_TOOLS)) return;
    const dir = await testTempDir(t);
    const imageA = dir.join('a.img');
    const imageB = dir.join('b.img');
    await writeFile(imageA, pattern(HOST_PATTERN_TEXT, MiB));
    await truncate(imageA, 16 * MiB);
    await writeFile(imageB, '');
    await truncate(imageB, 32 * MiB);
    const a = await startBackend({ socketPath: dir.join('a.sock'), args: ['--image', imageA] });
    t.after(() => a.stop());
    const b = await startBackend({ socketPath: dir.join('b.sock'), args: ['--image', imageB, '--queues', '2'] });
    t.after(() => b.stop());
    const token = `fs-token-${process.pid}-${Date.now()}`;

    const r = await bootGuest({
      blk: [{ socketPath: a.socketPath }, { socketPath: b.socketPath, numQueues: 2 }],
      smp: 2,
      packed,
      files: [{ file: guestScript('blk-pattern.sh') }, { file: guestScript('fs-roundtrip.sh'), name: 'fs.sh' }],
      env: { FS_TEXT: token },
      script: [
        'DEV=/dev/vda sh /guest/blk-pattern.sh || exit 1',
        'echo "GUEST-RESULT: vdb queues=$(ls /sys/block/vdb/mq | wc -l)"',
        // One character per feature bit: bit 34 is VIRTIO_F_RING_PACKED.
        'echo "GUEST-RESULT: features vda=$(cut -c35 /sys/block/vda/device/features) vdb=$(cut -c35 /sys/block/vdb/device/features)"',
        'DEV=/dev/vdb sh /guest/fs.sh',
      ].join('\n'),
      signal: t.signal,
    });
    t.diagnostic(`guest: ${r.durationMs} ms`);
    assert.equal(r.exitCode, 0, r.serial);
    assert.equal(result(r.results, 'vdb', 'queues'), '2', r.serial);
    for (const disk of ['vda', 'vdb']) assert.equal(result(r.results, 'features', disk), packed ? '1' : '0', `${disk}: ${rings}`);
    assert.equal(result(r.results, 'fs readback', 'md5'), result(r.results, 'fs written', 'md5'));
    assert.equal(r.results.filter((l) => l === 'PASS').length, 2, r.serial);
    // Both queues of the 2-queue disk ran.
    const started = new Set(b.logs().filter((l) => l.msg === 'ring started').map((l) => l.queue));
    assert.deepEqual([...started].sort(), [0, 1]);

    assert.equal(await b.stop(), 0);
    const data = await readFile(imageB);
    assert.ok(data.includes(`${token}\n${token}\n`), 'the file written in the guest is in the image');
  });
}
