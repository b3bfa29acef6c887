/**
 * What a device implements to be served by the vhost-user backend. A device has two halves:
 * - the control half (`VirtioDevice`), on the main thread: features, config space, queue count;
 * - the queue half (`QueueHandler`), in worker threads: it turns descriptor chains into completed requests.
 *
 * Worker threads cannot share JS objects with the main thread, so the queue half is named by a module URL and
 * created in each worker from plain (structured-cloneable) options: see `DeviceWorkerModule`.
 */
import type { GuestMemory } from '../memory/guest-memory.js';
import type { DescriptorChain } from '../queue/descriptor-chain.js';
import type { DeviceQueue } from '../queue/device-queue.js';

export interface VirtioDevice {
  /** A short name for logs ("blk"). */
  readonly name: string;
  /** The virtio device ID (2 for block). */
  readonly deviceId: number;
  /** Number of virtqueues the device offers (vhost-user GET_QUEUE_NUM). */
  readonly numQueues: number;
  /** Largest queue size accepted (SET_VRING_NUM above it is refused). */
  readonly maxQueueSize: number;
  /** Device-specific feature bits offered (the backend adds the transport bits it supports). */
  readonly features: bigint;
  /** The device's configuration space (read by GET_CONFIG). */
  configSpace(): Uint8Array;
  /** A driver write to the configuration space (SET_CONFIG); throw a ProtocolError to refuse it. */
  writeConfig(offset: number, data: Uint8Array): void;
  /** The module that every worker loads to process this device's queues, and the options it gets. */
  readonly worker: { readonly module: string; readonly options: unknown };
  /**
   * Queues that must share a worker thread, as runs of this many consecutive queues (default 1). virtio-net says 2:
   * a receive queue and its transmit queue form a pair, and a port that loops frames back (or reads a TAP queue)
   * serves both from one thread.
   */
  readonly queuesPerWorker?: number;
  /**
   * What GET_QUEUE_NUM answers (default `numQueues`). vhost-user-net answers queue pairs: QEMU's net code compares it
   * with its `queues=` (pairs), as DPDK's vhost library expects.
   */
  readonly vhostQueueNum?: number;
  /**
   * Offer VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (default false): the worker records what each queue took and
   * completed, so that requests in flight survive a backend restart. For devices whose queues the driver fills and
   * the device completes once per request (blk); not for queues whose chains may be given back (`unpop`, net RX).
   */
  readonly inflightTracking?: boolean;
  /**
   * The queue whose handler announces the guest's MAC address (`QueueHandler.announce`) when the frontend asks with
   * VHOST_USER_SEND_RARP after a migration; set, the protocol feature RARP is offered (virtio-net: its first
   * transmit queue).
   */
  readonly announceQueue?: number;
}

/** Per-queue context handed to `createQueueHandler`. */
export interface QueueContext {
  readonly queueIndex: number;
  /** Features the driver acknowledged (SET_FEATURES). */
  readonly features: bigint;
  /**
   * Identifies the device's connection within the worker pool: a worker serves the queues of many devices, so state
   * a handler shares with the other queues of its device in the same worker (net: a pair's port) is keyed by it.
   */
  readonly instance: number;
  /**
   * This queue's counters (queue-stats.ts), single writer: this queue's worker. The worker counts requests and
   * malformed chains; the handler adds `bytesRead`, `bytesWritten` and `errors` (`QueueStat` indices).
   */
  readonly stats: Float64Array;
}

/** `QueueHandler.process` result: the request completes later, through `reap`. */
export const PENDING = -1;

/** The queue half of a device: runs in a worker thread, one per virtqueue. */
export interface QueueHandler {
  /**
   * Handles one request. Returns the number of bytes written into the chain's writable part (the used length), or
   * `PENDING` when another thread completes it later (the worker then pins the memory regions the chain uses until
   * `reap` reports it; `chain` is reused after this call, so copy what the completion needs).
   * A malformed request that the device can still answer gets an error status from the device itself; a chain the
   * device cannot answer at all throws a `VirtioError` (the queue stops and the device needs reset).
   */
  process(mem: GuestMemory, chain: DescriptorChain): number;
  /**
   * Called after each batch of `process` calls (and when a batch ends early on an error): a handler that hands
   * requests to another thread sends them now, together, instead of one message per request.
   */
  endBatch?(): void;
  /** For handlers that return `PENDING`: an eventfd that becomes readable when `reap` has completions. */
  readonly completionFd?: number | undefined;
  /** Reports finished requests (chain head, used length). The other thread no longer touches their memory. */
  reap?(complete: (head: number, len: number) => void): void;
  /**
   * Bytes at the very end of a chain's writable part that each completion writes and counts in its used length,
   * besides what it writes from the part's start (blk: 1, the status byte; default 0). While a migration logs dirty
   * pages the worker marks, for a used length `len`, the first `len - trailingStatusBytes` writable bytes and the last
   * `trailingStatusBytes` (queue/written-buffers.ts): a device that writes anywhere else must say so here.
   */
  readonly trailingStatusBytes?: number;
  /**
   * Called when the queue stops gracefully (GET_VRING_BASE, a disabled ring), after every request it took has
   * completed: make what was completed durable (blk: fdatasync), since a migration's destination reads it next.
   */
  flush?(): void;
  /** For the device's `announceQueue`: sends a frame that announces `mac` (6 bytes) to the network. */
  announce?(mac: Uint8Array): void;
  /** Set for device-to-driver queues: the worker then calls the producer instead of `process`. */
  readonly producer?: QueueProducer | undefined;
  /** Releases what the handler holds (files, threads). Requests still pending are abandoned. */
  close(): void;
}

/** `QueueProducer.produce` results. */
export const ProduceResult = {
  /** No input is waiting: the queue sleeps until its input fd, `hasInput` or a kick says otherwise. */
  IDLE: 0,
  /** Input is waiting but the ring has no buffers: the queue sleeps until the driver kicks (adds buffers). */
  STARVED: 1,
  /** The work limit was hit with input and buffers left: the worker comes back after its other queues. */
  BUDGET: 2,
} as const;
export type ProduceResult = (typeof ProduceResult)[keyof typeof ProduceResult];

/**
 * The device side of a device-to-driver queue (virtio-net receive): data that comes from elsewhere (a TAP device,
 * another thread, the transmit queue of the same pair) is written into buffers the driver made available. The
 * worker calls `produce` when there may be input and the ring may have buffers; kicks only mean "buffers added".
 */
export interface QueueProducer {
  /** Readable when new input may be waiting (a TAP fd, an eventfd another thread writes); polled while not starved. */
  readonly inputFd: number | undefined;
  /** Whether input is waiting that this thread can deliver now; called on every loop, so it makes no syscall. */
  hasInput(): boolean;
  /**
   * Delivers input: pops chains from `queue`, writes them, and completes them with `queue.pushUsed` (the worker
   * publishes). Delivers at most `budget` units of input (frames) before returning BUDGET.
   */
  produce(mem: GuestMemory, queue: DeviceQueue, budget: number): ProduceResult;
}

/** The shape of a device's worker module (`VirtioDevice.worker.module`). */
export interface DeviceWorkerModule {
  createQueueHandler(options: unknown, context: QueueContext): QueueHandler;
}
