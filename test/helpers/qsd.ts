/**
 * qemu-storage-daemon as a reference vhost-user-blk backend: exports an image file (or any block node, such as
 * QEMU's null-co driver for the benchmarks) on a unix socket. It serves one frontend at a time and listens again
 * after a disconnect, so one daemon can serve several guest boots (or benchmark runs) in a row.
 */
import { findBinary, type ToolRequirement } from './require-tool.js';
import { startServerProcess } from './server-process.js';

/** qemu-storage-daemon is in qemu-system-common, which qemu-system-x86 depends on. */
export const QSD_TOOLS: readonly ToolRequirement[] = [{ bin: 'qemu-storage-daemon', pkg: 'qemu-system-x86' }];

export interface QsdOptions {
  /** The disk image (raw). It must exist; its size is the disk's size. Ignored when `blockdev` is given. */
  readonly image?: string;
  /**
   * The block node to export, as a --blockdev JSON object (its node-name is set to 'disk0'), e.g.
   * `{ driver: 'null-co', size: 1 << 30 }`. Default: the raw file `image`, without O_DIRECT.
   */
  readonly blockdev?: Readonly<Record<string, unknown>>;
  /** Where the vhost-user socket is created (under 108 bytes). */
  readonly socketPath: string;
  /** Queues the export offers (default 1). The device's num-queues must not exceed it. */
  readonly numQueues?: number;
  /** Default true. */
  readonly writable?: boolean;
  /** How long to wait for the socket to accept connections (default 15 s). */
  readonly startTimeoutMs?: number;
  /** More qemu-storage-daemon arguments (for example --trace). */
  readonly extraArgs?: readonly string[];
}

export interface Qsd {
  readonly socketPath: string;
  readonly pid: number;
  /** What the daemon printed so far (stdout and stderr; the last 64 KiB). */
  output(): string;
  /** SIGTERM, SIGKILL after 5 s; resolves when the daemon has exited. Safe to call twice. */
  stop(): Promise<void>;
}

/** Starts the daemon and resolves once its socket accepts a connection (a probe that is closed at once). */
export function startQsd(opts: QsdOptions): Promise<Qsd> {
  const bin = findBinary('qemu-storage-daemon');
  if (bin === undefined) throw new Error('qemu-storage-daemon not found: apt-get install -y qemu-system-x86');
  if (opts.blockdev === undefined && opts.image === undefined) throw new Error('startQsd needs an image or a blockdev');
  // JSON option syntax: no escaping of commas in paths.
  const blockdev =
    opts.blockdev !== undefined
      ? { ...opts.blockdev, 'node-name': 'disk0' }
      : { driver: 'file', 'node-name': 'disk0', filename: opts.image, cache: { direct: false } };
  const exp = {
    type: 'vhost-user-blk',
    id: 'exp0',
    'node-name': 'disk0',
    addr: { type: 'unix', path: opts.socketPath },
    writable: opts.writable ?? true,
    'num-queues': opts.numQueues ?? 1,
  };
  const args = ['--blockdev', JSON.stringify(blockdev), '--export', JSON.stringify(exp), ...(opts.extraArgs ?? [])];
  return startServerProcess('qemu-storage-daemon', args, opts.socketPath, opts.startTimeoutMs);
}
