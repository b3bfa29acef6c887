// The management API (src/daemon/api-server.ts) against a fake DaemonControl (a Map of devices): every route, every
// kind of bad request and the status it gets, the socket file (mode, stale, live, not a socket), and the
// `vhost-user ctl` client end to end as a child process.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { renameSync, statSync, writeFileSync } from 'node:fs';
import { Agent, request } from 'node:http';
import { connect, createServer as createNetServer, type Server as NetServer } from 'node:net';
import { fileURLToPath } from 'node:url';
import pino from 'pino';
import { MAX_BODY_BYTES, startApiServer, statusForCode, type ApiServer } from '../../src/daemon/api-server.js';
import type { DeviceConfig } from '../../src/daemon/config.js';
import type { DaemonControl, DeviceInfo } from '../../src/daemon/control.js';
import { VhostError } from '../../src/errors.js';
import { testTempDir, type TempDir } from '../helpers/tmp.js';
import { tryConnect } from '../helpers/unix-socket.js';

const repo = fileURLToPath(new URL('../../../', import.meta.url));
const METRICS_TYPE = 'text/plain; version=0.0.4; charset=utf-8';

function infoOf(config: DeviceConfig): DeviceInfo {
  return {
    id: config.id,
    type: config.type,
    config,
    state: 'listening',
    frontend: { connected: false, reconnects: 0 },
    features: { offered: '0x0', negotiated: '0x0', protocol: '0x0' },
    needsReset: false,
    memory: { regions: 0, bytes: 0, changes: 0 },
    queues: [],
  };
}

/** A daemon made of a Map. `failNextAdd` makes the next add throw that error. */
class FakeControl implements DaemonControl {
  readonly devices = new Map<string, DeviceInfo>();
  readonly metricsContentType = METRICS_TYPE;
  failNextAdd: Error | undefined;
  /** add resolves this much later. */
  addDelayMs = 0;
  added: DeviceConfig[] = [];

  list(): DeviceInfo[] {
    return [...this.devices.values()];
  }

  get(id: string): DeviceInfo | undefined {
    return this.devices.get(id);
  }

  add(config: DeviceConfig): Promise<DeviceInfo> {
    const fail = this.failNextAdd;
    this.failNextAdd = undefined;
    if (fail !== undefined) return Promise.reject(fail);
    if (this.devices.has(config.id)) return Promise.reject(new VhostError('VHOST_DEVICE_EXISTS', `device ${config.id} exists`));
    this.added.push(config);
    const info = infoOf(config);
    this.devices.set(config.id, info);
    return new Promise((resolve) => setTimeout(() => resolve(info), this.addDelayMs));
  }

  remove(id: string): Promise<boolean> {
    return Promise.resolve(this.devices.delete(id));
  }

  metrics(): Promise<string> {
    return Promise.resolve(`# TYPE vhost_user_devices gauge\nvhost_user_devices ${this.devices.size}\n`);
  }
}

interface Reply {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
  /** The parsed body (undefined when empty). */
  json: unknown;
}

function call(
  socketPath: string,
  method: string,
  path: string,
  options: { body?: string | Buffer; headers?: Record<string, string> } = {},
): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = { ...options.headers };
    if (options.body !== undefined && headers['content-type'] === undefined) headers['content-type'] = 'application/json';
    const req = request({ socketPath, method, path, headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        const isJson = (res.headers['content-type'] ?? '').startsWith('application/json');
        resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json: isJson && text !== '' ? JSON.parse(text) : undefined });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(options.body);
  });
}

/** The error object of an error reply, checked for the expected status and code. */
function expectError(reply: Reply, status: number, code: string): { code: string; message: string; issues?: string[] } {
  assert.equal(reply.status, status, `status of ${reply.text}`);
  const body = reply.json as { error: { code: string; message: string; issues?: string[] } };
  assert.equal(body.error.code, code, reply.text);
  assert.equal(typeof body.error.message, 'string');
  return body.error;
}

interface Setup {
  dir: TempDir;
  control: FakeControl;
  api: ApiServer;
  sock: string;
  logs: Array<{ level: number; msg: string; code?: string; status?: number }>;
  /** GET /devices answers 200: the server still serves. */
  alive: () => Promise<void>;
}

