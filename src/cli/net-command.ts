/** `vhost-user net` and `vhost-user switch`: virtio-net backends on unix sockets. */
import { Command } from 'commander';
import { VhostUserServer } from '../backend/server.js';
import { WorkerPool } from '../backend/worker-pool.js';
import { createDevice } from '../daemon/device-factory.js';
import { MAX_QUEUE_PAIRS, NetDevice } from '../devices/net/net-device.js';
import { MAX_FRAME, MIN_FRAME } from '../devices/net/constants.js';
import { MAX_SWITCH_PORTS, SwitchFabric } from '../devices/net/ports/switch.js';
import { createLogger } from './logger.js';
import { parseInteger, parsePort } from './parse.js';
import {
  addEndpointOptions,
  addServerOptions,
  endpoint,
  serveUntilStopped,
  stopSignal,
  type EndpointCliOptions,
  type ServerCliOptions,
} from './server-options.js';

interface NetOptions extends ServerCliOptions, EndpointCliOptions {
  /** Validated by parsePort, kept as text (the daemon config's form). */
  port: string;
  queues: number;
  mac?: string;
  queueSize: number;
  frameLen: number;
}

export function netCommand(): Command {
  const command = new Command('net')
    .description(
      'Serve a virtio-net device over vhost-user. Listens on --socket; the VMM connects as a client (QEMU: -chardev ' +
        'socket,id=c0,path=SOCK -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0, with shared ' +
        'memfd guest memory; DPDK: --vdev net_virtio_user0,path=SOCK). With --connect it connects to the VMM instead. ' +
        'Frames go to --port. SIGINT/SIGTERM: frames in flight complete, then it exits (status 0) after logging the counters.',
    );
  addEndpointOptions(command)
    .requiredOption(
      '--port <port>',
      'where frames go: loopback (echo), sink (drop), source (generate; check what comes back), tap:NAME (a new TAP device)',
      (value: string) => (parsePort(value), value),
    )
    .option('--queues <n>', 'queue pairs (VIRTIO_NET_F_MQ when > 1)', parseInteger(1, MAX_QUEUE_PAIRS), 1)
    .option('--mac <mac>', 'MAC address in the config space (and the source port\'s frames)')
    .option('--queue-size <n>', 'largest queue size the driver may use (power of two, up to 32768)', parseInteger(2, 32768), 1024)
    .option('--frame-len <bytes>', `length of the source port's frames (${MIN_FRAME}..${MAX_FRAME})`, parseInteger(MIN_FRAME, MAX_FRAME), 64);
  return addServerOptions(command, 'worker threads (default: one per queue pair)').action(async (opts: NetOptions) => {
    const log = createLogger(opts.logLevel);
    const { socketPath } = endpoint(opts);
    // The same construction as a daemon's `{"type": "net", ...}` device (daemon/device-factory.ts).
    const net = createDevice({
      id: 'net',
      type: 'net',
      socket: socketPath,
      port: opts.port,
      queues: opts.queues,
      queueSize: opts.queueSize,
      frameLen: opts.frameLen,
      memSlots: opts.memSlots,
      ...(opts.mac !== undefined ? { mac: opts.mac } : {}),
    });
    const device = net.device;
    try {
      await serveUntilStopped(device, opts, log, { port: opts.port, queuePairs: opts.queues });
    } finally {
      device.close();
    }
    log.info({ stats: device.stats() }, 'net stats');
    log.flush();
  });
}

interface SwitchOptions extends ServerCliOptions {
  socket: string[];
  queueSize: number;
}

export function switchCommand(): Command {
  const command = new Command('switch')
    .description(
      'A learning Ethernet switch between VMs: one vhost-user-net device per --socket (one queue pair each), frames ' +
        'forwarded by destination MAC, broadcast and unknown destinations flooded. SIGINT/SIGTERM exit cleanly.',
    )
    .requiredOption(
      '--socket <path>',
      `a unix socket to listen on for one VM (repeat for each port, 2..${MAX_SWITCH_PORTS})`,
      (value: string, previous: string[] | undefined) => [...(previous ?? []), value],
    )
    .option('--queue-size <n>', 'largest queue size the drivers may use (power of two, up to 32768)', parseInteger(2, 32768), 1024);
  return addServerOptions(command, 'worker threads shared by the ports (default: one per port)').action(async (opts: SwitchOptions) => {
    const log = createLogger(opts.logLevel);
    if (opts.socket.length < 2 || opts.socket.length > MAX_SWITCH_PORTS) {
      throw new Error(`a switch needs 2..${MAX_SWITCH_PORTS} --socket options`);
    }
    const fabric = new SwitchFabric(opts.socket.length);
    const devices = opts.socket.map(
      (_, index) => new NetDevice({ port: { kind: 'switch', fabric, index }, maxQueueSize: opts.queueSize }),
    );
    // One pool for every port, as in the daemon: a port's queue pair goes to the least-loaded worker.
    const pool = new WorkerPool({ threads: opts.workers ?? devices.length, sync: opts.sync, busyPollUs: opts.busyPoll });
    const servers = opts.socket.map(
      (socketPath, i) =>
        new VhostUserServer({ socketPath, device: devices[i] as NetDevice, logger: log.child({ switchPort: i }), pool, memSlots: opts.memSlots }),
    );
    try {
      for (const s of servers) s.listen();
      log.info({ ports: servers.length, threads: pool.size }, 'vhost-user switch ready');
      await stopSignal(log);
      await Promise.all(servers.map((s) => s.close()));
    } finally {
      await pool.stop();
      fabric.close();
    }
    log.info({ ports: devices.map((d) => d.stats()) }, 'switch stats');
    log.flush();
  });
}
