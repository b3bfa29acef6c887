/**
 * `vhost-user bench blk`: the TypeScript frontend as a fio-like load generator against any vhost-user-blk backend
 * (ours, qemu-storage-daemon, ...). It keeps `iodepth` requests in flight on each queue, each one resubmitted from
 * its completion callback (no Promise, no allocation and no data copy per request: `BlkDriver.submitRaw`), and
 * reports IOPS, MB/s and latency percentiles (one request in four is timed, into a log-linear histogram with 1.6 %
 * buckets: two clock reads per request would cost the generator ~10 %), plus the CPU time per request
 * of this process and, with `--backend-pid`, of the backend process (from /proc/PID/stat: every thread of it).
 *
 * `--loopback` replaces the backend with a device in this very thread that completes every request at once (the
 * same rings, eventfds and event-loop wakeups, no socket): the load generator's own ceiling. A backend measured at a
 * rate well below that ceiling is what limits the rate, not the generator.
 *
 * `--logging` runs the load as during a live migration: after the start, a dirty log covering the guest RAM is given
 * (SET_LOG_BASE) and logging turned on (SET_FEATURES | VHOST_F_LOG_ALL, SET_VRING_ADDR | VHOST_VRING_F_LOG), and a
 * timer plays QEMU's migration iterations: every `--log-take-ms` it takes and clears the bitmap (`takeDirty`), so
 * the backend keeps setting bits that were cleared. What it took in the window is reported (takes, pages).
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { readFileSync } from 'node:fs';
import { BlkConfigOffset, BlkFeature, SECTOR_SIZE } from '../devices/blk/constants.js';
import { BlkDriver, RAW_FAILED } from '../frontend/blk-driver.js';
import { FrontendQueue, VhostUserFrontend } from '../frontend/frontend.js';
import { GuestRam } from '../frontend/guest-ram.js';
import { MigrationLog } from '../frontend/migration-log.js';
import * as native from '../native/index.js';
import { VirtioFeature, featureBit, hasFeature } from '../protocol/constants.js';
import { createDeviceQueue } from '../queue/device-queue.js';
import { createQueueDriver, queueDriverLayout } from '../queue/queue-driver.js';
import { parseInteger, parseSize } from './parse.js';

export const RW_MODES = ['randread', 'randwrite', 'read', 'write', 'mixed'] as const;
export type RwMode = (typeof RW_MODES)[number];

/** What to run (the fio-like options). */
export interface BlkLoadOptions {
  readonly rw: RwMode;
  /** Bytes per request (a multiple of 512). */
  readonly bs: number;
  /** Requests in flight on each queue. */
  readonly iodepth: number;
  readonly queues: number;
  /** Length of the measured window. */
  readonly seconds: number;
  /** Run this long before the window opens (not measured). Default 0.5 s. */
  readonly rampSeconds?: number;
  /** `mixed`: percentage of reads (default 50, as fio's randrw). */
  readonly rwmixread?: number;
  /** Bytes of the device the offsets are drawn from (default: the whole device). */
  readonly span?: number;
  /** Ring size (default: the smallest power of two >= 128 that holds `iodepth` requests). */
  readonly queueSize?: number;
  /**
   * Put each request in an indirect table when the backend offers it, as Linux' virtio-blk does. Default false:
   * three ring descriptors per request, which costs this generator half as much per request.
   */
  readonly indirect?: boolean;
  /** Packed rings (VIRTIO_F_RING_PACKED, which the backend must offer). Default false: split rings. */
  readonly packed?: boolean;
  /** Ask for an inflight region (GET/SET_INFLIGHT_FD, as QEMU's vhost-user-blk does), so the backend tracks requests. */
  readonly inflight?: boolean;
  /**
   * Dirty-page logging on (live migration): a log over the guest RAM (SET_LOG_BASE, needs LOG_SHMFD), LOG_ALL and
   * the rings' F_LOG, and the bitmap taken and cleared every `logTakeMs` while the load runs. Not with 'loopback'.
   */
  readonly logging?: boolean;
  /** With `logging`: how often the bitmap is taken and cleared, as a migration iteration (ms, default 100). */
  readonly logTakeMs?: number;
  /** The backend's process: its CPU time over the window is read from /proc (all its threads). */
  readonly backendPid?: number;
  /** Seed of the offset generator (default 1). */
  readonly seed?: number;
}