async function setup(t: TestContext): Promise<Setup> {
  const dir = await testTempDir(t, 'vu-api-');
  const control = new FakeControl();
  const logs: Setup['logs'] = [];
  const log = pino({ level: 'debug' }, { write: (line: string) => void logs.push(JSON.parse(line) as Setup['logs'][number]) });
  const sock = dir.join('api.sock');
  const api = await startApiServer(control, sock, log);
  t.after(() => api.close());
  const alive = async (): Promise<void> => {
    const r = await call(sock, 'GET', '/devices');
    assert.equal(r.status, 200);
  };
  return { dir, control, api, sock, logs, alive };
}

const blkBody = (extra: Record<string, unknown> = {}): string =>
  JSON.stringify({ type: 'blk', socket: '/tmp/d0.sock', null: '64M', ...extra });

test('every route: list, add, get, add again (409), remove, remove again (404), metrics', async (t) => {
  const { sock, control, logs } = await setup(t);
  assert.deepEqual((await call(sock, 'GET', '/devices')).json, { devices: [] });

  const added = await call(sock, 'PUT', '/devices/d0', { body: blkBody() });
  assert.equal(added.status, 201);
  assert.equal(added.headers.location, '/devices/d0');
  const info = added.json as DeviceInfo;
  assert.equal(info.id, 'd0');
  assert.deepEqual(info.config, {
    id: 'd0', type: 'blk', socket: '/tmp/d0.sock', null: 64 * 1024 * 1024, memSlots: 509, readOnly: false, queues: 1,
    queueSize: 1024, io: 'sync', serial: 'vhost-user-ts',
  });
  assert.deepEqual(control.added, [info.config], 'the daemon got the parsed config, defaults filled in');

  const got = await call(sock, 'GET', '/devices/d0');
  assert.equal(got.status, 200);
  assert.deepEqual(got.json, info);
  assert.deepEqual((await call(sock, 'GET', '/devices')).json, { devices: [info] });

  expectError(await call(sock, 'PUT', '/devices/d0', { body: blkBody() }), 409, 'VHOST_DEVICE_EXISTS');

  const metrics = await call(sock, 'GET', '/metrics');
  assert.equal(metrics.status, 200);
  assert.equal(metrics.headers['content-type'], METRICS_TYPE);
  assert.match(metrics.text, /^vhost_user_devices 1$/m);

  const removed = await call(sock, 'DELETE', '/devices/d0');
  assert.equal(removed.status, 204);
  assert.equal(removed.text, '');
  expectError(await call(sock, 'DELETE', '/devices/d0'), 404, 'VHOST_DEVICE_NOT_FOUND');
  expectError(await call(sock, 'GET', '/devices/d0'), 404, 'VHOST_DEVICE_NOT_FOUND');
  assert.deepEqual((await call(sock, 'GET', '/devices')).json, { devices: [] });

  const head = await call(sock, 'HEAD', '/devices');
  assert.equal(head.status, 200);
  assert.equal(head.text, '');

  // each request logged at debug; failures at warn with their code
  assert.ok(logs.some((l) => l.level === 20 && l.msg === 'api request' && l.status === 201));
  assert.ok(logs.some((l) => l.level === 40 && l.code === 'VHOST_DEVICE_EXISTS' && l.status === 409));
});

test('PUT: the id in the body is optional and must be the path\'s; bad path ids are refused', async (t) => {
  const { sock, alive } = await setup(t);
  assert.equal((await call(sock, 'PUT', '/devices/n0', { body: JSON.stringify({ id: 'n0', type: 'net', socket: '/tmp/n0.sock', port: 'sink' }) })).status, 201);
  const mismatch = expectError(await call(sock, 'PUT', '/devices/n1', { body: blkBody({ id: 'other' }) }), 400, 'VHOST_API_ID_MISMATCH');
  assert.match(mismatch.message, /other/);
  expectError(await call(sock, 'PUT', '/devices/n1', { body: blkBody({ id: 5 }) }), 400, 'VHOST_API_ID_MISMATCH');
  for (const path of ['/devices/-x', '/devices/a%2Fb', '/devices/%E0%A4%A', `/devices/${'x'.repeat(65)}`, '/devices/a%20b']) {
    expectError(await call(sock, 'GET', path), 400, 'VHOST_API_BAD_ID');
  }
  expectError(await call(sock, 'PUT', '/devices/.hidden', { body: blkBody() }), 400, 'VHOST_API_BAD_ID');
  // percent-encoded letters are the same id
  assert.equal((await call(sock, 'GET', '/devices/%6E0')).status, 200);
  await alive();
});

