/**
 * The Promela model of the memory-publication protocol (model/memory-sync.pml, docs/memory-sync.md), checked by
 * spin: the protocol must be safe (no touch of a revoked region, no write to an unmapped dirty log, no dirty log bit
 * lost after a reply, no lost kick) and live under weak fairness (every grace period ends, every kick is processed)
 * in each configuration of the model (one daemon, a pool of two workers shared by two sessions), and spin must reject
 * every deliberately broken variant. model/README.md explains the model, the configurations, the properties and the
 * variants.
 *
 * Each run builds its own verifier in a temporary directory: spin -a, then gcc on pan.c, then ./pan. Two runs at a
 * time (the machine has 2 cores); the whole file takes about two minutes (model/README.md, "Measured").
 */
import { copyFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { repoRoot } from '../helpers/guest.js';
import { findBinary, requireTools } from '../helpers/require-tool.js';
import { spawnOwned, stopProcess, testTempDir, type TempDir } from '../helpers/tmp.js';

const MODEL = 'memory-sync.pml';
const TIMEOUT = { timeout: 15 * 60_000 };
/** Runs (spin, gcc, pan) at a time: one per core. */
const PARALLEL = 2;
/** Bound on one spin, gcc or pan process. */
const PROCESS_TIMEOUT_MS = 5 * 60_000;
/** Search depth bound: far above the deepest path of the model (about 1600 steps). */
const DEPTH = '-m200000';
/** pan stops (and says so) rather than exhaust the machine. */
const PAN_CFLAGS = ['-w', '-DMEMLIM=4096'];

type Run = 'safety' | 'gp_ends' | 'gp_ends_b' | 'kicks_processed';
const LIVENESS: readonly Run[] = ['gp_ends', 'kicks_processed'];

function haveTools(t: TestContext): boolean {
  if (!requireTools(t, [{ bin: 'spin', pkg: 'spin' }])) return false;
  // gcc compiles the verifiers spin generates. It is on every CI image (build-essential), so it is not one of the
  // packages .ci/run installs; the same rule applies: skipped locally, a failure under CI=true.
  if (findBinary('gcc') !== undefined) return true;
  const message = 'needs gcc (missing: gcc; apt-get install -y gcc)';
  if (process.env.CI === 'true') throw new Error(`CI=true and this test ${message}`);
  t.skip(message);
  return false;
}

interface Output {
  readonly code: number | null;
  readonly text: string;
}

/** Runs a tool to completion (stdout and stderr together); killed after PROCESS_TIMEOUT_MS. */
async function run(command: string, args: readonly string[], cwd: string): Promise<Output> {
  const child = spawnOwned(command, args, { cwd });
  let text = '';
  child.stdout?.setEncoding('utf8').on('data', (s: string) => (text += s));
  child.stderr?.setEncoding('utf8').on('data', (s: string) => (text += s));
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    void stopProcess(child);
  }, PROCESS_TIMEOUT_MS);
  try {
    const code = await new Promise<number | null>((resolve, reject) => {
      child.once('error', reject);
      child.once('close', (c) => resolve(c));
    });
    if (timedOut) throw new Error(`${command} ${args.join(' ')}: no result within ${PROCESS_TIMEOUT_MS} ms`);
    return { code, text };
  } finally {
    clearTimeout(timer);
  }
}

async function mustRun(command: string, args: readonly string[], cwd: string): Promise<void> {
  const out = await run(command, args, cwd);
  assert.equal(out.code, 0, `${command} ${args.join(' ')} failed:\n${out.text}`);
}

/**
 * Builds a verifier for the model with the given -D defines: a safety one (assertions and end states, no never
 * claim) or a liveness one (acceptance cycles, weak fairness over the model's 7 processes + the claim).
 */
async function build(root: TempDir, name: string, defines: readonly string[], kind: 'safety' | 'liveness', opt: string): Promise<string> {
  const dir = root.join(name);
  await mkdir(dir);
  await copyFile(join(repoRoot(), 'model', MODEL), join(dir, MODEL));
  await mustRun('spin', [...defines.map((d) => `-D${d}`), '-a', MODEL], dir);
  const mode = kind === 'safety' ? ['-DSAFETY', '-DNOCLAIM'] : ['-DNFAIR=3'];
  await mustRun('gcc', [opt, ...PAN_CFLAGS, ...mode, '-o', 'pan', 'pan.c'], dir);
  return dir;
}

