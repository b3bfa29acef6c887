/**
 * `npm run bench -- vsock`: stream throughput and connection setup rate through our vsock device, against a unix
 * socket pair in this process as the ceiling. No guest and no TCG: our backend runs as its own process (`vhost-user
 * vsock`, like a user's), this process is both ends: the guest through the TypeScript frontend (VsockDriver, with
 * the package's own connection logic turned around, `VsockHost` with `localCid` 3, as its transport) and the host
 * program through the hybrid unix sockets (`UDS` with "CONNECT <port>", and `UDS_<port>` servers).
 *
 * Workloads, each timed from its first byte (or connect) to the receiver's end: guest -> host and host -> guest
 * streams of --mib MiB (default 32) written in 64 KiB pieces with backpressure; sequential connections (connect,
 * one byte each way, close) for --seconds. The ceiling does the same over a unix socket this process connects to
 * itself. Rounds alternate ours and the ceiling; medians per workload and the ratio ours / ceiling.
 *
 * Options: --rounds N (3) --mib N (32) --seconds S (2) --name NAME (vsock)
 */
import { createServer, connect, type Server, type Socket } from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import type { Duplex } from 'node:stream';
import { VsockHost } from '../src/devices/vsock/host.js';
import { GuestRam } from '../src/frontend/guest-ram.js';
import { VhostUserFrontend } from '../src/frontend/frontend.js';
import { VsockDriver } from '../src/frontend/vsock-driver.js';
import { hasExited, spawnOwned, stopProcess } from '../test/helpers/tmp.js';
import { machine, markdownTable, median, writeResults } from './report.js';

const ROOT = new URL('../../', import.meta.url).pathname;
const GUEST_CID = 3;
const CHUNK = 64 * 1024;

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Writes `total` bytes in CHUNK pieces, waiting for 'drain' when told to, then ends. */
async function pump(stream: Duplex, total: number): Promise<void> {
  const chunk = Buffer.alloc(CHUNK, 0x5a);
  for (let sent = 0; sent < total; sent += CHUNK) {
    if (!stream.write(chunk.subarray(0, Math.min(CHUNK, total - sent)))) await new Promise((r) => stream.once('drain', r));
  }
  stream.end();
}

/** Resolves with the byte count once `stream` ends. */
function drainAll(stream: Duplex): Promise<number> {
  return new Promise((resolve, reject) => {
    let n = 0;
    stream.on('data', (c: Buffer) => (n += c.length));
    stream.once('end', () => resolve(n));
    stream.once('error', reject);
  });
}

function listen(server: Server, path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve());
  });
}

function unixConnect(path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect(path, () => resolve(s));
    s.once('error', reject);
  });
}

/** One contender: a way to open a stream toward the host and toward the guest. */
interface Contender {
  readonly name: string;
  /** A stream from the "guest" end to the host server on `port`. */
  guestToHost(port: number): Promise<Duplex>;
  /** A stream from the "host" end to the guest listener on `port`. */
  hostToGuest(port: number): Promise<Duplex>;
  /** Where host servers listen for `port`, and how the guest end listens. */
  hostServerPath(port: number): string;
  guestListen(port: number, onStream: (s: Duplex) => void): void;
  close(): Promise<void>;
}

