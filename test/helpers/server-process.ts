/**
 * A server program (qemu-storage-daemon, qemu-nbd, nbdkit) started for a test and ready once its unix socket accepts
 * a connection (a probe that is closed at once). It is stopped by its PID; `spawnOwned` also kills it if the test
 * process dies first.
 */
import type { ChildProcess } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { findBinary } from './require-tool.js';
import { hasExited, spawnOwned, stopProcess } from './tmp.js';
import { tryConnect } from './unix-socket.js';

export interface ServerProcess {
  readonly socketPath: string;
  readonly pid: number;
  /** What it printed so far (stdout and stderr; the last 64 KiB). */
  output(): string;
  /** SIGTERM, SIGKILL after 5 s; resolves once it has exited. Safe to call twice. */
  stop(): Promise<void>;
  /** SIGKILL (a crash); resolves once it has exited. */
  kill(): Promise<void>;
}

const OUTPUT_LIMIT = 64 * 1024;

/** Starts `name` (found on PATH) with `args` and waits (`timeoutMs`, default 15 s) until `socketPath` accepts. */
export async function startServerProcess(name: string, args: readonly string[], socketPath: string, timeoutMs = 15_000): Promise<ServerProcess> {
  const bin = findBinary(name);
  if (bin === undefined) throw new Error(`${name} not found on PATH`);
  const child: ChildProcess = spawnOwned(bin, args);
  let out = '';
  const collect = (chunk: Buffer): void => {
    out += chunk.toString('utf8');
    if (out.length > OUTPUT_LIMIT) out = out.slice(-OUTPUT_LIMIT);
  };
  child.stdout?.on('data', collect);
  child.stderr?.on('data', collect);
  let spawnError: Error | undefined;
  child.on('error', (err) => (spawnError ??= err));
  const stop = (): Promise<void> => stopProcess(child);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (spawnError !== undefined) throw spawnError;
    if (hasExited(child)) throw new Error(`${name} exited (code ${child.exitCode}, signal ${child.signalCode}):\n${out}`);
    if (await tryConnect(socketPath)) break;
    if (Date.now() >= deadline) {
      await stop();
      throw new Error(`${name}: ${socketPath} did not accept connections in time:\n${out}`);
    }
    await sleep(25);
  }
  const pid = child.pid;
  if (pid === undefined) throw new Error(`${name} did not start`);
  return {
    socketPath,
    pid,
    output: () => out,
    stop,
    kill: async () => {
      if (!hasExited(child)) child.kill('SIGKILL');
      await stopProcess(child);
    },
  };
}
