/**
 * Budgets and seeds of the fuzzers, shared by the time-boxed runs inside `npm test` and the longer `npm run fuzz`.
 *
 * Environment (all optional):
 * - `VHOST_FUZZ_SECONDS`: total time the fuzz test files under `npm test` spend fuzzing (default 60, 0 skips the
 *   random part and keeps only the fixed cases). Each file takes its share (`budgetMs`).
 * - `VHOST_FUZZ_SEED`: base seed (default: random, printed as a test diagnostic so a failing run can be replayed).
 * - `VHOST_FUZZ_KNOWN_BUGS=1`: also generate the inputs that trigger bugs recorded (as `todo`) in regressions.test.ts:
 *   kick/call/err fds that are not eventfds (a socket, a read-only file, a memfd). Off by default so a run stays
 *   green until that bug is fixed; make it the default once it is.
 */
import fc from 'fast-check';

/** Shares of the in-suite budget, per fuzz test file (they add up to 1). */
export const SHARES = {
  chains: 0.3,
  race: 0.1,
  protocol: 0.35,
  guestErrors: 0.15,
  fairness: 0.1,
} as const;

export type FuzzTarget = keyof typeof SHARES;

function numberFromEnv(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < 0) throw new RangeError(`${name} must be a non-negative number, got '${raw}'`);
  return n;
}

/** The in-suite budget of `target` in ms. */
export function budgetMs(target: FuzzTarget): number {
  return Math.round(numberFromEnv('VHOST_FUZZ_SECONDS', 60) * 1000 * SHARES[target]);
}

/** The base seed: `VHOST_FUZZ_SEED`, else a fresh one. */
export function baseSeed(): number {
  const fromEnv = process.env.VHOST_FUZZ_SEED;
  if (fromEnv !== undefined && fromEnv !== '') return Number(fromEnv) | 0;
  return (Date.now() ^ (process.pid << 16)) | 0;
}

/** Whether inputs that trigger known (reported, not yet fixed) bugs are generated. */
export function knownBugs(): boolean {
  return process.env.VHOST_FUZZ_KNOWN_BUGS === '1';
}

/** Deterministic PRNG (mulberry32), for the parts that are not fast-check arbitraries. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** What a fuzz run did, for the test diagnostics and `npm run fuzz`. */
export interface FuzzReport {
  target: string;
  seed: number;
  ms: number;
  /** Cases fast-check ran (sequences, scenarios). */
  runs: number;
  /** Finer counts: chains popped, messages sent, ... */
  counts: Record<string, number>;
}

export function formatReport(r: FuzzReport): string {
  const counts = Object.entries(r.counts)
    .map(([k, v]) => `${k}=${v}`)
    .join(' ');
  return `${r.target}: seed=${r.seed} runs=${r.runs} ${counts} in ${(r.ms / 1000).toFixed(1)} s`;
}

function replay(details: { seed: number; counterexamplePath: string | null }): { seed: number; path?: string } {
  return details.counterexamplePath === null ? { seed: details.seed } : { seed: details.seed, path: details.counterexamplePath };
}

/**
 * fast-check for a fixed time: runs `property` until `ms` have passed (or `numRuns` cases), and on a failure replays
 * the failing case (same seed and path) without the time limit, so that fast-check shrinks it and reports the
 * smallest counterexample it finds within `shrinkMs` together with the seed to replay it.
 */
export function timeBoxedAssert<Ts>(
  property: fc.IProperty<Ts>,
  options: { ms: number; seed: number; numRuns?: number; shrinkMs?: number },
): { numRuns: number } {
  const details = fc.check(property, {
    seed: options.seed,
    numRuns: options.numRuns ?? 1_000_000_000,
    interruptAfterTimeLimit: options.ms,
    markInterruptAsFailure: false,
  });
  if (details.failed) {
    fc.assert(property, { ...replay(details), interruptAfterTimeLimit: options.shrinkMs ?? 60_000, includeErrorInReport: true });
    throw new Error(`fuzz failure did not reproduce (seed ${details.seed}, path ${details.counterexamplePath ?? ''}): ${String(details.errorInstance)}`);
  }
  return { numRuns: details.numRuns };
}

/** The asynchronous version of `timeBoxedAssert`. */
export async function timeBoxedAssertAsync<Ts>(
  property: fc.IAsyncProperty<Ts>,
  options: { ms: number; seed: number; numRuns?: number; shrinkMs?: number },
): Promise<{ numRuns: number }> {
  const details = await fc.check(property, {
    seed: options.seed,
    numRuns: options.numRuns ?? 1_000_000_000,
    interruptAfterTimeLimit: options.ms,
    markInterruptAsFailure: false,
  });
  if (details.failed) {
    await fc.assert(property, { ...replay(details), interruptAfterTimeLimit: options.shrinkMs ?? 60_000, includeErrorInReport: true });
    throw new Error(`fuzz failure did not reproduce (seed ${details.seed}, path ${details.counterexamplePath ?? ''}): ${String(details.errorInstance)}`);
  }
  return { numRuns: details.numRuns };
}
