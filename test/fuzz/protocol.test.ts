// Time-boxed fuzzing of the vhost-user protocol over a real socket inside `npm test` (see protocol-fuzz.ts for the
// generated sequences and the per-message oracle). VHOST_FUZZ_SECONDS scales the budget; VHOST_FUZZ_SEED replays.
import { test } from 'node:test';
import { baseSeed, budgetMs, formatReport } from './config.js';
import { fuzzProtocol } from './protocol-fuzz.js';

test('random message sequences from a hostile frontend: acks, nacks, disconnects as the spec says; no crash, no leak', { timeout: 600_000 }, async (t) => {
  const seed = baseSeed();
  const ms = budgetMs('protocol');
  const report = await fuzzProtocol({ ms: Math.max(ms, 1), seed, ...(ms === 0 ? { numRuns: 5 } : {}) });
  t.diagnostic(formatReport(report));
});
