/** Options and the run loop that every device command (blk, net, rng, switch) shares. */
import { Option, type Command } from 'commander';
import { VhostUserServer } from '../backend/server.js';
import { SYNC_MODES, type SyncMode } from '../backend/sync-block.js';
import { MAX_BUSY_POLL_US } from '../backend/worker-pool.js';
import type { VirtioDevice } from '../devices/device.js';
import type { Logger } from 'pino';
import { parseInteger } from './parse.js';

export interface ServerCliOptions {
  workers?: number;
  sync: SyncMode;
  memSlots: number;
  busyPoll: number;
  logLevel: string;
}

/** Adds --workers, --sync, --mem-slots, --busy-poll and --log-level. */
export function addServerOptions(command: Command, workersHelp: string): Command {
  return command
    .option('--workers <n>', workersHelp, parseInteger(1, 64))
    .addOption(
      new Option('--sync <mode>', 'how workers are kept off memory being removed (docs/memory-sync.md)')
        .choices(SYNC_MODES)
        .default('qsbr'),
    )
    .option(
      '--mem-slots <n>',
      'memory slots offered to the frontend; 0 = do not offer CONFIGURE_MEM_SLOTS (the frontend sends whole tables)',
      parseInteger(0, 509),
      509,
    )
    .option(
      '--busy-poll <us>',
      'polling mode for workers with cores of their own: watch the rings this many microseconds before sleeping ' +
        '(0 = sleep at once, best on shared cores)',
      parseInteger(0, MAX_BUSY_POLL_US),
      0,
    )
    .option('--log-level <level>', 'fatal, error, warn, info, debug or trace', 'info');
}

/** The VhostUserServer options that come from the shared CLI options. */
export function serverOptions(opts: ServerCliOptions): { sync: SyncMode; memSlots: number; busyPollUs: number; workers?: number } {
  return { sync: opts.sync, memSlots: opts.memSlots, busyPollUs: opts.busyPoll, ...(opts.workers !== undefined ? { workers: opts.workers } : {}) };
}

/** How a device command reaches its frontend: `--socket` (listen) or `--connect` (client mode). */
export interface EndpointCliOptions {
  socket?: string;
  connect?: string;
}

/** Adds --socket PATH and --connect PATH (exactly one is given: see `endpoint`). */
export function addEndpointOptions(command: Command): Command {
  return command
    .option('--socket <path>', 'unix socket path to listen on, the VMM connects (a stale socket file is replaced)')
    .option(
      '--connect <path>',
      'client mode: connect to a VMM listening on this socket (QEMU -chardev socket,server=on,wait=off; DPDK ' +
        'virtio_user server=1), and again, with backoff, whenever it is not there or the connection drops',
    );
}

/** The socket path and whether to connect to it (client mode) or listen on it. */
export function endpoint(opts: EndpointCliOptions): { socketPath: string; clientMode: boolean } {
  if ((opts.socket === undefined) === (opts.connect === undefined)) throw new Error('give exactly one of --socket PATH or --connect PATH');
  return opts.connect !== undefined ? { socketPath: opts.connect, clientMode: true } : { socketPath: opts.socket ?? '', clientMode: false };
}

/**
 * At SIGINT/SIGTERM a device command stops taking requests and lets those in flight complete (their completions
 * published) for up to this long before it disconnects: a restart loses nothing even without inflight tracking.
 */
export const STOP_DRAIN_MS = 10_000;

/** Resolves at the first SIGINT or SIGTERM (logged), so that the command can close its servers and exit 0. */
export function stopSignal(log: Logger): Promise<void> {
  return new Promise<void>((resolve) => {
    const stop = (signal: string): void => {
      log.info({ signal }, 'stopping');
      resolve();
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
}

/**
 * The run loop of a single-device command: serves `device` on the endpoint the options name (listening, or
 * connecting in client mode), logs "vhost-user-NAME ready" with `details`, and at SIGINT/SIGTERM stops taking
 * requests, lets those in flight complete (up to STOP_DRAIN_MS) and closes the server.
 */
export async function serveUntilStopped(
  device: VirtioDevice,
  opts: ServerCliOptions & EndpointCliOptions,
  log: Logger,
  details: Record<string, unknown>,
): Promise<void> {
  const { socketPath, clientMode } = endpoint(opts);
  const server = new VhostUserServer({ socketPath, device, logger: log, ...serverOptions(opts) });
  if (clientMode) server.connect();
  else server.listen();
  log.info(details, `vhost-user-${device.name} ready`);
  await stopSignal(log);
  await server.close({ drainMs: STOP_DRAIN_MS });
}
