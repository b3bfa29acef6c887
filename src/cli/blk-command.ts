/** `vhost-user blk`: serve a raw image (or a null device) as a vhost-user-blk backend on a unix socket. */
import { Command, Option } from 'commander';
import { createDevice } from '../daemon/device-factory.js';
import { createLogger } from './logger.js';
import { parseInteger, parseSize } from './parse.js';
import { addEndpointOptions, addServerOptions, endpoint, serveUntilStopped, type EndpointCliOptions, type ServerCliOptions } from './server-options.js';

interface BlkOptions extends ServerCliOptions, EndpointCliOptions {
  image?: string;
  null?: number;
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
      if ((opts.image === undefined) === (opts.null === undefined)) {
        throw new Error('give exactly one of --image FILE or --null SIZE');
      }
      // The same construction as a daemon's `{"type": "blk", ...}` device (daemon/device-factory.ts).
      const { device } = createDevice({
        id: 'blk',
        type: 'blk',
        socket: socketPath,
        ...(opts.image !== undefined ? { image: opts.image } : { null: opts.null ?? 0 }),
        readOnly: opts.readOnly,
        queues: opts.queues,
        queueSize: opts.queueSize,
        serial: opts.serial,
        io: opts.io,
        memSlots: opts.memSlots,
      }, opts.completionDelayMs !== undefined ? { completionDelayMs: opts.completionDelayMs } : {});
      await serveUntilStopped(device, opts, log, { capacity: device.capacityBytes, queues: device.numQueues, readOnly: opts.readOnly });
      log.flush();
    });
}
