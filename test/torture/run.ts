// `npm run torture -- [--seconds N] [--sync qsbr|lock|copy] [--io sync|async] [--memory regions|table] [--packed] [--seed N]`:
// one longer torture run (see torture.ts); prints the report and exits non-zero on any error.
import { parseArgs } from 'node:util';
import { runTorture } from './torture.js';
import type { SyncMode } from '../../src/backend/sync-block.js';

const { values } = parseArgs({
  options: {
    seconds: { type: 'string', default: '60' },
    sync: { type: 'string', default: 'qsbr' },
    io: { type: 'string', default: 'async' },
    memory: { type: 'string', default: 'regions' },
    packed: { type: 'boolean', default: false },
    seed: { type: 'string', default: String(Date.now() % 100000) },
  },
});
const report = await runTorture({
  seconds: Number(values.seconds),
  sync: values.sync as SyncMode,
  io: values.io as 'sync' | 'async',
  memory: values.memory as 'regions' | 'table',
  packed: values.packed,
  seed: Number(values.seed),
});
const lat = [...report.changeLatencyMs].sort((a, b) => a - b);
console.log(
  JSON.stringify(
    {
      ...values,
      requests: report.requests,
      reads: report.reads,
      writes: report.writes,
      changes: report.changes,
      changeLatencyMs: { p50: lat[Math.floor(lat.length / 2)], p99: lat[Math.floor(lat.length * 0.99)], max: lat.at(-1) },
      errors: report.errors,
    },
    null,
    2,
  ),
);
process.exitCode = report.errors.length === 0 ? 0 : 1;