/** Our device: the backend process, the frontend as the guest, unix sockets as the host. */
async function ours(dir: string): Promise<Contender> {
  const socket = join(dir, 'vsock.sock');
  const uds = join(dir, 'v.vsock');
  const child = spawnOwned(process.execPath, [join(ROOT, 'bin/vhost-user.js'), 'vsock', '--socket', socket, '--guest-cid', String(GUEST_CID), '--uds-path', uds, '--log-level', 'warn'], {
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  for (let i = 0; i < 500; i++) {
    if (hasExited(child)) throw new Error('vhost-user vsock exited');
    try {
      (await unixConnect(socket)).destroy();
      break;
    } catch {
      await sleep(20);
    }
  }
  const ram = GuestRam.create(64 * 1024 * 1024);
  const fe = await VhostUserFrontend.connect(socket, { connectTimeoutMs: 5000 });
  const link: { guest?: VsockHost } = {};
  const driver = await VsockDriver.start(fe, { memory: ram, queueSize: 256, onPacket: (p) => link.guest?.fromGuest(p) });
  // The guest's end of the transport: the package's connection logic with the roles turned around.
  const g = new VsockHost({
    localCid: GUEST_CID,
    guestCid: 2,
    toGuest: (header, payload) => {
      const packet = new Uint8Array(header.length + (payload?.length ?? 0));
      packet.set(header);
      if (payload !== undefined) packet.set(payload, header.length);
      driver.send(packet).catch(() => undefined); // rejected only once the driver is closed
      return true;
    },
  });
  link.guest = g;
  return {
    name: 'ours',
    guestToHost: (port) => g.connect(port),
    async hostToGuest(port) {
      const s = await unixConnect(uds);
      s.write(`CONNECT ${port}\n`);
      await new Promise<void>((resolve, reject) => {
        let line = '';
        const onData = (c: Buffer): void => {
          line += c.toString('latin1');
          const nl = line.indexOf('\n');
          if (nl < 0) return;
          s.off('data', onData);
          if (!line.startsWith('OK ')) reject(new Error(`CONNECT answered ${line}`));
          else if (nl + 1 < line.length) reject(new Error('bytes after OK'));
          else resolve();
        };
        s.on('data', onData);
      });
      return s;
    },
    hostServerPath: (port) => `${uds}_${port}`,
    guestListen: (port, onStream) => void g.listen(port, (s) => onStream(s.on('error', () => undefined))),
    async close() {
      g.close();
      driver.close();
      fe.close();
      ram.close();
      await stopProcess(child);
    },
  };
}

/** The ceiling: unix sockets this process connects to itself. */
function ceiling(dir: string): Contender {
  const listeners = new Map<number, (s: Duplex) => void>();
  const servers: Server[] = [];
  return {
    name: 'unix socket pair',
    guestToHost: (port) => unixConnect(join(dir, `host_${port}`)),
    async hostToGuest(port) {
      if (!listeners.has(port)) throw new Error(`no listener on ${port}`);
      return unixConnect(join(dir, `guest_${port}`));
    },
    hostServerPath: (port) => join(dir, `host_${port}`),
    guestListen(port, onStream) {
      listeners.set(port, onStream);
      const server = createServer((s) => onStream(s));
      servers.push(server);
      server.listen(join(dir, `guest_${port}`));
    },
    close() {
      for (const s of servers) s.close();
      return Promise.resolve();
    },
  };
}

interface RoundResult {
  guestToHostMBps: number;
  hostToGuestMBps: number;
  connectionsPerSecond: number;
}

async function measure(c: Contender, bytes: number, seconds: number, round: number): Promise<RoundResult> {
  const base = 7000 + round * 10;
  // guest -> host
  const hostServer = createServer();
  const received = new Promise<number>((resolve, reject) => hostServer.once('connection', (s) => void drainAll(s).then(resolve, reject)));
  await listen(hostServer, c.hostServerPath(base));
  let t0 = performance.now();
  const up = await c.guestToHost(base);
  await pump(up, bytes);
  const got = await received;
  const guestToHostMBps = got / 1e6 / ((performance.now() - t0) / 1000);
  if (got !== bytes) throw new Error(`${c.name}: guest -> host got ${got} of ${bytes}`);
  up.destroy();
  hostServer.close();

  // host -> guest
  const downDone = new Promise<number>((resolve, reject) => c.guestListen(base + 1, (s) => void drainAll(s).then(resolve, reject)));
  t0 = performance.now();
  const down = await c.hostToGuest(base + 1);
  await pump(down, bytes);
  const gotDown = await downDone;
  const hostToGuestMBps = gotDown / 1e6 / ((performance.now() - t0) / 1000);
  if (gotDown !== bytes) throw new Error(`${c.name}: host -> guest got ${gotDown} of ${bytes}`);

  // connection setup: connect, one byte each way, close, one after the other
  const echo = createServer((s) => {
    s.once('data', () => s.end('y'));
    s.on('error', () => undefined);
  });
  await listen(echo, c.hostServerPath(base + 2));
  let connections = 0;
  t0 = performance.now();
  while (performance.now() - t0 < seconds * 1000) {
    const s = await c.guestToHost(base + 2);
    s.write('x');
    await drainAll(s);
    s.destroy();
    connections++;
  }
  const connectionsPerSecond = connections / ((performance.now() - t0) / 1000);
  echo.close();
  return { guestToHostMBps, hostToGuestMBps, connectionsPerSecond };
}

export async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      rounds: { type: 'string', default: '3' },
      mib: { type: 'string', default: '32' },
      seconds: { type: 'string', default: '2' },
      name: { type: 'string', default: 'vsock' },
    },
  });
  const rounds = Number(values.rounds);
  const bytes = Number(values.mib) * 1024 * 1024;
  const seconds = Number(values.seconds);
  const dir = mkdtempSync(join(tmpdir(), 'vu-bench-vsock-'));
  const results: Record<string, RoundResult[]> = { ours: [], 'unix socket pair': [] };
  const contenders: Contender[] = [];
  try {
    contenders.push(await ours(dir), ceiling(dir));
    for (let round = 0; round < rounds; round++) {
      const order = round % 2 === 0 ? contenders : [...contenders].reverse();
      for (const c of order) {
        const r = await measure(c, bytes, seconds, round);
        (results[c.name] as RoundResult[]).push(r);
        console.error(`round ${round + 1} ${c.name}: ${JSON.stringify(r)}`);
      }
    }
  } finally {
    for (const c of contenders) await c.close();
    rmSync(dir, { recursive: true, force: true });
  }
  const med = (name: string, k: keyof RoundResult): number => median((results[name] as RoundResult[]).map((r) => r[k]));
  const rows: (string | number)[][] = [];
  const keys: [keyof RoundResult, string][] = [
    ['guestToHostMBps', 'guest -> host stream, MB/s'],
    ['hostToGuestMBps', 'host -> guest stream, MB/s'],
    ['connectionsPerSecond', 'connections per second (connect, 1 byte each way, close)'],
  ];
  for (const [k, label] of keys) {
    const a = med('ours', k);
    const b = med('unix socket pair', k);
    rows.push([label, a, b, `**${(a / b).toFixed(2)}**`]);
  }
  const command = `npm run bench -- vsock ${argv.join(' ')}`.trim();
  const md = [
    '# vsock benchmark: our device through the TypeScript frontend vs a unix socket pair',
    '',
    `Command: \`${command}\`. ${rounds} rounds, ours and the ceiling alternating; medians. Streams of ${values.mib} MiB in 64 KiB writes; connections for ${seconds} s each.`,
    'Ours: `vhost-user vsock` as its own process; this process is the guest (VsockDriver + VsockHost with localCid 3) and the host program (hybrid unix sockets). Ceiling: unix sockets within this process.',
    '',
    markdownTable({ columns: ['workload', 'ours', 'unix socket pair', 'ours / ceiling'], rows }),
    '',
    `Machine: ${JSON.stringify(machine())}`,
    '',
  ].join('\n');
  const paths = writeResults(values.name, { machine: machine(), command, results }, md, {
    title: 'vsock: ours / unix socket pair',
    yLabel: 'ratio',
    categories: keys.map(([k]) => k),
    series: [{ name: 'ours / ceiling', values: keys.map(([k]) => med('ours', k) / med('unix socket pair', k)) }],
  });
  console.log(md);
  console.error(`wrote ${paths.join(', ')}`);
}
