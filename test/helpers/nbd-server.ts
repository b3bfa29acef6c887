/**
 * Real NBD servers for tests: qemu-nbd (Debian qemu-utils) and nbdkit (Debian nbdkit), on a unix socket, and the
 * X.509 files their TLS needs (made with the openssl CLI). Each server is stopped by its PID (`stop`, or `kill` for a
 * crash); `spawnOwned` also kills it if the test process dies first.
 */
import type { ChildProcess } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { connect } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ToolRequirement } from './require-tool.js';
import { findBinary } from './require-tool.js';
import { hasExited, spawnOwned, stopProcess } from './tmp.js';

export const QEMU_NBD_TOOLS: readonly ToolRequirement[] = [{ bin: 'qemu-nbd', pkg: 'qemu-utils' }];
export const NBDKIT_TOOLS: readonly ToolRequirement[] = [{ bin: 'nbdkit', pkg: 'nbdkit' }];
export const OPENSSL_TOOLS: readonly ToolRequirement[] = [{ bin: 'openssl', pkg: 'openssl' }];

export interface NbdServer {
  readonly socketPath: string;
  readonly pid: number;
  /** What it printed (last 64 KiB). */
  output(): string;
  /** SIGTERM (SIGKILL after 5 s); resolves once it has exited. Safe to call twice. */
  stop(): Promise<void>;
  /** SIGKILL (a crash); resolves once it has exited. */
  kill(): Promise<void>;
}

const OUTPUT_LIMIT = 64 * 1024;

function tryConnect(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function startServer(name: string, args: readonly string[], socketPath: string): Promise<NbdServer> {
  const bin = findBinary(name);
  if (bin === undefined) throw new Error(`${name} not found`);
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
  const deadline = Date.now() + 15_000;
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
  const pid = child.pid as number;
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

export interface QemuNbdOptions {
  socketPath: string;
  /** A raw image file. */
  image: string;
  exportName?: string;
  readOnly?: boolean;
  /** A directory with ca-cert.pem, server-cert.pem, server-key.pem: TLS required (no client certificate asked). */
  tlsDir?: string;
  /**
   * Clients served at once (default 16). qemu-nbd 7.2 offers CAN_MULTI_CONN when this is more than 1, and serves
   * one client at a time without it (later ones wait in the listen backlog).
   */
  shared?: number;
}

/** qemu-nbd serving `image` persistently (-t), writing through to the file. */
export function startQemuNbd(o: QemuNbdOptions): Promise<NbdServer> {
  const args = ['-t', `--shared=${o.shared ?? 16}`, '-f', 'raw', '--cache=writeback', '-k', o.socketPath, '-x', o.exportName ?? 'disk'];
  if (o.readOnly === true) args.push('--read-only');
  if (o.tlsDir !== undefined) {
    args.push('--object', `tls-creds-x509,id=tls0,dir=${o.tlsDir},endpoint=server,verify-peer=off`, '--tls-creds', 'tls0');
  }
  args.push(o.image);
  return startServer('qemu-nbd', args, o.socketPath);
}

export interface NbdkitOptions {
  socketPath: string;
  /** Plugin and its parameters, e.g. ['memory', '64M'] or ['file', '/path/img']; filters go in `filters`. */
  plugin: readonly string[];
  filters?: readonly string[];
  readOnly?: boolean;
  tlsDir?: string;
  /** Extra options before the plugin (e.g. '--no-sr'). */
  extra?: readonly string[];
}

/** nbdkit in the foreground, exiting with the test process. */
export function startNbdkit(o: NbdkitOptions): Promise<NbdServer> {
  const args = ['-f', '--exit-with-parent', '-U', o.socketPath];
  for (const f of o.filters ?? []) args.push(`--filter=${f}`);
  if (o.readOnly === true) args.push('-r');
  if (o.tlsDir !== undefined) args.push('--tls=require', `--tls-certificates=${o.tlsDir}`);
  args.push(...(o.extra ?? []), ...o.plugin);
  return startServer('nbdkit', args, o.socketPath);
}

/**
 * A CA and a server certificate it signed (for DNS:localhost and IP:127.0.0.1) in `dir`, under the names qemu-nbd's
 * tls-creds-x509 and nbdkit's --tls-certificates read: ca-cert.pem, server-cert.pem, server-key.pem.
 */
export function makeTlsCerts(dir: string): { ca: string; dir: string } {
  const run = (...args: string[]): void => void execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  run('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', '/CN=vhost-user test CA');
  run('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'server-key.pem', '-out', 'server.csr', '-subj', '/CN=localhost');
  const ext = join(dir, 'server.ext');
  execFileSync('sh', ['-c', `printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > '${ext}'`]);
  run('x509', '-req', '-in', 'server.csr', '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', 'server-cert.pem', '-days', '2', '-extfile', ext);
  return { ca: join(dir, 'ca-cert.pem'), dir };
}
