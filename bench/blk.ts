/**
 * `npm run bench -- blk`: our vhost-user-blk backend against qemu-storage-daemon, with the same load generator
 * (`vhost-user bench blk`, src/cli/bench-command.ts) in one run.
 *
 * Both backends run as separate processes side by side, each serving the same device: a null device (ours
 * `--null 1G`, QEMU's null-co: requests complete without touching data, so the datapath is what is measured), the
 * same raw image on tmpfs, and (with --devices) a disk on an NBD server that both backends are clients of: `nbd-qemu`
 * is qemu-nbd serving a raw image on tmpfs (`-t --shared=16 -f raw --cache=writeback`, which offers CAN_MULTI_CONN,
 * so ours opens a connection per queue), `nbdkit` is nbdkit's memory plugin (`memory 1G`, sparse RAM); ours is
 * `blk --nbd nbd+unix:///disk?socket=...` (nbdkit: the empty export name), qemu-storage-daemon a `driver=nbd` blockdev
 * on the same socket (one connection). One NBD server per device kind serves the whole run; there the NBD round trip
 * and the server are part of every figure, and the server's CPU per request during each backend's runs is shown
 * beside the backends' (approximate: its whole run, warm-up included). NBD devices run a smaller matrix: 4k random
 * read and write at QD1 and QD32, 128k sequential read and write, 4k QD32 on two queues (no QD128, no datapath floor:
 * the in-process floor drives the null or file backend, which has no meaning for an NBD disk). Every workload runs
 * against ours and qemu-storage-daemon back to back (the order
 * alternates), over several rounds; medians per workload, and the ratio ours / theirs of the medians. Beside IOPS:
 * each backend's CPU time per request from its own /proc/PID/stat (every thread), the load generator's own CPU
 * time per request, and its ceiling against a device that completes at once in its own thread (`--loopback`), which
 * shows whether the generator or the backend limits a figure. Physical limits of this machine are measured in the
 * same run (eventfd round trip, Atomics, cross-core handoff, memcpy) together with our datapath's cost per request
 * without any wake-up (the queue and device code driven in-process), and each figure is put beside them.
 *
 * Options: --seconds S (1) --ramp S (0.5) --rounds N (3) --devices LIST (null,image; any of null, image, nbd-qemu,
 * nbdkit, e.g. `--devices nbd-qemu,nbdkit`) --only SUBSTRING --quick (1 round of 0.5 s runs, about a minute per two
 * devices) --image-size BYTES (1 GiB; also the size of the NBD disks) --qsd-aio threads|io_uring (threads, its
 * default; file images only)
 * --busy-poll-us N (adds our backend with the optional busy-poll as a third contender) --packed (adds our backend
 * driven with packed rings as another contender: the same process as "ours", its own connection) --inflight (adds our
 * backend with an inflight region, as QEMU's vhost-user-blk asks for, so every request is tracked in it: its cost;
 * with --packed also on packed rings) --logging (dirty-page logging for live migration: adds "ours logging" against
 * "ours", with --packed "ours packed logging" against "ours packed", and "qsd logging" against qemu-storage-daemon,
 * each the same backend process over its own connection; the generator gives a log over its guest RAM, turns
 * VHOST_F_LOG_ALL on after the start and takes and clears the bitmap every --log-take-ms (100) as a migration's
 * iterations do) --name NAME (of the result files) --resummarize FILE (the report again from an earlier run's
 * JSON) --profile DIR (V8 CPU profiles of every thread of our backend, one folder per device and round, covering
 * the round's workloads: pair it with --only; `node dist/bench/profile-summary.js FILE` reads one). The default takes
 * about 8 minutes; every contender added (variants, busy-poll) about 2 more;
 * `--devices nbd-qemu,nbdkit` about 6.
 */
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, statfsSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Worker } from 'node:worker_threads';
import type { ChildProcess } from 'node:child_process';
import { processCpuSeconds, runBlkLoad, type BlkLoadResult, type RwMode } from '../src/cli/bench-command.js';
import { BlkQueueHandler } from '../src/devices/blk/blk-queue.js';
import { GuestRam } from '../src/frontend/guest-ram.js';
import { MemoryTable } from '../src/memory/memory-table.js';
import * as native from '../src/native/index.js';
import { SplitQueue } from '../src/queue/split-queue.js';
import { SplitQueueDriver, type Segment } from '../src/queue/split-queue-driver.js';
import { startNbdkit, startQemuNbd, type NbdServer } from '../test/helpers/nbd-server.js';
import { startQsd, type Qsd } from '../test/helpers/qsd.js';
import { findBinary } from '../test/helpers/require-tool.js';
import { hasExited, spawnOwned, stopProcess } from '../test/helpers/tmp.js';
import { machine, markdownTable, median, percentile, writeResults } from './report.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const ROOT = new URL('../../', import.meta.url).pathname;

interface Workload {
  readonly name: string;
  readonly rw: RwMode;
  readonly bs: number;
  readonly iodepth: number;
  readonly queues: number;
}

function wl(rw: RwMode, bs: number, iodepth: number, queues = 1): Workload {
  const size = bs >= MiB ? `${bs / MiB}m` : `${bs / KiB}k`;
  return { name: `${rw} ${size} QD${iodepth}${queues > 1 ? ` x${queues}q` : ''}`, rw, bs, iodepth, queues };
}

/** The default matrix: 4k random at QD 1, 32, 128; 128k sequential; 1 and 2 queues (iodepth is per queue). */
const WORKLOADS: readonly Workload[] = [
  wl('randread', 4 * KiB, 1),
  wl('randread', 4 * KiB, 32),
  wl('randread', 4 * KiB, 128),
  wl('randwrite', 4 * KiB, 1),
  wl('randwrite', 4 * KiB, 32),
  wl('randwrite', 4 * KiB, 128),
  wl('read', 128 * KiB, 16),
  wl('write', 128 * KiB, 16),
  wl('randread', 4 * KiB, 32, 2),
  wl('randwrite', 4 * KiB, 32, 2),
];

const DEVICE_KINDS = ['null', 'image', 'nbd-qemu', 'nbdkit'] as const;
type DeviceKind = (typeof DEVICE_KINDS)[number];
type NbdKind = Extract<DeviceKind, 'nbd-qemu' | 'nbdkit'>;

function isNbd(device: DeviceKind | 'loopback'): device is NbdKind {
  return device === 'nbd-qemu' || device === 'nbdkit';
}

/**
 * The workloads a device runs. NBD disks: 4k random read and write at QD1 and QD32, 128k sequential, 4k QD32 on two
 * queues: QD128 is left out (what the NBD server does with that many requests in flight is its own matter, and it
 * doubles the run).
 */
function workloadsFor(device: DeviceKind, all: readonly Workload[]): readonly Workload[] {
  return isNbd(device) ? all.filter((w) => w.iodepth <= 32) : all;
}

/** Short labels (chart): N null, I image, Q qemu-nbd, K nbdkit. */
const DEVICE_LABEL: Record<DeviceKind, string> = { null: 'N', image: 'I', 'nbd-qemu': 'Q', nbdkit: 'K' };