interface PanResult {
  readonly errors: number;
  readonly states: number;
  readonly seconds: number;
  /** The first error pan reports ("pan:1: ..."), if any. */
  readonly error: string | undefined;
  /** The search covered the whole state space (no depth, memory or error cut-off). */
  readonly complete: boolean;
  readonly text: string;
}

function parsePan(text: string): PanResult {
  const errors = /errors: (\d+)/.exec(text)?.[1];
  const states = /(\d+) states, stored/.exec(text)?.[1];
  const seconds = /pan: elapsed time ([\d.e+]+) seconds/.exec(text)?.[1];
  assert.ok(errors !== undefined && states !== undefined, `pan did not finish:\n${text}`);
  const incomplete = /Search not completed|max search depth too small|-DMEMLIM bound|out of memory/.test(text);
  return {
    errors: Number(errors),
    states: Number(states),
    seconds: Number(seconds ?? NaN),
    error: /^pan:1: (.*)$/m.exec(text)?.[1],
    complete: !incomplete,
    text,
  };
}

async function pan(dir: string, check: Run): Promise<PanResult> {
  const args = check === 'safety' ? [DEPTH] : ['-a', '-f', DEPTH, '-N', check];
  const out = await run('./pan', args, dir);
  assert.equal(out.code, 0, `pan ${args.join(' ')} failed:\n${out.text}`);
  return parsePan(out.text);
}

/**
 * Statements of the model's processes that the search never executed (pan's "unreached in proctype" report), other
 * than their closing "-end-" (the processes loop for ever), each as "proctype: file:line, state n, text". An
 * unreached statement means the configuration does not exercise part of the protocol, and a proof would be partly
 * vacuous.
 */
function unreached(text: string): string[] {
  const found: string[] = [];
  for (const section of text.split(/^unreached in /m).slice(1)) {
    const header = /^(proctype|claim) (\S+)/.exec(section);
    if (header?.[1] !== 'proctype') continue;
    for (const line of section.split('\n').slice(1)) {
      const stmt = /^\s+(\S+, state \d+), "(.*)"$/.exec(line);
      if (stmt !== null && stmt[2] !== '-end-') found.push(`${header[2]}: ${stmt[1]} ${stmt[2]}`);
    }
  }
  return found;
}

/**
 * The configurations of the correct model (model/README.md, "Configurations"). The bounded ones differ only in
 * -D values, so their verifiers have the same statements (and state numbers): between them they must execute
 * every statement.
 */
const BOUNDED: readonly string[] = []; // the model's defaults: A changes its memory three times, B never; requests
const SESSIONS = ['NCHA=1', 'NCHB=1', 'DMASK=3', 'IOMASK=0'];
const LOAD = ['LOAD', 'NCHB=1', 'IOMASK=0'];
const LOAD_SHARED = ['LOAD=2', 'NCHA=1', 'NCHB=2', 'IOMASK=0'];
/** `bounded` with A's three changes of the dirty log (logging on, SET_LOG_BASE replacing the log, logging off). */
const DIRTY_LOG = ['LOGS=1'];
const CONFIGS = [
  { name: 'bounded', defines: BOUNDED, bounded: true },
  { name: 'sessions', defines: SESSIONS, bounded: true },
  { name: 'log', defines: DIRTY_LOG, bounded: true },
  { name: 'load', defines: LOAD, bounded: false },
  { name: 'load-shared', defines: LOAD_SHARED, bounded: false },
] as const;

