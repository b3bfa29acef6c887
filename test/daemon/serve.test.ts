// `vhost-user serve` end to end, as a separate process driven by the TypeScript frontend over real sockets and
// memfds: 64 blk devices from a pool of 2 threads with verified I/O (the thread count does not grow with devices),
// /metrics against the requests the test made, and devices added and removed through the API while others run I/O.
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlkDriver, BlkStatus, GuestRam, VhostUserFrontend } from '../../src/frontend/index.js';
import { parseMetrics, startDaemon, type DaemonProcess } from '../helpers/daemon.js';
import { NBDKIT_TOOLS, startNbdkit } from '../helpers/nbd-server.js';
import { requireTools } from '../helpers/require-tool.js';
import { testTempDir, type TempDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const TIMEOUT = { timeout: 5 * 60_000 };
/** Requests a device gets from `exercise`: WRITES writes of CHUNK bytes, then as many reads. */
const WRITES = 4;
const CHUNK = 16 * KiB;

interface DeviceSpec {
  id: string;
  kind: 'image' | 'null';
}

function deviceBody(dir: TempDir, d: DeviceSpec): Record<string, unknown> {
  const base = { id: d.id, type: 'blk', socket: dir.join(`${d.id}.sock`), queueSize: 64 };
  return d.kind === 'image' ? { ...base, image: dir.join(`${d.id}.img`) } : { ...base, null: '16M' };
}

/** The bytes device `id` gets at chunk `i`: distinct per device and chunk, so a misrouted request is caught. */
function chunkData(id: string, i: number): Uint8Array {
  const out = new Uint8Array(CHUNK);
  const seed = [...`${id}/${i}`].reduce((h, c) => (h * 31 + c.charCodeAt(0)) >>> 0, 7);
  for (let j = 0; j < CHUNK; j++) out[j] = (seed + j * 131 + (j >> 9)) & 0xff;
  return out;
}

/** A connected frontend with a blk driver on device `id`'s socket. */
async function connect(dir: TempDir, id: string): Promise<{ blk: BlkDriver; close: () => void }> {
  const ram = GuestRam.create(2 * MiB);
  try {
    const fe = await VhostUserFrontend.connect(dir.join(`${id}.sock`));
    const blk = await BlkDriver.start(fe, { memory: ram, queueSize: 64, maxRequestBytes: CHUNK, ownMemory: true });
    return {
      blk,
      close: () => {
        blk.close();
        fe.close();
        ram.close();
      },
    };
  } catch (err) {
    ram.close();
    throw err;
  }
}

/** WRITES writes then WRITES reads; image devices must read back what was written. */
async function exercise(blk: BlkDriver, d: DeviceSpec, round = 0): Promise<void> {
  const sector = (i: number): number => (round * WRITES + i) * (CHUNK / 512);
  await Promise.all(
    Array.from({ length: WRITES }, async (_, i) => assert.equal(await blk.write(sector(i), chunkData(d.id, round * WRITES + i)), BlkStatus.OK, `${d.id} write ${i}`)),
  );
  await Promise.all(
    Array.from({ length: WRITES }, async (_, i) => {
      const r = await blk.read(sector(i), CHUNK);
      assert.equal(r.status, BlkStatus.OK, `${d.id} read ${i}`);
      if (d.kind === 'image') assert.deepEqual(r.data, chunkData(d.id, round * WRITES + i), `${d.id} chunk ${i} read back`);
    }),
  );
}

async function makeImages(dir: TempDir, devices: readonly DeviceSpec[]): Promise<void> {
  for (const d of devices) {
    if (d.kind !== 'image') continue;
    await writeFile(dir.join(`${d.id}.img`), '');
    await truncate(dir.join(`${d.id}.img`), 4 * MiB);
  }
}

async function addDevice(daemon: DaemonProcess, dir: TempDir, d: DeviceSpec): Promise<void> {
  const r = await daemon.api('PUT', `/devices/${d.id}`, deviceBody(dir, d));
  assert.equal(r.status, 201, r.body);
}

test('64 blk devices from a pool of 2 threads: concurrent verified I/O, threads do not grow, /metrics counts it', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-d-');
  const devices: DeviceSpec[] = Array.from({ length: 64 }, (_, i) => ({ id: `d${i}`, kind: i % 2 === 0 ? 'image' : 'null' }));
  await makeImages(dir, devices);
  const first = devices[0] as DeviceSpec;
  await writeFile(dir.join('config.json'), JSON.stringify({ threads: 2, devices: [deviceBody(dir, first)] }));
  const daemon = await startDaemon({ apiSocket: dir.join('api.sock'), config: dir.join('config.json'), logLevel: 'info' });
  t.after(() => daemon.stop());

  const threadsOne = daemon.threads();
  for (const d of devices.slice(1)) await addDevice(daemon, dir, d);
  const threadsAll = daemon.threads();
  t.diagnostic(`threads: ${threadsOne} with 1 device, ${threadsAll} with 64 (idle)`);
  assert.equal(threadsAll, threadsOne, 'adding devices starts no thread');

  const clients = await Promise.all(devices.map((d) => connect(dir, d.id)));
  try {
    await Promise.all(devices.map((d, i) => exercise((clients[i] as { blk: BlkDriver }).blk, d)));
    const threadsBusy = daemon.threads();
    t.diagnostic(`threads: ${threadsBusy} with 64 connected frontends after I/O`);
    assert.equal(threadsBusy, threadsOne, 'serving 64 frontends starts no thread');

    const list = (await daemon.api('GET', '/devices')).json as { devices: { id: string; state: string; queues: { worker: number; requests: number }[] }[] };
    assert.equal(list.devices.length, 64);
    const workers = new Set<number>();
    for (const info of list.devices) {
      assert.equal(info.state, 'connected', info.id);
      workers.add(info.queues[0]?.worker ?? -1);
    }
    assert.deepEqual([...workers].sort(), [0, 1], 'the devices are spread over both workers');

    const metrics = parseMetrics((await daemon.api('GET', '/metrics')).body);
    assert.equal(metrics.get('vhost_user_devices'), 64);
    for (const d of devices) {
      const q = `{device="${d.id}",queue="0"}`;
      assert.equal(metrics.get(`vhost_user_queue_requests_total${q}`), 2 * WRITES, `${d.id} requests`);
      assert.equal(metrics.get(`vhost_user_queue_written_bytes_total${q}`), WRITES * CHUNK, `${d.id} bytes written`);
      assert.equal(metrics.get(`vhost_user_queue_read_bytes_total${q}`), WRITES * CHUNK, `${d.id} bytes read`);
      assert.equal(metrics.get(`vhost_user_queue_errors_total${q}`), 0);
      assert.equal(metrics.get(`vhost_user_device_frontend_connected{device="${d.id}",type="blk"}`), 1);
    }
    const busy = [0, 1].map((w) => metrics.get(`vhost_user_worker_busy_seconds_total{worker="${w}"}`) ?? -1);
    assert.ok(busy.every((s) => s > 0), `both workers were busy: ${busy.join(', ')} s`);
  } finally {
    for (const c of clients) c.close();
  }
  assert.equal(await daemon.stop(), 0, 'SIGTERM: exit code 0');
  for (const d of devices.filter((x) => x.kind === 'image')) {
    const data = await readFile(dir.join(`${d.id}.img`));
    for (let i = 0; i < WRITES; i++) assert.deepEqual(data.subarray(i * CHUNK, (i + 1) * CHUNK), Buffer.from(chunkData(d.id, i)), `${d.id} image chunk ${i}`);
  }
});