test('PUT: bad JSON, an empty body, unknown fields, wrong types: 400 with the issues', async (t) => {
  const { sock, alive, control } = await setup(t);
  const badJson = expectError(await call(sock, 'PUT', '/devices/d0', { body: '{"type": "blk",' }), 400, 'VHOST_API_BAD_JSON');
  assert.match(badJson.message, /not valid JSON/);
  await alive();
  expectError(await call(sock, 'PUT', '/devices/d0', { body: '' }), 400, 'VHOST_API_BAD_JSON');
  expectError(await call(sock, 'PUT', '/devices/d0', { body: Buffer.from([0xff, 0xfe, 0x7b]) }), 400, 'VHOST_API_BAD_JSON');

  const unknown = expectError(await call(sock, 'PUT', '/devices/d0', { body: blkBody({ qeues: 2 }) }), 400, 'VHOST_CONFIG_INVALID');
  assert.deepEqual(unknown.issues, ['device: unknown field "qeues"']);
  assert.match(unknown.message, /unknown field "qeues"/);
  await alive();

  const types = expectError(
    await call(sock, 'PUT', '/devices/d0', { body: blkBody({ queues: '2', readOnly: 1, socket: 3 }) }),
    400,
    'VHOST_CONFIG_INVALID',
  );
  assert.deepEqual(types.issues, [
    'socket: expected a non-empty path of at most 107 bytes',
    'readOnly: expected true or false',
    'queues: expected an integer in 1..64',
  ]);
  for (const body of ['[]', '"blk"', 'null', '42']) {
    assert.deepEqual(expectError(await call(sock, 'PUT', '/devices/d0', { body }), 400, 'VHOST_CONFIG_INVALID').issues, ['device: expected an object']);
  }
  assert.deepEqual(
    expectError(await call(sock, 'PUT', '/devices/d0', { body: '{}' }), 400, 'VHOST_CONFIG_INVALID').issues,
    ['type: required: "blk", "net", "rng" or "vsock"'],
  );
  assert.equal(control.added.length, 0);
  await alive();
});