/** An NBD server a device kind's two backends are both clients of (one for the whole run). */
interface NbdDisk {
  readonly server: NbdServer;
  /** Ours: `blk --nbd URI`. */
  readonly uri: string;
  /** qemu-storage-daemon's `--blockdev` (driver nbd, the same server). */
  readonly blockdev: Readonly<Record<string, unknown>>;
}

interface Backend {
  readonly name: string;
  readonly socket: string;
  readonly pid: number;
  /** The load generator drives packed rings (VIRTIO_F_RING_PACKED) on this one. */
  readonly packed?: boolean;
  /** The load generator asks for an inflight region on this one. */
  readonly inflight?: boolean;
  /** The load generator turns dirty-page logging on for this one (live migration). */
  readonly logging?: boolean;
  stop(): Promise<void>;
}

interface Sample {
  readonly device: DeviceKind | 'loopback';
  readonly workload: string;
  readonly backend: string;
  readonly round: number;
  readonly result: BlkLoadResult;
  /**
   * NBD devices: the NBD server's CPU time (every thread) per request of this run. Approximate: read around the
   * whole run (warm-up and the drain at its end included) and spread over the requests at the window's rate.
   */
  readonly serverCpuUsPerIo?: number;
}

// ---- backends ----------------------------------------------------------------------------------------------------

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function waitForSocket(path: string, child: ChildProcess, what: string): Promise<void> {
  const deadline = Date.now() + 15_000;
  while (!existsSync(path)) {
    if (hasExited(child)) throw new Error(`${what} exited (code ${child.exitCode})`);
    if (Date.now() > deadline) throw new Error(`${what}: ${path} did not appear`);
    await sleep(20);
  }
}

/** Our backend as its own process, through the CLI, like qemu-storage-daemon. */
async function startOurs(
  name: string,
  dir: string,
  device: DeviceKind,
  image: string,
  nbd: NbdDisk | undefined,
  extraArgs: string[] = [],
  profileDir?: string,
): Promise<Backend> {
  const socket = join(dir, `${name}.sock`);
  // --profile: a V8 CPU profile of every thread of the process (main, queue workers, I/O threads), written when it exits.
  const nodeArgs = profileDir === undefined ? [] : ['--cpu-prof', '--cpu-prof-dir', profileDir];
  const args = [...nodeArgs, join(ROOT, 'bin/vhost-user.js'), 'blk', '--socket', socket, '--queues', '2', '--log-level', 'warn', ...extraArgs];
  if (isNbd(device)) {
    if (nbd === undefined) throw new Error(`${device}: no NBD server`);
    args.push('--nbd', nbd.uri);
  } else {
    args.push(...(device === 'null' ? ['--null', '1G'] : ['--image', image]));
  }
  const child = spawnOwned(process.execPath, args, { stdio: ['ignore', 'ignore', 'inherit'] });
  await waitForSocket(socket, child, `our backend (${name})`);
  const pid = child.pid;
  if (pid === undefined) throw new Error('our backend did not start');
  return { name, socket, pid, stop: () => stopProcess(child) };
}

async function startTheirs(dir: string, device: DeviceKind, image: string, aio: string, nbd: NbdDisk | undefined): Promise<Backend> {
  const socket = join(dir, 'qsd.sock');
  if (isNbd(device) && nbd === undefined) throw new Error(`${device}: no NBD server`);
  const blockdev =
    nbd !== undefined && isNbd(device)
      ? nbd.blockdev
      : device === 'null'
        ? { driver: 'null-co', size: GiB, 'read-zeroes': false }
        : { driver: 'file', filename: image, cache: { direct: false }, aio };
  const qsd: Qsd = await startQsd({ blockdev, socketPath: socket, numQueues: 2, writable: true });
  return { name: 'qemu-storage-daemon', socket, pid: qsd.pid, stop: () => qsd.stop() };
}

/**
 * The NBD server of an NBD device kind, on a unix socket in `dir`: qemu-nbd serving a raw image (`image`, made here)
 * with --shared=16 (so it offers CAN_MULTI_CONN), or nbdkit's memory plugin. Stopped by its PID (`server.stop()`).
 */
async function startNbdDisk(kind: NbdKind, dir: string, image: string, size: number): Promise<NbdDisk> {
  const socketPath = join(dir, `${kind}.sock`);
  if (kind === 'nbd-qemu') {
    makeImage(image, size);
    const server = await startQemuNbd({ socketPath, image, exportName: 'disk', shared: 16 });
    return {
      server,
      uri: `nbd+unix:///disk?socket=${socketPath}`,
      blockdev: { driver: 'nbd', server: { type: 'unix', path: socketPath }, export: 'disk' },
    };
  }
  const server = await startNbdkit({ socketPath, plugin: ['memory', String(size)] });
  // nbdkit's memory plugin serves any export name; both ask for the default one (empty).
  return {
    server,
    uri: `nbd+unix:///?socket=${socketPath}`,
    blockdev: { driver: 'nbd', server: { type: 'unix', path: socketPath } },
  };
}

const TMPFS_MAGIC = 0x01021994;

function isTmpfs(path: string): boolean {
  try {
    return statfsSync(path).type === TMPFS_MAGIC;
  } catch {
    return false;
  }
}

/** A raw image of `size` bytes of non-zero data (reads must hit real pages, not tmpfs holes). */
function makeImage(path: string, size: number): void {
  const fd = openSync(path, 'w');
  try {
    const chunk = Buffer.alloc(MiB);
    for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131 + 7) & 0xff || 1;
    for (let off = 0; off < size; off += chunk.length) {
      chunk.writeUInt32LE(off / chunk.length, 0); // every MiB differs
      writeSync(fd, chunk, 0, Math.min(chunk.length, size - off), off);
    }
  } finally {
    closeSync(fd);
  }
}

// ---- physical limits, measured in this run ---------------------------------------------------------------------

interface Limits {
  /** Main thread writes a kick eventfd, a worker blocked in read() wakes and writes the call eventfd: round trip. */
  eventfdRoundTripUs: { p50: number; p99: number };
  atomicsLoadNs: number;
  atomicsStoreNs: number;
  /** Two threads spinning on one SharedArrayBuffer word: one round trip (undefined if it did not finish in time). */
  crossCoreRoundTripNs: number | undefined;
  /** Buffer copy of 128 KiB pieces (the one copy a read from the page cache into guest memory costs). */
  memcpyGBps: number;
}

const WORKER_PRELUDE = `const { workerData, parentPort } = require('node:worker_threads');`;

function runWorker(code: string, data: unknown): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const w = new Worker(`${WORKER_PRELUDE}\n${code}`, { eval: true, workerData: data });
    w.once('message', resolve);
    w.once('error', reject);
  });
}

