// A QEMU guest keeps writing (O_DIRECT, numbered 4 KiB blocks) while our blk backend is SIGKILLed (or stopped with
// SIGTERM) and started again, 10 times, with QEMU's vhost-user-blk reconnecting (`reconnect=1` on its chardev) or
// listening while our backend connects (client mode), and handing each new backend the inflight region it kept
// (INFLIGHT_SHMFD). The guest must see no I/O error and not hang, read every block back as written, and the image
// must hold every block. The backend runs reads and writes in an I/O thread and completes each one later (`--io
// async` and a test knob), so that most kills find requests in flight: the new backend takes them again from the
// region. Four scenarios: split rings with one writer, in both connection modes; packed rings (which QEMU cannot
// restore after a crash: only the region says where they stand) with four writers and completions out of order
// (delays 40, 0, 15, 5 ms in turn); and SIGTERM restarts (graceful: requests in flight complete before the backend
// exits 0, so the region holds nothing to take again).
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { startBackend, type BackendProcess } from '../helpers/backend.js';
import { GUEST_TOOLS, guestScript, startGuest } from '../helpers/guest.js';
import { requireTools } from '../helpers/require-tool.js';
import { testTempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const BLOCKS = 768;
const KILLS = 10;

function block(i: number): Buffer {
  return Buffer.from(`block ${String(i).padStart(8, '0')} \n`.repeat(256).slice(0, 4096));
}

interface Scenario {
  readonly mode: 'listen' | 'client';
  readonly packed: boolean;
  readonly writers: number;
  readonly delays: string;
  /** How the backend goes: SIGKILL (a crash), or SIGTERM (a graceful stop: requests in flight complete first). */
  readonly signal: 'SIGKILL' | 'SIGTERM';
}

const SCENARIOS: readonly Scenario[] = [
  { mode: 'listen', packed: false, writers: 1, delays: '20', signal: 'SIGKILL' },
  { mode: 'client', packed: false, writers: 1, delays: '20', signal: 'SIGKILL' },
  { mode: 'listen', packed: true, writers: 4, delays: '40,0,15,5', signal: 'SIGKILL' },
  { mode: 'listen', packed: false, writers: 2, delays: '20', signal: 'SIGTERM' },
];

for (const { mode, packed, writers, delays, signal } of SCENARIOS) {
  const how =
    (mode === 'listen' ? 'QEMU reconnects (reconnect=1)' : 'QEMU listens, the backend connects (--connect)') +
    (packed ? `, packed rings, ${writers} writers, out-of-order completion` : ', split rings');
  test(`a guest writing through ${KILLS} ${signal}s of its blk backend, ${how}: no I/O error, no hang, every block written`, { timeout: 8 * 60_000 }, async (t) => {
    if (!requireTools(t, GUEST_TOOLS)) return;
    const dir = await testTempDir(t);
    const image = dir.join('disk.img');
    await writeFile(image, '');
    await truncate(image, 16 * MiB);
    const socketPath = dir.join('blk.sock');
    const start = (): Promise<BackendProcess> =>
      startBackend({ socketPath, args: ['--image', image, '--io', 'async', '--completion-delay-ms', delays], logLevel: 'info', connect: mode === 'client' });
    // Client mode: the backend starts first and connects once QEMU listens (QEMU waits for it before the guest boots).
    let backend = await start();
    const all: BackendProcess[] = [backend];
    t.after(async () => {
      for (const b of all) await b.kill();
    });
    const guest = await startGuest({
      blk: [mode === 'listen' ? { socketPath, reconnectSeconds: 1 } : { socketPath, server: true }],
      script: { file: guestScript('blk-kill-writer.sh') },
      env: { BLOCKS: String(BLOCKS), WRITERS: String(writers) },
      packed,
      serialLog: dir.join('serial.log'),
      timeoutMs: 6 * 60_000,
      signal: t.signal,
    });
    await guest.waitForMarker('GUEST-MARK: writing', 120_000);
    const recoveryMs: number[] = [];
    let resubmitted = 0;
    for (let k = 0; k < KILLS; k++) {
      await sleep(200 + Math.floor(Math.random() * 600)); // a random moment of the write stream
      if (signal === 'SIGKILL') await backend.kill();
      else assert.equal(await backend.stop(), 0, `stop ${k + 1}: SIGTERM exits 0 once the requests in flight completed`);
      const t0 = performance.now();
      backend = await start();
      all.push(backend);
      // QEMU reconnects (within its 1 s reconnect period), sets the device up again and restarts the ring.
      const b = backend;
      for (let i = 0; i < 600 && !b.logs().some((l) => l.msg === 'ring started'); i++) await sleep(20);
      assert.ok(b.logs().some((l) => l.msg === 'ring started'), `restart ${k + 1}: QEMU did not start the ring again`);
      recoveryMs.push(performance.now() - t0);
      for (const l of b.logs()) if (typeof l.resubmitted === 'number') resubmitted += l.resubmitted;
      assert.ok(b.logs().some((l) => l.msg === 'inflight region mapped'), `restart ${k + 1}: QEMU handed the inflight region back`);
      if (packed) assert.ok(b.logs().some((l) => l.msg === 'ring started' && l.packed === true), `restart ${k + 1}: the ring is packed`);
    }
    assert.ok(all[0]?.logs().some((l) => l.msg === 'inflight region created'), 'QEMU asked the first backend for an inflight region');
    const r = await guest.done;
    const sorted = [...recoveryMs].sort((a, b) => a - b);
    t.diagnostic(
      `${KILLS} ${signal}s; backend start -> ring running again: p50 ${sorted[Math.floor(sorted.length / 2)]?.toFixed(0)} ms, ` +
        `max ${sorted.at(-1)?.toFixed(0)} ms; requests taken again from the inflight region: ${resubmitted}; guest ${r.durationMs} ms`,
    );
    assert.equal(r.exitCode, 0, r.serial.slice(-3000));
    assert.ok(r.results.includes(`PASS blocks=${BLOCKS}`), r.serial.slice(-3000));
    // A graceful stop completes what it took before it exits: the region has nothing in flight for the next one.
    if (signal === 'SIGTERM') assert.equal(resubmitted, 0, 'nothing taken again after SIGTERM stops');
    const disk = await readFile(image);
    for (let i = 0; i < BLOCKS; i++) {
      if (!disk.subarray(4096 * i, 4096 * (i + 1)).equals(block(i))) assert.fail(`block ${i} is not on disk as written`);
    }
  });
}