/** Latency figures in microseconds. */
export interface LatencySummary {
  readonly mean: number;
  readonly p50: number;
  readonly p99: number;
  readonly p999: number;
  readonly max: number;
}

export interface BlkLoadResult {
  readonly target: string;
  readonly rw: RwMode;
  readonly bs: number;
  readonly iodepth: number;
  readonly queues: number;
  readonly seconds: number;
  /** Requests completed in the window (reads + writes). */
  readonly ios: number;
  readonly reads: number;
  readonly writes: number;
  readonly iops: number;
  /** 10^6 bytes per second. */
  readonly mbps: number;
  readonly latencyUs: LatencySummary;
  /** Requests that completed with a status other than OK. */
  readonly errors: number;
  /** CPU time of this process (the load generator) per request, and its share of one core over the window. */
  readonly generatorCpuUsPerIo: number;
  readonly generatorCpuUtil: number;
  /** With `backendPid`: the backend's CPU time (user + system, every thread) per request and in cores. */
  readonly backendCpuUsPerIo?: number;
  readonly backendCpuUtil?: number;
  /** With `logging`: the bitmap takes in the window and the dirty pages they returned (summed over takes). */
  readonly dirtyLog?: { readonly takes: number; readonly pages: number };
  /** Features the backend acknowledged that shape the datapath. */
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  readonly packed: boolean;
  readonly queueSize: number;
}

/** One progress report (once a second while the load runs). */
export interface BlkLoadProgress {
  readonly elapsed: number;
  readonly measuring: boolean;
  readonly iops: number;
  readonly mbps: number;
  readonly p99Us: number;
}

// ---- latency histogram -----------------------------------------------------------------------------------------

/** Buckets per power of two: values are kept with 1/64 (1.6 %) precision. */
const SUB_BITS = 6;
const SUB = 1 << SUB_BITS;
const BUCKETS = (32 - SUB_BITS + 1) * SUB;

/** A log-linear histogram of non-negative integers below 2^32 (nanoseconds here): fixed size, no allocation. */
export class Histogram {
  readonly counts = new Float64Array(BUCKETS);
  count = 0;
  sum = 0;
  max = 0;

  static bucket(v: number): number {
    if (v < SUB) return v;
    const e = 31 - Math.clz32(v); // >= SUB_BITS
    return (e - SUB_BITS + 1) * SUB + ((v >>> (e - SUB_BITS)) - SUB);
  }

  /** The smallest value of bucket `b` (lower bound). */
  static bucketValue(b: number): number {
    if (b < SUB) return b;
    const e = Math.floor(b / SUB) + SUB_BITS - 1;
    return (SUB + (b % SUB)) * 2 ** (e - SUB_BITS);
  }

  record(v: number): void {
    const x = v < 0 ? 0 : v > 0xffff_ffff ? 0xffff_ffff : Math.round(v);
    const b = Histogram.bucket(x);
    this.counts[b] = (this.counts[b] as number) + 1;
    this.count++;
    this.sum += x;
    if (x > this.max) this.max = x;
  }

  reset(): void {
    this.counts.fill(0);
    this.count = 0;
    this.sum = 0;
    this.max = 0;
  }

  /** Percentile (0..100): the middle of the bucket holding that rank. */
  percentile(p: number): number {
    if (this.count === 0) return NaN;
    const rank = Math.max(1, Math.ceil((p / 100) * this.count));
    let seen = 0;
    for (let b = 0; b < BUCKETS; b++) {
      seen += this.counts[b] as number;
      if (seen >= rank) {
        const lo = Histogram.bucketValue(b);
        const hi = Histogram.bucketValue(b + 1);
        return Math.min(this.max, (lo + hi) / 2);
      }
    }
    return this.max;
  }
}

// ---- /proc accounting ------------------------------------------------------------------------------------------

/** USER_HZ: the unit of utime and stime in /proc/PID/stat (100 on every Linux architecture Node runs on). */
const USER_HZ = 100;

/** CPU time (user + system, seconds) of process `pid` so far: every thread, live or exited. */
export function processCpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
  // The command name (field 2) is in parentheses and may contain spaces: fields are counted after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // fields[0] is field 3 (state): utime is field 14, stime field 15.
  return (Number(fields[11]) + Number(fields[12])) / USER_HZ;
}

