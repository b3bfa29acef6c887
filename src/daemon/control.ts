/**
 * What the management API (api-server.ts) needs from the daemon: the contract between `Daemon` (daemon.ts) and the
 * HTTP layer, so each can be read (and tested) without the other.
 */
import type { DeviceConfig } from './config.js';

/** Counters of one virtqueue (queue-stats.ts), as the API reports them. */
export interface QueueInfo {
  index: number;
  /** Running in a worker now. */
  started: boolean;
  /** Stopped by a guest error until the device is reset. */
  failed: boolean;
  /** The pool worker that serves it. */
  worker: number;
  requests: number;
  bytesRead: number;
  bytesWritten: number;
  /** Requests completed with an error status (blk: IOERR / UNSUPP). */
  errors: number;
  /** Malformed chains (each stops its queue: NEEDS_RESET). */
  malformed: number;
  /** Times the queue stopped on any error (NEEDS_RESET). */
  failures: number;
}

export interface DeviceInfo {
  id: string;
  type: DeviceConfig['type'];
  /** The device's configuration as it was given (normalized: defaults filled in). */
  config: DeviceConfig;
  /** listening: no frontend; connected: a frontend is attached; removing: DELETE in progress. */
  state: 'listening' | 'connected' | 'removing';
  frontend: { connected: boolean; connectedSince?: string; reconnects: number };
  /** Hex strings ("0x..."), as negotiated with the connected frontend (0x0 when none). */
  features: { offered: string; negotiated: string; protocol: string };
  needsReset: boolean;
  memory: { regions: number; bytes: number; changes: number };
  queues: QueueInfo[];
  /** Device-specific counters (net: frames and drops each way). */
  stats?: Record<string, number>;
}

/** The daemon as the API sees it. Errors are `VhostError`s; their `code` selects the HTTP status (api-server.ts). */
export interface DaemonControl {
  list(): DeviceInfo[];
  /** undefined: no such device. */
  get(id: string): DeviceInfo | undefined;
  /**
   * Adds and starts a device (its socket listens when this resolves). Codes: VHOST_DEVICE_EXISTS (the id is taken),
   * VHOST_SOCKET_IN_USE (the socket path is another device's, or an existing non-socket file, or a live socket),
   * VHOST_SOCKET_UNAVAILABLE (cannot be created there), VHOST_CONFIG_INVALID, device option codes
   * (VHOST_BLK_BAD_OPTION, VHOST_NET_BAD_OPTION, ...), or Node's system error codes (ENOENT for a missing image).
   */
  add(config: DeviceConfig): Promise<DeviceInfo>;
  /** Disconnects a connected frontend cleanly, stops listening, releases everything. false: no such device. */
  remove(id: string): Promise<boolean>;
  /** The Prometheus text exposition of every metric. */
  metrics(): Promise<string>;
  readonly metricsContentType: string;
}
