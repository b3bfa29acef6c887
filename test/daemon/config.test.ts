// The daemon's configuration file (src/daemon/config.ts): defaults, every field's bounds, unknown fields named at
// each level, whole-file checks, sizes, and reading a file.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { SYNC_MODES } from '../../src/backend/sync-block.js';
import { MAX_BUSY_POLL_US } from '../../src/backend/worker-pool.js';
import { MAX_QUEUE_PAIRS } from '../../src/devices/net/net-device.js';
import {
  ConfigError,
  MAX_CONFIG_BUSY_POLL_US,
  MAX_NET_QUEUE_PAIRS,
  SYNC_MODE_NAMES,
  parseDaemonConfig,
  parseDeviceConfig,
  parseNetPort,
  parseSizeText,
  readDaemonConfig,
} from '../../src/daemon/config.js';
import { VhostError } from '../../src/errors.js';
import { createDevice } from '../../src/daemon/device-factory.js';
import { RngDevice } from '../../src/devices/rng/rng-device.js';
import { testTempDir } from '../helpers/tmp.js';

/** The issues of the ConfigError that fn throws. */
function issuesOf(fn: () => unknown): string[] {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof ConfigError, `not a ConfigError: ${String(err)}`);
    assert.ok(err instanceof VhostError);
    assert.equal(err.code, 'VHOST_CONFIG_INVALID');
    for (const issue of err.issues) assert.ok(err.message.includes(issue), 'the message joins the issues');
    return err.issues;
  }
  assert.fail('no error');
}

const blk = (extra: Record<string, unknown> = {}): Record<string, unknown> => ({
  id: 'disk0',
  type: 'blk',
  socket: '/run/disk0.sock',
  image: '/var/disk0.img',
  ...extra,
});
const net = (extra: Record<string, unknown> = {}): Record<string, unknown> => ({
  id: 'net0',
  type: 'net',
  socket: '/run/net0.sock',
  port: 'loopback',
  ...extra,
});

/** The issues of one blk (or net) device with these fields, as parseDeviceConfig names them. */
const blkIssues = (extra: Record<string, unknown>): string[] => issuesOf(() => parseDeviceConfig(blk(extra)));
const netIssues = (extra: Record<string, unknown>): string[] => issuesOf(() => parseDeviceConfig(net(extra)));

test('a full file: every field kept, defaults filled in', () => {
  const config = parseDaemonConfig({
    threads: 4,
    sync: 'lock',
    busyPollUs: 50,
    apiSocket: '/run/vhost-user/api.sock',
    logLevel: 'debug',
    devices: [
      blk({ queues: 2 }),
      { id: 'scratch', type: 'blk', socket: '/run/scratch.sock', null: '1G', readOnly: true, queueSize: 256, io: 'async', serial: 'S1', memSlots: 0, logLevel: 'trace' },
      net({ port: 'tap:vu0', queues: 2, mac: '52:54:00:ab:cd:ef', queueSize: 256, frameLen: 1514 }),
      net({ id: 'n1', socket: '/run/n1.sock', port: 'source' }),
    ],
  });
  assert.deepEqual(config, {
    threads: 4,
    sync: 'lock',
    busyPollUs: 50,
    apiSocket: '/run/vhost-user/api.sock',
    logLevel: 'debug',
    devices: [
      { id: 'disk0', type: 'blk', socket: '/run/disk0.sock', image: '/var/disk0.img', memSlots: 509, readOnly: false, queues: 2, queueSize: 1024, io: 'sync', serial: 'vhost-user-ts' },
      { id: 'scratch', type: 'blk', socket: '/run/scratch.sock', null: 1024 ** 3, readOnly: true, queueSize: 256, io: 'async', serial: 'S1', memSlots: 0, logLevel: 'trace', queues: 1 },
      { id: 'net0', type: 'net', socket: '/run/net0.sock', port: 'tap:vu0', queues: 2, mac: '52:54:00:ab:cd:ef', queueSize: 256, frameLen: 1514, memSlots: 509 },
      { id: 'n1', type: 'net', socket: '/run/n1.sock', port: 'source', queues: 1, queueSize: 1024, frameLen: 64, memSlots: 509 },
    ],
  });
});

