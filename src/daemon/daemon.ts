/**
 * `vhost-user serve`: one process serving many vhost-user devices from a fixed pool of worker threads. Each device
 * has its own socket, server and (while a frontend is connected) session; all of them lease queues on the one
 * `WorkerPool`. Devices come and go at runtime (`add`, `remove`: the management API's PUT and DELETE), and every
 * log line of a device carries its id (a child logger, with the device's own level if its config sets one).
 */
import { availableParallelism } from 'node:os';
import { resolve } from 'node:path';
import type { Logger } from 'pino';
import { VhostError } from '../errors.js';
import { VhostUserServer } from '../backend/server.js';
import type { SyncMode } from '../backend/sync-block.js';
import { WorkerPool } from '../backend/worker-pool.js';
import { readQueueStats } from '../devices/queue-stats.js';
import type { DeviceConfig } from './config.js';
import type { DaemonControl, DeviceInfo, QueueInfo } from './control.js';
import { openDevice, type ConfiguredDevice } from './device-factory.js';
import { DaemonMetrics, type DeviceMetricsSnapshot } from './metrics.js';

export interface DaemonOptions {
  /** Worker threads of the pool (default: the number of CPUs, at most 64). */
  threads?: number;
  sync?: SyncMode;
  /** Busy-poll window of the workers, microseconds (PoolOptions.busyPollUs). */
  busyPollUs?: number;
  logger: Logger;
}

interface ManagedDevice {
  readonly config: DeviceConfig;
  readonly configured: ConfiguredDevice;
  readonly server: VhostUserServer;
  removing: boolean;
}

const hex = (v: bigint): string => `0x${v.toString(16)}`;

export class Daemon implements DaemonControl {
  readonly pool: WorkerPool;
  readonly #log: Logger;
  readonly #devices = new Map<string, ManagedDevice>();
  readonly #metrics: DaemonMetrics;
  #closed = false;

  constructor(options: DaemonOptions) {
    this.#log = options.logger;
    this.pool = new WorkerPool({
      threads: options.threads ?? Math.min(availableParallelism(), 64),
      ...(options.sync !== undefined ? { sync: options.sync } : {}),
      ...(options.busyPollUs !== undefined ? { busyPollUs: options.busyPollUs } : {}),
    });
    this.#metrics = new DaemonMetrics({ devices: () => this.#metricsSnapshot(), workers: () => this.pool.workers() });
  }

  /** Starts the devices of a config file; if one fails, the ones started are removed again and the error thrown. */
  async start(devices: readonly DeviceConfig[]): Promise<void> {
    try {
      for (const config of devices) await this.add(config);
    } catch (err) {
      await Promise.allSettled([...this.#devices.keys()].map((id) => this.remove(id)));
      throw err;
    }
  }

  async add(config: DeviceConfig): Promise<DeviceInfo> {
    if (this.#closed) throw new VhostError('VHOST_DAEMON_CLOSED', 'the daemon is stopping');
    await this.pool.ready(); // a thread that failed to start fails the first device, not a later frontend
    if (this.#devices.has(config.id)) throw new VhostError('VHOST_DEVICE_EXISTS', `device ${config.id} exists`);
    const socket = resolve(config.socket);
    for (const [id, d] of this.#devices) {
      if (resolve(d.config.socket) === socket) throw new VhostError('VHOST_SOCKET_IN_USE', `${config.socket} is the socket of device ${id}`);
    }
    const log = this.#log.child({ device: config.id }, config.logLevel !== undefined ? { level: config.logLevel } : {});
    const configured = await openDevice(config, { logLevel: log.level });
    const server = new VhostUserServer({
      socketPath: config.socket,
      device: configured.device,
      logger: log,
      pool: this.pool,
      memSlots: config.memSlots,
      onMemoryChange: (ms) => this.#metrics.observeMemoryChange(config.id, ms),
    });
    try {
      server.listen();
    } catch (err) {
      configured.close();
      throw err;
    }
    const managed: ManagedDevice = { config, configured, server, removing: false };
    this.#devices.set(config.id, managed);
    log.info({ type: config.type, socket: config.socket }, 'device added');
    return this.#info(managed);
  }

  async remove(id: string): Promise<boolean> {
    const d = this.#devices.get(id);
    if (d === undefined || d.removing) return d !== undefined;
    d.removing = true;
    try {
      await d.server.close(); // a connected frontend is disconnected and its session released first
    } finally {
      d.configured.close();
      this.#devices.delete(id);
      this.#metrics.forget(id);
    }
    this.#log.info({ device: id }, 'device removed');
    return true;
  }

  list(): DeviceInfo[] {
    return [...this.#devices.values()].map((d) => this.#info(d));
  }

  get(id: string): DeviceInfo | undefined {
    const d = this.#devices.get(id);
    return d === undefined ? undefined : this.#info(d);
  }

  async metrics(): Promise<string> {
    return this.#metrics.text();
  }

  get metricsContentType(): string {
    return this.#metrics.contentType;
  }

  /** Removes every device (disconnecting their frontends), then stops the pool. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await Promise.allSettled([...this.#devices.keys()].map((id) => this.remove(id)));
    await this.pool.stop();
  }

  #info(d: ManagedDevice): DeviceInfo {
    const { server, config } = d;
    const snap = server.session?.snapshot();
    const connections = server.connections;
    const queues: QueueInfo[] = [];
    for (let index = 0; index < server.device.numQueues; index++) {
      const q = snap?.queues[index];
      queues.push({
        index,
        started: q?.started ?? false,
        failed: q?.failed ?? false,
        worker: q?.worker ?? -1,
        ...readQueueStats(server.queueStats, index),
      });
    }
    const stats = d.configured.stats?.();
    return {
      id: config.id,
      type: config.type,
      config,
      state: d.removing ? 'removing' : snap !== undefined ? 'connected' : 'listening',
      frontend: {
        connected: snap !== undefined,
        ...(connections.connectedSince !== undefined ? { connectedSince: connections.connectedSince.toISOString() } : {}),
        reconnects: Math.max(0, connections.total - 1),
      },
      features: {
        offered: hex(snap?.offeredFeatures ?? 0n),
        negotiated: hex(snap?.features ?? 0n),
        protocol: hex(snap?.protocolFeatures ?? 0n),
      },
      needsReset: snap?.needsReset ?? false,
      memory: { regions: snap?.memory.regions ?? 0, bytes: snap?.memory.bytes ?? 0, changes: snap?.memoryChanges ?? 0 },
      queues,
      ...(stats !== undefined ? { stats } : {}),
    };
  }

  #metricsSnapshot(): DeviceMetricsSnapshot[] {
    return [...this.#devices.values()].map((d) => {
      const queues = [];
      for (let i = 0; i < d.server.device.numQueues; i++) queues.push(readQueueStats(d.server.queueStats, i));
      const net = d.configured.stats?.();
      return {
        id: d.config.id,
        type: d.config.type,
        connected: d.server.session !== undefined,
        connections: d.server.connections.total,
        queues,
        ...(net !== undefined ? { net } : {}),
      };
    });
  }
}
