// The driver rewrites the rings from another thread while the device reads them (race-fuzz.ts): only VirtioErrors,
// and every chain the device accepts satisfies the bounds it validated (no double fetch).
import { test } from 'node:test';
import { baseSeed, budgetMs, formatReport } from './config.js';
import { raceChains } from './race-fuzz.js';

test('a driver rewriting the rings from another thread: only VirtioErrors, every accepted chain within its bounds', async (t) => {
  const report = await raceChains({ ms: Math.max(budgetMs('race'), 500), seed: baseSeed() });
  t.diagnostic(formatReport(report));
});
