// A Linux guest whose disks live on NBD servers, served by our backend (`vhost-user blk --nbd`): vdb on nbdkit's file
// plugin (2 queues, multi-conn) gets an ext2 round trip that the host then finds in the image file; vda on qemu-nbd
// takes numbered O_DIRECT blocks while the host SIGKILLs qemu-nbd and starts it again 3 times (the guest must see
// no I/O error, and every block must be in the image), and then kills it for good: the guest's next write fails
// with an I/O error once the timeout (3 s) has passed, instead of hanging.
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { startBackend } from '../helpers/backend.js';
import { GUEST_TOOLS, guestScript, startGuest } from '../helpers/guest.js';
import { NBDKIT_TOOLS, QEMU_NBD_TOOLS, startNbdkit, startQemuNbd, type NbdServer } from '../helpers/nbd-server.js';
import { result } from '../helpers/patterns.js';
import { requireTools } from '../helpers/require-tool.js';
import { testTempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const BLOCKS = 512;
const RESTARTS = 3;

function block(i: number): Buffer {
  return Buffer.from(`block ${String(i).padStart(8, '0')} \n`.repeat(256).slice(0, 4096));
}

test('a guest on NBD disks: ext2 round trip, writes through 3 NBD server restarts, EIO (no hang) once it is gone', { timeout: 6 * 60_000 }, async (t) => {
  if (!requireTools(t, [...GUEST_TOOLS, ...QEMU_NBD_TOOLS, ...NBDKIT_TOOLS])) return;
  const dir = await testTempDir(t, 'vu-nbdg-');
  const imageA = dir.join('a.img');
  const imageB = dir.join('b.img');
  for (const image of [imageA, imageB]) {
    await writeFile(image, '');
    await truncate(image, 16 * MiB);
  }
  const socketA = dir.join('a.nbd');
  let qemuNbd = await startQemuNbd({ socketPath: socketA, image: imageA });
  const servers: NbdServer[] = [qemuNbd, await startNbdkit({ socketPath: dir.join('b.nbd'), plugin: ['file', imageB] })];
  t.after(async () => {
    for (const s of servers) await s.kill();
  });
  const a = await startBackend({
    socketPath: dir.join('a.sock'),
    args: ['--nbd', `nbd+unix:///disk?socket=${socketA}`, '--nbd-timeout', '3'],
    logLevel: 'info',
  });
  t.after(() => a.kill());
  const b = await startBackend({ socketPath: dir.join('b.sock'), args: ['--nbd', `nbd+unix:///?socket=${dir.join('b.nbd')}`, '--queues', '2'], logLevel: 'info' });
  t.after(() => b.kill());
  const token = `nbd-token-${process.pid}-${Date.now()}`;

  const guest = await startGuest({
    blk: [{ socketPath: a.socketPath }, { socketPath: b.socketPath, numQueues: 2 }],
    smp: 2,
    files: [{ file: guestScript('blk-kill-writer.sh'), name: 'writer.sh' }, { file: guestScript('fs-roundtrip.sh'), name: 'fs.sh' }],
    env: { FS_TEXT: token, BLOCKS: String(BLOCKS), WRITERS: '2' },
    script: [
      'DEV=/dev/vdb sh /guest/fs.sh || exit 1',
      'DEV=/dev/vda sh /guest/writer.sh || exit 1',
      'echo "GUEST-MARK: kill the server"',
      'sleep 2',
      's=$(date +%s)',
      'if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct conv=notrunc 2>/dev/null; then w=ok; else w=eio; fi',
      'echo "GUEST-RESULT: dead-server write=$w seconds=$(($(date +%s) - s))"',
    ].join('\n'),
    serialLog: dir.join('serial.log'),
    timeoutMs: 5 * 60_000,
    signal: t.signal,
  });
  await guest.waitForMarker('GUEST-MARK: writing', 120_000);
  for (let k = 0; k < RESTARTS; k++) {
    await sleep(300 + Math.floor(Math.random() * 500));
    await qemuNbd.kill();
    await sleep(400);
    qemuNbd = await startQemuNbd({ socketPath: socketA, image: imageA });
    servers.push(qemuNbd);
  }
  await guest.waitForMarker('GUEST-MARK: kill the server', 180_000);
  await qemuNbd.kill();
  const r = await guest.done;
  t.diagnostic(`guest ${r.durationMs} ms`);
  assert.equal(r.exitCode, 0, r.serial.slice(-3000));
  assert.equal(result(r.results, 'fs readback', 'md5'), result(r.results, 'fs written', 'md5'), r.serial.slice(-3000));
  assert.ok(r.results.includes(`PASS blocks=${BLOCKS}`), r.serial.slice(-3000));
  assert.equal(result(r.results, 'dead-server', 'write'), 'eio', r.serial.slice(-3000));
  const seconds = Number(result(r.results, 'dead-server', 'seconds'));
  assert.ok(seconds >= 2 && seconds <= 10, `the write failed after ${seconds} s (timeout 3 s)`);

  const lost = a.logs().filter((l) => l.msg === 'nbd connection lost').length;
  assert.ok(lost >= RESTARTS, `${lost} NBD connections lost`);
  const disk = await readFile(imageA);
  for (let i = 0; i < BLOCKS; i++) {
    if (!disk.subarray(4096 * i, 4096 * (i + 1)).equals(block(i))) assert.fail(`block ${i} is not in the image as written`);
  }
  assert.equal(await b.stop(), 0);
  assert.ok((await readFile(imageB)).includes(`${token}\n${token}\n`), 'the file written in the guest is in the image behind nbdkit');
});
