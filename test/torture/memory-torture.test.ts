// Torture runs of live memory-map changes (see torture.ts): bounded to a few seconds each here; `npm run torture`
// runs them longer. Each configuration must finish with no error, requests and changes in the thousands or
// hundreds, and every fd and mapping released.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import * as native from '../../src/native/index.js';
import { collectGarbage, openFdCount } from '../helpers/fds.js';
import { runTorture, type TortureOptions } from './torture.js';

const SECONDS = Number(process.env.TORTURE_SECONDS ?? 3);

const configs: TortureOptions[] = [
  { seconds: SECONDS, sync: 'qsbr', io: 'sync', memory: 'regions', seed: 1 },
  { seconds: SECONDS, sync: 'qsbr', io: 'async', memory: 'regions', seed: 2 },
  { seconds: SECONDS, sync: 'lock', io: 'async', memory: 'regions', seed: 3 },
  { seconds: SECONDS, sync: 'copy', io: 'sync', memory: 'table', seed: 4 },
  { seconds: SECONDS, sync: 'qsbr', io: 'async', memory: 'table', seed: 5 },
  { seconds: SECONDS, sync: 'qsbr', io: 'async', memory: 'regions', packed: true, seed: 6 },
  { seconds: SECONDS, sync: 'copy', io: 'sync', memory: 'table', packed: true, seed: 7 },
];

for (const config of configs) {
  test(`torture: --sync ${config.sync}, --io ${config.io}, memory by ${config.memory}${config.packed === true ? ', packed rings' : ''}`, { timeout: 120_000 }, async (t) => {
    const fds = openFdCount();
    const mappings = native.mappingCount();
    const report = await runTorture(config);
    const changes = Object.values(report.changes).reduce((a, b) => a + b, 0);
    const lat = [...report.changeLatencyMs].sort((a, b) => a - b);
    t.diagnostic(
      `${report.requests} requests (${report.reads} verified reads), ${changes} changes ${JSON.stringify(report.changes)}, ` +
        `change latency p50 ${lat[Math.floor(lat.length / 2)]?.toFixed(2)} ms p99 ${lat[Math.floor(lat.length * 0.99)]?.toFixed(2)} ms`,
    );
    assert.deepEqual(report.errors, []);
    assert.ok(report.requests > 100, `only ${report.requests} requests`);
    assert.ok(changes > 10, `only ${changes} memory changes`);
    assert.ok(report.changes.ringMove > 0 && report.changes.replace > 0 && report.changes.remove + report.changes.replace > 0);
    assert.equal(openFdCount(), fds, 'fds leaked');
    for (let i = 0; i < 200 && native.mappingCount() > mappings; i++) {
      collectGarbage();
      await sleep(10);
    }
    assert.equal(native.mappingCount(), mappings, 'mappings leaked');
  });
}
