/** `vhost-user blk`: serve a raw image (or a null device) as a vhost-user-blk backend on a unix socket. */
import { Command, Option } from 'commander';
import { VhostUserServer } from '../backend/server.js';
import { BlkDevice } from '../devices/blk/blk-device.js';
import { SYNC_MODES, type SyncMode } from '../backend/sync-block.js';
import { createLogger } from './logger.js';
import { parseInteger, parseSize } from './parse.js';

interface BlkOptions {
  socket: string;
  image?: string;
  null?: number;
  readOnly: boolean;
  queues: number;
  queueSize: number;
  workers?: number;
  sync: SyncMode;
  io: 'sync' | 'async';
  memSlots: number;
  serial: string;
  logLevel: string;
}

export function blkCommand(): Command {
  return new Command('blk')
    .description(
      'Serve a virtio-blk device over vhost-user. Listens on --socket; the VMM connects as a client (QEMU: ' +
        '-chardev socket,id=c0,path=SOCK -device vhost-user-blk-pci,chardev=c0, with shared memfd guest memory). ' +
        'Serves one frontend at a time and listens again when it leaves. SIGINT/SIGTERM exit cleanly (status 0).',
    )
    .requiredOption('--socket <path>', 'unix socket path to listen on (a stale socket file is replaced)')
    .option('--image <file>', 'raw disk image to serve (its size, rounded down to 512 bytes, is the capacity)')
    .option('--null <size>', 'serve a null device of this size instead (e.g. 1G): requests complete without data', parseSize)
    .option('--read-only', 'offer VIRTIO_BLK_F_RO and refuse writes', false)
    .option('--queues <n>', 'number of request queues (VIRTIO_BLK_F_MQ when > 1)', parseInteger(1, 64), 1)
    .option('--queue-size <n>', 'largest queue size the driver may use (power of two, up to 32768)', parseInteger(1, 32768), 1024)
    .option('--workers <n>', 'worker threads for the queues (default: one per queue)', parseInteger(1, 64))
    .addOption(
      new Option('--sync <mode>', 'how workers are kept off memory being removed (docs/memory-sync.md)')
        .choices(SYNC_MODES)
        .default('qsbr'),
    )
    .addOption(
      new Option('--io <mode>', 'run reads and writes in the queue worker (sync) or in an I/O thread per queue (async)')
        .choices(['sync', 'async'])
        .default('sync'),
    )
    .option(
      '--mem-slots <n>',
      'memory slots offered to the frontend; 0 = do not offer CONFIGURE_MEM_SLOTS (the frontend sends whole tables)',
      parseInteger(0, 509),
      509,
    )
    .option('--serial <id>', 'device serial returned by GET_ID (up to 20 bytes)', 'vhost-user-ts')
    .option('--log-level <level>', 'fatal, error, warn, info, debug or trace', 'info')
    .action(async (opts: BlkOptions) => {
      const log = createLogger(opts.logLevel);
      if ((opts.image === undefined) === (opts.null === undefined)) {
        throw new Error('give exactly one of --image FILE or --null SIZE');
      }
      const device = new BlkDevice({
        backend: opts.image !== undefined ? { kind: 'file', path: opts.image } : { kind: 'null', size: opts.null ?? 0 },
        readOnly: opts.readOnly,
        queues: opts.queues,
        maxQueueSize: opts.queueSize,
        serial: opts.serial,
        io: opts.io,
      });
      const server = new VhostUserServer({
        socketPath: opts.socket,
        device,
        logger: log,
        sync: opts.sync,
        memSlots: opts.memSlots,
        ...(opts.workers !== undefined ? { workers: opts.workers } : {}),
      });
      server.listen();
      log.info({ capacity: device.capacityBytes, queues: device.numQueues, readOnly: opts.readOnly }, 'vhost-user-blk ready');
      await new Promise<void>((resolve) => {
        const stop = (signal: string): void => {
          log.info({ signal }, 'stopping');
          resolve();
        };
        process.once('SIGINT', stop);
        process.once('SIGTERM', stop);
      });
      await server.close();
      log.flush();
    });
}