test('PUT content types: application/json with or without charset, or none; anything else 415', async (t) => {
  const { sock, alive } = await setup(t);
  const ok = async (id: string, headers: Record<string, string>): Promise<void> => {
    const r = await call(sock, 'PUT', `/devices/${id}`, { body: blkBody({ socket: `/tmp/${id}.sock` }), headers });
    assert.equal(r.status, 201, `${JSON.stringify(headers)}: ${r.text}`);
  };
  await ok('a', { 'content-type': 'application/json' });
  await ok('b', { 'content-type': 'Application/JSON; charset=UTF-8' });
  // no content-type at all (node:http sends none unless told)
  const none = await new Promise<number>((resolve, reject) => {
    const req = request({ socketPath: sock, method: 'PUT', path: '/devices/c', agent: false }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('error', reject);
    req.end(blkBody({ socket: '/tmp/c.sock' }));
  });
  assert.equal(none, 201);
  for (const type of ['text/plain', 'application/x-www-form-urlencoded', 'application/json; charset=latin1', 'application/jsonx']) {
    expectError(await call(sock, 'PUT', '/devices/d', { body: blkBody(), headers: { 'content-type': type } }), 415, 'VHOST_API_UNSUPPORTED_MEDIA_TYPE');
  }
  await alive();
});

test('an oversized body: 413 at once (declared or streamed), and the server keeps serving', async (t) => {
  const { sock, alive, control } = await setup(t);
  const big = blkBody({ serial: 'x'.repeat(MAX_BODY_BYTES) });
  const r = await call(sock, 'PUT', '/devices/d0', { body: big });
  expectError(r, 413, 'VHOST_API_BODY_TOO_LARGE');
  assert.equal(r.headers.connection, 'close');
  await alive();

  // chunked, past the limit and not finished: the answer comes without waiting for the end of the body, then the
  // connection closes. (All of it fits in the socket buffer, so that the client is not cut off by EPIPE while
  // writing before it reads the answer.)
  const answer = await new Promise<string>((resolve, reject) => {
    const s = connect(sock);
    let got = '';
    s.on('connect', () => {
      const chunk = `4000\r\n${' '.repeat(0x4000)}\r\n`;
      s.write(`PUT /devices/d1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n${chunk.repeat(5)}`);
    });
    s.on('data', (d: Buffer) => (got += d.toString('latin1')));
    s.on('error', reject);
    s.on('close', () => resolve(got));
    setTimeout(() => {
      s.destroy();
      reject(new Error(`no answer and no close after 10 s: ${got}`));
    }, 10_000).unref();
  });
  assert.match(answer, /^HTTP\/1\.1 413 /);
  assert.match(answer, /VHOST_API_BODY_TOO_LARGE/);
  assert.equal(control.added.length, 0);
  await alive();

  // a body just under the limit is read
  const fits = blkBody({ serial: 'x' }).replace('}', `${' '.repeat(MAX_BODY_BYTES - 200)}}`);
  assert.ok(Buffer.byteLength(fits) <= MAX_BODY_BYTES);
  assert.equal((await call(sock, 'PUT', '/devices/d2', { body: fits })).status, 201);
});

test('wrong method: 405 with Allow; unknown route: 404', async (t) => {
  const { sock, alive } = await setup(t);
  const r1 = await call(sock, 'POST', '/devices', { body: blkBody() });
  expectError(r1, 405, 'VHOST_API_METHOD_NOT_ALLOWED');
  assert.equal(r1.headers.allow, 'GET, HEAD');
  const r2 = await call(sock, 'PATCH', '/devices/d0', { body: '{}' });
  expectError(r2, 405, 'VHOST_API_METHOD_NOT_ALLOWED');
  assert.equal(r2.headers.allow, 'GET, HEAD, PUT, DELETE');
  const r3 = await call(sock, 'DELETE', '/metrics');
  expectError(r3, 405, 'VHOST_API_METHOD_NOT_ALLOWED');
  assert.equal(r3.headers.allow, 'GET, HEAD');
  for (const path of ['/', '/device', '/devices/', '/devices/a/b', '/metrics/x', '/v1/devices']) {
    expectError(await call(sock, 'GET', path), 404, 'VHOST_API_NOT_FOUND');
  }
  // a query string does not change the route
  assert.equal((await call(sock, 'GET', '/devices?verbose=1')).status, 200);
  await alive();
});

test('errors from the daemon: status by code; a plain Error is a 500 (logged); the server still answers', async (t) => {
  const { sock, alive, control, logs } = await setup(t);
  const cases: Array<[Error, number, string]> = [
    [new VhostError('VHOST_SOCKET_IN_USE', '/tmp/d0.sock is in use'), 409, 'VHOST_SOCKET_IN_USE'],
    [new VhostError('VHOST_SOCKET_UNAVAILABLE', 'cannot listen'), 400, 'VHOST_SOCKET_UNAVAILABLE'],
    [new VhostError('VHOST_BLK_BAD_OPTION', 'bad'), 400, 'VHOST_BLK_BAD_OPTION'],
    [new VhostError('VHOST_NET_BAD_MAC', 'bad mac'), 400, 'VHOST_NET_BAD_MAC'],
    [Object.assign(new Error("ENOENT: no such file or directory, open '/x.img'"), { code: 'ENOENT', errno: -2 }), 400, 'ENOENT'],
    [new Error('something broke'), 500, 'VHOST_INTERNAL'],
    [new VhostError('VHOST_WORKER_DIED', 'the pool is gone'), 500, 'VHOST_WORKER_DIED'],
  ];
  for (const [err, status, code] of cases) {
    control.failNextAdd = err;
    const e = expectError(await call(sock, 'PUT', '/devices/d0', { body: blkBody() }), status, code);
    assert.equal(e.message, err.message);
    await alive();
  }
  assert.ok(logs.some((l) => l.level === 50 && l.code === 'VHOST_INTERNAL' && l.status === 500), 'a 500 is logged as an error');
  assert.equal((await call(sock, 'PUT', '/devices/d0', { body: blkBody() })).status, 201);
});

test('statusForCode', () => {
  assert.equal(statusForCode('VHOST_NET_BAD_OPTION'), 400);
  assert.equal(statusForCode('EACCES'), 400);
  assert.equal(statusForCode('EISDIR'), 400);
  assert.equal(statusForCode('VHOST_DEVICE_NOT_FOUND'), 404);
  assert.equal(statusForCode('VHOST_DEVICE_EXISTS'), 409);
  assert.equal(statusForCode('VHOST_API_BODY_TOO_LARGE'), 413);
  assert.equal(statusForCode('EIO'), 500);
  assert.equal(statusForCode('VHOST_NBD_EXPORT'), 400, 'no such export: the request named it');
  assert.equal(statusForCode('VHOST_NBD_CONNECT'), 502, 'the NBD server cannot be reached: upstream');
  assert.equal(statusForCode('VHOST_NBD_TLS'), 502);
});

test('the socket: mode 0600, removed by close; a stale socket is replaced; a live one or a regular file refused', async (t) => {
  const dir = await testTempDir(t, 'vu-api-');
  const log = pino({ level: 'silent' });
  const control = new FakeControl();
  const path = dir.join('api.sock');

  const api = await startApiServer(control, path, log);
  assert.equal(statSync(path).mode & 0o777, 0o600);
  assert.ok(statSync(path).isSocket());
  // a second server on the same path: the first one is live
  await assert.rejects(startApiServer(control, path, log), { code: 'VHOST_SOCKET_IN_USE' });
  assert.ok(await tryConnect(path), 'the first server was left alone');
  await api.close();
  await api.close(); // idempotent
  assert.throws(() => statSync(path), { code: 'ENOENT' });

  // a stale socket: bound, then its server gone without removing the file
  const stale = dir.join('stale.sock');
  const other = dir.join('other.sock');
  const listener: NetServer = createNetServer();
  await new Promise<void>((resolve) => listener.listen(other, resolve));
  renameSync(other, stale);
  await new Promise<void>((resolve) => listener.close(() => resolve()));
  assert.ok(statSync(stale).isSocket());
  assert.equal(await tryConnect(stale), false);
  const replaced = await startApiServer(control, stale, log);
  t.after(() => replaced.close());
  assert.equal((await call(stale, 'GET', '/devices')).status, 200);
  assert.equal(statSync(stale).mode & 0o777, 0o600);

  // a live socket of another server
  const live = dir.join('live.sock');
  const liveServer = createNetServer((c) => c.destroy());
  await new Promise<void>((resolve) => liveServer.listen(live, resolve));
  t.after(() => new Promise<void>((resolve) => liveServer.close(() => resolve())));
  await assert.rejects(startApiServer(control, live, log), { code: 'VHOST_SOCKET_IN_USE' });

  // a regular file
  const file = dir.join('file');
  writeFileSync(file, 'keep me');
  await assert.rejects(startApiServer(control, file, log), { code: 'VHOST_SOCKET_IN_USE' });
  assert.ok(statSync(file).isFile());

  // a directory that does not exist
  await assert.rejects(startApiServer(control, dir.join('no', 'such', 'dir.sock'), log), { code: 'VHOST_SOCKET_UNAVAILABLE' });
});

test('close: idle keep-alive connections do not hold it; a request in progress is answered first', async (t) => {
  const dir = await testTempDir(t, 'vu-api-');
  const control = new FakeControl();
  const path = dir.join('api.sock');
  const api = await startApiServer(control, path, pino({ level: 'silent' }));
  const agent = new Agent({ keepAlive: true });
  t.after(() => agent.destroy());
  const get = (): Promise<number> =>
    new Promise((resolve, reject) => {
      const req = request({ socketPath: path, path: '/devices', agent }, (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      });
      req.on('error', reject);
      req.end();
    });
  assert.equal(await get(), 200);
  assert.equal(await get(), 200);

  control.addDelayMs = 300;
  const put = call(path, 'PUT', '/devices/d0', { body: blkBody() });
  await new Promise((resolve) => setTimeout(resolve, 100)); // the PUT is in the daemon's add now
  const t0 = performance.now();
  await api.close();
  assert.equal((await put).status, 201);
  assert.ok(performance.now() - t0 < 2000, `close took ${performance.now() - t0} ms`);
  assert.equal(await tryConnect(path), false);
});

// ---- vhost-user ctl ------------------------------------------------------------------------------------------------

interface CtlResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `node bin/vhost-user.js ctl ARGS` (asynchronously: the API server is in this process). */
function ctl(args: string[]): Promise<CtlResult> {
  return new Promise((resolve) => {
    execFile(process.execPath, ['bin/vhost-user.js', 'ctl', ...args], { cwd: repo, timeout: 30_000 }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof err.code === 'number' ? err.code : -1;
      resolve({ code, stdout, stderr });
    });
  });
}

