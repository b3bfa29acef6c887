// Time-boxed packed-ring chain fuzzing inside `npm test` (see packed-chain-fuzz.ts for what is generated and checked).
// VHOST_FUZZ_SECONDS scales the budget, VHOST_FUZZ_SEED replays a run; `npm run fuzz -- --only packedChains` runs it
// longer.
import { test } from 'node:test';
import { baseSeed, budgetMs, formatReport } from './config.js';
import { fuzzPackedChains } from './packed-chain-fuzz.js';

test('random packed rings through PackedQueue + the blk handler: only VirtioErrors, exact chains and used descriptors, writes only where allowed', (t) => {
  const seed = baseSeed();
  const ms = budgetMs('packedChains');
  // A fixed minimum of cases even with a zero budget, so the fixed part of the property always runs.
  const report = fuzzPackedChains({ ms: Math.max(ms, 1), seed, ...(ms === 0 ? { numRuns: 50 } : {}) });
  t.diagnostic(formatReport(report));
});
