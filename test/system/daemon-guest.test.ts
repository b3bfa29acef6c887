// A real QEMU + Linux guest on a disk that `vhost-user serve` did not have when it started: the device is added
// through the management API, the guest does an ext2 round trip on it, and the daemon's metrics and device info
// show the guest's I/O; then the device is removed at runtime and the daemon goes on.
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseMetrics, startDaemon } from '../helpers/daemon.js';
import { bootGuest, GUEST_TOOLS, guestScript } from '../helpers/guest.js';
import { result } from '../helpers/patterns.js';
import { requireTools } from '../helpers/require-tool.js';
import { testTempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const TIMEOUT = { timeout: 5 * 60_000 };

test('a QEMU guest on a blk device added to a running daemon through the API: ext2 round trip', TIMEOUT, async (t) => {
  if (!requireTools(t, GUEST_TOOLS)) return;
  const dir = await testTempDir(t, 'vu-dg-');
  const image = dir.join('disk.img');
  await writeFile(image, '');
  await truncate(image, 32 * MiB);
  const daemon = await startDaemon({ apiSocket: dir.join('api.sock'), threads: 2, logLevel: 'info' });
  t.after(() => daemon.stop());

  const socket = dir.join('disk0.sock');
  const added = await daemon.api('PUT', '/devices/disk0', { type: 'blk', socket, image, queues: 2 });
  assert.equal(added.status, 201, added.body);
  const token = `daemon-token-${process.pid}-${Date.now()}`;
  const r = await bootGuest({
    blk: [{ socketPath: socket, numQueues: 2 }],
    smp: 2,
    files: [{ file: guestScript('fs-roundtrip.sh'), name: 'fs.sh' }],
    env: { FS_TEXT: token },
    script: ['echo "GUEST-RESULT: vda queues=$(ls /sys/block/vda/mq | wc -l)"', 'DEV=/dev/vda sh /guest/fs.sh'].join('\n'),
    serialLog: dir.join('serial.log'),
    signal: t.signal,
  });
  t.diagnostic(`guest: ${r.durationMs} ms`);
  assert.equal(r.exitCode, 0, r.serial);
  assert.equal(result(r.results, 'vda', 'queues'), '2', r.serial);
  assert.equal(result(r.results, 'fs readback', 'md5'), result(r.results, 'fs written', 'md5'));
  assert.ok(r.results.includes('PASS'), r.serial);

  // The guest's I/O is in the device's counters; the guest (QEMU) has gone, so the device listens again.
  const info = (await daemon.api('GET', '/devices/disk0')).json as { state: string; frontend: { reconnects: number }; queues: { requests: number; bytesWritten: number }[] };
  assert.equal(info.state, 'listening');
  const requests = info.queues.reduce((n, q) => n + q.requests, 0);
  const written = info.queues.reduce((n, q) => n + q.bytesWritten, 0);
  t.diagnostic(`disk0: ${requests} requests, ${written} bytes written, ${info.frontend.reconnects} reconnects`);
  assert.ok(requests > 0 && written > 0);
  const metrics = parseMetrics((await daemon.api('GET', '/metrics')).body);
  assert.equal(metrics.get('vhost_user_queue_requests_total{device="disk0",queue="0"}'), info.queues[0]?.requests);
  assert.equal(metrics.get('vhost_user_devices'), 1);
  assert.ok((metrics.get('vhost_user_memory_change_seconds_count{device="disk0"}') ?? 0) >= 1, 'the guest\'s memory table was counted');

  assert.equal((await daemon.api('DELETE', '/devices/disk0')).status, 204);
  assert.deepEqual(((await daemon.api('GET', '/devices')).json as { devices: unknown[] }).devices, []);
  assert.equal(await daemon.stop(), 0);
  assert.deepEqual(daemon.logs().filter((l) => (l.level as number) >= 50), [], 'no errors logged');
  const data = await readFile(image);
  assert.ok(data.includes(`${token}\n${token}\n`), 'the file written in the guest is in the image');
});
