/**
 * Real NBD servers for tests: qemu-nbd (Debian qemu-utils) and nbdkit (Debian nbdkit), on a unix socket, and the
 * X.509 files their TLS needs (made with the openssl CLI). Each server is stopped by its PID (`stop`, or `kill` for a
 * crash); `spawnOwned` also kills it if the test process dies first.
 */
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import type { ToolRequirement } from './require-tool.js';
import { startServerProcess, type ServerProcess } from './server-process.js';

export const QEMU_NBD_TOOLS: readonly ToolRequirement[] = [{ bin: 'qemu-nbd', pkg: 'qemu-utils' }];
export const NBDKIT_TOOLS: readonly ToolRequirement[] = [{ bin: 'nbdkit', pkg: 'nbdkit' }];
export const OPENSSL_TOOLS: readonly ToolRequirement[] = [{ bin: 'openssl', pkg: 'openssl' }];

/** A running NBD server (stop it by PID with `stop`, or `kill` it for a crash). */
export type NbdServer = ServerProcess;

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
  return startServerProcess('qemu-nbd', args, o.socketPath);
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
  return startServerProcess('nbdkit', args, o.socketPath);
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