async function measureLimits(): Promise<Limits> {
  const addonPath = join(ROOT, 'build/Release/vhost_user.node');
  // eventfd kick -> wake -> call, blocking eventfds (the main thread blocks too: nothing else runs meanwhile).
  const kick = native.eventfdCreate(0, false);
  const call = native.eventfdCreate(0, false);
  const rounds = 20_000;
  const pong = runWorker(
    `const a = require(workerData.addonPath);
     for (let i = 0; i < workerData.rounds; i++) { a.eventfdRead(workerData.kick); a.eventfdWrite(workerData.call, 1); }
     parentPort.postMessage('done');`,
    { addonPath, kick, call, rounds },
  );
  await sleep(100); // let the worker reach its first read()
  const rtt: number[] = [];
  for (let i = 0; i < rounds; i++) {
    const t0 = performance.now();
    native.eventfdWrite(kick, 1);
    native.eventfdRead(call);
    rtt.push((performance.now() - t0) * 1000);
  }
  await pong;
  native.close(kick);
  native.close(call);
  rtt.sort((a, b) => a - b);

  // Atomics on a SharedArrayBuffer, tight loop.
  const words = new Int32Array(new SharedArrayBuffer(64));
  const n = 10_000_000;
  let t = performance.now();
  let sum = 0;
  for (let i = 0; i < n; i++) sum += Atomics.load(words, i & 7);
  const atomicsLoadNs = ((performance.now() - t) * 1e6) / n;
  t = performance.now();
  for (let i = 0; i < n; i++) Atomics.store(words, i & 7, i);
  const atomicsStoreNs = ((performance.now() - t) * 1e6) / n + sum * 0;

  // Cross-core handoff: ping-pong through one word between this thread and a worker, both spinning (bounded).
  const ping = new Int32Array(new SharedArrayBuffer(8));
  const handoffRounds = 200_000;
  const spinner = runWorker(
    `const w = new Int32Array(workerData.buf); const end = Date.now() + 1500;
     out: for (let i = 1; i <= workerData.rounds; i++) {
       for (let k = 1; Atomics.load(w, 0) !== 2 * i - 1; k++) if ((k & 1023) === 0 && Date.now() > end) break out;
       Atomics.store(w, 0, 2 * i);
     }
     parentPort.postMessage('done');`,
    { buf: ping.buffer, rounds: handoffRounds },
  );
  await sleep(100);
  let crossCoreRoundTripNs: number | undefined;
  t = performance.now();
  const end = Date.now() + 1000;
  let i = 1;
  let late = false;
  for (; i <= handoffRounds && !late; i++) {
    Atomics.store(ping, 0, 2 * i - 1);
    for (let k = 1; Atomics.load(ping, 0) !== 2 * i; k++) {
      if ((k & 1023) === 0 && Date.now() > end) {
        late = true;
        break;
      }
    }
  }
  if (i > handoffRounds) crossCoreRoundTripNs = ((performance.now() - t) * 1e6) / handoffRounds;
  await spinner;

  // memcpy bandwidth, 128 KiB pieces.
  const src = Buffer.alloc(128 * KiB, 1);
  const dst = Buffer.alloc(32 * MiB);
  dst.fill(2); // fault every page in first: page faults are not what is measured
  let copied = 0;
  t = performance.now();
  while (performance.now() - t < 300) {
    for (let off = 0; off < dst.length; off += src.length) src.copy(dst, off);
    copied += dst.length;
  }
  const memcpyGBps = copied / ((performance.now() - t) / 1000) / 1e9;
  return {
    eventfdRoundTripUs: { p50: percentile(rtt, 50), p99: percentile(rtt, 99) },
    atomicsLoadNs,
    atomicsStoreNs,
    crossCoreRoundTripNs,
    memcpyGBps,
  };
}

/**
 * Our datapath without wake-ups: the device side of the queue (SplitQueue) and the blk handler driven in this
 * thread over a real memory table, chains from the driver side, batches of 32. What remains of our backend's CPU
 * time per request beyond this is poll(), eventfds and scheduling. Returns ns per request.
 */
function datapathCost(w: Workload, device: 'null' | 'image', image: string, ms = 250): number {
  const ram = GuestRam.create(32 * MiB);
  const r = ram.regions[0];
  if (r === undefined) throw new Error('no RAM region');
  const table = new MemoryTable([{ gpa: r.gpa, size: r.size, uva: r.uva, fileOffset: 0, buffer: r.buffer, bufferOffset: 0, dev: 0n, ino: 0n, slot: 0 }]);
  const size = 128;
  const layout = SplitQueueDriver.layout(size, ram.alloc(SplitQueueDriver.layout(size, 0).end, { align: 4096 }));
  const driver = new SplitQueueDriver<number>(ram, { ...layout, size, eventIdx: true });
  const queue = new SplitQueue({ ...layout, size, eventIdx: true, indirect: true });
  queue.attach(table);
  const chain = queue.createChain();
  const capacity = GiB;
  const handler = new BlkQueueHandler({
    backend: device === 'null' ? { kind: 'null', size: capacity, readOnly: false } : { kind: 'file', path: image, readOnly: false },
    serial: 'bench',
    capacityBytes: capacity,
  });
  const write = w.rw === 'randwrite' || w.rw === 'write';
  const batch = 32;
  const slots: { header: DataView; segments: Segment[] }[] = [];
  for (let i = 0; i < batch; i++) {
    const base = ram.alloc(512 + w.bs, { align: 4096 });
    slots.push({
      header: new DataView(r.buffer, base, 16),
      segments: [
        { addr: base, len: 16, writable: false },
        { addr: base + 512, len: w.bs, writable: !write },
        { addr: base + 16, len: 1, writable: true },
      ],
    });
  }
  const blocks = capacity / w.bs;
  let x = 12345;
  let next = 0;
  /** ns per request of each batch: the median ignores batches during which this thread was descheduled. */
  const perBatch: number[] = [];
  const t0 = performance.now();
  try {
    while (performance.now() - t0 < ms) {
      for (let i = 0; i < batch; i++) {
        const s = slots[i] as (typeof slots)[number];
        x = (Math.imul(x, 1103515245) + 12345) >>> 0;
        const block = w.rw.startsWith('rand') ? x % blocks : next++ % blocks;
        s.header.setUint32(0, write ? 1 : 0, true);
        s.header.setUint32(8, (block * w.bs) / 512, true);
        s.header.setUint32(12, 0, true);
        driver.addChain(s.segments, i);
      }
      driver.publish();
      const a = performance.now();
      queue.disableNotification();
      while (queue.popChain(table, chain)) queue.pushUsed(chain.head, handler.process(table, chain));
      queue.publishUsed();
      queue.needsNotification();
      queue.enableNotification();
      perBatch.push(((performance.now() - a) * 1e6) / batch);
      driver.pollUsed(() => undefined);
    }
  } finally {
    handler.close();
    ram.close();
  }
  return median(perBatch.slice(perBatch.length >> 2)); // the first quarter warms the JIT up
}

// ---- the run ---------------------------------------------------------------------------------------------------

/** What the JSON result keeps (enough for --resummarize). */
interface SavedRun {
  machine: ReturnType<typeof machine>;
  command: string;
  seconds: number;
  ramp: number;
  rounds: number;
  qsdAio: string;
  busyPollUs: number;
  packed?: boolean;
  inflight?: boolean;
  logging?: boolean;
  logTakeMs?: number;
  imageSize: number;
  devices: DeviceKind[];
  workloads: string[];
  limits: Limits;
  datapathNsPerIo: Record<string, number>;
  samples: ({ device: Sample['device']; workload: string; backend: string; round: number; serverCpuUsPerIo?: number } & BlkLoadResult)[];
}

