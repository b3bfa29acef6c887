// Client mode and graceful stop. The TypeScript frontend plays a VMM that listens (QEMU `-chardev
// socket,server=on,wait=off`): our backend, a child process started with `blk --connect PATH`, must find it whenever it
// appears, after the VMM drops it, and after the backend itself is SIGKILLed and started again. Then, in process:
// close({ drainMs }) completes the requests in flight before it disconnects, where a plain close abandons them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { VhostUserServer } from '../../src/backend/server.js';
import { BlkDevice } from '../../src/devices/blk/blk-device.js';
import { BlkStatus } from '../../src/devices/blk/constants.js';
import { BlkDriver, FrontendErrorCode, GuestRam, VhostUserFrontend } from '../../src/frontend/index.js';
import * as native from '../../src/native/index.js';
import { startBackend, type BackendProcess } from '../helpers/backend.js';
import { assertBaseline, settledBaseline } from '../helpers/fds.js';
import { testTempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const TIMEOUT = { timeout: 60_000 };

/** A listening unix socket, as a VMM in server mode has: `next()` resolves with the next backend that connects. */
class Listener {
  readonly #fd: number;
  readonly #watch: number;
  readonly #waiting: ((fd: number) => void)[] = [];
  readonly #ready: number[] = [];

  constructor(path: string) {
    this.#fd = native.listenUnix(path);
    this.#watch = native.watch(this.#fd, native.WATCH_READABLE, () => {
      for (;;) {
        const fd = native.accept(this.#fd);
        if (fd < 0) return;
        const w = this.#waiting.shift();
        if (w !== undefined) w(fd);
        else this.#ready.push(fd);
      }
    });
  }

  /** The handshake with the next backend that connects (within `ms`). */
  async next(ms = 10_000): Promise<VhostUserFrontend> {
    const fd =
      this.#ready.shift() ??
      (await new Promise<number>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no backend connected within ${ms} ms`)), ms);
        this.#waiting.push((f) => {
          clearTimeout(timer);
          resolve(f);
        });
      }));
    return VhostUserFrontend.fromSocket(fd, { timeoutMs: 5000 }, 'accepted backend');
  }

  close(): void {
    native.unwatch(this.#watch);
    native.close(this.#fd);
    for (const fd of this.#ready.splice(0)) native.close(fd);
  }
}

/** A frontend session on the next backend that connects: one 4 KiB write at `sector` read back, or only a read. */
async function session(listener: Listener, ram: GuestRam, check: (blk: BlkDriver) => Promise<void>): Promise<void> {
  const fe = await listener.next();
  try {
    const blk = await BlkDriver.start(fe, { memory: ram, queueSize: 16, maxRequestBytes: 4096 });
    await check(blk);
    blk.close();
    await fe.resetDevice();
  } finally {
    fe.close();
  }
}

function block(seed: number): Uint8Array {
  return Uint8Array.from({ length: 4096 }, (_, i) => (i * 7 + seed) & 0xff);
}

test('client mode: the backend connects to a listening frontend, again after the frontend drops it and after its own SIGKILL', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-client-');
  const socketPath = dir.join('vmm.sock');
  const image = dir.join('disk.img');
  writeFileSync(image, Buffer.alloc(4 * MiB));
  const args = ['--image', image];
  // Started before anything listens: it retries until the socket appears.
  let be: BackendProcess | undefined = await startBackend({ socketPath, args, connect: true });
  const ram = GuestRam.create(8 * MiB);
  let listener: Listener | undefined;
  try {
    await sleep(300);
    listener = new Listener(socketPath);
    const l = listener;
    await session(l, ram, async (blk) => assert.equal(await blk.write(0, block(1)), BlkStatus.OK));
    // The frontend dropped it (resetDevice and close above): it connects again by itself.
    await session(l, ram, async (blk) => {
      assert.deepEqual((await blk.read(0, 4096)).data, block(1));
      assert.equal(await blk.write(8, block(2)), BlkStatus.OK);
    });
    // A crash: a new process, the same socket, the data is there.
    await be.kill();
    be = await startBackend({ socketPath, args, connect: true });
    await session(l, ram, async (blk) => {
      assert.deepEqual((await blk.read(0, 4096)).data, block(1));
      assert.deepEqual((await blk.read(8, 4096)).data, block(2));
    });
    const connects = be.logs().filter((x) => x.msg === 'frontend connected').length;
    assert.equal(connects, 1, 'the restarted backend connected once');
    assert.equal(await be.stop(), 0, 'SIGTERM while connected: exit status 0');
    be = undefined;
  } finally {
    await be?.kill();
    listener?.close();
    ram.close();
  }
});

test('graceful stop: close({ drainMs }) completes the requests in flight before it disconnects; a plain close abandons them', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-drain-');
  const baseline = await settledBaseline();
  await (async () => {
    for (const drain of [true, false]) {
      const image = dir.join(`disk-${drain}.img`);
      writeFileSync(image, Buffer.alloc(4 * MiB));
      // Every request completes 300 ms after its I/O: the close below comes while all of them are in flight.
      const device = new BlkDevice({ backend: { kind: 'file', path: image }, io: 'async', completionDelayMs: 300 });
      const server = new VhostUserServer({ socketPath: dir.join(`drain-${drain}.sock`), device });
      server.listen();
      const ram = GuestRam.create(8 * MiB);
      const fe = await VhostUserFrontend.connect(server.socketPath);
      try {
        const blk = await BlkDriver.start(fe, { memory: ram, queueSize: 16, maxRequestBytes: 4096 });
        const writes = Array.from({ length: 8 }, (_, i) => blk.write(8 * i, block(i)).then((s) => ({ ok: true, s }), (err: unknown) => ({ ok: false, s: err })));
        await sleep(100);
        await server.close(drain ? { drainMs: 5000 } : {});
        const results = await Promise.all(writes);
        if (drain) {
          assert.deepEqual(results, writes.map(() => ({ ok: true, s: BlkStatus.OK })), 'every write in flight completed before the disconnect');
        } else {
          const failed = results.filter((r) => !r.ok);
          assert.equal(failed.length, 8, 'without the drain the writes in flight were abandoned');
          for (const r of failed) assert.equal((r.s as { code?: string }).code, FrontendErrorCode.DISCONNECTED);
        }
        blk.close();
      } finally {
        fe.close();
        ram.close();
        await server.close();
      }
    }
  })();
  await assertBaseline(baseline);
});
