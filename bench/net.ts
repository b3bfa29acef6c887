/**
 * `npm run bench -- net`: our vhost-user-net backend against DPDK's vhost PMD, with the same frontend: DPDK's
 * `dpdk-testpmd` with the net_virtio_user PMD (Debian: dpdk-dev), in one run.
 *
 * Workloads: 64- and 1500-byte frames, in both directions:
 * - frontend sends: testpmd txonly -> ours `--port sink` / the vhost PMD in rxonly;
 * - backend sends: ours `--port source` / the vhost PMD in txonly -> testpmd rxonly.
 * The figure is the frontend's packet rate (its Tx-pps or Rx-pps, averaged over testpmd's stats intervals without
 * the warm-up one, as the DPDK pair recipe this was adapted from computes it). Each run starts a fresh backend and a fresh
 * frontend. Every workload runs against ours and DPDK back to back (A B, which one goes first alternates between
 * rounds), over several rounds: the ratio ours / DPDK is taken per round, then the median over rounds.
 *
 * CPUs (2 here): the frontend's forwarding lcore busy-polls the last CPU, its main lcore sleeps on the first;
 * our backend is pinned to the first CPU (taskset), and so is the vhost PMD's forwarding lcore (its main lcore on the
 * last). A run where a testpmd got less than 95 % of a CPU (`cpu`: its utime + stime over the window) was starved by
 * something else on the machine: it is flagged and left out of the ratios (kept in the JSON).
 *
 * Dirty-page logging (live migration) cannot be measured with testpmd: virtio_user never sends SET_LOG_BASE. With
 * --logging, every workload also runs against our backend with our TypeScript frontend as a busy-polling driver in
 * place of testpmd (bench/net-frontend.ts: its own process, pinned to testpmd's forwarding lcore's CPU, DPDK's buffer
 * layout, the same frame lengths and directions), twice back to back: "ours-ts" (logging off) and "ours-ts-logging"
 * (after the start a log over its guest RAM, SET_LOG_BASE, VHOST_F_LOG_ALL and the rings' VHOST_VRING_F_LOG, as QEMU
 * at a migration's start; the bitmap taken and cleared every --log-take-ms as a migration's iterations). Backend ->
 * frontend is where the backend's writes (frames into receive buffers) are logged; frontend -> backend writes only
 * used rings. The ratio logging / no logging is taken per round, then the median over rounds.
 *
 * Options: --seconds S (10) --rounds N (3) --quick (1 round of 3 s) --sizes 64,1500 --only SUBSTRING
 * --backends ours,ours-poll,dpdk (any of ours, ours-poll, dpdk, ours-ts, ours-ts-logging; ours-poll is ours in
 * polling mode, `--busy-poll` with --busy-poll-us US, default 1000000) --rings split,packed (each workload with split
 * rings, packed rings (virtio_user `packed_vq=1`, ours-ts `--packed`) or both; default split) --virtio-args DEVARGS
 * (extra net_virtio_user devargs) --profile DIR (CPU profiles of our backend, one folder per workload) --logging (adds
 * ours-ts and ours-ts-logging to the backends) --log-take-ms MS (100)
 * --name NAME (of the result files). The default takes about 5 minutes; each ring layout adds as much, and --logging
 * as much again.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import type { ChildProcess } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { startBackend } from '../test/helpers/backend.js';
import { allowedCpus, formatTestpmdResult, processCpuSeconds, startTestpmd, type TestpmdResult } from '../test/helpers/dpdk.js';
import { findBinary } from '../test/helpers/require-tool.js';
import { spawnOwned, stopProcess } from '../test/helpers/tmp.js';
import type { NetFrontendResult } from './net-frontend.js';
import { machine, markdownTable, median, writeResults } from './report.js';

type Direction = 'frontend-sends' | 'backend-sends';
/** ours and dpdk: testpmd as the frontend; ours-ts(-logging): our backend, our TypeScript frontend (net-frontend.ts). */
type Contender = 'ours' | 'ours-poll' | 'dpdk' | 'ours-ts' | 'ours-ts-logging';
const CONTENDERS: readonly Contender[] = ['ours', 'ours-poll', 'dpdk', 'ours-ts', 'ours-ts-logging'];
const isTs = (c: Contender): boolean => c === 'ours-ts' || c === 'ours-ts-logging';
const FRONTEND_SCRIPT = new URL('./net-frontend.js', import.meta.url).pathname;