test('memory-sync model: spin verifies safety and liveness of the protocol', { ...TIMEOUT, concurrency: PARALLEL }, async (t) => {
  if (!haveTools(t)) return;
  const root = await testTempDir(t, 'vhost-user-model-');
  // One verifier per configuration and kind, shared by the runs that need it.
  const builds = new Map<string, Promise<string>>();
  const verifier = (cfg: (typeof CONFIGS)[number], kind: 'safety' | 'liveness'): Promise<string> => {
    const key = `${cfg.name}-${kind}`;
    let dir = builds.get(key);
    if (dir === undefined) {
      dir = build(root, key, cfg.defines, kind, '-O2');
      builds.set(key, dir);
    }
    return dir;
  };
  const notReached: string[][] = [];
  const runs = CONFIGS.flatMap((cfg) =>
    (['safety', ...LIVENESS] as const).map((check) =>
      t.test(`${cfg.name} ${check}`, async (st) => {
        const r = await pan(await verifier(cfg, check === 'safety' ? 'safety' : 'liveness'), check);
        const what = `${cfg.name} ${check}`;
        assert.equal(r.errors, 0, `${what}: ${r.error ?? ''}\n${r.text}`);
        assert.ok(r.complete, `${what}: the search did not cover the state space:\n${r.text}`);
        assert.ok(r.states > 10_000, `${what}: only ${r.states} states: the model lost its behaviours`);
        if (cfg.bounded && check === 'safety') notReached.push(unreached(r.text));
        st.diagnostic(`${r.states} states, ${r.seconds} s`);
      }),
    ),
  );
  await Promise.all(runs);
  // A statement counts as executed if one bounded configuration executed it.
  if (notReached.length === CONFIGS.filter((c) => c.bounded).length) {
    const [first = [], ...rest] = notReached;
    const never = first.filter((s) => rest.every((other) => other.includes(s)));
    assert.deepEqual(never, [], 'statements that no bounded configuration executes');
  }
});