// ---- the loopback device ---------------------------------------------------------------------------------------

/** Progress once a second; at least four times in a short run. */
function progressIntervalMs(o: BlkLoadOptions): number {
  return Math.max(50, Math.min(1000, ((o.rampSeconds ?? 0.5) + o.seconds) * 250));
}

/** Latency is measured on one request in this many (a power of two). */
const LATENCY_SAMPLE = 4;

const LOOPBACK_CAPACITY = 1024 ** 3;

/**
 * A device in this thread that completes every request at once (status OK, data untouched): it watches each
 * queue's kick eventfd on the event loop, drains the ring with notifications suppressed, and signals the call
 * eventfd when the driver asks for it (EVENT_IDX on both sides). Stands in for a backend behind a socket.
 */
class LoopbackDevice {
  readonly frontend: VhostUserFrontend;
  readonly #queues = new Map<number, FrontendQueue>();
  readonly #watches: number[] = [];

  constructor(memory: GuestRam, queues: number, queueSize: number, indirect: boolean, packed: boolean) {
    const features =
      featureBit(VirtioFeature.VERSION_1) |
      featureBit(VirtioFeature.RING_EVENT_IDX) |
      (indirect ? featureBit(VirtioFeature.RING_INDIRECT_DESC) : 0n) |
      (packed ? featureBit(VirtioFeature.RING_PACKED) : 0n) |
      (queues > 1 ? featureBit(BlkFeature.MQ) : 0n);
    const region = memory.regions[0];
    if (region === undefined || memory.regions.length !== 1) throw new Error('loopback: one RAM region expected');
    const bytes = region.bytes;
    for (let index = 0; index < queues; index++) {
      const base = memory.alloc(queueDriverLayout(packed, queueSize, 0).end, { align: 4096 });
      const { layout, driver } = createQueueDriver<number>(memory, { packed, size: queueSize, base, eventIdx: true });
      const fq = new FrontendQueue(index, queueSize, layout, driver);
      this.#queues.set(index, fq);
      const device = createDeviceQueue({ packed, size: queueSize, ...layout, eventIdx: true, indirect });
      device.attach(memory);
      const chain = device.createChain();
      const { kickFd, callFd } = fq;
      const regionBase = region.gpa;
      const onKick = (): void => {
        native.eventfdRead(kickFd);
        for (;;) {
          device.disableNotification();
          while (device.popChain(memory, chain)) {
            const last = chain.count - 1; // the status byte ends the last writable segment
            bytes[(chain.addr[last] as number) + (chain.len[last] as number) - 1 - regionBase] = 0;
            device.pushUsed(chain.head, chain.writableBytes);
          }
          device.publishUsed();
          if (device.needsNotification()) native.eventfdWrite(callFd);
          if (!device.enableNotification()) break;
        }
      };
      this.#watches.push(native.watch(kickFd, native.WATCH_READABLE, onKick));
    }
    const config = new DataView(new ArrayBuffer(BlkConfigOffset.size));
    config.setBigUint64(BlkConfigOffset.capacity, BigInt(LOOPBACK_CAPACITY / SECTOR_SIZE), true);
    config.setUint16(BlkConfigOffset.numQueues, queues, true);
    const configBytes = new Uint8Array(config.buffer);
    const map = this.#queues;
    // The parts of a started frontend that BlkDriver uses; the rest of the protocol does not exist here.
    this.frontend = {
      memory,
      queues: map,
      config: configBytes,
      queue: (i: number) => {
        const q = map.get(i);
        if (q === undefined) throw new RangeError(`no queue ${i}`);
        return q;
      },
      hasFeature: (bit: number) => hasFeature(features, bit),
      onDisconnect: () => () => undefined,
      close: () => this.close(),
    } as unknown as VhostUserFrontend;
  }