interface Workload {
  readonly name: string;
  readonly dir: Direction;
  readonly pktlen: number;
  /** Packed rings: the frontend gets `packed_vq=1`. */
  readonly packed: boolean;
}

interface Sample {
  readonly workload: string;
  readonly backend: Contender;
  readonly round: number;
  /** The frontend's rate. */
  readonly mpps: number;
  readonly samples: number;
  readonly minMpps: number;
  readonly maxMpps: number;
  /** Frame length the frontend saw (from its bit counters). */
  readonly pktlen: number;
  /** CPU share of the frontend testpmd, and of the backend process (all threads), over the window. */
  readonly frontendCpu: number;
  readonly backendCpu: number;
  /** The backend's CPU time per frame (ns): backendCpu / rate. */
  readonly nsPerFrame: number;
  /** Why the run is left out of the ratios (undefined: it counts). */
  readonly flagged: string | undefined;
  readonly frontend: string;
  /** Our backend's `net stats`, or the vhost PMD's figures. */
  readonly backendStats: Record<string, unknown>;
  /** ours-ts-logging: takes of the bitmap in the window and the dirty pages they returned. */
  readonly dirtyLog?: { readonly takes: number; readonly pages: number };
}

const CPU_MIN = 0.95;

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

interface RunningBackend {
  readonly pid: number;
  /** Stops it; returns its own figures. */
  stop(): Promise<Record<string, unknown>>;
}

async function startOurs(socketPath: string, w: Workload, cpu: number, profileDir: string | undefined, busyPollUs = 0): Promise<RunningBackend> {
  const args = ['--port', w.dir === 'frontend-sends' ? 'sink' : 'source', '--busy-poll', String(busyPollUs)];
  if (w.dir === 'backend-sends') args.push('--frame-len', String(w.pktlen));
  // --profile: a V8 CPU profile of every thread of the backend (the net worker's is the one to read).
  const nodeArgs = profileDir === undefined ? [] : ['--cpu-prof', '--cpu-prof-dir', join(profileDir, w.name.replace(/\W+/g, '-'))];
  const be = await startBackend({ command: 'net', socketPath, args, logLevel: 'info', wrapper: ['taskset', '-c', String(cpu)], nodeArgs });
  return {
    pid: be.pid,
    stop: async () => {
      const code = await be.stop();
      const line = be.logs().find((l) => l.msg === 'net stats');
      if (code !== 0 || line === undefined) throw new Error(`our backend exited with ${code}, net stats: ${JSON.stringify(line)}`);
      return line.stats as Record<string, unknown>;
    },
  };
}

async function startDpdk(socketPath: string, w: Workload): Promise<RunningBackend> {
  const tp = await startTestpmd({ role: 'backend', socketPath, mode: w.dir === 'frontend-sends' ? 'rxonly' : 'txonly', pktlen: w.pktlen });
  return {
    pid: tp.pid,
    stop: async () => {
      const r = await tp.stop();
      return { mpps: r.mpps, samples: r.samples, cpu: r.cpu, rxPackets: r.rxPackets, txPackets: r.txPackets, txDropped: r.txDropped };
    },
  };
}

/** One run: a fresh backend, the frontend for `seconds`, both stopped. */
async function runOnce(
  w: Workload,
  backend: Contender,
  socketPath: string,
  o: { seconds: number; backendCpu: number; virtioArgs: string; profileDir: string | undefined; busyPollUs: number },
): Promise<{ fe: TestpmdResult; beCpu: number; backendStats: Record<string, unknown> }> {
  const be =
    backend === 'dpdk'
      ? await startDpdk(socketPath, w)
      : await startOurs(socketPath, w, o.backendCpu, o.profileDir, backend === 'ours-poll' ? o.busyPollUs : 0);
  const devargs = [...(w.packed ? ['packed_vq=1'] : []), ...(o.virtioArgs !== '' ? [o.virtioArgs] : [])].join(',');
  let fe: TestpmdResult;
  let beCpu: number;
  let backendStats: Record<string, unknown>;
  try {
    const tp = await startTestpmd({
      role: 'frontend',
      socketPath,
      mode: w.dir === 'frontend-sends' ? 'txonly' : 'rxonly',
      pktlen: w.pktlen,
      ...(devargs !== '' ? { devargs } : {}),
    });
    try {
      const c0 = processCpuSeconds(be.pid) ?? NaN;
      const t0 = performance.now();
      await sleep(o.seconds * 1000);
      beCpu = ((processCpuSeconds(be.pid) ?? NaN) - c0) / ((performance.now() - t0) / 1000);
    } finally {
      fe = await tp.stop();
    }
  } finally {
    backendStats = await be.stop();
  }
  return { fe, beCpu, backendStats };
}

