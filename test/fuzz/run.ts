// `npm run fuzz -- [--seconds N] [--seed N] [--only chains,packedChains,race,packedRace,protocol]`: the fuzzers of test/fuzz for longer than
// the time-boxed run inside `npm test` (the time is split between the selected targets). Prints one report line per
// target; on a failure prints fast-check's report (seed, path, shrunk counterexample) and exits 1. Replay a failure
// with the same --seed (and --only). VHOST_FUZZ_KNOWN_BUGS=1 also generates inputs of bugs not fixed yet.
import { parseArgs } from 'node:util';
import { fuzzChains } from './chain-fuzz.js';
import { baseSeed, formatReport, type FuzzReport } from './config.js';
import { fuzzPackedChains } from './packed-chain-fuzz.js';
import { racePackedChains } from './packed-race-fuzz.js';
import { fuzzProtocol } from './protocol-fuzz.js';
import { raceChains } from './race-fuzz.js';

const TARGETS = ['chains', 'packedChains', 'race', 'packedRace', 'protocol'] as const;
type Target = (typeof TARGETS)[number];
const SHARE: Record<Target, number> = { chains: 0.25, packedChains: 0.2, race: 0.07, packedRace: 0.08, protocol: 0.4 };

const { values } = parseArgs({
  options: {
    seconds: { type: 'string', default: '300' },
    seed: { type: 'string' },
    only: { type: 'string', default: TARGETS.join(',') },
  },
});
const seconds = Number(values.seconds);
if (!Number.isFinite(seconds) || seconds <= 0) throw new RangeError(`--seconds must be a positive number: ${values.seconds}`);
const seed = values.seed !== undefined ? Number(values.seed) | 0 : baseSeed();
const only = values.only.split(',').map((s) => s.trim()) as Target[];
for (const t of only) if (!TARGETS.includes(t)) throw new RangeError(`unknown target '${t}' (${TARGETS.join(', ')})`);
const total = only.reduce((sum, t) => sum + SHARE[t], 0);

let failed = false;
for (const target of only) {
  const ms = Math.round((seconds * 1000 * SHARE[target]) / total);
  try {
    let report: FuzzReport;
    if (target === 'chains') report = fuzzChains({ ms, seed });
    else if (target === 'packedChains') report = fuzzPackedChains({ ms, seed });
    else if (target === 'race') report = await raceChains({ ms, seed });
    else if (target === 'packedRace') report = await racePackedChains({ ms, seed });
    else report = await fuzzProtocol({ ms, seed });
    console.log(formatReport(report));
  } catch (err) {
    failed = true;
    console.error(`${target}: FAILED (seed ${seed})\n${err instanceof Error ? err.message : String(err)}`);
  }
}
process.exitCode = failed ? 1 : 0;