test('the smallest file: no field at all; optional fields stay absent', () => {
  const config = parseDaemonConfig({});
  assert.deepEqual(config, { sync: 'qsbr', busyPollUs: 0, devices: [] });
  assert.ok(!('threads' in config) && !('apiSocket' in config) && !('logLevel' in config));
  const device = parseDeviceConfig(net());
  assert.ok(!('mac' in device) && !('logLevel' in device));
});

test('a parsed device parses again to itself (the API shows it; it can be sent back)', () => {
  for (const d of [blk(), blk({ image: undefined, null: '64M' }), net({ mac: '02:00:00:00:00:01' })]) {
    const once = parseDeviceConfig(JSON.parse(JSON.stringify(d)));
    assert.deepEqual(parseDeviceConfig(JSON.parse(JSON.stringify(once))), once);
  }
});

test('limits match the devices and the worker pool', () => {
  assert.equal(MAX_NET_QUEUE_PAIRS, MAX_QUEUE_PAIRS);
  assert.deepEqual([...SYNC_MODE_NAMES], [...SYNC_MODES]);
  assert.equal(MAX_CONFIG_BUSY_POLL_US, MAX_BUSY_POLL_US);
  assert.throws(() => parseDaemonConfig({ busyPollUs: MAX_BUSY_POLL_US + 1 }), ConfigError);
});

test('id: 1..64 characters of [A-Za-z0-9._-], not starting with a punctuation mark; required', () => {
  for (const id of ['a', 'A.b_c-9', '0', 'x'.repeat(64)]) assert.equal(parseDeviceConfig(blk({ id })).id, id);
  for (const id of ['', '-a', '.a', '_a', 'a/b', 'a b', 'é', 'x'.repeat(65), 5, null]) {
    const issues = blkIssues({ id });
    assert.equal(issues.length, 1, String(id));
    assert.match(issues[0] as string, /^id: expected /);
  }
  assert.deepEqual(blkIssues({ id: undefined }), ['id: required']);
});

test('socket: a non-empty path of at most 107 bytes; required', () => {
  assert.equal(parseDeviceConfig(blk({ socket: `/${'s'.repeat(106)}` })).socket.length, 107);
  assert.deepEqual(blkIssues({ socket: `/${'s'.repeat(107)}` }), ['socket: expected a non-empty path of at most 107 bytes']);
  // bytes, not characters: 54 two-byte characters are 108 bytes
  assert.equal(blkIssues({ socket: 'é'.repeat(54) }).length, 1);
  assert.equal(blkIssues({ socket: '' }).length, 1);
  assert.equal(blkIssues({ socket: 'a\0b' }).length, 1);
  assert.equal(blkIssues({ socket: 7 }).length, 1);
  assert.deepEqual(blkIssues({ socket: undefined }), ['socket: required']);
});

test('memSlots 0..509 (default 509), logLevel one of pino levels (absent: the daemon\'s)', () => {
  assert.equal(parseDeviceConfig(blk({ memSlots: 0 })).memSlots, 0);
  assert.equal(parseDeviceConfig(net({ memSlots: 509 })).memSlots, 509);
  for (const memSlots of [-1, 510, 1.5, '8', null]) assert.deepEqual(blkIssues({ memSlots }), ['memSlots: expected an integer in 0..509']);
  for (const logLevel of ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']) {
    assert.equal(parseDeviceConfig(net({ logLevel })).logLevel, logLevel);
  }
  assert.equal(netIssues({ logLevel: 'verbose' }).length, 1);
  assert.match(netIssues({ logLevel: 'verbose' })[0] as string, /^logLevel: expected one of "fatal"/);
});

test('blk: exactly one of image, null and nbd', () => {
  assert.deepEqual(blkIssues({ null: '1G' }), ['device: give one of "image", "null", not both']);
  assert.deepEqual(blkIssues({ null: '1G', nbd: 'nbd://h/e' }), ['device: give one of "image", "null", "nbd", not all']);
  assert.deepEqual(blkIssues({ image: undefined }), ['device: give exactly one of "image" (a file), "null" (a size) or "nbd" (a URI)']);
  assert.equal(blkIssues({ image: '' })[0], 'image: expected a non-empty path');
  // reported along with the other problems of the same device
  assert.deepEqual(issuesOf(() => parseDeviceConfig({ type: 'blk', id: 'a', image: 'x', null: 512 })), [
    'socket: required',
    'device: give one of "image", "null", not both',
  ]);
});

