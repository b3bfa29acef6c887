/**
 * Messages and shared words between blk queue workers and an I/O thread (`io: 'async'`, and every NBD disk; see
 * blk-io-thread.ts). An I/O thread serves one or more *clients*: a queue each. A client has its own message port
 * (requests in, completions out), its own completion eventfd and its own control words.
 */
import type { MessagePort } from 'node:worker_threads';
import type { BlockBackendOptions } from './block-backend.js';
import type { NbdExportInfo, NbdTlsOptions } from './nbd/handshake.js';
import type { NbdTarget } from './nbd/uri.js';

export interface IoSpan {
  buffer: SharedArrayBuffer;
  offset: number;
  length: number;
  /** Byte offset in the device. */
  pos: number;
}

export type IoOp = 'read' | 'write' | 'flush' | 'zero' | 'discard';

export interface IoRequest {
  head: number;
  op: IoOp;
  /** read / write: the data, in device order (each span continues where the one before ended). */
  spans: IoSpan[];
  /** The byte range in the device (read / write: the one the spans cover; 0 and 0 for flush). */
  pos: number;
  length: number;
  /** write / zero: durable before it completes (the driver did not negotiate FLUSH: a write-through disk). */
  fua: boolean;
  /** zero: the range may be deallocated (virtio-blk's WRITE_ZEROES unmap flag). */
  unmap: boolean;
  /** Where the status byte goes. */
  status: { buffer: SharedArrayBuffer; offset: number };
  /** Used length reported on success. */
  len: number;
}

export interface IoCompletion {
  head: number;
  len: number;
}

/** A disk on an NBD server (blk-device.ts probed it: `info` is what the server said then). */
export interface NbdBackendOptions {
  kind: 'nbd';
  target: NbdTarget;
  tls?: NbdTlsOptions | undefined;
  /** How long a request waits for the server to come back before it fails (ms). */
  timeoutMs: number;
  info: NbdExportInfo;
  readOnly: boolean;
  /** The I/O thread logs connection changes (pino JSON lines on stderr) at this level; default silent. */
  logLevel?: string | undefined;
}

/** Where an I/O thread's bytes live. */
export type IoEngineOptions = BlockBackendOptions | NbdBackendOptions;

export interface IoThreadInit {
  engine: IoEngineOptions;
  /**
   * Completes the n-th read or write `delaysMs[n % length]` ms after its I/O, to exercise requests in flight across
   * map changes and restarts (several values complete them out of order); flushes, discards and write-zeroes
   * complete at once. Empty: everything at once.
   */
  delaysMs: readonly number[];
}

/** Posted to the thread (its `parentPort`) to add a client. */
export interface IoAttach {
  type: 'attach';
  port: MessagePort;
  completionFd: number;
  /** Int32 words below. */
  control: SharedArrayBuffer;
}

/** Posted on a client's port: a batch of requests, or a command. Completions come back in batches too. */
export type IoClientMessage = IoRequest[] | { type: 'stop' } | { type: 'flush-sync'; seq: number };

/** Control words of a client. */
export const STOP = 0;
/** Set by the thread once it will not touch the client's requests, memory or eventfd again. */
export const STOPPED = 1;
/** The `seq` of the last 'flush-sync' answered, and its status (BlkStatus). */
export const FLUSHED_SEQ = 2;
export const FLUSHED_STATUS = 3;
export const CONTROL_WORDS = 4;
