// A QEMU guest with `vhost-user-rng-pci` on our `vhost-user rng` backend (split and packed rings): the guest's
// virtio_rng driver becomes its hardware RNG and /dev/hwrng gives whole reads of fresh bytes
// (test/guest/rng-read.sh); the backend counted what it gave.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startBackend } from '../helpers/backend.js';
import { GUEST_TOOLS, guestScript, startGuest } from '../helpers/guest.js';
import { result } from '../helpers/patterns.js';
import { requireTools } from '../helpers/require-tool.js';
import { testTempDir } from '../helpers/tmp.js';

const BYTES = 256 * 1024;

for (const packed of [false, true]) {
  // The packed variant runs with a rate limit (128 KiB per 100 ms: the two reads take several periods), so requests
  // also complete later, from the timerfd.
  const rate = packed ? ['--rate-bytes', String(128 * 1024), '--rate-period', '100'] : [];
  test(`a guest reads /dev/hwrng from our rng backend (${packed ? 'packed ring, rate-limited' : 'split ring'})`, { timeout: 3 * 60_000 }, async (t) => {
    if (!requireTools(t, GUEST_TOOLS)) return;
    const dir = await testTempDir(t, 'vu-rng-');
    const socketPath = dir.join('rng.sock');
    const backend = await startBackend({ socketPath, command: 'rng', args: rate });
    t.after(() => backend.kill());
    const guest = await startGuest({
      rng: [socketPath],
      packed,
      script: { file: guestScript('rng-read.sh') },
      env: { RNG_BYTES: String(BYTES) },
      timeoutMs: 120_000,
      signal: t.signal,
    });
    const r = await guest.done;
    t.diagnostic(`guest: ${r.durationMs} ms`);
    assert.equal(r.exitCode, 0, r.serial.slice(-3000));
    assert.ok(r.results.includes('PASS'), r.serial.slice(-3000));
    assert.equal(result(r.results, 'rng bytes', 'bytes'), String(BYTES));
    const started = backend.logs().find((l) => l.msg === 'ring started');
    assert.equal(started?.packed, packed, 'the ring layout the guest negotiated');
  });
}
