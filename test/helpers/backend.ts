/**
 * Our own backend as a separate process, started through the real CLI (`bin/vhost-user.js blk`, or another device
 * subcommand such as `net`), as a user would. Its JSON log lines (stderr) are collected so tests can check what it saw.
 */
import type { ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { repoRoot } from './guest.js';
import { hasExited, spawnOwned, stopProcess } from './tmp.js';

export interface BackendProcess {
  readonly socketPath: string;
  readonly pid: number;
  /** Parsed JSON log lines so far. */
  logs(): Record<string, unknown>[];
  /** SIGTERM; resolves with the exit code (SIGKILL after 5 s, which fails the caller's assertion). */
  stop(): Promise<number | null>;
  /** SIGKILL (a crash); resolves once it is gone. */
  kill(): Promise<void>;
}

export interface StartBackendOptions {
  readonly socketPath: string;
  /** Device options after `--socket PATH --log-level L`. */
  readonly args: readonly string[];
  /** Client mode: `--connect PATH` instead of `--socket PATH` (ready once it logs 'connecting'). */
  readonly connect?: boolean;
  /** The device subcommand (default 'blk'). */
  readonly command?: string;
  /** Default 'debug'. */
  readonly logLevel?: string;
  /** A command that execs node with the rest (same PID), e.g. ['taskset', '-c', '0'] to pin the backend. */
  readonly wrapper?: readonly string[];
  /** Options for node itself, e.g. ['--cpu-prof', '--cpu-prof-dir', DIR] (a profile per thread, written at exit). */
  readonly nodeArgs?: readonly string[];
}

/** The complete JSON log lines in a child's stderr text (the last piece may be a line still being written). */
export function jsonLogLines(text: string): Record<string, unknown>[] {
  return text
    .split('\n')
    .slice(0, -1)
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

export async function startBackend(args: StartBackendOptions): Promise<BackendProcess> {
  const bin = join(repoRoot(), 'bin', 'vhost-user.js');
  const connect = args.connect ?? false;
  const argv = [bin, args.command ?? 'blk', connect ? '--connect' : '--socket', args.socketPath, '--log-level', args.logLevel ?? 'debug', ...args.args];
  const [exe, ...pre] = args.wrapper !== undefined && args.wrapper.length > 0 ? [...args.wrapper, process.execPath] : [process.execPath];
  const child: ChildProcess = spawnOwned(exe, [...pre, ...(args.nodeArgs ?? []), ...argv]);
  let text = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (chunk: string) => (text += chunk));
  child.stdout?.resume();
  const logs = (): Record<string, unknown>[] => jsonLogLines(text);
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const deadline = Date.now() + 15_000;
  const ready = connect ? 'connecting' : 'listening';
  while (!logs().some((l) => l.msg === ready)) {
    if (hasExited(child) || Date.now() > deadline) {
      await stopProcess(child);
      throw new Error(`backend did not start:\n${text}`);
    }
    await sleep(20);
  }
  return {
    socketPath: args.socketPath,
    pid: child.pid ?? -1,
    logs,
    stop: async () => {
      if (!hasExited(child)) child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      const code = await exited;
      clearTimeout(timer);
      return code;
    },
    kill: async () => {
      if (!hasExited(child)) child.kill('SIGKILL');
      await exited;
    },
  };
}