test('devices added, removed and re-added through the API while others run I/O; bad requests change nothing', TIMEOUT, async (t) => {
  const dir = await testTempDir(t, 'vu-d-');
  const steady: DeviceSpec[] = [0, 1, 2, 3].map((i) => ({ id: `a${i}`, kind: i % 2 === 0 ? 'image' : 'null' }));
  const churn: DeviceSpec[] = [0, 1, 2, 3].map((i) => ({ id: `b${i}`, kind: i % 2 === 0 ? 'null' : 'image' }));
  await makeImages(dir, [...steady, ...churn]);
  await writeFile(dir.join('config.json'), JSON.stringify({ threads: 2, devices: steady.map((d) => deviceBody(dir, d)) }));
  const daemon = await startDaemon({ apiSocket: dir.join('api.sock'), config: dir.join('config.json'), logLevel: 'info' });
  t.after(() => daemon.stop());
  t.after(() => {
    if (process.env.VHOST_TEST_DUMP !== undefined) for (const l of daemon.logs()) console.error(JSON.stringify(l));
  });

  // The steady devices run I/O rounds until the churn is over; every round is verified.
  let churning = true;
  const rounds = new Map<string, number>();
  const steadyClients = await Promise.all(steady.map((d) => connect(dir, d.id)));
  const load = Promise.all(
    steady.map(async (d, i) => {
      const { blk } = steadyClients[i] as { blk: BlkDriver };
      let round = 0;
      while (churning || round < 2) await exercise(blk, d, round++ % 32);
      rounds.set(d.id, round);
    }),
  );
  try {
    for (let pass = 0; pass < 3; pass++) {
      for (const d of churn) await addDevice(daemon, dir, d);
      const clients = await Promise.all(churn.map((d) => connect(dir, d.id)));
      await Promise.all(churn.map((d, i) => exercise((clients[i] as { blk: BlkDriver }).blk, d, pass)));
      // Removing a device with a connected frontend: the frontend is disconnected, then the device is gone.
      const pending = (clients[0] as { blk: BlkDriver }).blk.read(0, CHUNK).then(
        (r) => assert.equal(r.status, BlkStatus.OK), // completed before the disconnect: fine too
        (err: unknown) => assert.ok(err instanceof Error, String(err)),
      );
      for (const d of churn) assert.equal((await daemon.api('DELETE', `/devices/${d.id}`)).status, 204);
      await pending;
      for (const c of clients) c.close();
      assert.equal((await daemon.api('GET', `/devices/${churn[0]?.id ?? ''}`)).status, 404);
    }

    // Bad requests against the running daemon: each refused, nothing changes, the others keep serving.
    const a0 = steady[0] as DeviceSpec;
    const bad: [string, unknown, number, string][] = [
      ['a0', deviceBody(dir, a0), 409, 'VHOST_DEVICE_EXISTS'],
      ['x1', { ...deviceBody(dir, { id: 'x1', kind: 'null' }), socket: dir.join('a1.sock') }, 409, 'VHOST_SOCKET_IN_USE'],
      ['x2', { ...deviceBody(dir, { id: 'x2', kind: 'null' }), socket: dir.join('no-such-dir', 'x.sock') }, 400, 'VHOST_SOCKET_UNAVAILABLE'],
      ['x3', { ...deviceBody(dir, { id: 'x3', kind: 'image' }) }, 400, 'ENOENT'],
      ['x4', { ...deviceBody(dir, { id: 'x4', kind: 'null' }), queues: 65 }, 400, 'VHOST_CONFIG_INVALID'],
      ['x5', '{"id": "x5", ', 400, 'VHOST_API_BAD_JSON'],
    ];
    for (const [id, body, status, code] of bad) {
      const r = await daemon.api('PUT', `/devices/${id}`, body);
      assert.equal(r.status, status, `${id}: ${r.body}`);
      assert.equal((r.json as { error: { code: string } }).error.code, code, r.body);
    }
    const list = (await daemon.api('GET', '/devices')).json as { devices: { id: string }[] };
    assert.deepEqual(list.devices.map((d) => d.id).sort(), steady.map((d) => d.id));
  } finally {
    churning = false;
    await load.finally(() => {
      for (const c of steadyClients) c.close();
    });
  }
  t.diagnostic(`steady devices ran ${[...rounds.values()].join(', ')} verified rounds during the churn`);
  const metrics = parseMetrics((await daemon.api('GET', '/metrics')).body);
  for (const d of steady) {
    assert.equal(metrics.get(`vhost_user_queue_requests_total{device="${d.id}",queue="0"}`), (rounds.get(d.id) ?? 0) * 2 * WRITES, d.id);
  }
  assert.equal(await daemon.stop(), 0);
  const warnings = daemon.logs().filter((l) => (l.level as number) >= 50);
  assert.deepEqual(warnings, [], 'no errors logged');
});

