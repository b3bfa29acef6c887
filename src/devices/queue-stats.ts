/**
 * Per-queue counters of a device, shared by the control thread (metrics, the management API) and the queue workers:
 * one row of Float64 counters per virtqueue in a SharedArrayBuffer that the device owns, so the counts survive
 * reconnects and the datapath bumps them with a plain store (no message, no atomic). Each row has a single writer:
 * the worker that runs the queue (the worker loop counts requests and malformed chains, the device's handler bytes
 * and error statuses). Readers may see a row mid-update, which is fine for counters that only grow; Float64 keeps
 * them exact up to 2^53.
 */

export const QUEUE_COUNTERS = [
  /** Chains taken from the ring and handled (completed, failed or pending). */
  'requests',
  /** Bytes the device wrote into guest memory for the driver (blk: data read from the disk). */
  'bytesRead',
  /** Bytes the device took from guest memory (blk: data written to the disk). */
  'bytesWritten',
  /** Requests completed with an error status (blk: IOERR or UNSUPP). */
  'errors',
  /** Malformed chains (a guest error): each stops its queue until the device is reset. */
  'malformed',
  /** Times the queue stopped on any error (malformed chains, a failing eventfd, a handler bug): NEEDS_RESET. */
  'failures',
] as const;

export type QueueCounter = (typeof QUEUE_COUNTERS)[number];
export type QueueCounters = Record<QueueCounter, number>;

/** Index of each counter in a row. */
export const QueueStat = Object.fromEntries(QUEUE_COUNTERS.map((name, i) => [name, i])) as Record<QueueCounter, number>;

const ROW = QUEUE_COUNTERS.length;

/** Allocates the counters of `queues` virtqueues. */
export function createQueueStats(queues: number): SharedArrayBuffer {
  return new SharedArrayBuffer(Math.max(queues, 1) * ROW * Float64Array.BYTES_PER_ELEMENT);
}

/** The row of one queue, for the worker that runs it. */
export function queueStatsRow(buffer: SharedArrayBuffer, queue: number): Float64Array {
  return new Float64Array(buffer, queue * ROW * Float64Array.BYTES_PER_ELEMENT, ROW);
}

/** A snapshot of one queue's counters. */
export function readQueueStats(buffer: SharedArrayBuffer, queue: number): QueueCounters {
  const row = queueStatsRow(buffer, queue);
  return Object.fromEntries(QUEUE_COUNTERS.map((name, i) => [name, row[i] as number])) as QueueCounters;
}

/** Adds to one counter of a row (the row's single writer only). */
export function countStat(row: Float64Array, counter: number, n = 1): void {
  row[counter] = (row[counter] as number) + n;
}