interface Summary {
  device: DeviceKind;
  workload: string;
  ours: Stats;
  theirs: Stats;
  busyPoll?: Stats;
  /** A backend driven another way (packed rings, an inflight region, logging), each against the run it varies. */
  variants: VariantSummary[];
  /** With --logging: "ours logging" / "qsd logging", paired by round (median, range). */
  loggingVsQsd?: { ratio: number; ratioRange: [number, number] };
  ceilingIops: number;
  iopsRatio: number;
  /** Per round, ours / theirs of the runs taken back to back: the spread of the ratio. */
  iopsRatioRange: [number, number];
  cpuRatio: number;
  /** NaN for NBD devices (no floor). */
  datapathNsPerIo: number;
  /** NBD devices: the NBD server's CPU per request (approximate, median of the runs) during ours' and theirs. */
  serverCpuUsPerIo?: { ours: number; theirs: number };
}

/** The contender names of the two backend processes. */
const OURS = 'ours';
const QSD = 'qemu-storage-daemon';

/** A contender that is a backend driven another way (the same backend process, its own connection). */
interface Variant {
  readonly name: string;
  /** Which backend process it runs on. */
  readonly backend: typeof OURS | typeof QSD;
  readonly packed: boolean;
  readonly inflight: boolean;
  readonly logging: boolean;
  /** The contender it is compared with (the same but for one thing). */
  readonly base: string;
}

function variantsOf(packed: boolean, inflight: boolean, logging: boolean): Variant[] {
  const v: Variant[] = [];
  const ours = { backend: OURS, packed: false, inflight: false, logging: false } as const;
  if (packed) v.push({ ...ours, name: 'ours packed', packed: true, base: OURS });
  if (inflight) v.push({ ...ours, name: 'ours inflight', inflight: true, base: OURS });
  if (packed && inflight) v.push({ ...ours, name: 'ours packed inflight', packed: true, inflight: true, base: 'ours packed' });
  if (logging) {
    v.push({ ...ours, name: 'ours logging', logging: true, base: OURS });
    if (packed) v.push({ ...ours, name: 'ours packed logging', packed: true, logging: true, base: 'ours packed' });
    // qemu-storage-daemon offers VHOST_F_LOG_ALL and LOG_SHMFD (libvhost-user): the same migration, against it.
    v.push({ backend: QSD, name: 'qsd logging', packed: false, inflight: false, logging: true, base: QSD });
  }
  return v;
}

interface VariantSummary {
  readonly name: string;
  readonly base: string;
  readonly stats: Stats;
  /** Per round, this variant / its base: median, and range over rounds. */
  readonly ratio: number;
  readonly ratioRange: [number, number];
  /** Logging variants: dirty pages per take of the bitmap (median over runs): proof that the backend logged. */
  readonly dirtyPagesPerTake?: number;
}

/** Median over the runs of the dirty pages each take of the bitmap returned (NaN when no run logged). */
function dirtyPagesPerTake(samples: readonly Sample[]): number {
  const per = samples.flatMap((s) => (s.result.dirtyLog !== undefined && s.result.dirtyLog.takes > 0 ? [s.result.dirtyLog.pages / s.result.dirtyLog.takes] : []));
  return per.length === 0 ? NaN : median(per);
}

interface Stats {
  iops: number;
  mbps: number;
  p50Us: number;
  p99Us: number;
  p999Us: number;
  cpuUsPerIo: number;
  generatorCpuUsPerIo: number;
  /** The load generator's CPU use during these runs, in cores (1 = saturated). */
  generatorUtil: number;
  runs: number[];
}

/**
 * Throughput and CPU per request of one backend in one round: its runs of that round (A B B A: two) taken together,
 * requests over time. The pairing that the ratios use, and the basis of the medians shown.
 */
function roundFigures(samples: readonly Sample[], round: number): { iops: number; mbps: number; cpu: number } {
  const mine = samples.filter((x) => x.round === round).map((x) => x.result);
  const ios = mine.reduce((a, x) => a + x.ios, 0);
  const time = mine.reduce((a, x) => a + x.seconds, 0);
  const bytes = mine.reduce((a, x) => a + x.ios * x.bs, 0);
  const cpu = mine.reduce((a, x) => a + (x.backendCpuUsPerIo ?? NaN) * x.ios, 0);
  return { iops: ios / time, mbps: bytes / time / 1e6, cpu: cpu / ios };
}

function roundsOf(samples: readonly Sample[]): number[] {
  return [...new Set(samples.map((x) => x.round))].sort((a, b) => a - b);
}

function stats(samples: readonly Sample[]): Stats {
  const m = (f: (r: BlkLoadResult) => number): number => median(samples.map((s) => f(s.result)));
  const perRound = roundsOf(samples).map((r) => roundFigures(samples, r));
  return {
    iops: median(perRound.map((x) => x.iops)),
    mbps: median(perRound.map((x) => x.mbps)),
    p50Us: m((r) => r.latencyUs.p50),
    p99Us: m((r) => r.latencyUs.p99),
    p999Us: m((r) => r.latencyUs.p999),
    cpuUsPerIo: median(perRound.map((x) => x.cpu)),
    generatorCpuUsPerIo: m((r) => r.generatorCpuUsPerIo),
    generatorUtil: m((r) => r.generatorCpuUtil),
    runs: samples.map((s) => Math.round(s.result.iops)),
  };
}

/** How close ours is to the physical limits: QD1 latency in eventfd round trips, CPU per request over the floor. */
function limitNote(s: Summary, lim: Limits): string {
  const w = WORKLOADS.find((x) => x.name === s.workload);
  const parts: string[] = [];
  if (w?.iodepth === 1) parts.push(`p50 = ${(s.ours.p50Us / lim.eventfdRoundTripUs.p50).toFixed(1)}x RTT`);
  // No floor for an NBD disk: the in-process datapath drives a null or file backend.
  if (!isNbd(s.device)) {
    parts.push(`CPU = ${(s.ours.cpuUsPerIo / (s.datapathNsPerIo / 1000)).toFixed(1)}x floor (${(s.datapathNsPerIo / 1000).toFixed(2)} us)`);
  }
  if (s.device === 'image' && w !== undefined && w.bs >= 64 * KiB) {
    parts.push(`${((100 * s.ours.mbps) / (lim.memcpyGBps * 1000)).toFixed(0)} % of memcpy`);
  }
  return parts.join(', ');
}

/**
 * Short x-axis labels (20 groups share 680 px): N/I/Q/K = null/image/qemu-nbd/nbdkit, r/w = 4k random read/write,
 * R/W = 128k sequential, then the queue depth, and q2 for two queues.
 */
function chartLabel(s: Summary): string {
  const w = WORKLOADS.find((x) => x.name === s.workload);
  if (w === undefined) return s.workload;
  const op = { randread: 'r', randwrite: 'w', read: 'R', write: 'W', mixed: 'm' }[w.rw];
  return `${DEVICE_LABEL[s.device]}${op}${w.iodepth}${w.queues > 1 ? `q${w.queues}` : ''}`;
}

