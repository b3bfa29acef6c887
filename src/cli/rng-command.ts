/** `vhost-user rng`: serve a virtio-rng device (entropy from the system's CSPRNG) as a vhost-user backend. */
import { Command } from 'commander';
import { MAX_RNG_BYTES_PER_REQUEST, MAX_RNG_RATE_PERIOD_MS } from '../daemon/config.js';
import { RngDevice } from '../devices/rng/rng-device.js';
import { createLogger } from './logger.js';
import { parseInteger } from './parse.js';
import { addEndpointOptions, addServerOptions, serveUntilStopped, type EndpointCliOptions, type ServerCliOptions } from './server-options.js';

interface RngOptions extends ServerCliOptions, EndpointCliOptions {
  maxBytes: number;
  rateBytes?: number;
  ratePeriod: number;
}

export function rngCommand(): Command {
  const command = new Command('rng').description(
    'Serve a virtio-rng device over vhost-user: every buffer the guest makes available is filled from the ' +
      "system's CSPRNG (QEMU: -chardev socket,id=r0,path=SOCK -device vhost-user-rng-pci,chardev=r0; the guest " +
      'reads /dev/hwrng). Listens on --socket, or connects with --connect. SIGINT/SIGTERM: exits (status 0).',
  );
  addEndpointOptions(command)
    .option('--max-bytes <n>', 'most bytes given per request', parseInteger(1, MAX_RNG_BYTES_PER_REQUEST), 65536)
    .option('--rate-bytes <n>', 'rate limit: at most this many bytes per --rate-period (QEMU\'s max-bytes); requests beyond wait', parseInteger(1, 2 ** 31))
    .option('--rate-period <ms>', 'the rate limit\'s period in milliseconds (QEMU\'s period)', parseInteger(1, MAX_RNG_RATE_PERIOD_MS), 1000);
  return addServerOptions(command, 'worker threads for the queue (default: one)').action(async (opts: RngOptions) => {
    const log = createLogger(opts.logLevel);
    const rateLimit = opts.rateBytes !== undefined ? { bytes: opts.rateBytes, periodMs: opts.ratePeriod } : undefined;
    const device = new RngDevice({ maxBytesPerRequest: opts.maxBytes, ...(rateLimit !== undefined ? { rateLimit } : {}) });
    await serveUntilStopped(device, opts, log, { maxBytesPerRequest: opts.maxBytes, rateLimit: rateLimit ?? 'none' });
    log.flush();
  });
}