test('blk nbd: a URI of the NBD URI spec; TLS files and a timeout in seconds (absent: 30) only with it', () => {
  const d = parseDeviceConfig(blk({ image: undefined, nbd: 'nbds+unix:///disk?socket=/run/nbd.sock', nbdTlsCa: '/etc/ca.pem' }));
  assert.ok(d.type === 'blk');
  assert.equal(d.nbd, 'nbds+unix:///disk?socket=/run/nbd.sock');
  assert.equal(d.nbdTimeout, undefined);
  assert.equal(d.nbdTlsCa, '/etc/ca.pem');
  for (const nbd of ['http://h/e', 'nbd+unix:///e', 'nbd://h:99999/e', 7]) {
    assert.match(blkIssues({ image: undefined, nbd })[0] as string, /^nbd: expected an NBD URI/, String(nbd));
  }
  assert.deepEqual(blkIssues({ nbdTlsCert: '/c.pem' }), ['nbdTlsCert: "nbdTlsCert" is for an "nbd" disk']);
  assert.deepEqual(blkIssues({ nbdTimeout: 5 }), ['nbdTimeout: "nbdTimeout" is for an "nbd" disk']);
  for (const nbdTimeout of [0, 3601, 1.5]) {
    assert.deepEqual(blkIssues({ image: undefined, nbd: 'nbd://h/e', nbdTimeout }), ['nbdTimeout: expected an integer in 1..3600']);
  }
});

test('blk null sizes: a number of bytes or a string with a binary unit; a positive multiple of 512', () => {
  const size = (s: unknown): number | undefined => {
    const d = parseDeviceConfig(blk({ image: undefined, null: s }));
    assert.equal(d.type, 'blk');
    return d.type === 'blk' ? d.null : undefined;
  };
  assert.equal(size(512), 512);
  assert.equal(size(2 ** 40), 2 ** 40);
  assert.equal(size('4096'), 4096);
  assert.equal(size('4k'), 4096);
  assert.equal(size('4K'), 4096);
  assert.equal(size('64M'), 64 * 1024 ** 2);
  assert.equal(size('64MiB'), 64 * 1024 ** 2);
  assert.equal(size(' 1G '), 1024 ** 3);
  assert.equal(size('2t'), 2 * 1024 ** 4);
  const bad = (s: unknown): string[] => blkIssues({ image: undefined, null: s });
  assert.deepEqual(bad(0), ['null: expected a positive multiple of 512 bytes, got 0']);
  assert.deepEqual(bad(1000), ['null: expected a positive multiple of 512 bytes, got 1000']);
  assert.deepEqual(bad(-512), ['null: expected a positive multiple of 512 bytes, got -512']);
  assert.deepEqual(bad(512.5), ['null: expected a positive multiple of 512 bytes, got 512.5']);
  assert.deepEqual(bad('100'), ['null: expected a positive multiple of 512 bytes, got 100']);
  assert.deepEqual(bad('1x'), ['null: expected a size such as 4096, 4k, 64M or 1G']);
  assert.deepEqual(bad('-1G'), ['null: expected a size such as 4096, 4k, 64M or 1G']);
  assert.deepEqual(bad('1.5G'), ['null: expected a size such as 4096, 4k, 64M or 1G']);
  assert.deepEqual(bad('99999999999T'), ['null: size too large']);
  assert.equal(bad(true).length, 1);
  assert.equal(bad(null).length, 1);
});

test('parseSizeText keeps the CLI\'s unit rules', () => {
  assert.equal(parseSizeText('4096'), 4096);
  assert.equal(parseSizeText('1g'), 1024 ** 3);
  assert.equal(parseSizeText('16KB'), 16384);
  assert.throws(() => parseSizeText(''), RangeError);
  assert.throws(() => parseSizeText('G'), RangeError);
  assert.throws(() => parseSizeText('1P'), RangeError);
});

