/**
 * The daemon's metrics in the Prometheus text format (prom-client, a registry of its own). Counters are read at
 * scrape time from where the datapath keeps them, never pushed per request: the per-queue counters are
 * SharedArrayBuffers the workers bump with plain stores (devices/queue-stats.ts), net frames and drops likewise
 * (devices/net/stats.ts), worker busy time lives in the pool's shared block. Only memory-change latency is
 * observed as it happens (once per SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG, on the control thread).
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { QueueCounters } from '../devices/queue-stats.js';
import type { WorkerInfo } from '../backend/worker-pool.js';

/** What a scrape reads of one device. */
export interface DeviceMetricsSnapshot {
  id: string;
  type: string;
  connected: boolean;
  /** Frontends accepted since the device was added. */
  connections: number;
  queues: QueueCounters[];
  /** Net devices: rxFrames, rxBytes, rxDropped, txFrames, txBytes, txErrors, txDropped. */
  net?: Record<string, number>;
}

export interface MetricsSource {
  devices(): DeviceMetricsSnapshot[];
  workers(): WorkerInfo[];
}

const QUEUE_METRICS: readonly { counter: keyof QueueCounters; name: string; help: string }[] = [
  { counter: 'requests', name: 'vhost_user_queue_requests_total', help: 'Requests (descriptor chains) taken from the queue.' },
  { counter: 'bytesRead', name: 'vhost_user_queue_read_bytes_total', help: 'Bytes the device wrote into guest memory (blk: read from the disk).' },
  { counter: 'bytesWritten', name: 'vhost_user_queue_written_bytes_total', help: 'Bytes the device took from guest memory (blk: written to the disk).' },
  { counter: 'errors', name: 'vhost_user_queue_errors_total', help: 'Requests completed with an error status.' },
  { counter: 'malformed', name: 'vhost_user_queue_malformed_chains_total', help: 'Malformed descriptor chains (the queue stops: NEEDS_RESET).' },
  { counter: 'failures', name: 'vhost_user_queue_needs_reset_total', help: 'Times the queue stopped on an error and the device needed a reset.' },
];

const NET_METRICS: readonly { key: string; name: string; help: string; direction: 'rx' | 'tx' }[] = [
  { key: 'rxFrames', name: 'vhost_user_net_frames_total', help: 'Frames to (rx) and from (tx) the guest.', direction: 'rx' },
  { key: 'txFrames', name: 'vhost_user_net_frames_total', help: '', direction: 'tx' },
  { key: 'rxBytes', name: 'vhost_user_net_bytes_total', help: 'Frame bytes to (rx) and from (tx) the guest.', direction: 'rx' },
  { key: 'txBytes', name: 'vhost_user_net_bytes_total', help: '', direction: 'tx' },
  { key: 'rxDropped', name: 'vhost_user_net_dropped_total', help: 'Frames dropped: no guest buffers in time (rx), the port could not take them (tx).', direction: 'rx' },
  { key: 'txDropped', name: 'vhost_user_net_dropped_total', help: '', direction: 'tx' },
  { key: 'txErrors', name: 'vhost_user_net_malformed_frames_total', help: 'Malformed frames from the guest, dropped.', direction: 'tx' },
];

export class DaemonMetrics {
  readonly registry = new Registry();
  readonly #memoryChange: Histogram<'device'>;

  constructor(source: MetricsSource) {
    const r = this.registry;
    const perDevice = (name: string, help: string, value: (d: DeviceMetricsSnapshot) => number, kind: 'counter' | 'gauge'): void => {
      const Type = kind === 'counter' ? Counter : Gauge;
      new Type({
        name,
        help,
        labelNames: ['device', 'type'] as const,
        registers: [r],
        collect() {
          this.reset();
          for (const d of source.devices()) {
            if (this instanceof Counter) this.inc({ device: d.id, type: d.type }, value(d));
            else this.set({ device: d.id, type: d.type }, value(d));
          }
        },
      });
    };
    perDevice('vhost_user_device_frontend_connected', 'Whether a frontend is connected (1) or not (0).', (d) => (d.connected ? 1 : 0), 'gauge');
    perDevice('vhost_user_device_connections_total', 'Frontends accepted since the device was added.', (d) => d.connections, 'counter');
    perDevice('vhost_user_device_reconnects_total', 'Frontends accepted after the first one.', (d) => Math.max(0, d.connections - 1), 'counter');

    for (const m of QUEUE_METRICS) {
      new Counter({
        name: m.name,
        help: m.help,
        labelNames: ['device', 'queue'] as const,
        registers: [r],
        collect() {
          this.reset();
          for (const d of source.devices()) d.queues.forEach((q, i) => this.inc({ device: d.id, queue: String(i) }, q[m.counter]));
        },
      });
    }

    const netNames = [...new Set(NET_METRICS.map((m) => m.name))];
    for (const name of netNames) {
      const parts = NET_METRICS.filter((m) => m.name === name);
      new Counter({
        name,
        help: parts.map((p) => p.help).join(' '),
        labelNames: ['device', 'direction'] as const,
        registers: [r],
        collect() {
          this.reset();
          for (const d of source.devices()) {
            if (d.net === undefined) continue;
            for (const p of parts) this.inc({ device: d.id, direction: p.direction }, d.net[p.key] ?? 0);
          }
        },
      });
    }

    new Gauge({
      name: 'vhost_user_devices',
      help: 'Devices served by the daemon.',
      registers: [r],
      collect() {
        this.set(source.devices().length);
      },
    });
    new Counter({
      name: 'vhost_user_worker_busy_seconds_total',
      help: 'Time each pool worker spent outside poll() (processing queues).',
      labelNames: ['worker'] as const,
      registers: [r],
      collect() {
        this.reset();
        for (const w of source.workers()) this.inc({ worker: String(w.id) }, w.busyMs / 1000);
      },
    });
    new Gauge({
      name: 'vhost_user_worker_queue_groups',
      help: 'Queue groups (a queue, or a net queue pair) placed on each pool worker.',
      labelNames: ['worker'] as const,
      registers: [r],
      collect() {
        this.reset();
        for (const w of source.workers()) this.set({ worker: String(w.id) }, w.queueGroups);
      },
    });
    this.#memoryChange = new Histogram({
      name: 'vhost_user_memory_change_seconds',
      help: 'Memory-table changes (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG): from arrival to reply, grace period included.',
      labelNames: ['device'] as const,
      buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5],
      registers: [r],
    });
  }

  observeMemoryChange(device: string, durationMs: number): void {
    this.#memoryChange.observe({ device }, durationMs / 1000);
  }

  /** Drops what is kept per device (a removed device). */
  forget(device: string): void {
    this.#memoryChange.remove({ device });
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  async text(): Promise<string> {
    return this.registry.metrics();
  }
}
