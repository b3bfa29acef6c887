/**
 * `vhost-user serve`: the daemon. Serves every device of a config file from one pool of worker threads, and takes
 * devices in and out at runtime through the management API (`--api-socket`; `vhost-user ctl` is its client).
 */
import { Command } from 'commander';
import { startApiServer, type ApiServer } from '../daemon/api-server.js';
import { readDaemonConfig, type DaemonConfig } from '../daemon/config.js';
import { Daemon } from '../daemon/daemon.js';
import { createLogger } from './logger.js';
import { parseInteger } from './parse.js';
import { stopSignal } from './server-options.js';

interface ServeOptions {
  config?: string;
  apiSocket?: string;
  threads?: number;
  logLevel?: string;
}

export function serveCommand(): Command {
  return new Command('serve')
    .description(
      'Serve many vhost-user devices (blk, net) from one process and one pool of worker threads. --config FILE is ' +
        'JSON: {"threads": N, "sync": "qsbr", "apiSocket": PATH, "devices": [{"id": "disk0", "type": "blk", "socket": ' +
        'PATH, "image": FILE, ...}, {"id": "nic0", "type": "net", "socket": PATH, "port": "tap:vm1", ...}]}, every ' +
        'option of the blk and net commands as a camelCase field; the whole file is validated before anything starts. ' +
        'With --api-socket, devices are listed, added and removed at runtime over HTTP (see `vhost-user ctl`) and ' +
        'GET /metrics serves Prometheus metrics. SIGINT/SIGTERM disconnect every frontend and exit 0.',
    )
    .option('--config <file>', 'the devices to serve (JSON); without it the daemon starts with none')
    .option('--api-socket <path>', 'unix socket of the management API (mode 0600); overrides the file\'s apiSocket')
    .option('--threads <n>', 'worker threads of the pool (default: the file\'s threads, else the number of CPUs)', parseInteger(1, 64))
    .option('--log-level <level>', 'fatal, error, warn, info, debug or trace (default: the file\'s logLevel, else info)')
    .action(async (opts: ServeOptions) => {
      const config: DaemonConfig = opts.config !== undefined ? await readDaemonConfig(opts.config) : { sync: 'qsbr', busyPollUs: 0, devices: [] };
      const log = createLogger(opts.logLevel ?? config.logLevel ?? 'info');
      const threads = opts.threads ?? config.threads;
      const daemon = new Daemon({ logger: log, sync: config.sync, busyPollUs: config.busyPollUs, ...(threads !== undefined ? { threads } : {}) });
      let api: ApiServer | undefined;
      try {
        await daemon.start(config.devices);
        const apiSocket = opts.apiSocket ?? config.apiSocket;
        if (apiSocket !== undefined) api = await startApiServer(daemon, apiSocket, log.child({ api: true }));
        log.info({ threads: daemon.pool.size, devices: config.devices.length, api: apiSocket ?? null }, 'vhost-user daemon ready');
        await stopSignal(log);
      } finally {
        await api?.close();
        await daemon.close();
      }
      log.flush();
    });
}
