/** `vhost-user blk`: serve a raw image (or a null device) as a vhost-user-blk backend on a unix socket. */
import { Command, Option } from 'commander';
import { openDevice } from '../daemon/device-factory.js';
import { createLogger } from './logger.js';
import { DEFAULT_NBD_TIMEOUT_S, MAX_NBD_TIMEOUT_S } from '../daemon/config.js';
import { parseInteger, parseSize } from './parse.js';
import { addEndpointOptions, addServerOptions, endpoint, serveUntilStopped, type EndpointCliOptions, type ServerCliOptions } from './server-options.js';

interface BlkOptions extends ServerCliOptions, EndpointCliOptions {
  image?: string;
  null?: number;
  nbd?: string;
  nbdTlsCa?: string;
  nbdTlsCert?: string;
  nbdTlsKey?: string;
  nbdTimeout: number;
  readOnly: boolean;
  queues: number;
  queueSize: number;
  io: 'sync' | 'async';
  serial: string;
  completionDelayMs?: number[];
}

export function blkCommand(): Command {
  const command = new Command('blk')
    .description(
      'Serve a virtio-blk device over vhost-user. Listens on --socket; the VMM connects as a client (QEMU: ' +
        '-chardev socket,id=c0,path=SOCK -device vhost-user-blk-pci,chardev=c0, with shared memfd guest memory). ' +
        'Serves one frontend at a time and listens again when it leaves; with --connect it connects to the VMM ' +
        'instead. SIGINT/SIGTERM: requests in flight complete, then it exits (status 0).',
    );
  addEndpointOptions(command)
    .option('--image <file>', 'raw disk image to serve (its size, rounded down to 512 bytes, is the capacity)')
    .option('--null <size>', 'serve a null device of this size instead (e.g. 1G): requests complete without data', parseSize)
    .option(
      '--nbd <uri>',
      'serve an NBD export instead: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, or nbds://, nbds+unix:// (TLS)',
    )
    .option('--nbd-tls-ca <file>', 'nbds: PEM file of the CA that signed the server certificate (default: the system CAs)')
    .option('--nbd-tls-cert <file>', 'nbds: PEM client certificate, for servers that ask for one')
    .option('--nbd-tls-key <file>', 'nbds: PEM key of the client certificate')
    .option(
      '--nbd-timeout <seconds>',
      'how long requests wait for a lost NBD server to come back before the guest gets an I/O error',
      parseInteger(1, MAX_NBD_TIMEOUT_S),
      DEFAULT_NBD_TIMEOUT_S,
    )
    .option('--read-only', 'offer VIRTIO_BLK_F_RO and refuse writes', false)
    .option('--queues <n>', 'number of request queues (VIRTIO_BLK_F_MQ when > 1)', parseInteger(1, 64), 1)
    .option('--queue-size <n>', 'largest queue size the driver may use (power of two, up to 32768)', parseInteger(1, 32768), 1024)
    .addOption(
      new Option('--io <mode>', 'run reads and writes in the queue worker (sync) or in an I/O thread per queue (async)')
        .choices(['sync', 'async'])
        .default('sync'),
    )
    .option('--serial <id>', 'device serial returned by GET_ID (up to 20 bytes)', 'vhost-user-ts')
    .addOption(
      new Option(
        '--completion-delay-ms <ms,...>',
        'test knob (with --io async): complete each request this long after its I/O; a list is taken in turn (out of order)',
      )
        .argParser((v: string) => v.split(',').map((x) => parseInteger(0, 60_000)(x)))
        .hideHelp(),
    );
  return addServerOptions(command, 'worker threads for the queues (default: one per queue)').action(async (opts: BlkOptions) => {
      const log = createLogger(opts.logLevel);
      const { socketPath } = endpoint(opts);
      if ([opts.image, opts.null, opts.nbd].filter((o) => o !== undefined).length !== 1) {
        throw new Error('give exactly one of --image FILE, --null SIZE or --nbd URI');
      }
      const storage =
        opts.nbd !== undefined
          ? {
              nbd: opts.nbd,
              nbdTimeout: opts.nbdTimeout,
              ...(opts.nbdTlsCa !== undefined ? { nbdTlsCa: opts.nbdTlsCa } : {}),
              ...(opts.nbdTlsCert !== undefined ? { nbdTlsCert: opts.nbdTlsCert } : {}),
              ...(opts.nbdTlsKey !== undefined ? { nbdTlsKey: opts.nbdTlsKey } : {}),
            }
          : opts.image !== undefined
            ? { image: opts.image }
            : { null: opts.null ?? 0 };
      // The same construction as a daemon's `{"type": "blk", ...}` device (daemon/device-factory.ts).
      const { device } = await openDevice({
        id: 'blk',
        type: 'blk',
        socket: socketPath,
        ...storage,
        readOnly: opts.readOnly,
        queues: opts.queues,
        queueSize: opts.queueSize,
        serial: opts.serial,
        io: opts.io,
        memSlots: opts.memSlots,
      }, { logLevel: opts.logLevel, ...(opts.completionDelayMs !== undefined ? { completionDelayMs: opts.completionDelayMs } : {}) });
      await serveUntilStopped(device, opts, log, { capacity: device.capacityBytes, queues: device.numQueues, readOnly: device.readOnly });
      log.flush();
    });
}