function fmtIops(v: number): string {
  return v >= 1e6 ? `${(v / 1e6).toFixed(2)} M` : `${(v / 1e3).toFixed(v >= 1e5 ? 0 : 1)} k`;
}

export async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      seconds: { type: 'string', default: '1' },
      ramp: { type: 'string', default: '0.5' },
      rounds: { type: 'string', default: '3' },
      devices: { type: 'string', default: 'null,image' },
      only: { type: 'string' },
      quick: { type: 'boolean', default: false },
      'image-size': { type: 'string', default: String(GiB) },
      logging: { type: 'boolean', default: false },
      'log-take-ms': { type: 'string', default: '100' },
      'qsd-aio': { type: 'string', default: 'threads' },
      'busy-poll-us': { type: 'string', default: '0' },
      packed: { type: 'boolean', default: false },
      inflight: { type: 'boolean', default: false },
      name: { type: 'string', default: 'blk' },
      profile: { type: 'string' },
      resummarize: { type: 'string' },
    },
  });
  // --resummarize FILE: no measurement, the report again from the samples of an earlier run's JSON.
  const earlier = values.resummarize === undefined ? undefined : (JSON.parse(readFileSync(values.resummarize, 'utf8')) as SavedRun);
  const seconds = earlier?.seconds ?? (values.quick ? 0.5 : Number(values.seconds));
  const rounds = earlier?.rounds ?? (values.quick ? 1 : Number(values.rounds));
  const ramp = earlier?.ramp ?? (values.quick ? 0.3 : Number(values.ramp));
  const busyPollUs = earlier?.busyPollUs ?? Number(values['busy-poll-us']);
  const packed = earlier?.packed ?? values.packed;
  const inflight = earlier?.inflight ?? values.inflight;
  const logging = earlier?.logging ?? values.logging;
  const logTakeMs = earlier?.logTakeMs ?? Number(values['log-take-ms']);
  const variants = variantsOf(packed, inflight, logging);
  const imageSize = earlier?.imageSize ?? Number(values['image-size']);
  const qsdAio = earlier?.qsdAio ?? values['qsd-aio'];
  const command = earlier?.command ?? `npm run bench -- blk ${argv.join(' ')}`.trim();
  const devices = earlier?.devices ?? values.devices.split(',').map((d) => d.trim()).filter((d) => d !== '').map((d) => {
    if (!(DEVICE_KINDS as readonly string[]).includes(d)) throw new Error(`--devices: unknown device ${d} (${DEVICE_KINDS.join(', ')})`);
    return d as DeviceKind;
  });
  if (devices.length === 0) throw new Error('--devices: no device');
  const only = values.only;
  const candidates = earlier !== undefined
    ? WORKLOADS.filter((w) => earlier.workloads.includes(w.name))
    : WORKLOADS.filter((w) => only === undefined || w.name.includes(only));
  /** Each device's own matrix (NBD devices: a smaller one), and all that any device runs (the loopback runs). */
  const workloadsOf = (device: DeviceKind): readonly Workload[] => workloadsFor(device, candidates);
  const workloads = candidates.filter((w) => devices.some((d) => workloadsOf(d).includes(w)));
  if (workloads.length === 0) throw new Error('no workload left to run (--only)');
  const samples: Sample[] = [];
  const datapath = new Map<string, number>(earlier === undefined ? [] : Object.entries(earlier.datapathNsPerIo));
  let limits: Limits | undefined = earlier?.limits;
  let when = machine();
  if (earlier !== undefined) {
    when = earlier.machine;
    for (const x of earlier.samples) {
      const { device, workload, backend, round, serverCpuUsPerIo, ...result } = x;
      samples.push({ device, workload, backend, round, result, ...(serverCpuUsPerIo !== undefined ? { serverCpuUsPerIo } : {}) });
    }
  } else {
    await measure();
  }

  async function measure(): Promise<void> {
    if (findBinary('qemu-storage-daemon') === undefined) {
      throw new Error('qemu-storage-daemon not found: apt-get install -y qemu-system-x86 (qemu-system-common)');
    }

    // Images (ours --image, qemu-nbd's) on tmpfs: /dev/shm, else the temporary directory if it is one.
    const shm = '/dev/shm';
    const base = existsSync(shm) && isTmpfs(shm) ? shm : tmpdir();
    if (!isTmpfs(base)) process.stderr.write(`warning: neither ${shm} nor ${tmpdir()} is tmpfs: the images are on ${base}\n`);
    const dir = mkdtempSync(join(base, 'vhost-user-bench-'));
    const image = join(dir, 'disk.img');
    /** The NBD server of each NBD device kind of the run, started once, stopped (by PID) at the end. */
    const nbdDisks = new Map<NbdKind, NbdDisk>();
    const progress = (line: string): void => {
      process.stderr.write(process.stderr.isTTY ? `\r${line.slice(0, 110).padEnd(110)}` : `${line}\n`);
    };
    // Physical limits and our datapath's floor are best-case figures: measured at the start of every round (the
    // machine is shared and changes), and the best value seen is kept.
    const measureBest = async (): Promise<void> => {
      progress('physical limits and datapath floors...');
      const l = await measureLimits();
      const minDefined = (a: number | undefined, b: number | undefined): number | undefined =>
        a === undefined ? b : b === undefined ? a : Math.min(a, b);
      limits =
        limits === undefined
          ? l
          : {
              eventfdRoundTripUs: l.eventfdRoundTripUs.p50 < limits.eventfdRoundTripUs.p50 ? l.eventfdRoundTripUs : limits.eventfdRoundTripUs,
              atomicsLoadNs: Math.min(l.atomicsLoadNs, limits.atomicsLoadNs),
              atomicsStoreNs: Math.min(l.atomicsStoreNs, limits.atomicsStoreNs),
              crossCoreRoundTripNs: minDefined(l.crossCoreRoundTripNs, limits.crossCoreRoundTripNs),
              memcpyGBps: Math.max(l.memcpyGBps, limits.memcpyGBps),
            };
      for (const device of devices) {
        if (isNbd(device)) continue; // no in-process floor for an NBD disk
        for (const w of workloadsOf(device)) {
          const key = `${device} ${w.name}`;
          datapath.set(key, Math.min(datapath.get(key) ?? Infinity, datapathCost(w, device, image)));
        }
      }
    };
    try {
      if (devices.includes('image')) makeImage(image, imageSize);
      for (const device of devices) {
        if (!isNbd(device) || nbdDisks.has(device)) continue;
        progress(`starting the NBD server of ${device}...`);
        nbdDisks.set(device, await startNbdDisk(device, dir, join(dir, `${device}.img`), imageSize));
      }

      const contenders = 2 + (busyPollUs > 0 ? 1 : 0) + variants.length;
      const total = rounds * (workloads.length + devices.reduce((n, d) => n + workloadsOf(d).length * 2 * contenders, 0));
      let started = 0;
      const run = async (
        device: Sample['device'],
        w: Workload,
        b: Pick<Backend, 'name' | 'socket' | 'packed' | 'inflight' | 'logging'> & { pid?: number },
        round: number,
      ): Promise<void> => {
        const backend = b.name;
        const label = `[${++started}/${total}] round ${round + 1} ${device} ${w.name} ${backend}`;
        const server = device === 'loopback' || !isNbd(device) ? undefined : nbdDisks.get(device)?.server;
        const server0 = server === undefined ? 0 : processCpuSeconds(server.pid);
        const wall0 = performance.now();
        const result = await runBlkLoad(
          b.socket,
          {
            rw: w.rw,
            bs: w.bs,
            iodepth: w.iodepth,
            queues: w.queues,
            seconds,
            rampSeconds: ramp,
            packed: b.packed === true,
            inflight: b.inflight === true,
            ...(b.logging === true ? { logging: true, logTakeMs } : {}),
            ...(b.pid !== undefined ? { backendPid: b.pid } : {}),
          },
          (p) => progress(`${label}: ${fmtIops(p.iops)} IOPS${p.measuring ? '' : ' (warm-up)'}`),
        );
        // The server's CPU over the whole call, in cores, over the window's request rate: its CPU per request.
        const serverCpuUsPerIo =
          server === undefined
            ? undefined
            : ((processCpuSeconds(server.pid) - server0) / ((performance.now() - wall0) / 1000) / result.iops) * 1e6;
        samples.push({ device, workload: w.name, backend, round, result, ...(serverCpuUsPerIo !== undefined ? { serverCpuUsPerIo } : {}) });
        progress(
          `${label}: ${fmtIops(result.iops)} IOPS, p50 ${result.latencyUs.p50.toFixed(1)} us` +
            (result.backendCpuUsPerIo !== undefined ? `, ${result.backendCpuUsPerIo.toFixed(2)} us CPU/req` : ''),
        );
      };

      for (let round = 0; round < rounds; round++) {
        await measureBest();
        // The generator's ceiling: no backend at all.
        for (const w of workloads) await run('loopback', w, { name: 'loopback', socket: 'loopback' }, round);
        for (const device of devices) {
          const nbd = isNbd(device) ? nbdDisks.get(device) : undefined;
          // --profile DIR: ours' threads' CPU profiles in DIR/<contender>-<device>-round<N> (every workload of the round).
          const profileDir = (who: string): string | undefined =>
            values.profile === undefined ? undefined : join(values.profile, `${who}-${device}-round${round + 1}`.replace(/\W+/g, '-'));
          const backends = [
            await startOurs('ours', dir, device, image, nbd, [], profileDir('ours')),
            await startTheirs(dir, device, image, qsdAio, nbd),
          ];
          if (busyPollUs > 0) {
            backends.push(await startOurs('ours+busy-poll', dir, device, image, nbd, ['--busy-poll', String(busyPollUs)], profileDir('ours-busy-poll')));
          }
          // qemu-storage-daemon (libvhost-user) offers neither VIRTIO_F_RING_PACKED nor (as a daemon export) an inflight
          // region: those variants are ours alone. Logging both have.
          const processes = { [OURS]: backends[0] as Backend, [QSD]: backends[1] as Backend };
          for (const v of variants) {
            const b = processes[v.backend];
            backends.push({ ...b, name: v.name, packed: v.packed, inflight: v.inflight, logging: v.logging, stop: () => Promise.resolve() });
          }
          try {
            for (const [k, w] of workloadsOf(device).entries()) {
              // A B B A, back to back (which one goes first alternates): drift, even a steady one, hits both alike.
              const order = (k + round) % 2 === 0 ? backends : [...backends].reverse();
              for (const b of [...order, ...[...order].reverse()]) await run(device, w, b, round);
            }
          } finally {
            for (const b of backends) await b.stop();
          }
        }
      }
    } finally {
      for (const d of nbdDisks.values()) await d.server.stop();
      rmSync(dir, { recursive: true, force: true });
    }
    if (process.stderr.isTTY) process.stderr.write('\n');
  }

  // ---- summary ---------------------------------------------------------------------------------------------------
  const pick = (device: Sample['device'], w: string, backend: string): Sample[] =>
    samples.filter((s) => s.device === device && s.workload === w && s.backend === backend);
  const summaries: Summary[] = [];
  for (const device of devices) {
    for (const w of workloadsOf(device)) {
      const ours = pick(device, w.name, OURS);
      const theirs = pick(device, w.name, QSD);
      // Ratios are paired by round (the A B B A runs, taken back to back), then the median over rounds.
      const paired = roundsOf(ours).map((r) => roundFigures(ours, r).iops / roundFigures(theirs, r).iops);
      const pairedCpu = roundsOf(ours).map((r) => roundFigures(ours, r).cpu / roundFigures(theirs, r).cpu);
      const s: Summary = {
        device,
        workload: w.name,
        ours: stats(ours),
        theirs: stats(theirs),
        // A ceiling is a best case: the best round (the loopback runs suffer the machine's load like any other).
        ceilingIops: Math.max(...pick('loopback', w.name, 'loopback').map((x) => x.result.iops)),
        iopsRatio: 0,
        iopsRatioRange: [Math.min(...paired), Math.max(...paired)],
        cpuRatio: 0,
        datapathNsPerIo: datapath.get(`${device} ${w.name}`) ?? NaN,
        variants: [],
      };
      if (isNbd(device)) {
        const serverCpu = (xs: readonly Sample[]): number => median(xs.flatMap((x) => x.serverCpuUsPerIo ?? []));
        s.serverCpuUsPerIo = { ours: serverCpu(ours), theirs: serverCpu(theirs) };
      }
      if (busyPollUs > 0) s.busyPoll = stats(pick(device, w.name, 'ours+busy-poll'));
      for (const v of variants) {
        const p = pick(device, w.name, v.name);
        const base = pick(device, w.name, v.base);
        const ratios = roundsOf(p).map((r) => roundFigures(p, r).iops / roundFigures(base, r).iops);
        s.variants.push({
          name: v.name,
          base: v.base,
          stats: stats(p),
          ratio: median(ratios),
          ratioRange: [Math.min(...ratios), Math.max(...ratios)],
          ...(v.logging ? { dirtyPagesPerTake: dirtyPagesPerTake(p) } : {}),
        });
      }
      if (logging) {
        const a = pick(device, w.name, 'ours logging');
        const b = pick(device, w.name, 'qsd logging');
        const ratios = roundsOf(a).map((r) => roundFigures(a, r).iops / roundFigures(b, r).iops);
        s.loggingVsQsd = { ratio: median(ratios), ratioRange: [Math.min(...ratios), Math.max(...ratios)] };
      }
      s.iopsRatio = median(paired);
      s.cpuRatio = median(pairedCpu);
      summaries.push(s);
    }
  }

  const lim = limits as Limits;
  const anyNbd = devices.some(isNbd);
  const rows = summaries.map((s) => [
    s.device,
    s.workload,
    fmtIops(s.ours.iops),
    fmtIops(s.theirs.iops),
    `**${s.iopsRatio.toFixed(2)}** (${s.iopsRatioRange[0].toFixed(2)}-${s.iopsRatioRange[1].toFixed(2)})`,
    `${s.ours.cpuUsPerIo.toFixed(2)} / ${s.theirs.cpuUsPerIo.toFixed(2)}`,
    `**${s.cpuRatio.toFixed(2)}**`,
    `${s.ours.p50Us.toFixed(1)} / ${s.ours.p99Us.toFixed(0)} / ${s.ours.p999Us.toFixed(0)}`,
    `${s.theirs.p50Us.toFixed(1)} / ${s.theirs.p99Us.toFixed(0)} / ${s.theirs.p999Us.toFixed(0)}`,
    `${s.ours.mbps.toFixed(0)} / ${s.theirs.mbps.toFixed(0)}`,
    `${fmtIops(s.ceilingIops)}; ${(100 * s.ours.generatorUtil).toFixed(0)} / ${(100 * s.theirs.generatorUtil).toFixed(0)} %`,
    limitNote(s, lim),
    ...(anyNbd
      ? [s.serverCpuUsPerIo === undefined ? '-' : `${s.serverCpuUsPerIo.ours.toFixed(2)} / ${s.serverCpuUsPerIo.theirs.toFixed(2)}`]
      : []),
    ...(busyPollUs > 0 && s.busyPoll !== undefined
      ? [`${fmtIops(s.busyPoll.iops)}, ${s.busyPoll.cpuUsPerIo.toFixed(2)} us`]
      : []),
    ...s.variants.map(
      (v) => `${fmtIops(v.stats.iops)}, ${v.stats.cpuUsPerIo.toFixed(2)} us; **${v.ratio.toFixed(2)}** (${v.ratioRange[0].toFixed(2)}-${v.ratioRange[1].toFixed(2)})`,
    ),
  ]);
  const table = markdownTable({
    columns: [
      'device',
      'workload',
      'IOPS ours',
      'IOPS qsd',
      'ours/qsd IOPS (range)',
      'CPU us/req ours / qsd',
      'ours/qsd CPU',
      'latency us p50/p99/p99.9 ours',
      'latency us p50/p99/p99.9 qsd',
      'MB/s ours / qsd',
      'generator: alone (loopback); CPU use with ours / qsd',
      'ours vs the limits',
      ...(anyNbd ? ['NBD server CPU us/req during ours / qsd (approx.)'] : []),
      ...(busyPollUs > 0 ? [`ours + busy-poll ${busyPollUs} us: IOPS, CPU/req`] : []),
      ...variants.map((v) => `${v.name}: IOPS, CPU/req; / ${v.base} IOPS (range)`),
    ],
    rows,
  });
  const limitLines = [
    `- eventfd kick -> wake -> call round trip, measured now: p50 ${lim.eventfdRoundTripUs.p50.toFixed(1)} us, p99 ` +
      `${lim.eventfdRoundTripUs.p99.toFixed(1)} us (design.md, quiet machine: 4.4-4.9 us). A QD1 request costs at least one ` +
      'such round trip plus the generator\'s own turn through its event loop ("RTT" in the table).',
    `- Atomics.load ${lim.atomicsLoadNs.toFixed(1)} ns, Atomics.store ${lim.atomicsStoreNs.toFixed(1)} ns (design.md: ~5 / ~9 ns); ` +
      `cross-core handoff round trip ${lim.crossCoreRoundTripNs === undefined ? 'did not finish in 1 s (the other core was busy)' : `${lim.crossCoreRoundTripNs.toFixed(0)} ns`} ` +
      '(design.md: 72-105 ns). Our datapath touches 3-4 Atomics per batch, not per request.',
    `- memcpy ${lim.memcpyGBps.toFixed(1)} GB/s in 128 KiB pieces: the one copy (page cache -> guest memory) of a 128k read ` +
      `from the image caps it at ~${Math.round((lim.memcpyGBps * 1e9) / (128 * KiB) / 1000)}k IOPS per core.`,
    '- "floor": our queue and device code driven in-process without any wake-up (pop, parse, I/O, used ring; batches of 32): ' +
      'the least CPU per request our backend can spend; the rest of the measured figure is poll(), eventfd reads and writes and ' +
      'scheduling, paid once per batch.',
    '- "generator alone": the same load generator against a device that completes every request at once in its own thread ' +
      '(loopback: one thread does both, so it is a conservative ceiling; best round); "CPU use" is its share of one core during the ' +
      'runs against each backend: below 100 % the generator was waiting for the backend, not the other way round.',
  ];
  /** With --logging: the logging ratios side by side, and their spread over the workloads. */
  function loggingSection(): string[] {
    const of = (s: Summary, name: string): VariantSummary | undefined => s.variants.find((v) => v.name === name);
    const range = (r: [number, number]): string => `${r[0].toFixed(2)}-${r[1].toFixed(2)}`;
    const cell = (v: VariantSummary | undefined): string =>
      v === undefined ? '-' : `**${v.ratio.toFixed(2)}** (${range(v.ratioRange)})`;
    const cpu = (v: VariantSummary | undefined, base: Stats): string =>
      v === undefined ? '-' : `${base.cpuUsPerIo.toFixed(2)} -> ${v.stats.cpuUsPerIo.toFixed(2)}`;
    const rows = summaries.map((s) => {
      const ol = of(s, 'ours logging');
      const ql = of(s, 'qsd logging');
      const pl = of(s, 'ours packed logging');
      const pb = of(s, 'ours packed');
      return [
        s.device,
        s.workload,
        cell(ol),
        cpu(ol, s.ours),
        cell(ql),
        cpu(ql, s.theirs),
        `${fmtIops(ol?.stats.iops ?? NaN)} / ${fmtIops(ql?.stats.iops ?? NaN)}`,
        s.loggingVsQsd === undefined ? '-' : `**${s.loggingVsQsd.ratio.toFixed(2)}** (${range(s.loggingVsQsd.ratioRange)})`,
        `**${s.iopsRatio.toFixed(2)}**`,
        `${(ol?.dirtyPagesPerTake ?? NaN).toFixed(0)} / ${(ql?.dirtyPagesPerTake ?? NaN).toFixed(0)}`,
        ...(packed ? [cell(pl), pb === undefined ? '-' : cpu(pl, pb.stats)] : []),
      ];
    });
    const spread = (xs: number[]): string =>
      xs.length === 0 ? '-' : `median ${median(xs).toFixed(2)} (${Math.min(...xs).toFixed(2)}-${Math.max(...xs).toFixed(2)})`;
    const across = (name: string): number[] => summaries.flatMap((s) => of(s, name)?.ratio ?? []).filter(Number.isFinite);
    return [
      '## Dirty-page logging (live migration)',
      '',
      markdownTable({
        columns: [
          'device',
          'workload',
          'ours logging / ours IOPS (range)',
          'ours CPU us/req off -> on',
          'qsd logging / qsd IOPS (range)',
          'qsd CPU us/req off -> on',
          'IOPS ours logging / qsd logging',
          'ours logging / qsd logging IOPS (range)',
          'ours / qsd IOPS, no logging',
          'dirty pages per take ours / qsd',
          ...(packed ? ['ours packed logging / ours packed IOPS (range)', 'ours packed CPU us/req off -> on'] : []),
        ],
        rows,
      }),
      '',
      `Over the ${summaries.length} device/workload pairs (medians per pair): ours logging / ours ${spread(across('ours logging'))}; ` +
        `qsd logging / qsd ${spread(across('qsd logging'))}; ours logging / qsd logging ` +
        `${spread(summaries.flatMap((s) => s.loggingVsQsd?.ratio ?? []).filter(Number.isFinite))}` +
        (packed ? `; ours packed logging / ours packed ${spread(across('ours packed logging'))}` : '') +
        '. "Dirty pages per take": what one take of the bitmap returned (median over the runs): the data pages the ' +
        'requests in flight wrote (reads), the status bytes\' and the used ring\'s pages.',
    ];
  }

  const gib = `${imageSize / GiB} GiB`;
  const deviceText: Record<DeviceKind, string> = {
    null: 'null (N): ours `--null 1G` vs null-co (size 1G, read-zeroes off)',
    image: `image (I): ours \`--image\` vs \`driver=file,aio=${qsdAio},cache.direct=off\` on the same ${gib} raw image on tmpfs`,
    'nbd-qemu':
      `nbd-qemu (Q): qemu-nbd \`-t --shared=16 -f raw --cache=writeback -x disk\` serving a ${gib} raw image on tmpfs (it offers ` +
      'CAN_MULTI_CONN: ours opens one connection per queue); ours `--nbd nbd+unix:///disk?socket=...` vs `driver=nbd,' +
      'server.type=unix,export=disk` (one connection), both clients of the same server',
    nbdkit:
      `nbdkit (K): \`nbdkit -f --exit-with-parent -U SOCK memory ${imageSize}\` (sparse RAM: unwritten blocks read as zeroes); ` +
      'ours `--nbd nbd+unix:///?socket=...` vs `driver=nbd,server.type=unix` (the default export), both clients of the same server',
  };
  const header = [
    '# blk benchmark: our vhost-user-blk backend vs qemu-storage-daemon',
    '',
    `Command: \`${command}\`. ${rounds} round(s); in each, every workload runs ${seconds} s ` +
      `(after ${ramp} s of warm-up) against ours and qemu-storage-daemon in the order A B B A, back to back. A backend's ` +
      'figure for a round is its two runs together; the table shows medians over rounds, and each ratio is the median of ' +
      'the per-round ratios (their range in brackets). Latencies: medians of the runs\' percentiles. iodepth is per queue. ' +
      `Devices: ${devices.map((d) => deviceText[d]).join('; ')}. ` +
      'CPU = each backend process\'s utime + stime (/proc/PID/stat, all threads) over the measured window / requests. ' +
      `Both backends offer 2 queues; qemu-storage-daemon ${'runs its export in the main loop (its default)'}.`,
    ...(variants.length > 0
      ? [
          '',
          `${variants.map((v) => `"${v.name}"`).join(', ')}: the same backend process as "${OURS}"` +
            (logging ? ' ("qsd logging": as qemu-storage-daemon)' : '') +
            ', driven by the same generator over its own connection (run in the same A B B A order), with ' +
            [
              ...(packed ? ['VIRTIO_F_RING_PACKED ("packed")'] : []),
              ...(inflight
                ? ['an inflight region asked for as QEMU\'s vhost-user-blk does ("inflight": every request marked in it before its I/O and cleared after its completion is published)']
                : []),
              ...(logging
                ? [
                    'dirty-page logging on as during a live migration ("logging": a log over the generator\'s guest RAM given with ' +
                      'SET_LOG_BASE after the start, then SET_FEATURES | VHOST_F_LOG_ALL and SET_VRING_ADDR | VHOST_VRING_F_LOG, as ' +
                      `QEMU's vhost_log_global_start; while the run goes the generator takes and clears the bitmap every ${logTakeMs} ms, ` +
                      'as a migration\'s iterations do)',
                  ]
                : []),
            ].join(', with ') +
            '; each is compared with the same run without that one difference.',
        ]
      : []),
    '',
    table,
    ...(logging ? ['', ...loggingSection()] : []),
    '',
    `Chart (${values.name}.svg): ${logging ? 'the IOPS ratios ours / qsd and those of logging' : 'both ratios'} per workload; labels N/I/Q/K = null device / ` +
      'image / qemu-nbd / nbdkit, r/w = 4k random read / write, R/W = 128k sequential, then the queue depth, q2 = two queues.',
    ...(anyNbd
      ? [
          '',
          'NBD devices: every request is also a round trip over the NBD unix socket to the same server process, whose CPU is ' +
            'not in either backend\'s figure (it is in "NBD server CPU": the server\'s utime + stime over each whole run, warm-up ' +
            'included, per request at the window\'s rate). Their matrix leaves QD128 out, and their "limits" have no floor (the ' +
            'in-process datapath drives a null or file backend).',
        ]
      : []),
    '',
    '## Physical limits (measured in this run)',
    '',
    ...limitLines,
    '',
    `Machine: ${JSON.stringify(when)}`,
  ].join('\n');
  console.log(header);
  mkdirSync(join(ROOT, 'bench/results'), { recursive: true });
  const paths = writeResults(
    values.name,
    {
      machine: when,
      command,
      seconds,
      ramp,
      rounds,
      qsdAio,
      busyPollUs,
      packed,
      inflight,
      logging,
      logTakeMs,
      imageSize,
      devices,
      workloads: workloads.map((w) => w.name),
      limits,
      datapathNsPerIo: Object.fromEntries(datapath),
      summaries,
      samples: samples.map((s) => ({
        device: s.device,
        workload: s.workload,
        backend: s.backend,
        round: s.round,
        ...(s.serverCpuUsPerIo !== undefined ? { serverCpuUsPerIo: s.serverCpuUsPerIo } : {}),
        ...s.result,
      })),
    },
    header,
    logging
      ? {
          title: 'IOPS ratios with dirty-page logging (live migration) on and off (higher is better)',
          yLabel: 'IOPS ratio',
          categories: summaries.map((s) => chartLabel(s)),
          series: [
            { name: 'ours / qsd', values: summaries.map((s) => s.iopsRatio) },
            { name: 'ours log / ours', values: summaries.map((s) => s.variants.find((v) => v.name === 'ours logging')?.ratio ?? NaN) },
            { name: 'qsd log / qsd', values: summaries.map((s) => s.variants.find((v) => v.name === 'qsd logging')?.ratio ?? NaN) },
            { name: 'ours log / qsd log', values: summaries.map((s) => s.loggingVsQsd?.ratio ?? NaN) },
          ],
        }
      : {
          title: 'ours / qemu-storage-daemon: IOPS (higher is better), CPU per request (lower is better)',
          // N/I/Q/K: null device / image / qemu-nbd / nbdkit; r/w: 4k random read/write; R/W: 128k sequential; then the queue depth; q2: 2 queues.
          yLabel: 'ours / qsd',
          categories: summaries.map((s) => chartLabel(s)),
          series: [
            { name: 'IOPS ratio', values: summaries.map((s) => s.iopsRatio) },
            { name: 'CPU/request ratio', values: summaries.map((s) => s.cpuRatio) },
          ],
        },
  );
  console.error(`wrote ${paths.join(', ')}`);
}