interface Rejection {
  readonly what: string;
  readonly pattern: RegExp;
}
/** TOUCH / TOUCHR: a worker or the I/O thread touched a region that is not mapped (revoked). */
const TOUCH_OF_REVOKED: Rejection = { what: 'touch of a revoked region', pattern: /^assertion violated .*live/ };
/** LOGW: a worker wrote to a dirty log that is not mapped (unmapped after a change replaced it). */
const LOG_UNMAPPED: Rejection = { what: 'write to an unmapped dirty log', pattern: /^assertion violated .*&lmap\[/ };
/** LOGW: after control replied to a change of the log, a worker wrote with an older log (or none): a lost bit. */
const LOG_BIT_LOST: Rejection = { what: 'dirty log bit lost after the reply', pattern: /^assertion violated .*replied\[/ };
/** The lostkick monitor's assert(false). */
const LOST_KICK: Rejection = { what: 'lost kick', pattern: /^assertion violated 0 / };
/** The scan's check that the table of the generation it reports was drained (the code's VHOST_INTERNAL throw). */
const TABLE_MISSING: Rejection = { what: 'reported generation without its table', pattern: /^assertion violated \(lt\[\d\]>=g\)/ };
const ACCEPTANCE: Rejection = { what: 'acceptance cycle', pattern: /^acceptance cycle/ };
/** Control blocked for ever while everything else has stopped. */
const INVALID_END: Rejection = { what: 'invalid end state', pattern: /^invalid end state/ };

interface Variant {
  readonly name: string;
  /** The configuration's defines, then the variant's. */
  readonly defines: readonly string[];
  readonly check: Run;
  readonly expect: Rejection;
}

/** Each broken variant, the configuration and run that must reject it, and how (model/README.md, "Broken variants"). */
const VARIANTS: readonly Variant[] = [
  { name: 'touch after idle', defines: ['BROKEN_TOUCH_AFTER_IDLE'], check: 'safety', expect: TOUCH_OF_REVOKED },
  { name: 'wake before gen', defines: ['BROKEN_WAKE_BEFORE_GEN'], check: 'safety', expect: TOUCH_OF_REVOKED },
  { name: 'idle before gen', defines: ['BROKEN_IDLE_BEFORE_GEN'], check: 'safety', expect: TOUCH_OF_REVOKED },
  { name: 'revoke early', defines: ['BROKEN_REVOKE_EARLY'], check: 'safety', expect: TOUCH_OF_REVOKED },
  { name: 'no pin wait', defines: ['BROKEN_NO_PIN_WAIT'], check: 'safety', expect: TOUCH_OF_REVOKED },
  { name: 'missing unpin (safety)', defines: ['BROKEN_MISSING_UNPIN'], check: 'safety', expect: INVALID_END },
  { name: 'missing unpin (liveness)', defines: ['BROKEN_MISSING_UNPIN'], check: 'gp_ends', expect: ACCEPTANCE },
  { name: 'no re-check (invariant)', defines: ['BROKEN_NO_RECHECK'], check: 'safety', expect: LOST_KICK },
  {
    name: 'no re-check (liveness, without the invariant)',
    defines: ['BROKEN_NO_RECHECK', 'NO_MONITOR'],
    check: 'kicks_processed',
    expect: ACCEPTANCE,
  },
  // a lost notify needs a worker that stays busy after it (bounded: it goes idle, and that notify wakes control)
  { name: 'wait without a re-check slice', defines: [...LOAD, 'BROKEN_WAIT_NO_SLICE'], check: 'gp_ends', expect: ACCEPTANCE },
  // needs a third chain: one whose kick is seen by poll(0) after the chain was popped by a re-check
  {
    name: 'kick read after the re-check',
    defines: [...SESSIONS, 'NADD=3', 'BROKEN_KICK_READ_LATE'],
    check: 'safety',
    expect: LOST_KICK,
  },
  // safe (the drain after the bump applies the table before the worker touches memory again), but a busy worker
  // never reports the generation: its grace period never ends
  { name: 'epoch bumped before gen', defines: [...LOAD, 'BROKEN_EPOCH_BEFORE_GEN'], check: 'gp_ends', expect: ACCEPTANCE },
  { name: 'lastEpoch set after the scan', defines: ['BROKEN_EPOCH_LATE'], check: 'safety', expect: TOUCH_OF_REVOKED },
  { name: 'no epoch bump (B)', defines: [...SESSIONS, 'BROKEN_NO_EPOCH_BUMP'], check: 'safety', expect: TOUCH_OF_REVOKED },
  // safe for the same reason as the early bump; B's grace period waits for its busy worker for ever
  { name: 'scan stops at a change', defines: [...LOAD_SHARED, 'BROKEN_SCAN_STOPS'], check: 'gp_ends', expect: ACCEPTANCE },
  { name: 'B waits for every worker', defines: [...LOAD, 'BROKEN_WAIT_ALL'], check: 'gp_ends_b', expect: ACCEPTANCE },
  { name: 'port drained once (two sessions)', defines: [...SESSIONS, 'BROKEN_DRAIN_ONCE'], check: 'safety', expect: TABLE_MISSING },
  { name: 'port drained once (one session)', defines: ['BROKEN_DRAIN_ONCE'], check: 'safety', expect: TABLE_MISSING },
  // the dirty log: a request popped before SET_LOG_BASE and reaped after its reply must be logged in the new log
  { name: 'log of the pop at reap', defines: [...DIRTY_LOG, 'BROKEN_LOG_AT_POP'], check: 'safety', expect: LOG_UNMAPPED },
  { name: 'log unmapped early', defines: [...DIRTY_LOG, 'BROKEN_LOG_UNMAP_EARLY'], check: 'safety', expect: LOG_UNMAPPED },
  // logging turned on unmaps nothing, but its reply must still wait for the grace period
  { name: 'log on replied early', defines: [...DIRTY_LOG, 'BROKEN_LOG_REPLY_EARLY'], check: 'safety', expect: LOG_BIT_LOST },
];

test('memory-sync model: spin rejects every broken variant', { ...TIMEOUT, concurrency: PARALLEL }, async (t) => {
  if (!haveTools(t)) return;
  const root = await testTempDir(t, 'vhost-user-model-');
  await Promise.all(
    VARIANTS.map((v, i) =>
      t.test(v.name, async (st) => {
        // -O1: the verifiers build twice as fast as with -O2, and a rejection needs a fraction of the state space
        const dir = await build(root, `variant-${i}`, v.defines, v.check === 'safety' ? 'safety' : 'liveness', '-O1');
        const r = await pan(dir, v.check);
        const what = v.defines.join(' ');
        assert.ok(r.errors > 0, `${what} was not rejected by the ${v.check} run:\n${r.text}`);
        assert.match(r.error ?? '', v.expect.pattern, `${what}: expected a ${v.expect.what}, got:\n${r.text}`);
        const depth = /\(at depth (\d+)\)/.exec(r.error ?? '')?.[1] ?? '?';
        st.diagnostic(`${v.check}: ${v.expect.what} at depth ${depth} (${r.states} states, ${r.seconds} s)`);
      }),
    ),
  );
});
