// The driver rewrites a packed ring from another thread while the device reads it (packed-race-fuzz.ts): only
// VirtioErrors, and every chain the device accepts satisfies the bounds it validated (no double fetch).
import { test } from 'node:test';
import { baseSeed, budgetMs, formatReport } from './config.js';
import { racePackedChains } from './packed-race-fuzz.js';

test('a driver rewriting a packed ring from another thread: only VirtioErrors, every accepted chain within its bounds', async (t) => {
  const report = await racePackedChains({ ms: Math.max(budgetMs('packedRace'), 500), seed: baseSeed() });
  t.diagnostic(formatReport(report));
});