test('blk fields: readOnly, queues 1..64, queueSize a power of two 1..32768, io, serial of at most 20 bytes', () => {
  const d = parseDeviceConfig(blk({ readOnly: true, queues: 64, queueSize: 1, io: 'async', serial: 'x'.repeat(20) }));
  assert.deepEqual(
    { ...d },
    { ...blk(), readOnly: true, queues: 64, queueSize: 1, io: 'async', serial: 'x'.repeat(20), memSlots: 509 },
  );
  assert.equal((parseDeviceConfig(blk({ queueSize: 32768 })) as { queueSize: number }).queueSize, 32768);
  assert.deepEqual(blkIssues({ readOnly: 'yes' }), ['readOnly: expected true or false']);
  for (const queues of [0, 65, 2.5, '2']) assert.deepEqual(blkIssues({ queues }), ['queues: expected an integer in 1..64']);
  for (const queueSize of [0, 3, 1000, 65536, 2 ** 31]) {
    assert.deepEqual(blkIssues({ queueSize }), ['queueSize: expected a power of two in 1..32768']);
  }
  assert.deepEqual(blkIssues({ io: 'direct' }), ['io: expected one of "sync", "async"']);
  assert.deepEqual(blkIssues({ serial: 'x'.repeat(21) }), ['serial: expected a string of at most 20 bytes']);
  assert.deepEqual(blkIssues({ serial: 'é'.repeat(11) }), ['serial: expected a string of at most 20 bytes']);
  // net-only fields are unknown on a blk device
  assert.deepEqual(blkIssues({ port: 'sink', frameLen: 64 }), ['device: unknown field "port"', 'device: unknown field "frameLen"']);
});

test('net fields: port, queues 1..32, mac, queueSize a power of two 2..32768, frameLen 60..9014', () => {
  for (const port of ['loopback', 'sink', 'source', 'tap:vu0', 'tap:a', 'tap:123456789012345']) {
    assert.equal((parseDeviceConfig(net({ port })) as { port: string }).port, port);
  }
  for (const port of ['tap:', 'tap:1234567890123456', 'tap:a/b', 'tap:a b', 'tap:a:b', 'switch', 'Loopback', '', 3]) {
    assert.equal(netIssues({ port }).length, 1, String(port));
    assert.match(netIssues({ port })[0] as string, /^port: expected /);
  }
  assert.deepEqual(netIssues({ port: undefined }), ['port: required']);
  assert.deepEqual(parseNetPort('tap:vu0'), { kind: 'tap', name: 'vu0' });
  assert.deepEqual(parseNetPort('sink'), { kind: 'sink' });

  assert.equal((parseDeviceConfig(net({ queues: 32 })) as { queues: number }).queues, 32);
  for (const queues of [0, 33]) assert.deepEqual(netIssues({ queues }), ['queues: expected an integer in 1..32']);

  for (const mac of ['52:54:00:12:34:56', '02:00:00:00:00:00', 'FE:ff:Ab:00:00:01']) {
    assert.equal((parseDeviceConfig(net({ mac })) as { mac?: string }).mac, mac);
  }
  for (const mac of ['01:00:5e:00:00:01', 'ff:ff:ff:ff:ff:ff', '52:54:00:12:34', '52-54-00-12-34-56', '52:54:00:12:34:5g', '525400123456', 5]) {
    assert.equal(netIssues({ mac }).length, 1, String(mac));
  }

  assert.equal((parseDeviceConfig(net({ queueSize: 2 })) as { queueSize: number }).queueSize, 2);
  for (const queueSize of [1, 3, 65536]) assert.deepEqual(netIssues({ queueSize }), ['queueSize: expected a power of two in 2..32768']);

  assert.equal((parseDeviceConfig(net({ frameLen: 60 })) as { frameLen: number }).frameLen, 60);
  assert.equal((parseDeviceConfig(net({ frameLen: 9014 })) as { frameLen: number }).frameLen, 9014);
  for (const frameLen of [59, 9015, 64.5]) assert.deepEqual(netIssues({ frameLen }), ['frameLen: expected an integer in 60..9014']);
  // blk-only fields are unknown on a net device
  assert.deepEqual(netIssues({ image: 'x', readOnly: true }), ['device: unknown field "image"', 'device: unknown field "readOnly"']);
});

