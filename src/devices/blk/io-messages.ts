/** Messages and shared words between a blk queue worker and its I/O thread (`io: 'async'`, see blk-io-thread.ts). */
import type { MessagePort } from 'node:worker_threads';
import type { BlockBackendOptions } from './block-backend.js';

export interface IoSpan {
  buffer: SharedArrayBuffer;
  offset: number;
  length: number;
  /** Byte offset in the device. */
  pos: number;
}

export interface IoRequest {
  head: number;
  op: 'read' | 'write' | 'flush' | 'zero';
  spans: IoSpan[];
  /** Where the status byte goes. */
  status: { buffer: SharedArrayBuffer; offset: number };
  /** Used length reported on success. */
  len: number;
}

export interface IoCompletion {
  head: number;
  len: number;
}

export interface IoThreadInit {
  backend: BlockBackendOptions;
  completions: MessagePort;
  completionFd: number;
  control: SharedArrayBuffer;
  /**
   * Completes the n-th request `delaysMs[n % length]` ms after its I/O (to exercise requests in flight across map
   * changes and restarts; several values complete requests out of order). Empty: at once.
   */
  delaysMs: readonly number[];
}

export const STOP = 0;
export const STOPPED = 1;
