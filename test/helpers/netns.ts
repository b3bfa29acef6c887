/**
 * Network namespaces that a test owns (`ip netns add vu-<pid>-<random>`), so that TAP devices, addresses and
 * listening sockets of a test never touch the host's network or another test's. A namespace is deleted by
 * remove(), when the test ends (testNetns), and, as a last resort, when the test process exits. Deleting it
 * also removes every interface in it once the processes that hold them (the backend's TAP fd) are gone.
 *
 *     const ns = await testNetns(t);
 *     await ns.run(['ip', 'addr', 'add', '10.1.0.1/24', 'dev', 'vutap0']);
 *     const child = ns.spawn(['busybox', 'nc', '-l', '-p', '5002']);
 */
import { execFileSync, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import type { TestContext } from 'node:test';
import { findBinary, type ToolRequirement } from './require-tool.js';
import { spawnOwned, stopProcess } from './tmp.js';

const NAME_RE = /^vu-(\d+)-[0-9a-f]{6}$/;
const RUN_TIMEOUT_MS = 30_000;

/**
 * What a test that creates namespaces needs: `ip` (iproute2), root (CAP_NET_ADMIN), and /dev/net/tun for TAP
 * devices. The package names must be in DEBIAN_TEST_PACKAGES (require-tool.ts).
 */
export const NETNS_TOOLS: readonly ToolRequirement[] = [
  { bin: 'ip', pkg: 'iproute2' },
  {
    check: () => process.getuid?.() === 0,
    what: 'root (network namespaces and TAP devices need CAP_NET_ADMIN)',
    pkg: 'iproute2',
  },
  { check: () => existsSync('/dev/net/tun'), what: '/dev/net/tun (the tun driver)', pkg: 'iproute2' },
];

export interface NetNamespace {
  readonly name: string;
  /** argv run inside the namespace: ['ip', 'netns', 'exec', name, ...argv] (ip execs it: same PID). */
  command(argv: readonly string[]): string[];
  /** Runs argv in the namespace; resolves with its stdout, rejects on a non-zero exit (with its stderr). */
  run(argv: readonly string[]): Promise<string>;
  /** Starts argv in the namespace as an owned child (see tmp.ts spawnOwned); stop it with stopProcess. */
  spawn(argv: readonly string[], options?: SpawnOptions): ChildProcess;
  /** Deletes the namespace (safe to call more than once). */
  remove(): Promise<void>;
}

const live = new Set<string>();
let hookInstalled = false;

function deleteSync(name: string): void {
  try {
    execFileSync('ip', ['netns', 'del', name], { stdio: 'ignore', timeout: 5000 });
  } catch {
    // already gone
  }
}

function installExitHook(): void {
  if (hookInstalled) return;
  hookInstalled = true;
  process.on('exit', () => {
    for (const name of live) deleteSync(name);
  });
  // tmp.ts kills the children and re-raises SIGTERM/SIGHUP; delete our namespaces before that happens. If nobody
  // else listens for the signal, re-raise it ourselves, so that adding this listener never keeps the process alive.
  for (const sig of ['SIGTERM', 'SIGHUP'] as const) {
    const onSignal = (): void => {
      for (const name of live) deleteSync(name);
      live.clear();
      if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
    };
    process.prependOnceListener(sig, onSignal);
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Runs a command; resolves with stdout, rejects with stderr on a non-zero exit or after RUN_TIMEOUT_MS. */
async function runCommand(argv: readonly string[]): Promise<string> {
  const [cmd, ...args] = argv;
  if (cmd === undefined) throw new Error('empty command');
  const child = spawnOwned(cmd, args);
  let out = '';
  let err = '';
  child.stdout?.setEncoding('utf8').on('data', (c: string) => (out += c));
  child.stderr?.setEncoding('utf8').on('data', (c: string) => (err += c));
  const timer = setTimeout(() => void stopProcess(child).catch(() => undefined), RUN_TIMEOUT_MS);
  try {
    const code = await new Promise<number | null>((resolve, reject) => {
      child.once('error', reject);
      child.once('close', (c) => resolve(c));
    });
    if (code !== 0) throw new Error(`${argv.join(' ')} failed (exit ${code}): ${err.trim()}`);
    return out;
  } finally {
    clearTimeout(timer);
  }
}

/** Deletes namespaces named by this module whose process is gone (a test process that was SIGKILLed). */
async function pruneStale(): Promise<void> {
  const list = await runCommand(['ip', 'netns', 'list']).catch(() => '');
  for (const line of list.split('\n')) {
    const name = line.split(' ')[0] ?? '';
    const m = NAME_RE.exec(name);
    if (m !== null && !pidAlive(Number(m[1]))) await runCommand(['ip', 'netns', 'del', name]).catch(() => undefined);
  }
}

/** Creates a fresh namespace vu-<pid>-<random> with its loopback up. */
export async function createNetns(): Promise<NetNamespace> {
  if (findBinary('ip') === undefined) throw new Error('ip not found: apt-get install -y iproute2');
  await pruneStale();
  installExitHook();
  const name = `vu-${process.pid}-${randomBytes(3).toString('hex')}`;
  await runCommand(['ip', 'netns', 'add', name]);
  live.add(name);
  const command = (argv: readonly string[]): string[] => ['ip', 'netns', 'exec', name, ...argv];
  const ns: NetNamespace = {
    name,
    command,
    run: (argv) => runCommand(command(argv)),
    spawn: (argv, options) => {
      const [cmd, ...args] = command(argv);
      return spawnOwned(cmd as string, args, options);
    },
    async remove() {
      if (!live.has(name)) return;
      live.delete(name);
      await runCommand(['ip', 'netns', 'del', name]);
    },
  };
  try {
    await ns.run(['ip', 'link', 'set', 'lo', 'up']);
  } catch (err) {
    await ns.remove().catch(() => undefined);
    throw err;
  }
  return ns;
}

/** A namespace deleted when the test ends (t.after hooks also run when the test fails). */
export async function testNetns(t: TestContext): Promise<NetNamespace> {
  const ns = await createNetns();
  t.after(() => ns.remove());
  return ns;
}
