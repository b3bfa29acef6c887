/**
 * `vhost-user serve` as a separate process, started through the real CLI as a user would, with its management API
 * on a unix socket: the tests' handle on it (JSON log lines, the API, /proc of its PID, stop by PID).
 */
import type { ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { jsonLogLines } from './backend.js';
import { repoRoot } from './guest.js';
import { hasExited, spawnOwned, stopProcess } from './tmp.js';

export interface ApiReply {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
  /** The body parsed as JSON (undefined when empty or not JSON). */
  json: unknown;
}

/** One HTTP request to the API on a unix socket. */
export function apiCall(socketPath: string, method: string, path: string, body?: unknown): Promise<ApiReply> {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body);
    const headers: Record<string, string | number> = data === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) };
    const req = request({ socketPath, method, path, headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let json: unknown;
        try {
          json = text === '' ? undefined : JSON.parse(text);
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text, json });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(data);
  });
}

export interface DaemonProcess {
  readonly pid: number;
  readonly apiSocket: string;
  logs(): Record<string, unknown>[];
  api(method: string, path: string, body?: unknown): Promise<ApiReply>;
  /** Threads of the process (/proc/PID/status). */
  threads(): number;
  /** Resident memory in KiB (/proc/PID/status VmRSS). */
  rssKiB(): number;
  /** SIGTERM; resolves with the exit code (SIGKILL after 10 s, which fails the caller's assertion). */
  stop(): Promise<number | null>;
}

export interface StartDaemonOptions {
  apiSocket: string;
  /** A config file (omitted: the daemon starts with no device). */
  config?: string;
  threads?: number;
  logLevel?: string;
}

function procStatus(pid: number, field: string): number {
  const m = new RegExp(`^${field}:\\s+(\\d+)`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (m === null) throw new Error(`no ${field} in /proc/${pid}/status`);
  return Number(m[1]);
}

export async function startDaemon(options: StartDaemonOptions): Promise<DaemonProcess> {
  const argv = [join(repoRoot(), 'bin', 'vhost-user.js'), 'serve', '--api-socket', options.apiSocket, '--log-level', options.logLevel ?? 'debug'];
  if (options.config !== undefined) argv.push('--config', options.config);
  if (options.threads !== undefined) argv.push('--threads', String(options.threads));
  const child: ChildProcess = spawnOwned(process.execPath, argv);
  let text = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (chunk: string) => (text += chunk));
  child.stdout?.resume();
  const logs = (): Record<string, unknown>[] => jsonLogLines(text);
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const deadline = Date.now() + 20_000;
  while (!logs().some((l) => l.msg === 'vhost-user daemon ready')) {
    if (hasExited(child) || Date.now() > deadline) {
      await stopProcess(child);
      throw new Error(`daemon did not start:\n${text}`);
    }
    await sleep(20);
  }
  const pid = child.pid ?? -1;
  return {
    pid,
    apiSocket: options.apiSocket,
    logs,
    api: (method, path, body) => apiCall(options.apiSocket, method, path, body),
    threads: () => procStatus(pid, 'Threads'),
    rssKiB: () => procStatus(pid, 'VmRSS'),
    stop: async () => {
      if (!hasExited(child)) child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      const code = await exited;
      clearTimeout(timer);
      return code;
    },
  };
}

/** Parses the Prometheus text format into `name{labels}` -> value (comments skipped). */
export function parseMetrics(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$/.exec(line);
    if (m === null) throw new Error(`not a metrics line: ${line}`);
    out.set(m[1] as string, Number(m[2]));
  }
  return out;
}
