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
 * Options: --seconds S (10) --rounds N (3) --quick (1 round of 3 s) --sizes 64,1500 --only SUBSTRING
 * --backends ours,dpdk --rings split,packed (each workload with split rings, packed rings (virtio_user
 * `packed_vq=1`) or both; default split) --virtio-args DEVARGS (extra net_virtio_user devargs) --name NAME (of the
 * result files). The default takes about 5 minutes; each ring layout adds as much.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { startBackend } from '../test/helpers/backend.js';
import { allowedCpus, formatTestpmdResult, processCpuSeconds, startTestpmd, type TestpmdResult } from '../test/helpers/dpdk.js';
import { findBinary } from '../test/helpers/require-tool.js';
import { machine, markdownTable, median, writeResults } from './report.js';

type Direction = 'frontend-sends' | 'backend-sends';
type Contender = 'ours' | 'dpdk';

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

async function startOurs(socketPath: string, w: Workload, cpu: number): Promise<RunningBackend> {
  const args = ['--port', w.dir === 'frontend-sends' ? 'sink' : 'source'];
  if (w.dir === 'backend-sends') args.push('--frame-len', String(w.pktlen));
  const be = await startBackend({ command: 'net', socketPath, args, logLevel: 'info', wrapper: ['taskset', '-c', String(cpu)] });
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
  o: { seconds: number; backendCpu: number; virtioArgs: string },
): Promise<{ fe: TestpmdResult; beCpu: number; backendStats: Record<string, unknown> }> {
  const be = backend === 'ours' ? await startOurs(socketPath, w, o.backendCpu) : await startDpdk(socketPath, w);
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
      backends: { type: 'string', default: 'ours,dpdk' },
      rings: { type: 'string', default: 'split' },
      'virtio-args': { type: 'string', default: '' },
      name: { type: 'string', default: 'net' },
    },
  });
  const seconds = values.quick ? 3 : Number(values.seconds);
  const rounds = values.quick ? 1 : Number(values.rounds);
  const contenders = values.backends.split(',').filter((b): b is Contender => b === 'ours' || b === 'dpdk');
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
  if (findBinary('dpdk-testpmd') === undefined) throw new Error('dpdk-testpmd not found: apt-get install -y dpdk-dev');
  if (contenders.includes('ours') && findBinary('taskset') === undefined) throw new Error('taskset not found: apt-get install -y util-linux');
  const cpus = allowedCpus();
  const backendCpu = cpus[0] as number;
  const when = machine();

  const samples: Sample[] = [];
  const progress = (line: string): void => void process.stderr.write(`${line}\n`);
  const dir = mkdtempSync(join(tmpdir(), 'vu-net-bench-'));
  const total = rounds * workloads.length * contenders.length;
  let started = 0;
  try {
    for (let round = 0; round < rounds; round++) {
      for (const [k, w] of workloads.entries()) {
        const order = (k + round) % 2 === 0 ? contenders : [...contenders].reverse();
        for (const backend of order) {
          const label = `[${++started}/${total}] round ${round + 1} ${w.name} ${backend}`;
          let fe: TestpmdResult;
          let beCpu: number;
          let backendStats: Record<string, unknown>;
          try {
            ({ fe, beCpu, backendStats } = await runOnce(w, backend, join(dir, `${backend}.sock`), { seconds, backendCpu, virtioArgs }));
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
          const flags: string[] = [];
          if (fe.cpu < CPU_MIN) flags.push(`frontend cpu ${fe.cpu.toFixed(2)}`);
          if (backend === 'dpdk' && typeof backendStats.cpu === 'number' && backendStats.cpu < CPU_MIN) {
            flags.push(`DPDK backend cpu ${backendStats.cpu.toFixed(2)}`);
          }
          if (fe.samples === 0 || fe.mpps === 0) flags.push('no traffic');
          else if (fe.pktlen !== w.pktlen) flags.push(`frame length ${fe.pktlen}`);
          samples.push({
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
          });
          progress(`${label}: ${fe.mpps.toFixed(2)} Mpps (${formatTestpmdResult(fe)}; backend cpu ${beCpu.toFixed(2)})${flags.length > 0 ? ` FLAGGED: ${flags.join(', ')}` : ''}`);
        }
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }

  // ---- summary ---------------------------------------------------------------------------------------------------
  const pick = (w: string, b: Contender): Sample[] => samples.filter((s) => s.workload === w && s.backend === b);
  const summaries = workloads.map((w) => {
    const ours = pick(w.name, 'ours');
    const dpdk = pick(w.name, 'dpdk');
    const good = (xs: Sample[]): Sample[] => xs.filter((s) => s.flagged === undefined);
    const ratios: { round: number; ratio: number; flagged: boolean }[] = [];
    for (let r = 0; r < rounds; r++) {
      const a = ours.find((s) => s.round === r);
      const b = dpdk.find((s) => s.round === r);
      if (a === undefined || b === undefined || b.mpps === 0) continue;
      ratios.push({ round: r, ratio: a.mpps / b.mpps, flagged: a.flagged !== undefined || b.flagged !== undefined });
    }
    const valid = ratios.filter((x) => !x.flagged).map((x) => x.ratio);
    const ok = (xs: Sample[]): Sample[] => xs.filter((x) => Number.isFinite(x.mpps) && x.mpps > 0);
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
      flaggedRuns: [...ours, ...dpdk].filter((s) => s.flagged !== undefined).length,
    };
  });

  const rows = summaries.map((s) => [
    s.workload,
    fmt(s.oursMpps),
    fmt(s.dpdkMpps),
    s.ratios.map((x) => `${x.ratio.toFixed(2)}${x.flagged ? '*' : ''}`).join(', ') || '-',
    `**${fmt(s.medianRatio)}**`,
    fmt(s.medianRatioAll),
    fmt(s.oursBackendCpu),
    `${s.oursNsPerFrame.toFixed(0)} / ${s.dpdkNsPerFrame.toFixed(0)}`,
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
    s.flagged ?? '',
  ]);
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
    '## Every run',
    '',
    markdownTable({ columns: ['round', 'workload', 'backend', 'Mpps', 'min-max (intervals)', 'frame', 'frontend cpu', 'backend cpu', 'backend CPU ns/frame', 'flagged'], rows: runRows }),
    '',
    `Machine: ${JSON.stringify(when)}`,
  ].join('\n');
  console.log(header);
  const paths = writeResults(
    values.name,
    { machine: when, command, seconds, rounds, virtioArgs, contenders, workloads, summaries, samples },
    header,
    {
      title: 'Mpps with DPDK virtio_user as the frontend (medians over rounds)',
      yLabel: 'Mpps',
      categories: summaries.map((s) => `${s.dir === 'frontend-sends' ? 'fe->be' : 'be->fe'} ${s.pktlen}B${s.packed ? ' P' : ''}`),
      series: contenders.map((c) => ({
        name: c === 'ours' ? 'ours' : 'DPDK vhost PMD',
        values: summaries.map((s) => (c === 'ours' ? s.oursMpps : s.dpdkMpps)),
      })),
    },
  );
  console.error(`wrote ${paths.join(', ')}`);
}
