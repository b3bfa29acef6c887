/**
 * `npm run bench -- scale`: one `vhost-user serve` process (a fixed pool of `--threads 2` workers) serving many null
 * vhost-user-blk devices, against one qemu-storage-daemon process with as many null-co exports.
 *
 * 1. Footprint: VmRSS (with its anon / file / shmem parts) and the thread count (/proc/PID/status) of each process
 *    serving 1, 16, 64 and 256 devices of one queue: idle after start, and once every device has a frontend
 *    connected (the TypeScript frontend of src/frontend: GuestRam of 2 MiB, BlkDriver on one queue of 128) that did a
 *    little I/O (8 reads and 8 writes) and stays connected; RSS per added device is the slope between two device
 *    counts (16 -> 256 and 1 -> 64).
 * 2. Aggregate IOPS: 4k random reads at QD32 on each of 1, 16 and 64 devices at once, all driven from this process in
 *    one event loop (`BlkDriver.submitRaw`, as `vhost-user bench blk` does; that command drives one socket only), with
 *    completions counted per device; the backend's CPU time from /proc/PID/stat (every thread) and this generator's
 *    own CPU use beside them.
 *
 * In a round, for each device count both backends are started side by side (the start order alternates), measured
 * idle, connected, and then loaded in the order A B B A (which one goes first alternates over counts and rounds); a
 * backend's figure in a round is its two runs together; ratios are per round (paired), then the median over rounds.
 *
 * Options: --rounds N (3) --seconds S (3, per run) --ramp S (0.5) --settle S (1: wait before each RSS reading)
 * --counts 1,16,64,256 (footprint) --iops-counts 1,16,64 --threads N (2) --quick (1 round, 2 s runs, counts 1,16,64)
 * --name NAME (of the result files: bench/results/NAME.{json,md,svg}).
 */
import { execFileSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { availableParallelism, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { processCpuSeconds } from '../src/cli/bench-command.js';
import { BlkDriver, RAW_FAILED } from '../src/frontend/blk-driver.js';
import { VhostUserFrontend } from '../src/frontend/frontend.js';
import { GuestRam } from '../src/frontend/guest-ram.js';
import { findBinary } from '../test/helpers/require-tool.js';
import { hasExited, spawnOwned, stopProcess } from '../test/helpers/tmp.js';
import { tryConnect } from '../test/helpers/unix-socket.js';
import { barChartSvg, machine, markdownTable, median, RESULTS_DIR, type BarChart } from './report.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const ROOT = new URL('../../', import.meta.url).pathname;

/** Per device: guest RAM of the frontend, ring size, requests in flight, request size. */
const GUEST_RAM = 2 * MiB;
const QUEUE_SIZE = 128;
const IODEPTH = 32;
const BS = 4 * KiB;
/** Frontends connecting at once. */
const CONNECT_CONCURRENCY = 8;

type Kind = 'ours' | 'qsd';
const NAMES: Record<Kind, string> = { ours: 'vhost-user serve', qsd: 'qemu-storage-daemon' };
type State = 'idle' | 'connected' | 'loaded';

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---- /proc ------------------------------------------------------------------------------------------------------

interface Footprint {
  rssKiB: number;
  anonKiB: number;
  fileKiB: number;
  shmemKiB: number;
  threads: number;
  fds: number;
}

function footprint(pid: number): Footprint {
  const text = readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (name: string): number => {
    const m = new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(text);
    if (m === null) throw new Error(`no ${name} in /proc/${pid}/status`);
    return Number(m[1]);
  };
  let fds = NaN;
  try {
    fds = execFileSync('ls', [`/proc/${pid}/fd`], { encoding: 'utf8' }).split('\n').filter((l) => l !== '').length;
  } catch {
    // not readable: NaN
  }
  return { rssKiB: field('VmRSS'), anonKiB: field('RssAnon'), fileKiB: field('RssFile'), shmemKiB: field('RssShmem'), threads: field('Threads'), fds };
}

// ---- backends ---------------------------------------------------------------------------------------------------

interface Backend {
  readonly kind: Kind;
  readonly pid: number;
  readonly sockets: readonly string[];
  readonly apiSocket?: string;
  /** The last 64 KiB of what the process wrote to stderr (and stdout). */
  output(): string;
  exited(): boolean;
  exitStatus(): string;
  stop(): Promise<void>;
}

function spawnCollecting(bin: string, args: string[]): { child: ChildProcess; output: () => string } {
  const child = spawnOwned(bin, args);
  let out = '';
  const collect = (chunk: Buffer): void => {
    out += chunk.toString('utf8');
    if (out.length > 64 * KiB) out = out.slice(-64 * KiB);
  };
  child.stdout?.on('data', collect);
  child.stderr?.on('data', collect);
  return { child, output: () => out };
}

function backendOf(kind: Kind, child: ChildProcess, output: () => string, sockets: string[], apiSocket?: string): Backend {
  const pid = child.pid;
  if (pid === undefined) throw new Error(`${NAMES[kind]} did not start`);
  return {
    kind,
    pid,
    sockets,
    ...(apiSocket !== undefined ? { apiSocket } : {}),
    output,
    exited: () => hasExited(child),
    exitStatus: () => `exit code ${child.exitCode}, signal ${child.signalCode}`,
    stop: () => stopProcess(child, { graceMs: 10_000 }),
  };
}

/** GET on the management API; resolves with the parsed JSON body (rejects on a status other than 200). */
function apiGet(socketPath: string, path: string): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, method: 'GET', path, agent: false, timeout: 10_000 }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        if (res.statusCode !== 200) return reject(new Error(`GET ${path}: ${res.statusCode}: ${text}`));
        try {
          resolve(JSON.parse(text));
        } catch (err) {
          reject(err instanceof Error ? err : new Error(String(err)));
        }
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${path}: no answer in 10 s`)));
    req.on('error', reject);
    req.end();
  });
}

interface ApiDevice {
  id: string;
  state: string;
  queues: { index: number; started: boolean; failed: boolean; worker: number; requests: number; errors: number }[];
}

async function listDevices(b: Backend): Promise<ApiDevice[]> {
  if (b.apiSocket === undefined) throw new Error('no API socket');
  return ((await apiGet(b.apiSocket, '/devices')) as { devices: ApiDevice[] }).devices;
}

/** `vhost-user serve --config FILE --api-socket PATH --threads N`: n null devices of 1 GiB, one queue each. */
async function startOurs(dir: string, n: number, threads: number): Promise<Backend> {
  const sockets = Array.from({ length: n }, (_, i) => join(dir, `o${i}.sock`));
  const config = join(dir, 'ours.json');
  const apiSocket = join(dir, 'api.sock');
  writeFileSync(config, JSON.stringify({ threads, devices: sockets.map((socket, i) => ({ id: `d${i}`, type: 'blk', socket, null: '1G', queues: 1 })) }));
  const args = [join(ROOT, 'bin/vhost-user.js'), 'serve', '--config', config, '--api-socket', apiSocket, '--threads', String(threads), '--log-level', 'warn'];
  const { child, output } = spawnCollecting(process.execPath, args);
  const b = backendOf('ours', child, output, sockets, apiSocket);
  try {
    // The API answers once every device of the file listens.
    const deadline = Date.now() + 60_000;
    for (;;) {
      if (b.exited()) throw new Error(`vhost-user serve exited during start (${b.exitStatus()}):\n${output()}`);
      if (existsSync(apiSocket)) {
        const devices = await listDevices(b).catch(() => undefined);
        if (devices !== undefined) {
          if (devices.length !== n) throw new Error(`vhost-user serve lists ${devices.length} devices, ${n} configured`);
          break;
        }
      }
      if (Date.now() > deadline) throw new Error(`vhost-user serve with ${n} devices: the API did not answer in 60 s:\n${output()}`);
      await sleep(25);
    }
  } catch (err) {
    await b.stop();
    throw err;
  }
  return b;
}

/** One qemu-storage-daemon with n null-co nodes (1 GiB, read-zeroes off), each exported as vhost-user-blk (1 queue). */
async function startQsd(dir: string, n: number): Promise<Backend> {
  const bin = findBinary('qemu-storage-daemon');
  if (bin === undefined) throw new Error('qemu-storage-daemon not found: apt-get install -y qemu-system-x86');
  const sockets = Array.from({ length: n }, (_, i) => join(dir, `q${i}.sock`));
  const args: string[] = [];
  sockets.forEach((path, i) => {
    // JSON option syntax (as test/helpers/qsd.ts): no escaping of commas in paths.
    args.push('--blockdev', JSON.stringify({ driver: 'null-co', 'node-name': `n${i}`, size: GiB, 'read-zeroes': false }));
    args.push(
      '--export',
      JSON.stringify({ type: 'vhost-user-blk', id: `e${i}`, 'node-name': `n${i}`, addr: { type: 'unix', path }, writable: true, 'num-queues': 1 }),
    );
  });
  const { child, output } = spawnCollecting(bin, args);
  const b = backendOf('qsd', child, output, sockets);
  try {
    const deadline = Date.now() + 60_000;
    // Exports are created in order before the main loop runs: the last socket accepting means all of them do.
    while (!(sockets.every((s) => existsSync(s)) && (await tryConnect(sockets[n - 1] as string)))) {
      if (b.exited()) throw new Error(`qemu-storage-daemon exited during start (${b.exitStatus()}):\n${output()}`);
      if (Date.now() > deadline) throw new Error(`qemu-storage-daemon with ${n} exports: sockets not ready in 60 s:\n${output()}`);
      await sleep(25);
    }
  } catch (err) {
    await b.stop();
    throw err;
  }
  return b;
}

// ---- frontends --------------------------------------------------------------------------------------------------

interface Device {
  readonly socket: string;
  readonly memory: GuestRam;
  readonly frontend: VhostUserFrontend;
  readonly driver: BlkDriver;
}

function closeDevice(d: Device): void {
  d.driver.close();
  d.frontend.close();
  d.memory.close();
}

async function connectDevice(socket: string): Promise<Device> {
  const memory = GuestRam.create(GUEST_RAM);
  let frontend: VhostUserFrontend | undefined;
  try {
    frontend = await VhostUserFrontend.connect(socket, { connectTimeoutMs: 5000 });
    const driver = await BlkDriver.start(frontend, { memory, queues: 1, queueSize: QUEUE_SIZE, maxRequestBytes: BS, slotsPerQueue: IODEPTH, indirect: false });
    if (driver.slotsPerQueue < IODEPTH) throw new Error(`${socket}: ${driver.slotsPerQueue} slots, ${IODEPTH} wanted`);
    return { socket, memory, frontend, driver };
  } catch (err) {
    frontend?.close();
    memory.close();
    throw new Error(`connecting to ${socket}: ${(err as Error).message}`, { cause: err });
  }
}

/** Connects a frontend to every socket, CONNECT_CONCURRENCY at a time; `into` holds the ones connected (to close). */
async function connectAll(sockets: readonly string[], into: Device[]): Promise<void> {
  let next = 0;
  const lane = async (): Promise<void> => {
    while (next < sockets.length) {
      const socket = sockets[next++] as string;
      into.push(await connectDevice(socket));
    }
  };
  await Promise.all(Array.from({ length: Math.min(CONNECT_CONCURRENCY, sockets.length) }, lane));
}

/** A little I/O on every device at once: 8 reads and 8 writes of 4k each; every one must complete with status OK. */
async function littleIo(devices: readonly Device[]): Promise<void> {
  await Promise.all(
    devices.map(
      (d, i) =>
        new Promise<void>((resolve, reject) => {
          let left = 16;
          const timer = setTimeout(() => reject(new Error(`${d.socket}: ${left} of 16 requests did not complete in 10 s`)), 10_000);
          const done = (status: number): void => {
            if (status !== 0) {
              clearTimeout(timer);
              reject(new Error(`${d.socket}: a request completed with status ${status}${status === RAW_FAILED ? ` (${d.driver.error?.message})` : ''}`));
              return;
            }
            if (--left === 0) {
              clearTimeout(timer);
              resolve();
            }
          };
          for (let k = 0; k < 16; k++) d.driver.submitRaw(0, k % 2 === 1, ((i * 16 + k) * 8) % (GiB / 512), BS, k, done);
        }),
    ),
  );
}

// ---- the load ---------------------------------------------------------------------------------------------------

interface LoadRun {
  seconds: number;
  ios: number;
  iops: number;
  /** Completions per device in the window. */
  perDevice: number[];
  errors: number;
  generatorCpuUtil: number;
  backendCpuUtil: number;
  backendCpuUsPerIo: number;
}

/**
 * 4k random reads at QD32 on every device at once, from this thread's event loop: each completion resubmits its slot
 * (no Promise, no allocation). Counts completions per device over `seconds` after `ramp`.
 */
async function runLoad(devices: readonly Device[], backendPid: number, seconds: number, ramp: number): Promise<LoadRun> {
  const n = devices.length;
  const counts = new Float64Array(n);
  let running = true;
  let inflight = 0;
  let errors = 0;
  /** Why the load stopped early (set from a completion callback). */
  const stop: { failure: Error | undefined } = { failure: undefined };
  const failed = (): Error | undefined => stop.failure;
  let drained: (() => void) | undefined;
  const submitters = devices.map((d, i) => {
    const blocks = Math.floor(d.driver.capacityBytes / BS);
    const sectorsPerBlock = BS / 512;
    let x = (i + 1) * 0x9e3779b1;
    const submit = (token: number): void => {
      // xorshift32
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      inflight++;
      d.driver.submitRaw(0, false, Math.floor((x >>> 0) * (blocks / 4294967296)) * sectorsPerBlock, BS, token, done);
    };
    const done = (status: number, token: number): void => {
      inflight--;
      if (status === RAW_FAILED) {
        stop.failure ??= new Error(`${d.socket}: request failed: ${d.driver.error?.message ?? 'unknown'}`);
        running = false;
      } else {
        counts[i] = (counts[i] as number) + 1;
        if (status !== 0) errors++;
      }
      if (running) submit(token);
      else if (inflight === 0) drained?.();
    };
    return submit;
  });
  for (const submit of submitters) for (let t = 0; t < IODEPTH; t++) submit(t);
  await sleep(ramp * 1000);
  if (stop.failure !== undefined) throw stop.failure;
  const c0 = Float64Array.from(counts);
  const e0 = errors;
  const cpu0 = process.cpuUsage();
  const b0 = processCpuSeconds(backendPid);
  const t0 = performance.now();
  await sleep(seconds * 1000);
  const elapsed = (performance.now() - t0) / 1000;
  const c1 = Float64Array.from(counts);
  const cpu = process.cpuUsage(cpu0);
  const backendCpu = processCpuSeconds(backendPid) - b0;
  const e1 = errors;
  running = false;
  if (inflight > 0) {
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        new Promise<void>((resolve) => (drained = resolve)),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => {
            const stuck = devices.filter((d) => d.driver.inFlight(0) > 0).map((d) => `${d.socket} (${d.driver.inFlight(0)})`);
            reject(new Error(`${inflight} requests did not complete within 10 s after the run, on ${stuck.length} devices: ${stuck.slice(0, 10).join(', ')}`));
          }, 10_000);
        }),
      ]);
    } finally {
      clearTimeout(timer);
    }
  }
  const late = failed();
  if (late !== undefined) throw late;
  const perDevice = Array.from(c1, (v, i) => v - (c0[i] as number));
  const ios = perDevice.reduce((a, b) => a + b, 0);
  return {
    seconds: elapsed,
    ios,
    iops: ios / elapsed,
    perDevice,
    errors: e1 - e0,
    generatorCpuUtil: (cpu.user + cpu.system) / 1e6 / elapsed,
    backendCpuUtil: backendCpu / elapsed,
    backendCpuUsPerIo: (backendCpu * 1e6) / ios,
  };
}

// ---- the run ----------------------------------------------------------------------------------------------------

interface FootprintSample extends Footprint {
  backend: Kind;
  devices: number;
  state: State;
  round: number;
}

interface LoadSample {
  backend: Kind;
  devices: number;
  round: number;
  run: number;
  seconds: number;
  ios: number;
  iops: number;
  errors: number;
  perDeviceMin: number;
  perDeviceMax: number;
  perDeviceZero: number;
  generatorCpuUtil: number;
  backendCpuUtil: number;
  backendCpuUsPerIo: number;
}

interface ConnectSample {
  backend: Kind;
  devices: number;
  round: number;
  ms: number;
}

interface Anomaly {
  round: number;
  devices: number;
  backend: Kind;
  what: string;
}

function fmtIops(v: number): string {
  if (!Number.isFinite(v)) return '-';
  return v >= 1e6 ? `${(v / 1e6).toFixed(2)} M` : `${(v / 1e3).toFixed(v >= 1e5 ? 0 : 1)} k`;
}

function fmtMiB(kib: number): string {
  return Number.isFinite(kib) ? (kib / 1024).toFixed(1) : '-';
}

function parseCounts(text: string): number[] {
  const v = text.split(',').map((s) => Number(s.trim()));
  if (v.some((x) => !Number.isInteger(x) || x < 1 || x > 1024)) throw new Error(`bad device counts: ${text}`);
  return [...new Set(v)].sort((a, b) => a - b);
}

function cpuModel(): string {
  try {
    return /^model name\s*:\s*(.+)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1]?.trim() ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

function qsdVersion(): string {
  try {
    return execFileSync('qemu-storage-daemon', ['--version'], { encoding: 'utf8' }).split('\n')[0]?.trim() ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

export async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      rounds: { type: 'string', default: '3' },
      seconds: { type: 'string', default: '3' },
      ramp: { type: 'string', default: '0.5' },
      settle: { type: 'string', default: '1' },
      counts: { type: 'string' },
      'iops-counts': { type: 'string', default: '1,16,64' },
      threads: { type: 'string', default: '2' },
      quick: { type: 'boolean', default: false },
      name: { type: 'string', default: 'scale' },
    },
  });
  const quick = values.quick;
  const rounds = quick ? 1 : Number(values.rounds);
  const seconds = quick ? 2 : Number(values.seconds);
  const ramp = Number(values.ramp);
  const settle = Number(values.settle);
  const threads = Number(values.threads);
  const counts = parseCounts(values.counts ?? (quick ? '1,16,64' : '1,16,64,256'));
  const iopsCounts = parseCounts(values['iops-counts']).filter((n) => counts.includes(n));
  if (!(rounds >= 1 && seconds > 0 && ramp >= 0 && settle >= 0 && Number.isInteger(threads) && threads >= 1)) {
    throw new Error('bad --rounds, --seconds, --ramp, --settle or --threads');
  }
  const command = `npm run bench -- scale ${argv.join(' ')}`.trim();
  if (findBinary('qemu-storage-daemon') === undefined) throw new Error('qemu-storage-daemon not found: apt-get install -y qemu-system-x86');

  const m0 = machine();
  const when = { ...m0, node: process.version, kernel: String(m0.kernel), date: String(m0.date), nproc: availableParallelism(), cpuModel: cpuModel(), qsd: qsdVersion(), loadavgStart: loadavg().map((x) => +x.toFixed(2)) };
  const started = performance.now();
  const footprints: FootprintSample[] = [];
  const loads: LoadSample[] = [];
  const connects: ConnectSample[] = [];
  const anomalies: Anomaly[] = [];
  const workerSpread: { round: number; devices: number; queuesPerWorker: Record<string, number> }[] = [];
  const progress = (line: string): void => {
    const t = ((performance.now() - started) / 1000).toFixed(0).padStart(4);
    process.stderr.write(process.stderr.isTTY ? `\r${`[${t} s] ${line}`.slice(0, 118).padEnd(118)}` : `[${t} s] ${line}\n`);
  };

  const dir = mkdtempSync(join(tmpdir(), 'vus-'));
  if (Buffer.byteLength(join(dir, `q${Math.max(...counts)}.sock`)) > 107) throw new Error(`${dir}: socket paths too long`);
  const totalLoads = rounds * iopsCounts.length * 4;
  let loadNo = 0;
  try {
    for (let round = 0; round < rounds; round++) {
      for (const [k, n] of counts.entries()) {
        const order: Kind[] = (round + k) % 2 === 0 ? ['ours', 'qsd'] : ['qsd', 'ours'];
        const backends = new Map<Kind, Backend>();
        const devices = new Map<Kind, Device[]>([
          ['ours', []],
          ['qsd', []],
        ]);
        const sample = (state: State): void => {
          for (const kind of order) {
            const b = backends.get(kind) as Backend;
            if (b.exited()) throw new Error(`${NAMES[kind]} (${n} devices) died (${b.exitStatus()}) before the ${state} reading:\n${b.output()}`);
            const f = footprint(b.pid);
            footprints.push({ backend: kind, devices: n, state, round, ...f });
            progress(`round ${round + 1}/${rounds}, ${n} devices, ${kind} ${state}: RSS ${fmtMiB(f.rssKiB)} MiB, ${f.threads} threads, ${f.fds} fds`);
          }
        };
        const check = async (when: string): Promise<void> => {
          const b = backends.get('ours') as Backend;
          const list = await listDevices(b);
          const bad = list.filter((d) => d.state !== 'connected' || d.queues[0]?.started !== true || d.queues[0]?.failed === true);
          if (bad.length > 0) {
            const what = `${when}: ${bad.length} of ${n} devices not connected with a running queue: ${JSON.stringify(bad.slice(0, 3))}`;
            anomalies.push({ round, devices: n, backend: 'ours', what });
            throw new Error(what);
          }
          const spread: Record<string, number> = {};
          for (const d of list) spread[String(d.queues[0]?.worker)] = (spread[String(d.queues[0]?.worker)] ?? 0) + 1;
          if (when === 'connected') workerSpread.push({ round, devices: n, queuesPerWorker: spread });
        };
        try {
          for (const kind of order) {
            progress(`round ${round + 1}/${rounds}, ${n} devices: starting ${kind}`);
            backends.set(kind, kind === 'ours' ? await startOurs(dir, n, threads) : await startQsd(dir, n));
          }
          await sleep(settle * 1000);
          sample('idle');
          for (const kind of order) {
            const b = backends.get(kind) as Backend;
            const t = performance.now();
            progress(`round ${round + 1}/${rounds}, ${n} devices: connecting ${n} frontends to ${kind}`);
            await connectAll(b.sockets, devices.get(kind) as Device[]);
            await littleIo(devices.get(kind) as Device[]);
            connects.push({ backend: kind, devices: n, round, ms: performance.now() - t });
          }
          await sleep(settle * 1000);
          sample('connected');
          await check('connected');
          if (iopsCounts.includes(n)) {
            const ab = (k + round) % 2 === 0 ? order : [...order].reverse();
            for (const [run, kind] of [...ab, ...[...ab].reverse()].entries()) {
              const b = backends.get(kind) as Backend;
              const label = `[${++loadNo}/${totalLoads}] round ${round + 1}, ${n} devices, ${kind}`;
              progress(`${label}: 4k randread QD${IODEPTH} on every device...`);
              const r = await runLoad(devices.get(kind) as Device[], b.pid, seconds, ramp);
              if (b.exited()) throw new Error(`${NAMES[kind]} died during the load (${b.exitStatus()}):\n${b.output()}`);
              const zero = r.perDevice.filter((v) => v === 0).length;
              if (zero > 0) anomalies.push({ round, devices: n, backend: kind, what: `${zero} of ${n} devices completed no request in a ${seconds} s run` });
              if (r.errors > 0) anomalies.push({ round, devices: n, backend: kind, what: `${r.errors} requests completed with an error status` });
              loads.push({
                backend: kind,
                devices: n,
                round,
                run,
                seconds: r.seconds,
                ios: r.ios,
                iops: r.iops,
                errors: r.errors,
                perDeviceMin: Math.min(...r.perDevice) / r.seconds,
                perDeviceMax: Math.max(...r.perDevice) / r.seconds,
                perDeviceZero: zero,
                generatorCpuUtil: r.generatorCpuUtil,
                backendCpuUtil: r.backendCpuUtil,
                backendCpuUsPerIo: r.backendCpuUsPerIo,
              });
              progress(
                `${label}: ${fmtIops(r.iops)} IOPS (per device ${fmtIops(Math.min(...r.perDevice) / r.seconds)}-${fmtIops(Math.max(...r.perDevice) / r.seconds)}), ` +
                  `backend ${(100 * r.backendCpuUtil).toFixed(0)} % CPU, generator ${(100 * r.generatorCpuUtil).toFixed(0)} %`,
              );
            }
            await sleep(settle * 1000);
            sample('loaded');
            await check('loaded');
          }
        } finally {
          for (const list of devices.values()) for (const d of list.splice(0)) closeDevice(d);
          for (const kind of order) {
            const b = backends.get(kind);
            if (b === undefined) continue;
            if (b.exited()) anomalies.push({ round, devices: n, backend: kind, what: `had exited before it was stopped (${b.exitStatus()}): ${b.output().slice(-2000)}` });
            const t = performance.now();
            await b.stop();
            const ms = performance.now() - t;
            if (ms > 5000) anomalies.push({ round, devices: n, backend: kind, what: `took ${(ms / 1000).toFixed(1)} s to exit after SIGTERM (${b.exitStatus()})` });
          }
          for (const f of [join(dir, 'ours.json'), join(dir, 'api.sock')]) rmSync(f, { force: true });
        }
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
    if (process.stderr.isTTY) process.stderr.write('\n');
  }
  const durationS = (performance.now() - started) / 1000;
  const loadavgEnd = loadavg().map((x) => +x.toFixed(2));

  // ---- summary ------------------------------------------------------------------------------------------------
  const kinds: Kind[] = ['ours', 'qsd'];
  const states: State[] = ['idle', 'connected'];
  const fp = (kind: Kind, n: number, state: State, key: keyof Footprint): number => {
    const v = footprints.filter((s) => s.backend === kind && s.devices === n && s.state === state).map((s) => s[key]);
    return v.length === 0 ? NaN : median(v);
  };
  // RSS per added device: 1 -> 64 and 16 -> 256 (the largest count when 256 is not measured).
  const maxCount = Math.max(...counts);
  const pairs: [number, number][] = [];
  for (const [a, b] of [
    [1, 64],
    [16, 256],
  ] as const) {
    const to = counts.includes(b) ? b : maxCount;
    if (counts.includes(a) && to > a && !pairs.some(([x, y]) => x === a && y === to)) pairs.push([a, to]);
  }
  const slope = (kind: Kind, state: State, [a, b]: [number, number], key: keyof Footprint | 'privateKiB' = 'rssKiB'): number => {
    // private: RSS without the guest RAM pages mapped from the frontends' memfds (RssShmem), i.e. anon + file.
    const at = (n: number): number => (key === 'privateKiB' ? fp(kind, n, state, 'anonKiB') + fp(kind, n, state, 'fileKiB') : fp(kind, n, state, key));
    return (at(b) - at(a)) / (b - a);
  };
  const slopes = pairs.flatMap((p) =>
    states.map((state) => ({
      from: p[0],
      to: p[1],
      state,
      oursKiB: slope('ours', state, p),
      qsdKiB: slope('qsd', state, p),
      oursPrivateKiB: slope('ours', state, p, 'privateKiB'),
      qsdPrivateKiB: slope('qsd', state, p, 'privateKiB'),
      oursAnonKiB: slope('ours', state, p, 'anonKiB'),
      qsdAnonKiB: slope('qsd', state, p, 'anonKiB'),
      oursShmemKiB: slope('ours', state, p, 'shmemKiB'),
      qsdShmemKiB: slope('qsd', state, p, 'shmemKiB'),
    })),
  );

  const footprintRows = counts.flatMap((n) =>
    (['idle', 'connected', 'loaded'] as State[])
      .filter((state) => state !== 'loaded' || iopsCounts.includes(n))
      .map((state) => [
        String(n),
        state,
        `${fmtMiB(fp('ours', n, state, 'rssKiB'))} / ${fmtMiB(fp('qsd', n, state, 'rssKiB'))}`,
        `${fmtMiB(fp('ours', n, state, 'anonKiB'))} / ${fmtMiB(fp('qsd', n, state, 'anonKiB'))}`,
        `${fmtMiB(fp('ours', n, state, 'fileKiB'))} / ${fmtMiB(fp('qsd', n, state, 'fileKiB'))}`,
        `${fmtMiB(fp('ours', n, state, 'shmemKiB'))} / ${fmtMiB(fp('qsd', n, state, 'shmemKiB'))}`,
        `${fp('ours', n, state, 'threads')} / ${fp('qsd', n, state, 'threads')}`,
        `${fp('ours', n, state, 'fds')} / ${fp('qsd', n, state, 'fds')}`,
      ]),
  );
  const slopeRows = slopes.map((s) => [
    `${s.from} -> ${s.to}`,
    s.state,
    `**${s.oursKiB.toFixed(0)}**`,
    `**${s.qsdKiB.toFixed(0)}**`,
    (s.oursKiB / s.qsdKiB).toFixed(2),
    `${s.oursPrivateKiB.toFixed(0)} / ${s.qsdPrivateKiB.toFixed(0)}`,
    `${s.oursAnonKiB.toFixed(0)} / ${s.qsdAnonKiB.toFixed(0)}`,
    `${s.oursShmemKiB.toFixed(0)} / ${s.qsdShmemKiB.toFixed(0)}`,
  ]);
  const connectRows = counts.map((n) => {
    const ms = (kind: Kind): number => median(connects.filter((c) => c.backend === kind && c.devices === n).map((c) => c.ms));
    return [String(n), `${ms('ours').toFixed(0)} / ${ms('qsd').toFixed(0)}`, `${(ms('ours') / n).toFixed(1)} / ${(ms('qsd') / n).toFixed(1)}`];
  });

  // IOPS: a backend's figure in a round is its two runs together.
  const roundIops = (kind: Kind, n: number, round: number): number => {
    const runs = loads.filter((s) => s.backend === kind && s.devices === n && s.round === round);
    return runs.length === 0 ? NaN : runs.reduce((a, s) => a + s.ios, 0) / runs.reduce((a, s) => a + s.seconds, 0);
  };
  const roundList = Array.from({ length: rounds }, (_, r) => r);
  const single = iopsCounts[0];
  const iopsSummaries = iopsCounts.map((n) => {
    const of = (kind: Kind): LoadSample[] => loads.filter((s) => s.backend === kind && s.devices === n);
    const ratio = roundList.map((r) => roundIops('ours', n, r) / roundIops('qsd', n, r));
    const oursScale = roundList.map((r) => roundIops('ours', n, r) / roundIops('ours', single ?? 1, r));
    const qsdScale = roundList.map((r) => roundIops('qsd', n, r) / roundIops('qsd', single ?? 1, r));
    const m = (kind: Kind, key: keyof LoadSample): number => median(of(kind).map((s) => s[key] as number));
    return {
      devices: n,
      ours: median(roundList.map((r) => roundIops('ours', n, r))),
      qsd: median(roundList.map((r) => roundIops('qsd', n, r))),
      ratio: median(ratio),
      ratioRange: [Math.min(...ratio), Math.max(...ratio)],
      oursVsSingle: median(oursScale),
      oursVsSingleRange: [Math.min(...oursScale), Math.max(...oursScale)],
      qsdVsSingle: median(qsdScale),
      oursPerDevice: [m('ours', 'perDeviceMin'), m('ours', 'perDeviceMax')],
      qsdPerDevice: [m('qsd', 'perDeviceMin'), m('qsd', 'perDeviceMax')],
      oursCpuUsPerIo: m('ours', 'backendCpuUsPerIo'),
      qsdCpuUsPerIo: m('qsd', 'backendCpuUsPerIo'),
      oursCpuUtil: m('ours', 'backendCpuUtil'),
      qsdCpuUtil: m('qsd', 'backendCpuUtil'),
      generatorUtil: [m('ours', 'generatorCpuUtil'), m('qsd', 'generatorCpuUtil')],
    };
  });
  const range = (r: number[]): string => (rounds > 1 ? ` (${(r[0] as number).toFixed(2)}-${(r[1] as number).toFixed(2)})` : '');
  const iopsRows = iopsSummaries.map((s) => [
    String(s.devices),
    fmtIops(s.ours),
    fmtIops(s.qsd),
    `**${s.ratio.toFixed(2)}**${range(s.ratioRange)}`,
    `**${s.oursVsSingle.toFixed(2)}**${range(s.oursVsSingleRange)}`,
    s.qsdVsSingle.toFixed(2),
    `${fmtIops(s.oursPerDevice[0] as number)}-${fmtIops(s.oursPerDevice[1] as number)} / ${fmtIops(s.qsdPerDevice[0] as number)}-${fmtIops(s.qsdPerDevice[1] as number)}`,
    `${s.oursCpuUsPerIo.toFixed(2)} / ${s.qsdCpuUsPerIo.toFixed(2)}`,
    `${(100 * s.oursCpuUtil).toFixed(0)} / ${(100 * s.qsdCpuUtil).toFixed(0)}`,
    `${(100 * (s.generatorUtil[0] as number)).toFixed(0)} / ${(100 * (s.generatorUtil[1] as number)).toFixed(0)}`,
  ]);

  // Goals.
  const big = pairs.find(([a]) => a === 16) ?? pairs[0];
  const slopeGoal = slopes.every((s) => s.oursKiB < s.qsdKiB);
  const oursThreads = counts.flatMap((n) => states.map((st) => fp('ours', n, st, 'threads')));
  const threadsFlat = Math.max(...oursThreads) === Math.min(...oursThreads);
  const top = iopsSummaries.at(-1);
  const iopsGoal = top !== undefined && top.oursVsSingle >= 1;
  const bigSlopes = slopes.filter((s) => big !== undefined && s.from === big[0] && s.to === big[1]);
  const goals = [
    `- RSS per added device below qemu-storage-daemon's (every slope below, idle and connected): **${slopeGoal ? 'met' : 'not met'}**` +
      (big === undefined
        ? ''
        : ` (${big[0]} -> ${big[1]} devices: ` +
          bigSlopes
            .map((s) => `${s.state} ours ${s.oursKiB.toFixed(0)} KiB vs qsd ${s.qsdKiB.toFixed(0)} KiB per device, without guest RAM pages ${s.oursPrivateKiB.toFixed(0)} vs ${s.qsdPrivateKiB.toFixed(0)} KiB`)
            .join('; ') +
          ')') +
      '.',
    `- Threads of ours not growing with devices: **${threadsFlat ? 'met' : 'not met'}** (${[...new Set(oursThreads)].join(', ')} threads from ` +
      `${counts[0]} to ${maxCount} devices, idle and connected; qemu-storage-daemon: ${[...new Set(counts.flatMap((n) => states.map((st) => fp('qsd', n, st, 'threads'))))].join(', ')}).`,
    top === undefined
      ? '- Aggregate IOPS: not measured.'
      : `- Aggregate IOPS of ${top.devices} devices >= the single-device figure: **${iopsGoal ? 'met' : 'not met'}** ` +
        `(ours ${fmtIops(top.ours)} at ${top.devices} devices, ${top.oursVsSingle.toFixed(2)}x its ${single}-device figure; ` +
        `qemu-storage-daemon ${top.qsdVsSingle.toFixed(2)}x).`,
  ];

  const spreadLine = workerSpread
    .filter((w) => w.round === 0)
    .map((w) => `${w.devices}: ${Object.entries(w.queuesPerWorker).map(([wk, c]) => `worker ${wk} ${c}`).join(', ')}`)
    .join('; ');
  const header = [
    '# scale benchmark: one `vhost-user serve` process with many devices vs one qemu-storage-daemon',
    '',
    `Command: \`${command}\`, ${(durationS / 60).toFixed(1)} minutes. Machine: ${when.nproc} CPUs (${when.cpuModel}), Linux ${when.kernel}, ` +
      `Node ${when.node}, ${when.qsd}; ${when.date}. Load average ${when.loadavgStart.join(' ')} at the start, ${loadavgEnd.join(' ')} at the end ` +
      '(the machine is shared: absolute rates drift, only paired ratios within this run compare).',
    '',
    `Ours: \`vhost-user serve --config FILE --api-socket PATH --threads ${threads}\` with N \`{"type": "blk", "null": "1G", "queues": 1}\` devices. ` +
      'Theirs: one `qemu-storage-daemon` with N `--blockdev null-co,size=1G,read-zeroes=off` + `--export vhost-user-blk,num-queues=1,writable=on` ' +
      '(JSON syntax). Both run side by side, started in alternating order, for each device count in each round. Frontends: the TypeScript ' +
      `frontend in the benchmark process (GuestRam ${GUEST_RAM / MiB} MiB, one queue of ${QUEUE_SIZE}, ${IODEPTH} request slots of ${BS / KiB} KiB), ` +
      `${CONNECT_CONCURRENCY} connecting at a time. ${rounds} round(s).`,
    '',
    '## Goals',
    '',
    ...goals,
    '',
    '## Footprint',
    '',
    `Medians over rounds of /proc/PID/status, ${settle} s after each state was reached. idle: after start, no frontend; connected: every ` +
      'device has a frontend that did 8 reads and 8 writes of 4k and stays connected; loaded: after the IOPS runs below, frontends still ' +
      'connected. RSS includes the pages of guest RAM the backend touched (RssShmem: rings and request headers, mapped from the frontends\' memfds).',
    '',
    markdownTable({
      columns: ['devices', 'state', 'RSS MiB ours / qsd', 'RssAnon MiB', 'RssFile MiB', 'RssShmem MiB', 'threads ours / qsd', 'fds ours / qsd'],
      rows: footprintRows,
    }),
    '',
    'RSS per added device (KiB; slope of the medians between two device counts). RssShmem is guest RAM (the frontend\'s pages, ' +
      'counted again in every process that maps them); RSS - RssShmem is the backend\'s own memory:',
    '',
    markdownTable({
      columns: ['devices', 'state', 'ours KiB/device', 'qsd KiB/device', 'ours/qsd', 'RSS - RssShmem KiB/device ours / qsd', 'RssAnon KiB/device ours / qsd', 'RssShmem KiB/device ours / qsd'],
      rows: slopeRows,
    }),
    '',
    `Connecting every frontend (handshake, SET_MEM_TABLE, queue start) and its little I/O, ms in total / per device, ours / qsd:`,
    '',
    markdownTable({ columns: ['devices', 'ms total', 'ms per device'], rows: connectRows }),
    '',
    `Queues per pool worker of ours (round 1, devices: spread): ${spreadLine}.`,
    '',
    '## Aggregate IOPS',
    '',
    `4k random read, QD${IODEPTH} on each device, one queue each, every device busy at once; all driven from one event loop in the benchmark ` +
      `process (BlkDriver.submitRaw: \`vhost-user bench blk\` drives one socket per process). Each run ${seconds} s after ${ramp} s of ` +
      'warm-up, order A B B A; a backend\'s figure in a round is its two runs together; medians over rounds, ratios paired per round ' +
      '(median, range in brackets). "N / 1 device": the aggregate against the same backend\'s 1-device figure of the same round. ' +
      'Per device: the slowest and the fastest device\'s IOPS (medians over runs). CPU: the backend\'s utime + stime (every thread) ' +
      'per request and in cores; generator: this process\'s share of one core (near 100 %: the generator may be what limits).',
    '',
    markdownTable({
      columns: [
        'devices',
        'IOPS ours',
        'IOPS qsd',
        'ours/qsd',
        'ours N / 1 device',
        'qsd N / 1 device',
        'per device ours / qsd (min-max)',
        'CPU us/req ours / qsd',
        'backend CPU % ours / qsd',
        'generator CPU % (ours / qsd runs)',
      ],
      rows: iopsRows,
    }),
    '',
    '## Anomalies',
    '',
    ...(anomalies.length === 0 ? ['None: every device connected, answered and completed requests in every run; no backend died.'] : anomalies.map((a) => `- round ${a.round + 1}, ${a.devices} devices, ${NAMES[a.backend]}: ${a.what}`)),
    '',
    `Chart (${values.name}.svg): top, RSS per added device; bottom, aggregate IOPS.`,
  ].join('\n');
  console.log(header);

  const charts: BarChart[] = [
    {
      title: 'RSS per added device (KiB, lower is better)',
      yLabel: 'KiB per device',
      categories: slopes.map((s) => `${s.state} ${s.from}->${s.to}`),
      series: kinds.map((kind) => ({ name: NAMES[kind], values: slopes.map((s) => (kind === 'ours' ? s.oursKiB : s.qsdKiB)) })),
    },
    {
      title: `aggregate IOPS, 4k randread QD${IODEPTH} per device (k, higher is better)`,
      yLabel: 'k IOPS',
      categories: iopsSummaries.map((s) => `${s.devices} device${s.devices > 1 ? 's' : ''}`),
      series: kinds.map((kind) => ({ name: NAMES[kind], values: iopsSummaries.map((s) => (kind === 'ours' ? s.ours : s.qsd) / 1000) })),
    },
  ];
  const svg = [
    '<svg xmlns="http://www.w3.org/2000/svg" width="760" height="760">',
    ...charts.map((c, i) => barChartSvg(c).replace('<svg ', `<svg y="${i * 380}" `)),
    '</svg>',
  ].join('\n');
  const json = {
    machine: { ...when, loadavgEnd },
    command,
    durationSeconds: durationS,
    rounds,
    seconds,
    ramp,
    settle,
    threads,
    counts,
    iopsCounts,
    guestRamBytes: GUEST_RAM,
    queueSize: QUEUE_SIZE,
    iodepth: IODEPTH,
    bs: BS,
    slopes,
    iops: iopsSummaries,
    anomalies,
    workerSpread,
    footprints,
    connects,
    loads,
  };
  mkdirSync(RESULTS_DIR, { recursive: true });
  const paths = ['json', 'md', 'svg'].map((ext) => join(RESULTS_DIR, `${values.name}.${ext}`));
  writeFileSync(paths[0] as string, `${JSON.stringify(json, null, 2)}\n`);
  writeFileSync(paths[1] as string, `${header}\n`);
  writeFileSync(paths[2] as string, svg);
  console.error(`wrote ${paths.join(', ')}`);
}
