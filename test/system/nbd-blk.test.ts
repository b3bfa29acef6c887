// Our blk backend with its disk on a real NBD server (`vhost-user blk --nbd URI`), driven by the TypeScript frontend:
// qemu-nbd (a raw file, checked on the host afterwards) and nbdkit (memory and file plugins, multi-conn on and off),
// every request type, 2 queues of verified random I/O, a read-only export, TLS with a CA the test makes, and the
// server killed and restarted under load (nothing lost, no error) or killed for good (an I/O error after the timeout,
// not a hang).
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { BlkFeature, BlkStatus } from '../../src/devices/blk/constants.js';
import { BlkDriver, GuestRam, VhostUserFrontend, parseBlkConfig } from '../../src/frontend/index.js';
import { startBackend, type BackendProcess } from '../helpers/backend.js';
import { imagePattern, prng, writeAndVerify } from '../helpers/blk-io.js';
import { makeTlsCerts, NBDKIT_TOOLS, OPENSSL_TOOLS, QEMU_NBD_TOOLS, startNbdkit, startQemuNbd, type NbdServer } from '../helpers/nbd-server.js';
import { requireTools } from '../helpers/require-tool.js';
import { testTempDir, type TempDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const DISK = 16 * MiB;
const TIMEOUT = { timeout: 2 * 60_000 };

const has = (features: bigint, bit: number): boolean => (features & (1n << BigInt(bit))) !== 0n;

/** Our backend serving `uri`, owned by the test (stopped by PID, even on failure). */
async function nbdBackend(t: TestContext, dir: TempDir, uri: string, extra: readonly string[] = []): Promise<BackendProcess> {
  const backend = await startBackend({ socketPath: dir.join(`blk-${Date.now()}.sock`), args: ['--nbd', uri, ...extra], logLevel: 'info' });
  t.after(() => backend.kill());
  return backend;
}

interface Session {
  fe: VhostUserFrontend;
  blk: BlkDriver;
  close(): void;
}

async function session(socketPath: string, queues: number): Promise<Session> {
  const ram = GuestRam.create(24 * MiB);
  const fe = await VhostUserFrontend.connect(socketPath, { connectTimeoutMs: 5000 });
  try {
    const blk = await BlkDriver.start(fe, { memory: ram, queues, queueSize: 64, slotsPerQueue: 32 });
    return {
      fe,
      blk,
      close: () => {
        blk.close();
        fe.close();
        ram.close();
      },
    };
  } catch (err) {
    fe.close();
    ram.close();
    throw err;
  }
}

/** Distinct NBD connections in an nbdkit log filter file. */
function nbdkitConnections(logFile: string): number {
  return new Set([...readFileSync(logFile, 'utf8').matchAll(/connection=(\d+) Connect/g)].map((m) => m[1])).size;
}

test('qemu-nbd (--shared=1: no multi-conn): every request type on 2 queues over one connection, checked in the image file', TIMEOUT, async (t) => {
  if (!requireTools(t, QEMU_NBD_TOOLS)) return;
  const dir = await testTempDir(t, 'vu-nbd-');
  const image = dir.join('disk.img');
  const model = imagePattern(DISK);
  writeFileSync(image, model);
  const server = await startQemuNbd({ socketPath: dir.join('nbd.sock'), image, shared: 1 });
  t.after(() => server.stop());
  const backend = await nbdBackend(t, dir, `nbd+unix:///disk?socket=${server.socketPath}`, ['--queues', '2']);
  const s = await session(backend.socketPath, 2);
  try {
    const config = parseBlkConfig(s.fe.config);
    assert.equal(config.capacity, DISK / 512);
    const f = s.fe.backendFeatures;
    // qemu-nbd offers flush, trim and write-zeroes.
    assert.ok(has(f, BlkFeature.FLUSH) && has(f, BlkFeature.DISCARD) && has(f, BlkFeature.WRITE_ZEROES) && !has(f, BlkFeature.RO));
    await writeAndVerify(s.blk, prng(11), model, 0, 4 * MiB);
    await writeAndVerify(s.blk, prng(12), model, DISK - 2 * MiB, DISK);
    assert.equal(await s.blk.flush(1), BlkStatus.OK);
    assert.equal(await s.blk.writeZeroes(8192, 16, false, 0), BlkStatus.OK);
    model.fill(0, 8192 * 512, 8208 * 512);
    assert.equal(await s.blk.discard(9000, 8, 1), BlkStatus.OK); // a hint: the model keeps its bytes either way
    const zeroes = await s.blk.read(8192, 16 * 512, 1);
    assert.equal(zeroes.status, BlkStatus.OK);
    assert.ok(zeroes.data.every((b) => b === 0));
    assert.equal((await s.blk.getId()).status, BlkStatus.OK);
    assert.equal((await s.blk.read(DISK / 512, 512)).status, BlkStatus.IOERR, 'past the end');
    assert.equal(await s.blk.flush(0), BlkStatus.OK);
    const onDisk = readFileSync(image);
    assert.ok(onDisk.subarray(0, 4 * MiB).equals(model.subarray(0, 4 * MiB)), 'the image holds what was written');
    assert.ok(onDisk.subarray(DISK - 2 * MiB).equals(model.subarray(DISK - 2 * MiB)));
    assert.ok(onDisk.subarray(8192 * 512, 8208 * 512).every((b) => b === 0));
  } finally {
    s.close();
  }
  const connected = backend.logs().filter((l) => l.msg === 'nbd server connected');
  assert.equal(connected.length, 1, 'no CAN_MULTI_CONN: one connection for both queues');
  assert.equal(await backend.stop(), 0);
});

for (const multiConn of [true, false]) {
  test(`nbdkit memory, multi-conn ${multiConn ? 'on: a connection per queue' : 'off: one connection'}, 2 queues of verified I/O`, TIMEOUT, async (t) => {
    if (!requireTools(t, NBDKIT_TOOLS)) return;
    const dir = await testTempDir(t, 'vu-nbd-');
    const logFile = dir.join('nbdkit.log');
    const server = await startNbdkit({
      socketPath: dir.join('nbd.sock'),
      filters: multiConn ? ['log'] : ['log', 'multi-conn'],
      plugin: ['memory', `${DISK}`, `logfile=${logFile}`, ...(multiConn ? [] : ['multi-conn-mode=disable'])],
    });
    t.after(() => server.stop());
    const backend = await nbdBackend(t, dir, `nbd+unix:///?socket=${server.socketPath}`, ['--queues', '2']);
    const before = nbdkitConnections(logFile); // the backend's probe
    const s = await session(backend.socketPath, 2);
    const model = Buffer.alloc(DISK);
    try {
      await writeAndVerify(s.blk, prng(multiConn ? 21 : 22), model, 0, 6 * MiB);
      assert.equal(await s.blk.writeZeroes(0, 64, true, 1), BlkStatus.OK);
      assert.equal(await s.blk.discard(64, 64, 0), BlkStatus.OK);
      model.fill(0, 0, 64 * 512); // nbdkit memory: trimmed bytes read as zeroes
      model.fill(0, 64 * 512, 128 * 512);
      const back = await s.blk.read(0, 128 * 512, 0);
      assert.ok(Buffer.from(back.data).equals(model.subarray(0, 128 * 512)));
      assert.equal(await s.blk.flush(), BlkStatus.OK);
    } finally {
      s.close();
    }
    assert.equal(await backend.stop(), 0);
    assert.equal(nbdkitConnections(logFile) - before, multiConn ? 2 : 1, `${multiConn ? 'a connection per queue' : 'one connection'}`);
  });
}

test('a read-only export: VIRTIO_BLK_F_RO, reads work, writes fail with IOERR', TIMEOUT, async (t) => {
  if (!requireTools(t, QEMU_NBD_TOOLS)) return;
  const dir = await testTempDir(t, 'vu-nbd-');
  const image = dir.join('disk.img');
  const model = imagePattern(DISK);
  writeFileSync(image, model);
  const server = await startQemuNbd({ socketPath: dir.join('nbd.sock'), image, readOnly: true });
  t.after(() => server.stop());
  const backend = await nbdBackend(t, dir, `nbd+unix:///disk?socket=${server.socketPath}`);
  const s = await session(backend.socketPath, 1);
  try {
    assert.ok(has(s.fe.backendFeatures, BlkFeature.RO));
    const r = await s.blk.read(100, 64 * KiB);
    assert.equal(r.status, BlkStatus.OK);
    assert.ok(Buffer.from(r.data).equals(model.subarray(100 * 512, 100 * 512 + 64 * KiB)));
    assert.equal(await s.blk.write(0, new Uint8Array(4096)), BlkStatus.IOERR);
  } finally {
    s.close();
  }
  assert.ok(readFileSync(image).equals(model));
});

test('TLS (nbds+unix) with qemu-nbd and nbdkit: a CA the test makes; refused without it', TIMEOUT, async (t) => {
  if (!requireTools(t, [...QEMU_NBD_TOOLS, ...NBDKIT_TOOLS, ...OPENSSL_TOOLS])) return;
  const dir = await testTempDir(t, 'vu-nbd-');
  const { ca, dir: tlsDir } = makeTlsCerts(dir.path);
  const image = dir.join('disk.img');
  const model = imagePattern(DISK);
  writeFileSync(image, model);
  const servers: NbdServer[] = [
    await startQemuNbd({ socketPath: dir.join('qemu-nbd.sock'), image, tlsDir }),
    await startNbdkit({ socketPath: dir.join('nbdkit.sock'), plugin: ['memory', `${DISK}`], tlsDir }),
  ];
  t.after(async () => {
    for (const s of servers) await s.stop();
  });
  for (const [i, server] of servers.entries()) {
    const exportName = i === 0 ? 'disk' : '';
    const backend = await nbdBackend(t, dir, `nbds+unix:///${exportName}?socket=${server.socketPath}`, ['--nbd-tls-ca', ca]);
    const s = await session(backend.socketPath, 1);
    try {
      await writeAndVerify(s.blk, prng(30 + i), i === 0 ? model : Buffer.alloc(DISK), 0, MiB);
    } finally {
      s.close();
    }
    assert.equal(await backend.stop(), 0);
    // Plain NBD to a server that requires TLS, and TLS without the CA: the backend does not start.
    for (const uri of [`nbd+unix:///${exportName}?socket=${server.socketPath}`, `nbds+unix:///${exportName}?socket=${server.socketPath}`]) {
      await assert.rejects(nbdBackend(t, dir, uri), /VHOST_NBD_TLS|backend did not start/);
    }
  }
});

test('the NBD server killed and restarted under load: no error, nothing lost; killed for good: EIO after the timeout', TIMEOUT, async (t) => {
  if (!requireTools(t, QEMU_NBD_TOOLS)) return;
  const dir = await testTempDir(t, 'vu-nbd-');
  const image = dir.join('disk.img');
  const model = Buffer.alloc(DISK);
  writeFileSync(image, model);
  const socketPath = dir.join('nbd.sock');
  let server = await startQemuNbd({ socketPath, image });
  const all = [server];
  t.after(async () => {
    for (const s of all) await s.kill();
  });
  const backend = await nbdBackend(t, dir, `nbd+unix:///disk?socket=${socketPath}`, ['--queues', '2', '--nbd-timeout', '4']);
  const s = await session(backend.socketPath, 2);
  try {
    // Writers keep 2 x 8 requests going while the server is SIGKILLed and started again 3 times.
    const rand = prng(40);
    let stop = false;
    let writes = 0;
    const failures: number[] = [];
    const writer = async (q: number): Promise<void> => {
      while (!stop) {
        // Distinct 4 KiB blocks, writer q taking those with index % 2 == q: no two writes in flight overlap.
        const blocks = new Set<number>();
        while (blocks.size < 8) blocks.add(Math.floor(rand() * (DISK / 8192)) * 2 + q);
        const batch = [...blocks].map((index) => {
          const sector = index * 8;
          const data = new Uint8Array(4096).fill((rand() * 255 + 1) | 0);
          return s.blk.write(sector, data, q).then((status) => {
            if (status !== BlkStatus.OK) failures.push(status);
            else model.set(data, sector * 512); // acknowledged: must be in the image
            writes++;
          });
        });
        await Promise.all(batch);
      }
    };
    const writers = [writer(0), writer(1)];
    for (let k = 0; k < 3; k++) {
      await sleep(300);
      await server.kill();
      await sleep(500 + k * 300);
      server = await startQemuNbd({ socketPath, image });
      all.push(server);
    }
    await sleep(300);
    stop = true;
    await Promise.all(writers);
    assert.deepEqual(failures, [], 'no request failed');
    assert.equal(await s.blk.flush(), BlkStatus.OK);
    t.diagnostic(`${writes} writes through 3 server restarts`);
    assert.ok(readFileSync(image).equals(model), 'every acknowledged write is in the image');
    const lost = backend.logs().filter((l) => l.msg === 'nbd connection lost');
    assert.ok(lost.length >= 3, `${lost.length} connections lost`);

    // Gone for good: the request fails once the 4 s timeout has passed, not before, and not never.
    await server.kill();
    const t0 = performance.now();
    const status = await s.blk.write(0, new Uint8Array(4096).fill(7), 0);
    const ms = performance.now() - t0;
    assert.equal(status, BlkStatus.IOERR);
    assert.ok(ms >= 3500 && ms < 15_000, `failed after ${ms.toFixed(0)} ms`);
    // Later requests fail at once while the server stays away.
    const t1 = performance.now();
    assert.equal((await s.blk.read(0, 4096, 1)).status, BlkStatus.IOERR);
    assert.ok(performance.now() - t1 < 3000);
  } finally {
    s.close();
  }
});