test('rng fields: maxBytes 1..1048576 (default 65536), rateBytes and ratePeriodMs, queueSize a power of two 1..32768', () => {
  const rng = (extra: Record<string, unknown> = {}): Record<string, unknown> => ({ id: 'rng0', type: 'rng', socket: '/run/rng0.sock', ...extra });
  assert.deepEqual(parseDeviceConfig(rng()), { id: 'rng0', type: 'rng', socket: '/run/rng0.sock', memSlots: 509, queueSize: 1024, maxBytes: 65536, ratePeriodMs: 1000 });
  const limited = parseDeviceConfig(rng({ rateBytes: 1024, ratePeriodMs: 100 })) as { rateBytes: number; ratePeriodMs: number };
  assert.deepEqual([limited.rateBytes, limited.ratePeriodMs], [1024, 100]);
  assert.deepEqual(issuesOf(() => parseDeviceConfig(rng({ rateBytes: 0, ratePeriodMs: 0 }))), [
    'rateBytes: expected an integer in 1..2147483648',
    'ratePeriodMs: expected an integer in 1..3600000',
  ]);
  assert.equal((parseDeviceConfig(rng({ maxBytes: 1048576, queueSize: 1 })) as { maxBytes: number }).maxBytes, 1048576);
  for (const maxBytes of [0, 1048577, 1.5]) {
    assert.deepEqual(issuesOf(() => parseDeviceConfig(rng({ maxBytes }))), ['maxBytes: expected an integer in 1..1048576']);
  }
  assert.deepEqual(issuesOf(() => parseDeviceConfig(rng({ port: 'sink' }))), ['device: unknown field "port"']);
  const { device } = createDevice(parseDeviceConfig(rng({ maxBytes: 4096, queueSize: 64 })));
  assert.ok(device instanceof RngDevice);
  assert.equal(device.maxQueueSize, 64);
});

test('vsock fields: guestCid 3..4294967294 and udsPath required, queueSize a power of two (default 256)', () => {
  const vsock = (extra: Record<string, unknown> = {}): Record<string, unknown> => ({
    id: 'v0',
    type: 'vsock',
    socket: '/run/v0.sock',
    guestCid: 3,
    udsPath: '/run/v0.vsock',
    ...extra,
  });
  assert.deepEqual(parseDeviceConfig(vsock()), { id: 'v0', type: 'vsock', socket: '/run/v0.sock', memSlots: 509, queueSize: 256, guestCid: 3, udsPath: '/run/v0.vsock' });
  for (const guestCid of [0, 2, 0xffffffff, 1.5, '3']) {
    assert.deepEqual(issuesOf(() => parseDeviceConfig(vsock({ guestCid }))), ['guestCid: expected an integer in 3..4294967294'], String(guestCid));
  }
  assert.deepEqual(issuesOf(() => parseDeviceConfig(vsock({ udsPath: undefined }))), ['udsPath: required']);
  assert.equal(issuesOf(() => parseDeviceConfig(vsock({ udsPath: `/${'x'.repeat(96)}` }))).length, 1, 'udsPath_PORT must fit a socket path');
});

test('type: required, "blk", "net", "rng" or "vsock"; a device must be an object', () => {
  assert.deepEqual(issuesOf(() => parseDeviceConfig({ id: 'a', socket: '/s' })), ['type: required: "blk", "net", "rng" or "vsock"']);
  assert.deepEqual(issuesOf(() => parseDeviceConfig(blk({ type: 'scsi' }))), ['type: expected "blk", "net", "rng" or "vsock"']);
  for (const value of [null, 5, 'blk', [], [blk()]]) assert.deepEqual(issuesOf(() => parseDeviceConfig(value)), ['device: expected an object']);
});

test('daemon fields: threads 1..64 (absent: decided by the daemon), sync, apiSocket, logLevel, devices', () => {
  assert.equal(parseDaemonConfig({ threads: 1 }).threads, 1);
  assert.equal(parseDaemonConfig({ threads: 64 }).threads, 64);
  for (const threads of [0, 65, 1.5, '4']) {
    assert.deepEqual(issuesOf(() => parseDaemonConfig({ threads })), ['threads: expected an integer in 1..64']);
  }
  for (const sync of ['qsbr', 'lock', 'copy'] as const) assert.equal(parseDaemonConfig({ sync }).sync, sync);
  assert.deepEqual(issuesOf(() => parseDaemonConfig({ sync: 'none' })), ['sync: expected one of "qsbr", "lock", "copy"']);
  assert.deepEqual(issuesOf(() => parseDaemonConfig({ apiSocket: `/${'a'.repeat(107)}` })), [
    'apiSocket: expected a non-empty path of at most 107 bytes',
  ]);
  assert.equal(issuesOf(() => parseDaemonConfig({ logLevel: 'loud' })).length, 1);
  assert.deepEqual(issuesOf(() => parseDaemonConfig({ devices: {} })), ['devices: expected an array']);
  for (const value of [null, [], 'x', 3]) assert.deepEqual(issuesOf(() => parseDaemonConfig(value)), ['config: expected an object']);
});