/** Resolves with the exit code once `child` exits; kills it after `ms`. */
function exited(child: ChildProcess, ms: number): Promise<number | null> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => void stopProcess(child), ms);
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve(code);
    });
  });
}

/**
 * One run with our TypeScript frontend (net-frontend.ts) in place of testpmd: a fresh backend, the frontend process
 * pinned to `frontendCpu` for 1 s of warm-up and `seconds` measured, both stopped.
 */
async function runTsOnce(
  w: Workload,
  socketPath: string,
  o: { seconds: number; backendCpu: number; frontendCpu: number; logging: boolean; logTakeMs: number },
): Promise<{ fe: NetFrontendResult; backendStats: Record<string, unknown> }> {
  const be = await startOurs(socketPath, w, o.backendCpu, undefined);
  let fe: NetFrontendResult | undefined;
  let backendStats: Record<string, unknown>;
  try {
    const args = [
      FRONTEND_SCRIPT,
      '--socket', socketPath,
      '--mode', w.dir === 'frontend-sends' ? 'tx' : 'rx',
      '--pktlen', String(w.pktlen),
      '--seconds', String(o.seconds),
      '--warmup', '1',
      '--backend-pid', String(be.pid),
      ...(w.packed ? ['--packed'] : []),
      ...(o.logging ? ['--logging', '--log-take-ms', String(o.logTakeMs)] : []),
    ];
    const child = spawnOwned('taskset', ['-c', String(o.frontendCpu), process.execPath, ...args]);
    let out = '';
    let err = '';
    child.stdout?.on('data', (c: Buffer) => void (out += c.toString('utf8')));
    child.stderr?.on('data', (c: Buffer) => void (err += c.toString('utf8')));
    const code = await exited(child, (o.seconds + 60) * 1000);
    if (code !== 0) throw new Error(`our frontend exited with ${code}: ${err.trim().split('\n').slice(0, 3).join(' | ')}`);
    fe = JSON.parse(out.trim().split('\n').pop() ?? '') as NetFrontendResult;
  } finally {
    backendStats = await be.stop();
  }
  return { fe, backendStats };
}

/** The per-round ratios of a table cell, flagged ones starred. */
function perRound(ratios: readonly { ratio: number; flagged: boolean }[]): string {
  return ratios.map((x) => `${x.ratio.toFixed(2)}${x.flagged ? '*' : ''}`).join(', ') || '-';
}

function fmt(v: number): string {
  return Number.isFinite(v) ? v.toFixed(2) : '-';
}