test('an nbd disk added over the API: verified I/O on nbdkit; an unreachable server is 502, a missing export 400', TIMEOUT, async (t) => {
  if (!requireTools(t, NBDKIT_TOOLS)) return;
  const dir = await testTempDir(t, 'vu-d-');
  // Strict export names: only "disk" is served.
  const nbd = await startNbdkit({ socketPath: dir.join('nbd.sock'), filters: ['exportname'], plugin: ['memory', '16M', 'exportname=disk', 'exportname-strict=true'] });
  t.after(() => nbd.stop());
  const daemon = await startDaemon({ apiSocket: dir.join('api.sock'), logLevel: 'info' });
  t.after(() => daemon.stop());
  const body = (id: string, uri: string): Record<string, unknown> => ({ id, type: 'blk', socket: dir.join(`${id}.sock`), queueSize: 64, nbd: uri });
  const added = await daemon.api('PUT', '/devices/n0', body('n0', `nbd+unix:///disk?socket=${nbd.socketPath}`));
  assert.equal(added.status, 201, added.body);
  const client = await connect(dir, 'n0');
  try {
    for (let round = 0; round < 3; round++) await exercise(client.blk, { id: 'n0', kind: 'image' }, round);
  } finally {
    client.close();
  }
  const refused: [string, string, number, string][] = [
    ['n1', `nbd+unix:///?socket=${dir.join('nobody.sock')}`, 502, 'VHOST_NBD_CONNECT'],
    ['n2', `nbd+unix:///no-such-export?socket=${nbd.socketPath}`, 400, 'VHOST_NBD_EXPORT'],
  ];
  for (const [id, uri, status, code] of refused) {
    const r = await daemon.api('PUT', `/devices/${id}`, body(id, uri));
    assert.equal(r.status, status, r.body);
    assert.equal((r.json as { error: { code: string } }).error.code, code, r.body);
  }
  const list = (await daemon.api('GET', '/devices')).json as { devices: { id: string }[] };
  assert.deepEqual(list.devices.map((d) => d.id), ['n0']);
  assert.equal(await daemon.stop(), 0);
});
