/**
 * `npm run bench -- sync`: the cost of keeping workers off memory that is being removed (docs/memory-sync.md).
 *
 * One backend in a thread of this process with its own event loop (bench/backend-thread.ts; a null virtio-blk
 * device: requests complete without touching data, so the queue machinery is what is measured), one queue, one
 * queue worker thread; our TypeScript frontend on the main thread keeps
 * 4 KiB reads in flight while it hot-plugs and unplugs a spare guest-memory region at a fixed rate. For each sync
 * mode (qsbr, lock, copy, and the unsynchronized ceiling that exists only here) and each rate (0, 10, 100, 1000
 * changes/s) it measures request throughput and the latency of each change (message sent -> acknowledgement).
 * Modes are interleaved within each round so drift of the shared machine affects them alike; medians over rounds.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Worker } from 'node:worker_threads';
import { UNSYNCHRONIZED, type WorkerSyncMode } from '../src/backend/sync-block.js';
import type { BackendThreadInit } from './backend-thread.js';
import { BlkDriver } from '../src/frontend/blk-driver.js';
import { VhostUserFrontend } from '../src/frontend/frontend.js';
import { GuestRam } from '../src/frontend/guest-ram.js';
import { machine, markdownTable, median, percentile, writeResults } from './report.js';

const MiB = 1024 * 1024;
const MODES: { name: string; mode: WorkerSyncMode }[] = [
  { name: 'unsynchronized (ceiling)', mode: UNSYNCHRONIZED },
  { name: 'qsbr', mode: 'qsbr' },
  { name: 'lock', mode: 'lock' },
  { name: 'copy', mode: 'copy' },
];

interface Sample {
  mode: string;
  rate: number;
  round: number;
  iops: number;
  changes: number;
  /** Frontend-observed round trips (message sent -> acknowledgement processed), ms. */
  latencyMs: number[];
  /** Backend-side latencies (message arrival -> reply), ms. */
  backendMs: number[];
  errors: number;
}

async function measure(mode: WorkerSyncMode, rate: number, seconds: number, depth: number): Promise<Omit<Sample, 'mode' | 'rate' | 'round'>> {
  const dir = mkdtempSync(join(tmpdir(), 'vhost-user-bench-'));
  const socketPath = join(dir, 'sock');
  const init: BackendThreadInit = {
    socketPath,
    device: { backend: { kind: 'null', size: 1024 * MiB }, queues: 1 },
    server: { sync: mode, workers: 1 },
  };
  const backend = new Worker(new URL('./backend-thread.js', import.meta.url), { workerData: init });
  await new Promise((resolve) => backend.once('message', resolve));
  const memory = GuestRam.create(16 * MiB);
  const frontend = await VhostUserFrontend.connect(socketPath);
  try {
    const driver = await BlkDriver.start(frontend, { memory, queues: 1, queueSize: 256, maxRequestBytes: 4096, memoryMode: 'regions' });
    let running = true;
    let measuring = false;
    let completed = 0;
    let errors = 0;
    const lane = async (k: number): Promise<void> => {
      const target = new Uint8Array(4096);
      let sector = k * 8;
      while (running) {
        const status = await driver.readInto(sector, target, 0);
        if (status !== 0) errors++;
        if (measuring) completed++;
        sector = (sector + depth * 8) % (2 * 1024 * 1024);
      }
    };
    const latencyMs: number[] = [];
    let changes = 0;
    const churn = async (): Promise<void> => {
      if (rate === 0) return;
      const interval = 1000 / rate;
      let next = performance.now();
      let region = undefined as ReturnType<GuestRam['addRegion']> | undefined;
      while (running) {
        next += interval;
        const wait = next - performance.now();
        if (wait > 0) await new Promise((r) => setTimeout(r, wait));
        if (!running) break;
        const t0 = performance.now();
        if (region === undefined) {
          region = memory.addRegion({ gpa: 0x1_0000_0000, size: 2 * MiB });
          await frontend.addMemoryRegion(region);
        } else {
          await frontend.removeMemoryRegion(region);
          memory.removeRegion(region);
          region = undefined;
        }
        if (measuring) {
          latencyMs.push(performance.now() - t0);
          changes++;
        }
      }
    };
    const lanes = Array.from({ length: depth }, (_, k) => lane(k));
    const churning = churn();
    await new Promise((r) => setTimeout(r, 300)); // warm up
    measuring = true;
    backend.postMessage('reset-stats');
    const t0 = performance.now();
    await new Promise((r) => setTimeout(r, seconds * 1000));
    measuring = false;
    const elapsed = (performance.now() - t0) / 1000;
    running = false;
    await Promise.all([...lanes, churning]);
    driver.close();
    frontend.close();
    const stats = new Promise<{ changeMs: number[] }>((resolve) => backend.once('message', resolve));
    backend.postMessage('close');
    const backendMs = (await stats).changeMs;
    return { iops: completed / elapsed, changes: changes / elapsed, latencyMs, backendMs, errors };
  } finally {
    frontend.close();
    memory.close();
    backend.postMessage('close');
    await new Promise((resolve) => backend.once('exit', resolve));
    rmSync(dir, { recursive: true, force: true });
  }
}