  close(): void {
    for (const id of this.#watches.splice(0)) native.unwatch(id);
    for (const q of this.#queues.values()) q.dispose();
    this.#queues.clear();
  }
}

// ---- the load ------------------------------------------------------------------------------------------------

/** A xorshift+ generator on two 32-bit words: fast, seedable, good enough for offsets. */
class Rng {
  #a: number;
  #b: number;
  constructor(seed: number) {
    this.#a = (seed * 0x9e3779b1) | 1;
    this.#b = (seed ^ 0x6d2b79f5) | 1;
  }
  /** A uniform integer in [0, n) for n <= 2^32. */
  below(n: number): number {
    let x = this.#a;
    const y = this.#b;
    this.#a = y;
    x ^= x << 23;
    x ^= x >>> 17;
    x ^= y ^ (y >>> 26);
    this.#b = x;
    return Math.floor(((x + y) >>> 0) * (n / 4294967296));
  }
}

function nextPow2(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Runs one load against the vhost-user-blk backend at `target` (a socket path, or 'loopback'), and resolves with
 * the figures of the measured window. Calls `onProgress` once a second.
 */
export async function runBlkLoad(
  target: string,
  options: BlkLoadOptions,
  onProgress?: (p: BlkLoadProgress) => void,
): Promise<BlkLoadResult> {
  const { bs, iodepth, queues } = options;
  if (bs % SECTOR_SIZE !== 0 || bs < SECTOR_SIZE) throw new RangeError(`bs must be a multiple of 512: ${bs}`);
  const wantIndirect = options.indirect ?? false;
  const packed = options.packed ?? false;
  const queueSize = options.queueSize ?? nextPow2(Math.max(128, iodepth * (wantIndirect ? 1 : 3)));
  const slotBytes = 512 + bs;
  const ramBytes = Math.ceil((queues * (iodepth * (slotBytes + 4096) + 64 * 1024 + 20 * queueSize) + 4 * 1024 * 1024) / (2 * 1024 * 1024)) * 2 * 1024 * 1024;
  const memory = GuestRam.create(ramBytes);
  let frontend: VhostUserFrontend | undefined;
  let loopback: LoopbackDevice | undefined;
  let driver: BlkDriver | undefined;
  let log: MigrationLog | undefined;
  try {
    if (target === 'loopback') {
      if (options.logging === true) throw new RangeError('logging needs a backend, not the loopback device');
      loopback = new LoopbackDevice(memory, queues, queueSize, wantIndirect, packed);
      driver = new BlkDriver(loopback.frontend, { memory, maxRequestBytes: bs, slotsPerQueue: iodepth, indirect: wantIndirect });
    } else {
      frontend = await VhostUserFrontend.connect(target, { connectTimeoutMs: 5000 });
      const indirect = wantIndirect && hasFeature(frontend.backendFeatures, VirtioFeature.RING_INDIRECT_DESC);
      driver = await BlkDriver.start(frontend, {
        memory,
        queues,
        queueSize,
        maxRequestBytes: bs,
        slotsPerQueue: iodepth,
        indirect,
        packed,
        inflight: options.inflight === true,
      });
      if (options.logging === true) {
        // As QEMU at a migration's start (vhost_log_global_start): the log, then LOG_ALL and the rings' F_LOG.
        log = MigrationLog.create(Math.max(...memory.regions.map((r) => r.gpa + r.size)));
        await frontend.setLogBase(log);
        await frontend.setLogging(true);
        log.takeDirty();
      }
    }
    if (driver.slotsPerQueue < iodepth) throw new RangeError(`ring of ${queueSize} cannot hold ${iodepth} requests`);
    return await drive(target, driver, options, queueSize, onProgress, log);
  } finally {
    driver?.close();
    frontend?.close();
    loopback?.close();
    log?.close();
    memory.close();
  }
}

async function drive(
  target: string,
  driver: BlkDriver,
  options: BlkLoadOptions,
  queueSize: number,
  onProgress?: (p: BlkLoadProgress) => void,
  log?: MigrationLog,
): Promise<BlkLoadResult> {
  const { rw, bs, iodepth, queues } = options;
  const capacity = driver.capacityBytes;
  const span = Math.min(options.span ?? capacity, capacity);
  const blocks = Math.floor(span / bs);
  if (blocks < 1) throw new RangeError(`the device (${capacity} bytes) is smaller than one ${bs}-byte block`);
  const sectorsPerBlock = bs / SECTOR_SIZE;
  const readPercent = rw === 'mixed' ? (options.rwmixread ?? 50) : rw === 'randread' || rw === 'read' ? 100 : 0;
  const random = rw === 'randread' || rw === 'randwrite' || rw === 'mixed';
  const rng = new Rng(options.seed ?? 1);
  let cursor = 0;

  // Write data: a fixed non-zero pattern in every slot's buffer, written once.
  if (readPercent < 100) {
    for (let q = 0; q < queues; q++) {
      for (let s = 0; s < iodepth; s++) {
        const buf = driver.slotBuffer(q, s);
        for (let i = 0; i < bs; i += 8) buf[i] = (i >>> 3) & 0xff || 1;
      }
    }
  }

  const hist = new Histogram();
  const starts = new Float64Array(queues * iodepth); // 0: this request is not timed
  const isWrite = new Uint8Array(queues * iodepth);
  let issued = 0;
  let running = true;
  let measuring = false;
  let inflight = 0;
  let completed = 0; // every completion, measured or not (progress)
  let reads = 0;
  let writes = 0;
  let errors = 0;
  /** Why the load stopped early (set from the completion callback). */
  const stop: { failure: Error | undefined } = { failure: undefined };
  let drained: (() => void) | undefined;

  const submit = (token: number): void => {
    const write = readPercent === 0 ? true : readPercent === 100 ? false : rng.below(100) >= readPercent;
    let block: number;
    if (random) {
      block = rng.below(blocks);
    } else {
      block = cursor;
      cursor = cursor + 1 === blocks ? 0 : cursor + 1;
    }
    isWrite[token] = write ? 1 : 0;
    inflight++;
    // One request in LATENCY_SAMPLE is timed: two clock reads per request would cost the generator ~10 %.
    starts[token] = (issued++ & (LATENCY_SAMPLE - 1)) === 0 ? performance.now() : 0;
    driver.submitRaw((token / iodepth) | 0, write, block * sectorsPerBlock, bs, token, done);
  };
  const done = (status: number, token: number): void => {
    inflight--;
    completed++;
    if (status === RAW_FAILED) {
      stop.failure ??= driver.error ?? new Error('request failed');
      running = false;
    } else if (measuring) {
      const start = starts[token] as number;
      if (start !== 0) hist.record((performance.now() - start) * 1e6); // ms -> ns
      if (status !== 0) errors++;
      if (isWrite[token] === 1) writes++;
      else reads++;
    }
    if (running) submit(token);
    else if (inflight === 0) drained?.();
  };

  const t0 = performance.now();
  let lastCompleted = 0;
  let lastTime = t0;
  const progress = setInterval(() => {
    const now = performance.now();
    const iops = ((completed - lastCompleted) * 1000) / (now - lastTime);
    lastCompleted = completed;
    lastTime = now;
    onProgress?.({ elapsed: (now - t0) / 1000, measuring, iops, mbps: (iops * bs) / 1e6, p99Us: hist.percentile(99) / 1000 });
  }, progressIntervalMs(options));
  // The migration's iterations: the bitmap taken and cleared periodically (counted in the window).
  let logTakes = 0;
  let logPages = 0;
  const stopTaking = log?.takeEvery(options.logTakeMs ?? 100, (pages) => {
    if (!measuring) return;
    logTakes++;
    logPages += pages.length;
  });

  for (let token = 0; token < queues * iodepth; token++) submit(token);
  const window = async (): Promise<{ cpu0: NodeJS.CpuUsage; backend0: number; tStart: number }> => {
    await sleep((options.rampSeconds ?? 0.5) * 1000);
    if (stop.failure !== undefined) throw stop.failure;
    hist.reset();
    reads = 0;
    writes = 0;
    errors = 0;
    const backend0 = options.backendPid !== undefined ? processCpuSeconds(options.backendPid) : 0;
    const cpu0 = process.cpuUsage();
    const tStart = performance.now();
    measuring = true;
    await sleep(options.seconds * 1000);
    return { cpu0, backend0, tStart };
  };
  let opened: { cpu0: NodeJS.CpuUsage; backend0: number; tStart: number };
  try {
    opened = await window();
  } finally {
    clearInterval(progress);
    stopTaking?.();
    measuring = false;
  }
  const { cpu0, backend0, tStart } = opened;
  const elapsed = (performance.now() - tStart) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const backendCpu = options.backendPid !== undefined ? processCpuSeconds(options.backendPid) - backend0 : undefined;
  running = false;
  if (inflight > 0) {
    let timer: NodeJS.Timeout | undefined;
    const finished = new Promise<void>((resolve) => (drained = resolve));
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${inflight} requests did not complete within 10 s after the run`)), 10_000);
    });
    try {
      await Promise.race([finished, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }
  if (stop.failure !== undefined) throw stop.failure;

  const ios = reads + writes;
  const genCpu = (cpu.user + cpu.system) / 1e6;
  const us = (ns: number): number => ns / 1000;
  return {
    target,
    rw,
    bs,
    iodepth,
    queues,
    seconds: elapsed,
    ios,
    reads,
    writes,
    iops: ios / elapsed,
    mbps: (ios * bs) / elapsed / 1e6,
    latencyUs: {
      mean: hist.count === 0 ? NaN : us(hist.sum / hist.count),
      p50: us(hist.percentile(50)),
      p99: us(hist.percentile(99)),
      p999: us(hist.percentile(99.9)),
      max: us(hist.max),
    },
    errors,
    generatorCpuUsPerIo: (genCpu * 1e6) / ios,
    generatorCpuUtil: genCpu / elapsed,
    ...(backendCpu !== undefined ? { backendCpuUsPerIo: (backendCpu * 1e6) / ios, backendCpuUtil: backendCpu / elapsed } : {}),
    ...(log !== undefined ? { dirtyLog: { takes: logTakes, pages: logPages } } : {}),
    eventIdx: driver.frontend.hasFeature(VirtioFeature.RING_EVENT_IDX),
    indirect: driver.indirect,
    packed: driver.frontend.hasFeature(VirtioFeature.RING_PACKED),
    queueSize,
  };
}

// ---- the command -----------------------------------------------------------------------------------------------

interface BenchBlkCliOptions {
  connect?: string;
  loopback: boolean;
  rw: RwMode;
  bs: number;
  iodepth: number;
  queues: number;
  seconds: number;
  ramp: number;
  rwmixread: number;
  span?: number;
  queueSize?: number;
  indirect: boolean;
  packed: boolean;
  inflight: boolean;
  logging: boolean;
  logTakeMs: number;
  backendPid?: number;
  json: boolean;
}

function parseSeconds(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n < 0 || n > 86_400) throw new InvalidArgumentError('expected seconds, e.g. 5 or 0.5');
  return n;
}

function fmt(n: number, digits = 1): string {
  if (!Number.isFinite(n)) return '-';
  return n >= 100 ? Math.round(n).toLocaleString('en-US') : n.toFixed(digits);
}

/** The human-readable summary (fio's shape, shortened). */
export function formatBlkLoadResult(r: BlkLoadResult): string {
  const l = r.latencyUs;
  const lines = [
    `${r.rw} bs=${r.bs} iodepth=${r.iodepth} queues=${r.queues} (ring ${r.queueSize}, event_idx ${r.eventIdx ? 'on' : 'off'}, ` +
      `indirect ${r.indirect ? 'on' : 'off'}, ${r.packed ? 'packed' : 'split'}) against ${r.target}, ${r.seconds.toFixed(2)} s`,
    `  IOPS ${fmt(r.iops)}  ${fmt(r.mbps)} MB/s  (${r.reads} reads, ${r.writes} writes, ${r.errors} errors)`,
    `  latency us: mean ${fmt(l.mean)}  p50 ${fmt(l.p50)}  p99 ${fmt(l.p99)}  p99.9 ${fmt(l.p999)}  max ${fmt(l.max)}`,
    `  load generator: ${fmt(r.generatorCpuUsPerIo, 2)} us CPU per request, ${(r.generatorCpuUtil * 100).toFixed(0)} % of a core`,
  ];
  if (r.backendCpuUsPerIo !== undefined && r.backendCpuUtil !== undefined) {
    lines.push(`  backend: ${fmt(r.backendCpuUsPerIo, 2)} us CPU per request, ${(r.backendCpuUtil * 100).toFixed(0)} % of a core`);
  }
  if (r.dirtyLog !== undefined) {
    const perTake = r.dirtyLog.takes === 0 ? NaN : r.dirtyLog.pages / r.dirtyLog.takes;
    lines.push(`  dirty log: ${r.dirtyLog.takes} takes, ${r.dirtyLog.pages} dirty pages (${fmt(perTake)} per take)`);
  }
  return lines.join('\n');
}

function blkBenchCommand(): Command {
  return new Command('blk')
    .description(
      'Load generator (fio-like) against a vhost-user-blk backend: the TypeScript frontend connects to --connect SOCK ' +
        'as a VMM would, keeps --iodepth requests in flight per queue, and reports IOPS, MB/s and latency ' +
        'percentiles. --loopback measures the generator alone, against an in-process device that completes at once.',
    )
    .option('--connect <socket>', "the backend's vhost-user socket")
    .option('--loopback', 'no backend: an in-process device completes every request at once (the generator ceiling)', false)
    .addOption(new Option('--rw <mode>', 'access pattern (mixed: random reads and writes)').choices(RW_MODES).default('randread'))
    .option('--bs <bytes>', 'request size (a multiple of 512)', parseSize, 4096)
    .option('--iodepth <n>', 'requests in flight per queue', parseInteger(1, 32768), 32)
    .option('--queues <n>', 'request queues used', parseInteger(1, 64), 1)
    .option('--seconds <s>', 'measured time', parseSeconds, 5)
    .option('--ramp <s>', 'warm-up before measuring', parseSeconds, 0.5)
    .option('--rwmixread <percent>', 'mixed: percentage of reads', parseInteger(0, 100), 50)
    .option('--span <bytes>', 'draw offsets from the first SPAN bytes of the device (default: all of it)', parseSize)
    .option('--queue-size <n>', 'ring size (default: a power of two >= 128 that holds iodepth requests)', parseInteger(1, 32768))
    .option('--indirect', 'one indirect table per request (as Linux guests) instead of three ring descriptors', false)
    .option('--packed', 'packed rings (VIRTIO_F_RING_PACKED) instead of split rings', false)
    .option('--inflight', 'ask for an inflight region (GET/SET_INFLIGHT_FD) as QEMU does: the backend tracks requests', false)
    .option('--logging', 'dirty-page logging on, as during a live migration (SET_LOG_BASE, VHOST_F_LOG_ALL; needs LOG_SHMFD)', false)
    .option('--log-take-ms <ms>', 'with --logging: take and clear the dirty bitmap this often', parseInteger(1, 60_000), 100)
    .option('--backend-pid <pid>', "also report the backend process's CPU time per request (/proc/PID/stat)", parseInteger(1, 2 ** 22))
    .option('--json', 'print the result as JSON on stdout (progress still goes to stderr)', false)
    .action(async (opts: BenchBlkCliOptions) => {
      if ((opts.connect === undefined) === !opts.loopback) throw new Error('give exactly one of --connect SOCK or --loopback');
      if (opts.bs % SECTOR_SIZE !== 0 || opts.bs === 0) throw new Error('--bs must be a multiple of 512');
      const tty = process.stderr.isTTY;
      const result = await runBlkLoad(
        opts.connect ?? 'loopback',
        {
          rw: opts.rw,
          bs: opts.bs,
          iodepth: opts.iodepth,
          queues: opts.queues,
          seconds: opts.seconds,
          rampSeconds: opts.ramp,
          rwmixread: opts.rwmixread,
          indirect: opts.indirect,
          packed: opts.packed,
          inflight: opts.inflight,
          logging: opts.logging,
          logTakeMs: opts.logTakeMs,
          ...(opts.span !== undefined ? { span: opts.span } : {}),
          ...(opts.queueSize !== undefined ? { queueSize: opts.queueSize } : {}),
          ...(opts.backendPid !== undefined ? { backendPid: opts.backendPid } : {}),
        },
        (p) => {
          const line =
            `[${p.elapsed.toFixed(0).padStart(3)} s ${p.measuring ? 'run ' : 'ramp'}] ${fmt(p.iops).padStart(9)} IOPS ` +
            `${fmt(p.mbps).padStart(7)} MB/s  p99 ${p.measuring ? fmt(p.p99Us) : '-'} us`;
          process.stderr.write(tty ? `\r${line.padEnd(70)}` : `${line}\n`);
        },
      );
      if (tty) process.stderr.write('\r'.padEnd(72) + '\r');
      if (opts.json) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
      else process.stdout.write(`${formatBlkLoadResult(result)}\n`);
    });
}

/** `vhost-user bench`: load generators. */
export function benchCommand(): Command {
  return new Command('bench').description('Benchmark tools: load generators against vhost-user backends').addCommand(blkBenchCommand());
}