test('vhost-user ctl: list, add, get, metrics, remove, and errors with exit status 1', { timeout: 120_000 }, async (t) => {
  const { sock, dir } = await setup(t);
  const api = ['--api-socket', sock];

  let r = await ctl([...api, 'list']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout), { devices: [] });
  assert.ok(r.stdout.includes('\n  "devices"'), 'pretty-printed');

  const file = dir.join('n0.json');
  writeFileSync(file, JSON.stringify({ id: 'n0', type: 'net', socket: '/tmp/n0.sock', port: 'loopback', queues: 2 }));
  r = await ctl([...api, 'add', file]);
  assert.equal(r.code, 0, r.stderr);
  const info = JSON.parse(r.stdout) as DeviceInfo;
  assert.equal(info.id, 'n0');
  assert.equal(info.config.type === 'net' ? info.config.queues : undefined, 2);

  // the option after the subcommand works too
  r = await ctl(['get', 'n0', ...api]);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout), info);

  r = await ctl([...api, 'list']);
  assert.deepEqual((JSON.parse(r.stdout) as { devices: DeviceInfo[] }).devices.map((d) => d.id), ['n0']);

  r = await ctl([...api, 'metrics']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^vhost_user_devices 1$/m);

  // adding it again: the API's error, on stderr, exit status 1
  r = await ctl([...api, 'add', file]);
  assert.equal(r.code, 1);
  assert.equal(r.stdout, '');
  assert.match(r.stderr, /^vhost-user ctl: VHOST_DEVICE_EXISTS: /);

  r = await ctl([...api, 'remove', 'n0']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, '');
  r = await ctl([...api, 'get', 'n0']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^vhost-user ctl: VHOST_DEVICE_NOT_FOUND: /);

  // an invalid device: the issues come back from the server
  writeFileSync(file, JSON.stringify({ id: 'n0', type: 'net', socket: '/tmp/n0.sock', port: 'loopback', qeues: 2 }));
  r = await ctl([...api, 'add', file]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^vhost-user ctl: VHOST_CONFIG_INVALID: .*unknown field "qeues"/);

  // files ctl cannot send
  writeFileSync(file, '{ not json');
  r = await ctl([...api, 'add', file]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^vhost-user ctl: VHOST_CONFIG_INVALID: /);
  writeFileSync(file, JSON.stringify({ type: 'net' }));
  r = await ctl([...api, 'add', file]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /no "id"/);
  r = await ctl([...api, 'add', dir.join('missing.json')]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^vhost-user ctl: ENOENT: /);

  // nothing listening
  r = await ctl(['--api-socket', dir.join('nobody.sock'), 'list']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^vhost-user ctl: ENOENT: /);
  const stale = dir.join('stale.sock');
  const other = dir.join('other.sock');
  const listener = createNetServer();
  await new Promise<void>((resolve) => listener.listen(other, resolve));
  renameSync(other, stale);
  await new Promise<void>((resolve) => listener.close(() => resolve()));
  r = await ctl(['--api-socket', stale, 'list']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^vhost-user ctl: ECONNREFUSED: /);

  // --api-socket is required
  r = await ctl(['list']);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /--api-socket/);
});