export async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      seconds: { type: 'string', default: '2' },
      rounds: { type: 'string', default: '3' },
      depth: { type: 'string', default: '32' },
      rates: { type: 'string', default: '0,10,100,1000' },
    },
  });
  const seconds = Number(values.seconds);
  const rounds = Number(values.rounds);
  const depth = Number(values.depth);
  const rates = values.rates.split(',').map(Number);
  const samples: Sample[] = [];
  for (let round = 0; round < rounds; round++) {
    for (const rate of rates) {
      for (const m of MODES) {
        const s = await measure(m.mode, rate, seconds, depth);
        samples.push({ mode: m.name, rate, round, ...s });
        process.stderr.write(
          `round ${round + 1}/${rounds} rate ${rate}/s ${m.name}: ${Math.round(s.iops)} IOPS, ${s.changes.toFixed(0)} changes/s, ` +
            `backend p99 ${percentile([...s.backendMs].sort((a, b) => a - b), 99).toFixed(3)} ms\n`,
        );
      }
    }
  }

  const rows: (string | number)[][] = [];
  const summary: Record<string, unknown>[] = [];
  const ceilingAt = (rate: number): number => median(samples.filter((s) => s.rate === rate && s.mode === MODES[0]?.name).map((s) => s.iops));
  const copyAt = (rate: number): number => median(samples.filter((s) => s.rate === rate && s.mode === 'copy').map((s) => s.iops));
  for (const rate of rates) {
    for (const m of MODES) {
      const mine = samples.filter((s) => s.rate === rate && s.mode === m.name);
      const iops = median(mine.map((s) => s.iops));
      const lat = mine.flatMap((s) => s.latencyMs).sort((a, b) => a - b);
      const blat = mine.flatMap((s) => s.backendMs).sort((a, b) => a - b);
      const entry = {
        mode: m.name,
        rate,
        iops,
        vsCeiling: iops / ceilingAt(rate),
        vsCopy: iops / copyAt(rate),
        changesPerSecond: median(mine.map((s) => s.changes)),
        latencyP50Ms: percentile(lat, 50),
        latencyP99Ms: percentile(lat, 99),
        backendP50Ms: percentile(blat, 50),
        backendP99Ms: percentile(blat, 99),
        errors: mine.reduce((a, s) => a + s.errors, 0),
      };
      summary.push(entry);
      rows.push([
        m.name,
        String(rate),
        Math.round(iops),
        entry.vsCeiling.toFixed(3),
        entry.vsCopy.toFixed(2),
        entry.changesPerSecond.toFixed(0),
        rate === 0 ? '-' : entry.backendP50Ms.toFixed(3),
        rate === 0 ? '-' : entry.backendP99Ms.toFixed(3),
        rate === 0 ? '-' : entry.latencyP50Ms.toFixed(3),
        rate === 0 ? '-' : entry.latencyP99Ms.toFixed(3),
        String(entry.errors),
      ]);
    }
  }
  const table = markdownTable({
    columns: [
      'mode',
      'changes/s asked',
      'IOPS (median)',
      'x ceiling',
      'x copy',
      'changes/s done',
      'backend p50 ms',
      'backend p99 ms',
      'round trip p50 ms',
      'round trip p99 ms',
      'failed requests',
    ],
    rows,
  });
  const md = [
    '# Sync benchmark: request throughput while guest memory changes',
    '',
    `Null virtio-blk device, 1 queue, 1 worker thread, 4 KiB reads at queue depth ${depth}, ${seconds} s per sample, ` +
      `${rounds} rounds (modes interleaved), medians. Changes: ADD_MEM_REG / REM_MEM_REG of a spare 2 MiB region. ` +
      'Backend latency: message arrival to reply, in the backend (grace period, pins, revoke); round trip: sent to ' +
      'acknowledgement processed, in the frontend, whose event loop is busy with the load. Command: `npm run bench -- sync`.',
    '',
    table,
    '',
    `Machine: ${JSON.stringify(machine())}`,
  ].join('\n');
  console.log(md);
  const paths = writeResults('sync', { machine: machine(), seconds, rounds, depth, summary, samples: samples.map((s) => ({ ...s, latencyMs: undefined, backendMs: undefined })) }, md, {
    title: 'Request throughput vs memory changes per second',
    yLabel: 'IOPS (4 KiB reads, null device)',
    categories: rates.map((r) => `${r} changes/s`),
    series: MODES.map((m) => ({ name: m.name, values: rates.map((r) => median(samples.filter((s) => s.rate === r && s.mode === m.name).map((s) => s.iops))) })),
  });
  console.error(`wrote ${paths.join(', ')}`);
}
