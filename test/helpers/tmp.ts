/**
 * Temporary directories and child processes that a test owns: both are always cleaned up, also when the
 * test fails or the test process exits early.
 */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

/** A directory under os.tmpdir(), removed (recursively) by remove(). */
export class TempDir {
  readonly path: string;

  private constructor(path: string) {
    this.path = path;
  }

  /** Short prefix: unix socket paths in it must stay under 108 bytes. */
  static async create(prefix = 'vhost-user-test-'): Promise<TempDir> {
    return new TempDir(await mkdtemp(join(tmpdir(), prefix)));
  }

  join(...parts: string[]): string {
    return join(this.path, ...parts);
  }

  async remove(): Promise<void> {
    await rm(this.path, { recursive: true, force: true, maxRetries: 3 });
  }
}

/** Runs fn with a fresh TempDir, and removes it afterwards whatever fn does. */
export async function withTempDir<T>(fn: (dir: TempDir) => Promise<T> | T, prefix?: string): Promise<T> {
  const dir = await TempDir.create(prefix);
  try {
    return await fn(dir);
  } finally {
    await dir.remove();
  }
}

/** A TempDir removed when the test ends (t.after hooks also run when the test fails). */
export async function testTempDir(t: TestContext, prefix?: string): Promise<TempDir> {
  const dir = await TempDir.create(prefix);
  t.after(() => dir.remove());
  return dir;
}

// ------------------------------------------------------------------------------------------ processes

/** Children started with spawnOwned that have not exited yet; SIGKILLed if the test process exits or gets
 * SIGTERM/SIGHUP. (SIGINT from a terminal reaches them anyway: they share its process group.) */
const live = new Set<ChildProcess>();
let exitHookInstalled = false;

function killAllLive(): void {
  for (const child of live) {
    if (child.pid !== undefined) {
      try {
        process.kill(child.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  }
}

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', killAllLive);
  // 'exit' does not run when a signal ends the process: kill the children, then die of the same signal.
  for (const sig of ['SIGTERM', 'SIGHUP'] as const) {
    process.once(sig, () => {
      killAllLive();
      process.kill(process.pid, sig);
    });
  }
}

/**
 * child_process.spawn (argument array, no shell) plus bookkeeping: if the test process exits while the
 * child still runs, the child gets SIGKILL. Stop it with stopProcess().
 */
export function spawnOwned(command: string, args: readonly string[], options: SpawnOptions = {}): ChildProcess {
  installExitHook();
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], ...options });
  if (child.pid !== undefined) {
    live.add(child);
    child.once('exit', () => live.delete(child));
  }
  return child;
}

export function hasExited(child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

function signal(pid: number, sig: NodeJS.Signals | 0): boolean {
  try {
    process.kill(pid, sig);
    return true;
  } catch {
    return false; // ESRCH: already gone
  }
}

/** Resolves when the child has exited or after ms; true if it exited. */
function waitExit(child: ChildProcess, ms: number): Promise<boolean> {
  if (hasExited(child)) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      child.off('exit', onExit);
      resolve(hasExited(child));
    }, ms);
    const onExit = (): void => {
      clearTimeout(timer);
      resolve(true);
    };
    child.once('exit', onExit);
  });
}

/** Polls (every 25 ms) until no process has this PID, for processes that are not our children. */
async function waitPidGone(pid: number, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (!signal(pid, 0)) return true;
    if (Date.now() >= deadline) return false;
    await sleep(25);
  }
}

/**
 * Stops a process by PID: SIGTERM, then SIGKILL if it is still there after graceMs; resolves once it
 * has exited. For a ChildProcess the 'exit' event is awaited (so the PID cannot have been reused);
 * for a bare PID, kill(pid, 0) is polled. Safe to call more than once.
 */
export async function stopProcess(
  proc: ChildProcess | number,
  { graceMs = 5000, killWaitMs = 5000 }: { graceMs?: number; killWaitMs?: number } = {},
): Promise<void> {
  if (typeof proc === 'number') {
    if (!signal(proc, 'SIGTERM')) return;
    if (await waitPidGone(proc, graceMs)) return;
    signal(proc, 'SIGKILL');
    if (!(await waitPidGone(proc, killWaitMs))) throw new Error(`process ${proc} survived SIGKILL`);
    return;
  }
  const pid = proc.pid;
  if (pid === undefined || hasExited(proc)) return;
  signal(pid, 'SIGTERM');
  if (await waitExit(proc, graceMs)) return;
  signal(pid, 'SIGKILL');
  if (!(await waitExit(proc, killWaitMs))) throw new Error(`process ${pid} survived SIGKILL`);
}