test('unknown fields are named at every level, with every other problem', () => {
  assert.deepEqual(
    issuesOf(() =>
      parseDaemonConfig({
        thread: 4,
        devices: [blk({ qeues: 2 }), net({ queues: 0, extra: true, 'frame-len': 64 })],
      }),
    ),
    [
      'devices[0]: unknown field "qeues"',
      'devices[1].queues: expected an integer in 1..32',
      'devices[1]: unknown field "extra"',
      'devices[1]: unknown field "frame-len"',
      'config: unknown field "thread"',
    ],
  );
  assert.deepEqual(issuesOf(() => parseDaemonConfig({ devices: [blk({ queues: 65 }), {}, 7] })), [
    'devices[0].queues: expected an integer in 1..64',
    'devices[1].type: required: "blk", "net", "rng" or "vsock"',
    'devices[2]: expected an object',
  ]);
});

test('ids and sockets are unique in a file: each duplicate named', () => {
  const issues = issuesOf(() =>
    parseDaemonConfig({
      devices: [
        blk(),
        net({ id: 'disk0' }),
        net({ id: 'n2', socket: '/run/disk0.sock' }),
        blk({ id: 'd3', socket: '/run/disk0.sock' }),
      ],
    }),
  );
  assert.deepEqual(issues, [
    'devices[1].id: duplicate id "disk0" (also devices[0].id)',
    'devices[2].socket: duplicate socket "/run/disk0.sock" (also devices[0].socket)',
    'devices[3].socket: duplicate socket "/run/disk0.sock" (also devices[0].socket)',
  ]);
  // also when other devices have errors
  assert.deepEqual(issuesOf(() => parseDaemonConfig({ devices: [blk({ queues: 0 }), blk()] })), [
    'devices[0].queues: expected an integer in 1..64',
    'devices[1].id: duplicate id "disk0" (also devices[0].id)',
    'devices[1].socket: duplicate socket "/run/disk0.sock" (also devices[0].socket)',
  ]);
});

test('readDaemonConfig: a valid file, invalid JSON, invalid content, a missing file', async (t) => {
  const dir = await testTempDir(t);
  const good = dir.join('good.json');
  await writeFile(good, JSON.stringify({ threads: 2, devices: [net()] }));
  const config = await readDaemonConfig(good);
  assert.equal(config.threads, 2);
  assert.equal(config.devices[0]?.id, 'net0');

  const badJson = dir.join('bad.json');
  await writeFile(badJson, '{"devices": [}');
  await assert.rejects(readDaemonConfig(badJson), (err: unknown) => {
    assert.ok(err instanceof ConfigError);
    assert.equal(err.code, 'VHOST_CONFIG_INVALID');
    assert.equal(err.issues.length, 1);
    assert.match(err.issues[0] as string, /^config: not valid JSON/);
    assert.ok(err.message.includes(badJson));
    return true;
  });
  const empty = dir.join('empty.json');
  await writeFile(empty, '');
  await assert.rejects(readDaemonConfig(empty), ConfigError);

  const invalid = dir.join('invalid.json');
  await writeFile(invalid, JSON.stringify({ devices: [blk({ queues: 0 })] }));
  await assert.rejects(readDaemonConfig(invalid), (err: unknown) => {
    assert.ok(err instanceof ConfigError);
    assert.deepEqual(err.issues, ['devices[0].queues: expected an integer in 1..64']);
    assert.ok(err.message.startsWith(`invalid config file ${invalid}: `));
    return true;
  });

  await assert.rejects(readDaemonConfig(dir.join('missing.json')), { code: 'ENOENT' });
});
