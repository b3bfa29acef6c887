/** `vhost-user rng`: serve a virtio-rng device (entropy from the system's CSPRNG) as a vhost-user backend. */
import { Command } from 'commander';
import { MAX_RNG_BYTES_PER_REQUEST } from '../daemon/config.js';
import { RngDevice } from '../devices/rng/rng-device.js';
import { createLogger } from './logger.js';
import { parseInteger } from './parse.js';
import { addEndpointOptions, addServerOptions, serveUntilStopped, type EndpointCliOptions, type ServerCliOptions } from './server-options.js';

interface RngOptions extends ServerCliOptions, EndpointCliOptions {
  maxBytes: number;
}

export function rngCommand(): Command {
  const command = new Command('rng').description(
    'Serve a virtio-rng device over vhost-user: every buffer the guest makes available is filled from the ' +
      "system's CSPRNG (QEMU: -chardev socket,id=r0,path=SOCK -device vhost-user-rng-pci,chardev=r0; the guest " +
      'reads /dev/hwrng). Listens on --socket, or connects with --connect. SIGINT/SIGTERM: exits (status 0).',
  );
  addEndpointOptions(command).option('--max-bytes <n>', 'most bytes given per request', parseInteger(1, MAX_RNG_BYTES_PER_REQUEST), 65536);
  return addServerOptions(command, 'worker threads for the queue (default: one)').action(async (opts: RngOptions) => {
    const log = createLogger(opts.logLevel);
    await serveUntilStopped(new RngDevice({ maxBytesPerRequest: opts.maxBytes }), opts, log, { maxBytesPerRequest: opts.maxBytes });
    log.flush();
  });
}
