/**
 * `vhost-user vsock`: serve a virtio-vsock device (stream sockets between the guest and this host) as a vhost-user
 * backend, with the hybrid unix-socket convention of Firecracker, Cloud Hypervisor and vhost-device-vsock.
 */
import { Command } from 'commander';
import { openDevice } from '../daemon/device-factory.js';
import { createLogger } from './logger.js';
import { parseInteger } from './parse.js';
import { addEndpointOptions, addServerOptions, endpoint, serveUntilStopped, type EndpointCliOptions, type ServerCliOptions } from './server-options.js';

interface VsockOptions extends ServerCliOptions, EndpointCliOptions {
  guestCid: number;
  udsPath: string;
  queueSize: number;
}

export function vsockCommand(): Command {
  const command = new Command('vsock').description(
    'Serve a virtio-vsock device over vhost-user (QEMU: -chardev socket,id=v0,path=SOCK -device ' +
      'vhost-user-vsock-pci,chardev=v0). A guest connecting to host port P (CID 2) reaches the unix socket ' +
      'UDS_PATH_P; a host program connects to UDS_PATH, writes "CONNECT <guest port>\\n", reads "OK <host port>\\n" ' +
      'and then talks to the guest. Listens on --socket, or connects with --connect. SIGINT/SIGTERM: exits (status 0).',
  );
  addEndpointOptions(command)
    .requiredOption('--guest-cid <n>', "the guest's context ID (3..4294967294)", parseInteger(3, 0xffff_fffe))
    .requiredOption('--uds-path <path>', 'the unix socket host programs connect to; guest connections to port P go to PATH_P')
    .option('--queue-size <n>', 'largest queue size the driver may use (power of two, up to 32768)', parseInteger(1, 32768), 256);
  return addServerOptions(command, 'worker threads (default: one)').action(async (opts: VsockOptions) => {
    const log = createLogger(opts.logLevel);
    // The same construction as a daemon's `{"type": "vsock", ...}` device (daemon/device-factory.ts).
    const { device } = await openDevice({
      id: 'vsock',
      type: 'vsock',
      socket: endpoint(opts).socketPath,
      guestCid: opts.guestCid,
      udsPath: opts.udsPath,
      queueSize: opts.queueSize,
      memSlots: opts.memSlots,
    });
    try {
      await serveUntilStopped(device, opts, log, { guestCid: opts.guestCid, udsPath: opts.udsPath });
      log.info({ stats: device.stats() }, 'vsock stats');
    } finally {
      device.close();
    }
    log.flush();
  });
}
