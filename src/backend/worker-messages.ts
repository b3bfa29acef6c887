/**
 * Messages between the control thread and the queue workers of a pool.
 *
 * A busy worker does not run its event loop, so every command travels as a message on the worker's MessagePort
 * plus a write to the worker's control eventfd; the worker, blocked in poll() or between batches, sees the eventfd
 * and drains its port synchronously (receiveMessageOnPort). Every command carries an `id` and is acknowledged
 * with a `WorkerReply` of the same id once it has taken effect. A worker serves queues of many sessions (one per
 * connected frontend): every session-scoped command names its session.
 */
import type { MessagePort } from 'node:worker_threads';
import type { WorkerSyncMode } from './sync-block.js';
import type { InflightGeometry } from './inflight-region.js';
import type { InflightRecovered } from './queue-inflight.js';

/** A region as a worker needs it: the mapping is shared (SharedArrayBuffer), not copied. */
export interface WorkerRegion {
  gpa: number;
  size: number;
  uva: number;
  buffer: SharedArrayBuffer;
  bufferOffset: number;
  slot: number;
}

/**
 * Migration: the session's dirty log (SET_LOG_BASE), given to the workers only while logging is on (LOG_ALL
 * negotiated): `size` bytes at `offset` in the mapping. Published with the memory table, through the same grace
 * period (docs/memory-sync.md): once a new log's generation is seen, no worker writes to the old one.
 */
export interface WorkerLog {
  buffer: SharedArrayBuffer;
  offset: number;
  size: number;
}

/** A ring's logging (SET_VRING_ADDR): whether its used ring writes are logged (VHOST_VRING_F_LOG) and where. */
export interface RingLog {
  enabled: boolean;
  /** `log_guest_addr`: the used ring's guest-physical address in the log (split rings). */
  usedAddr: number;
}

/** Everything a worker needs to run one virtqueue. Ring addresses are guest-physical. */
export interface QueueStart {
  index: number;
  size: number;
  /** VIRTIO_F_RING_PACKED: `descAddr` is the ring, `availAddr` / `usedAddr` the driver / device event areas. */
  packed: boolean;
  descAddr: number;
  availAddr: number;
  usedAddr: number;
  /** Where to resume: the avail position of the next request (SET_VRING_BASE; packed: index | wrap << 15). */
  lastAvailIdx: number;
  kickFd: number;
  /** -1: no call eventfd (the driver polls). */
  callFd: number;
  /** -1: no error eventfd. */
  errFd: number;
  eventIdx: boolean;
  indirect: boolean;
  features: bigint;
  /** No inflight region: a split ring whose used.idx differs from `lastAvailIdx` resumes at used.idx. */
  resyncToUsed: boolean;
  /**
   * INFLIGHT_SHMFD: the session's inflight region, whose queue `index` region records what this
   * queue takes; at start, what it says was in flight is taken again first (inflight-region.ts).
   */
  inflight?: { buffer: SharedArrayBuffer; geometry: InflightGeometry };
  ringLog: RingLog;
}

/** Where a queue resumed (the `queue-started` reply). */
export interface QueueStarted {
  index: number;
  /** The avail position it resumed at. */
  base: number;
  /** The position SET_VRING_BASE gave when the queue moved to used.idx instead (`resyncToUsed`), else -1. */
  resyncedFrom: number;
  /** With an inflight region: what its recovery found. */
  inflight?: InflightRecovered;
}

/** What a worker learns of a session the first time it is given one of its queues. */
export interface SessionAttach {
  /** The session's SyncBlock buffer (its generation, what each worker has seen, pins, queue locks). */
  sync: SharedArrayBuffer;
  /** The current memory table. */
  gen: number;
  regions: WorkerRegion[];
  log: WorkerLog | undefined;
  /** The device's worker module (loaded once per worker) and the options its handlers get. */
  deviceModule: string;
  deviceOptions: unknown;
  /** The device's per-queue counters (devices/queue-stats.ts). */
  stats: SharedArrayBuffer;
}

export type WorkerCommand =
  /** A new memory table for generation `gen`. Not acknowledged: control waits for the grace period instead. */
  | { type: 'memory'; id: number; session: number; gen: number; regions: WorkerRegion[]; log: WorkerLog | undefined }
  /** Acknowledged once the device module is loaded. */
  | { type: 'attach'; id: number; session: number; attach: SessionAttach }
  /** Stops the session's queues here (requests in flight are abandoned) and forgets it. */
  | { type: 'detach'; id: number; session: number }
  | { type: 'start-queue'; id: number; session: number; queue: QueueStart }
  | { type: 'set-call'; id: number; session: number; index: number; callFd: number }
  | { type: 'set-err'; id: number; session: number; index: number; errFd: number }
  | { type: 'set-ring-log'; id: number; session: number; index: number; ringLog: RingLog }
  /** SEND_RARP: the queue's handler announces `mac` (`QueueHandler.announce`). */
  | { type: 'announce'; id: number; session: number; index: number; mac: Uint8Array }
  /** Stops a queue once its requests in flight completed, then flushes its device (`QueueHandler.flush`). */
  | { type: 'stop-queue'; id: number; session: number; index: number }
  | { type: 'exit'; id: number };

export type WorkerReply =
  | { type: 'ack'; id: number }
  | { type: 'queue-stopped'; id: number; index: number; lastAvailIdx: number }
  | ({ type: 'queue-started'; id: number } & QueueStarted)
  | { type: 'failed'; id: number; code: string; message: string };

/** Unsolicited events from a worker. `session` -1 and `index` -1: the worker itself failed. */
export type WorkerEvent =
  | { type: 'ready' }
  | { type: 'queue-error'; session: number; index: number; code: string; message: string };

export type WorkerToControl = WorkerReply | WorkerEvent;

/** Options the worker is started with (`workerData`). */
export interface WorkerInit {
  workerId: number;
  controlFd: number;
  /** The pool's PoolBlock buffer (idle flags, epochs, busy time). */
  pool: SharedArrayBuffer;
  mode: WorkerSyncMode;
  /** Busy-poll window (microseconds) before the worker sleeps; 0 = sleep at once (PoolOptions.busyPollUs). */
  busyPollUs: number;
  port: MessagePort;
}
