// Time-boxed descriptor-chain fuzzing inside `npm test` (see chain-fuzz.ts for what is generated and checked).
// VHOST_FUZZ_SECONDS scales the budget, VHOST_FUZZ_SEED replays a run; `npm run fuzz` runs it longer.
import { test } from 'node:test';
import { baseSeed, budgetMs, formatReport } from './config.js';
import { fuzzChains } from './chain-fuzz.js';

test('random rings and indirect tables through SplitQueue + the blk handler: only VirtioErrors, exact chains, writes only where allowed', (t) => {
  const seed = baseSeed();
  const ms = budgetMs('chains');
  // A fixed minimum of cases even with a zero budget, so the fixed part of the property always runs.
  const report = fuzzChains({ ms: Math.max(ms, 1), seed, ...(ms === 0 ? { numRuns: 50 } : {}) });
  t.diagnostic(formatReport(report));
});