export async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      seconds: { type: 'string', default: '10' },
      rounds: { type: 'string', default: '3' },
      quick: { type: 'boolean', default: false },
      sizes: { type: 'string', default: '64,1500' },
      only: { type: 'string' },
      backends: { type: 'string', default: 'ours,ours-poll,dpdk' },
      logging: { type: 'boolean', default: false },
      'log-take-ms': { type: 'string', default: '100' },
      rings: { type: 'string', default: 'split' },
      'virtio-args': { type: 'string', default: '' },
      name: { type: 'string', default: 'net' },
      profile: { type: 'string' },
      'busy-poll-us': { type: 'string', default: '1000000' },
    },
  });
  const seconds = values.quick ? 3 : Number(values.seconds);
  const rounds = values.quick ? 1 : Number(values.rounds);
  const asked = values.backends.split(',').filter((b): b is Contender => (CONTENDERS as readonly string[]).includes(b));
  if (values.logging) asked.push('ours-ts', 'ours-ts-logging');
  const busyPollUs = Number(values['busy-poll-us']);
  // In this order, so that the two runs of ours-ts come back to back whichever way a round goes.
  const contenders = CONTENDERS.filter((c) => asked.includes(c));
  const logTakeMs = Number(values['log-take-ms']);
  const virtioArgs = values['virtio-args'];
  const command = `npm run bench -- net ${argv.join(' ')}`.trim();
  const rings = values.rings.split(',');
  if (rings.some((r) => r !== 'split' && r !== 'packed')) throw new Error(`--rings takes split and/or packed: ${values.rings}`);
  const workloads: Workload[] = [];
  for (const ring of rings) {
    for (const dir of ['frontend-sends', 'backend-sends'] as const) {
      for (const pktlen of values.sizes.split(',').map(Number)) {
        const packed = ring === 'packed';
        const name = `${dir === 'frontend-sends' ? 'frontend -> backend' : 'backend -> frontend'} ${pktlen} B${packed ? ', packed' : ''}`;
        if (values.only === undefined || name.includes(values.only)) workloads.push({ name, dir, pktlen, packed });
      }
    }
  }
  if (contenders.some((c) => !isTs(c)) && findBinary('dpdk-testpmd') === undefined) throw new Error('dpdk-testpmd not found: apt-get install -y dpdk-dev');
  if (contenders.some((c) => c !== 'dpdk') && findBinary('taskset') === undefined) throw new Error('taskset not found: apt-get install -y util-linux');
  const cpus = allowedCpus();
  const backendCpu = cpus[0] as number;
  const frontendCpu = cpus[cpus.length - 1] as number;
  const when = machine();

  const samples: Sample[] = [];
  const progress = (line: string): void => void process.stderr.write(`${line}\n`);

  /** One run with testpmd as the frontend. */
  const testpmdSample = async (w: Workload, backend: Contender, round: number, socketPath: string): Promise<Sample> => {
    const { fe, beCpu, backendStats } = await runOnce(w, backend, socketPath, { seconds, backendCpu, virtioArgs, profileDir: values.profile, busyPollUs });
    const flags: string[] = [];
    if (fe.cpu < CPU_MIN) flags.push(`frontend cpu ${fe.cpu.toFixed(2)}`);
    if (backend === 'dpdk' && typeof backendStats.cpu === 'number' && backendStats.cpu < CPU_MIN) {
      flags.push(`DPDK backend cpu ${backendStats.cpu.toFixed(2)}`);
    }
    if (fe.samples === 0 || fe.mpps === 0) flags.push('no traffic');
    else if (fe.pktlen !== w.pktlen) flags.push(`frame length ${fe.pktlen}`);
    return {
      workload: w.name,
      backend,
      round,
      mpps: fe.mpps,
      samples: fe.samples,
      minMpps: fe.minMpps,
      maxMpps: fe.maxMpps,
      pktlen: fe.pktlen,
      frontendCpu: fe.cpu,
      backendCpu: beCpu,
      nsPerFrame: (beCpu * 1e3) / fe.mpps,
      flagged: flags.length > 0 ? flags.join(', ') : undefined,
      frontend: formatTestpmdResult(fe),
      backendStats,
    };
  };

  /** One run with our TypeScript frontend (net-frontend.ts), logging on or off. */
  const tsSample = async (w: Workload, backend: Contender, round: number, socketPath: string): Promise<Sample> => {
    const logging = backend === 'ours-ts-logging';
    const { fe, backendStats } = await runTsOnce(w, socketPath, { seconds, backendCpu, frontendCpu, logging, logTakeMs });
    const beCpu = fe.backendCpu ?? NaN;
    const flags: string[] = [];
    // The same rule as for testpmd: a busy-polling frontend below 95 % of a CPU was starved by something else.
    if (fe.cpu < CPU_MIN) flags.push(`frontend cpu ${fe.cpu.toFixed(2)}`);
    if (fe.frames === 0) flags.push('no traffic');
    else if (fe.pktlen !== w.pktlen || fe.badFrames > 0) flags.push(`frame length ${fe.pktlen}, ${fe.badFrames} bad frames`);
    if (logging && (fe.dirtyLog === undefined || fe.dirtyLog.pages === 0)) flags.push('nothing logged');
    const perTake = fe.dirtyLog === undefined || fe.dirtyLog.takes === 0 ? '' : `, ${(fe.dirtyLog.pages / fe.dirtyLog.takes).toFixed(0)} dirty pages per take`;
    return {
      workload: w.name,
      backend,
      round,
      mpps: fe.mpps,
      samples: fe.intervals.length,
      minMpps: Math.min(...fe.intervals),
      maxMpps: Math.max(...fe.intervals),
      pktlen: fe.pktlen,
      frontendCpu: fe.cpu,
      backendCpu: beCpu,
      nsPerFrame: (beCpu * 1e3) / fe.mpps,
      flagged: flags.length > 0 ? flags.join(', ') : undefined,
      frontend:
        `TS frontend ${fe.mode} ${fe.mpps.toFixed(2)} Mpps, ${(fe.frames / Math.max(1, fe.batches)).toFixed(0)} frames per poll, ` +
        `${((100 * fe.kicks) / Math.max(1, fe.frames)).toFixed(1)} kicks per 100 frames, cpu ${fe.cpu.toFixed(2)}${perTake}`,
      backendStats,
      ...(fe.dirtyLog !== undefined ? { dirtyLog: fe.dirtyLog } : {}),
    };
  };
  const dir = mkdtempSync(join(tmpdir(), 'vu-net-bench-'));
  const total = rounds * workloads.length * contenders.length;
  let started = 0;
  try {
    for (let round = 0; round < rounds; round++) {
      for (const [k, w] of workloads.entries()) {
        const order = (k + round) % 2 === 0 ? contenders : [...contenders].reverse();
        for (const backend of order) {
          const label = `[${++started}/${total}] round ${round + 1} ${w.name} ${backend}`;
          let sample: Sample;
          try {
            sample = isTs(backend)
              ? await tsSample(w, backend, round, join(dir, `${backend}.sock`))
              : await testpmdSample(w, backend, round, join(dir, `${backend}.sock`));
          } catch (err) {
            // One failed run (a peer that did not start on a loaded machine, ...) is recorded, not fatal.
            const message = (err as Error).message.split('\n')[0] ?? '';
            progress(`${label}: FAILED: ${(err as Error).message}`);
            samples.push({
              workload: w.name,
              backend,
              round,
              mpps: NaN,
              samples: 0,
              minMpps: NaN,
              maxMpps: NaN,
              pktlen: 0,
              frontendCpu: NaN,
              backendCpu: NaN,
              nsPerFrame: NaN,
              flagged: `failed: ${message}`,
              frontend: '',
              backendStats: {},
            });
            continue;
          }
          samples.push(sample);
          progress(
            `${label}: ${sample.mpps.toFixed(2)} Mpps (${sample.frontend}; backend cpu ${sample.backendCpu.toFixed(2)})` +
              (sample.flagged !== undefined ? ` FLAGGED: ${sample.flagged}` : ''),
          );
        }
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }

  // ---- summary ---------------------------------------------------------------------------------------------------
  const pick = (w: string, b: Contender): Sample[] => samples.filter((s) => s.workload === w && s.backend === b);
  const good = (xs: Sample[]): Sample[] => xs.filter((s) => s.flagged === undefined);
  const ok = (xs: Sample[]): Sample[] => xs.filter((x) => Number.isFinite(x.mpps) && x.mpps > 0);
  /** a / b per round (runs of one round were taken back to back); flagged when either run was. */
  const paired = (as: Sample[], bs: Sample[]): { round: number; ratio: number; flagged: boolean }[] => {
    const out: { round: number; ratio: number; flagged: boolean }[] = [];
    for (let r = 0; r < rounds; r++) {
      const a = as.find((s) => s.round === r);
      const b = bs.find((s) => s.round === r);
      if (a === undefined || b === undefined || b.mpps === 0) continue;
      out.push({ round: r, ratio: a.mpps / b.mpps, flagged: a.flagged !== undefined || b.flagged !== undefined });
    }
    return out;
  };
  const summaries = workloads.map((w) => {
    const ours = pick(w.name, 'ours');
    const dpdk = pick(w.name, 'dpdk');
    const ratios = paired(ours, dpdk);
    const valid = ratios.filter((x) => !x.flagged).map((x) => x.ratio);
    const poll = pick(w.name, 'ours-poll');
    const pollRatios = paired(poll, dpdk);
    const off = pick(w.name, 'ours-ts');
    const on = pick(w.name, 'ours-ts-logging');
    const logRatios = paired(on, off);
    const perTake = on.flatMap((x) => (x.dirtyLog !== undefined && x.dirtyLog.takes > 0 ? [x.dirtyLog.pages / x.dirtyLog.takes] : []));
    return {
      workload: w.name,
      dir: w.dir,
      pktlen: w.pktlen,
      packed: w.packed,
      oursMpps: median(good(ours).map((s) => s.mpps)),
      dpdkMpps: median(good(dpdk).map((s) => s.mpps)),
      oursBackendCpu: median(good(ours).map((s) => s.backendCpu)),
      ratios,
      medianRatio: median(valid),
      // Every round, flagged or not: only a hint when the machine was too busy for clean runs.
      medianRatioAll: median(ratios.filter((x) => Number.isFinite(x.ratio)).map((x) => x.ratio)),
      oursNsPerFrame: median(ok(ours).map((x) => x.nsPerFrame)),
      dpdkNsPerFrame: median(ok(dpdk).map((x) => x.nsPerFrame)),
      flaggedRuns: [...ours, ...dpdk, ...poll].filter((s) => s.flagged !== undefined).length,
      // ours in polling mode (--busy-poll) against DPDK, when it ran.
      ...(poll.length > 0
        ? {
            polling: {
              mpps: median(good(poll).map((s) => s.mpps)),
              ratios: pollRatios,
              medianRatio: median(pollRatios.filter((x) => !x.flagged).map((x) => x.ratio)),
              nsPerFrame: median(ok(poll).map((x) => x.nsPerFrame)),
            },
          }
        : {}),
      // ours-ts-logging against ours-ts (our frontend), when they ran.
      ...(off.length > 0 || on.length > 0
        ? {
            logging: {
              offMpps: median(good(off).map((x) => x.mpps)),
              onMpps: median(good(on).map((x) => x.mpps)),
              ratios: logRatios,
              medianRatio: median(logRatios.filter((x) => !x.flagged).map((x) => x.ratio)),
              medianRatioAll: median(logRatios.filter((x) => Number.isFinite(x.ratio)).map((x) => x.ratio)),
              offNsPerFrame: median(ok(off).map((x) => x.nsPerFrame)),
              onNsPerFrame: median(ok(on).map((x) => x.nsPerFrame)),
              offBackendCpu: median(good(off).map((x) => x.backendCpu)),
              onBackendCpu: median(good(on).map((x) => x.backendCpu)),
              dirtyPagesPerTake: perTake.length > 0 ? median(perTake) : NaN,
              flaggedRuns: [...off, ...on].filter((x) => x.flagged !== undefined).length,
            },
          }
        : {}),
    };
  });
  const mppsOf = (s: (typeof summaries)[number], c: Contender): number =>
    c === 'ours' ? s.oursMpps : c === 'ours-poll' ? (s.polling?.mpps ?? NaN) : c === 'dpdk' ? s.dpdkMpps : c === 'ours-ts' ? (s.logging?.offMpps ?? NaN) : (s.logging?.onMpps ?? NaN);

  const polled = summaries.some((s) => s.polling !== undefined);
  const rows = summaries.map((s) => [
    s.workload,
    fmt(s.oursMpps),
    fmt(s.dpdkMpps),
    perRound(s.ratios),
    `**${fmt(s.medianRatio)}**`,
    fmt(s.medianRatioAll),
    fmt(s.oursBackendCpu),
    `${s.oursNsPerFrame.toFixed(0)} / ${s.dpdkNsPerFrame.toFixed(0)}`,
    ...(polled ? [s.polling === undefined ? '-' : `${fmt(s.polling.mpps)}: ${perRound(s.polling.ratios)}, **${fmt(s.polling.medianRatio)}**, ${s.polling.nsPerFrame.toFixed(0)} ns/frame`] : []),
    String(s.flaggedRuns),
  ]);
  const table = markdownTable({
    columns: [
      'workload',
      'Mpps ours',
      'Mpps DPDK',
      'ours/DPDK per round',
      'median ours/DPDK',
      'median ours/DPDK, all rounds (incl. flagged)',
      'our backend CPU share',
      'backend CPU ns/frame ours / DPDK (all runs)',
      ...(polled ? [`ours polling (--busy-poll ${busyPollUs}): Mpps, ours/DPDK per round, median, CPU ns/frame`] : []),
      'flagged runs',
    ],
    rows,
  });
  // Ours with packed rings against ours with split rings, where both ran: medians of the unflagged runs.
  const layoutRows = summaries
    .filter((s) => s.packed)
    .flatMap((p) => {
      const split = summaries.find((s) => !s.packed && s.dir === p.dir && s.pktlen === p.pktlen);
      return split === undefined ? [] : [[split.workload, fmt(split.oursMpps), fmt(p.oursMpps), `**${fmt(p.oursMpps / split.oursMpps)}**`, fmt(split.dpdkMpps), fmt(p.dpdkMpps), fmt(p.dpdkMpps / split.dpdkMpps)]];
    });
  const runRows = samples.map((s) => [
    String(s.round + 1),
    s.workload,
    s.backend,
    fmt(s.mpps),
    `${fmt(s.minMpps)}-${fmt(s.maxMpps)} (${s.samples})`,
    String(s.pktlen),
    fmt(s.frontendCpu),
    fmt(s.backendCpu),
    Number.isFinite(s.nsPerFrame) ? s.nsPerFrame.toFixed(0) : '-',
    s.dirtyLog === undefined || s.dirtyLog.takes === 0 ? '' : (s.dirtyLog.pages / s.dirtyLog.takes).toFixed(0),
    s.flagged ?? '',
  ]);
  // ours-ts-logging against ours-ts.
  const logged = summaries.flatMap((s) => (s.logging === undefined ? [] : [{ s, l: s.logging }]));
  const loggingRows = logged.map(({ s, l }) => [
    s.workload,
    fmt(l.offMpps),
    fmt(l.onMpps),
    perRound(l.ratios),
    `**${fmt(l.medianRatio)}**`,
    fmt(l.medianRatioAll),
    `${fmt(l.offBackendCpu)} / ${fmt(l.onBackendCpu)}`,
    `${l.offNsPerFrame.toFixed(0)} -> ${l.onNsPerFrame.toFixed(0)} (${fmt(l.onNsPerFrame / l.offNsPerFrame)})`,
    Number.isFinite(l.dirtyPagesPerTake) ? l.dirtyPagesPerTake.toFixed(0) : '-',
    fmt(l.offMpps / s.oursMpps),
    String(l.flaggedRuns),
  ]);
  const loggingSection =
    loggingRows.length === 0
      ? []
      : [
          '## Dirty-page logging (live migration): ours with our TypeScript frontend, logging on vs off',
          '',
          'testpmd\'s virtio_user cannot log (it never sends SET_LOG_BASE), so these runs use our TypeScript frontend as a ' +
            'busy-polling driver in its place (bench/net-frontend.ts: a process pinned to CPU ' +
            `${frontendCpu} as testpmd's forwarding lcore, 1 queue pair of 256 entries, VERSION_1 + MRG_RXBUF + EVENT_IDX, no ` +
            'used-buffer notifications, DPDK\'s mbuf layout: the frame at a 128-byte boundary with the header before it, one ' +
            'descriptor per frame; 1 s of warm-up, then the window). "ours-ts" runs without logging; "ours-ts-logging" gives, ' +
            'after the start, a log over its guest RAM (SET_LOG_BASE) and turns logging on (SET_FEATURES | VHOST_F_LOG_ALL, ' +
            `SET_VRING_ADDR | VHOST_VRING_F_LOG), then takes and clears the bitmap every ${logTakeMs} ms as a migration's ` +
            'iterations do. Both run back to back with a fresh backend each; the ratio is per round, median over the unflagged ' +
            'rounds (* = flagged: the frontend got < 95 % of a CPU, no traffic, wrong frames or nothing logged). Backend -> ' +
            'frontend is where data pages are logged (frames written into receive buffers); frontend -> backend logs only the ' +
            'used ring. "Dirty pages per take": what one take returned (every receive buffer and the used ring, or the used ring).',
          '',
          markdownTable({
            columns: [
              'workload',
              'Mpps ours-ts',
              'Mpps ours-ts-logging',
              'logging/off per round',
              'median logging/off',
              'median logging/off, all rounds (incl. flagged)',
              'backend CPU share off / on',
              'backend CPU ns/frame off -> on (ratio)',
              'dirty pages per take',
              'ours-ts / ours (testpmd) Mpps',
              'flagged runs',
            ],
            rows: loggingRows,
          }),
          '',
          `Over the ${logged.length} workloads: median logging/off ${fmt(median(logged.map(({ l }) => l.medianRatio).filter(Number.isFinite)))} ` +
            `(${fmt(Math.min(...logged.map(({ l }) => l.medianRatio).filter(Number.isFinite)))}-` +
            `${fmt(Math.max(...logged.map(({ l }) => l.medianRatio).filter(Number.isFinite)))}).`,
          '',
        ];
  const header = [
    '# net benchmark: our vhost-user-net backend vs DPDK\'s vhost PMD, DPDK virtio_user as the frontend',
    '',
    `Command: \`${command}\`. ${rounds} round(s); in each, every workload runs ${seconds} s against ours and against ` +
      'DPDK\'s vhost PMD (testpmd `net_vhost`), back to back (which goes first alternates). The frontend is testpmd with ' +
      `\`net_virtio_user\` (1 queue pair${virtioArgs !== '' ? `, ${virtioArgs}` : ', default devargs: split ring, in_order, mrg_rxbuf, 256 entries'}; ` +
      '"packed" workloads add `packed_vq=1`; ' +
      '`--no-huge -m 256`), txonly when the frontend sends (ours `--port sink`, the PMD in rxonly) and rxonly when the ' +
      'backend sends (ours `--port source`, the PMD in txonly). Mpps is the frontend\'s rate (mean of testpmd\'s stats ' +
      'intervals after the first); the table shows medians over the rounds that are not flagged, and the ratio is the median ' +
      'of the per-round ratios (* = flagged, left out). A run is flagged when a testpmd got < 95 % of a CPU (starved by ' +
      `something else on the machine), saw no traffic or the wrong frame length. CPUs: frontend forwarding lcore on CPU ${cpus[cpus.length - 1]}, ` +
      `our backend pinned to CPU ${backendCpu} (taskset), the PMD's forwarding lcore on CPU ${backendCpu}. Our backend's CPU share ` +
      'is its utime + stime (all threads) over the window.',
    '',
    table,
    '',
    ...(layoutRows.length > 0
      ? [
          '## Packed vs split rings',
          '',
          markdownTable({
            columns: ['workload', 'Mpps ours split', 'Mpps ours packed', 'ours packed/split', 'Mpps DPDK split', 'Mpps DPDK packed', 'DPDK packed/split'],
            rows: layoutRows,
          }),
          '',
        ]
      : []),
    ...loggingSection,
    '## Every run',
    '',
    markdownTable({
      columns: ['round', 'workload', 'backend', 'Mpps', 'min-max (intervals)', 'frame', 'frontend cpu', 'backend cpu', 'backend CPU ns/frame', 'dirty pages per take', 'flagged'],
      rows: runRows,
    }),
    '',
    `Machine: ${JSON.stringify(when)}`,
  ].join('\n');
  console.log(header);
  const paths = writeResults(
    values.name,
    { machine: when, command, seconds, rounds, virtioArgs, logTakeMs, contenders, workloads, summaries, samples },
    header,
    {
      title: contenders.some(isTs)
        ? 'Mpps (medians over rounds): DPDK virtio_user or our TS frontend (ts) as the frontend'
        : 'Mpps with DPDK virtio_user as the frontend (medians over rounds)',
      yLabel: 'Mpps',
      categories: summaries.map((s) => `${s.dir === 'frontend-sends' ? 'fe->be' : 'be->fe'} ${s.pktlen}B${s.packed ? ' P' : ''}`),
      series: contenders.map((c) => ({
        name: { ours: 'ours', 'ours-poll': 'ours, polling', dpdk: 'DPDK vhost PMD', 'ours-ts': 'ours, ts', 'ours-ts-logging': 'ours, ts, logging' }[c],
        values: summaries.map((s) => mppsOf(s, c)),
      })),
    },
  );
  console.error(`wrote ${paths.join(', ')}`);
}
