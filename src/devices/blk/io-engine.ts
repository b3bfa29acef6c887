/**
 * What performs a blk request in an I/O thread: a local file (synchronous calls, done at once) or an NBD export
 * (asynchronous, any number in flight, completed out of order).
 */
import { openBlockBackend, type BlockBackend } from './block-backend.js';
import { BlkStatus } from './constants.js';
import type { IoEngineOptions, IoRequest, NbdBackendOptions } from './io-messages.js';
import { NbdClient, type NbdClientEvent, type NbdClientRequest } from './nbd/client.js';

export interface IoEngine {
  /** Performs `req` for client `owner`; `done` gets a BlkStatus, later or at once. */
  execute(owner: number, req: IoRequest, done: (status: number) => void): void;
  /** Runs `fn`, which executes a batch of requests: an NBD engine sends them in one write. */
  batch(fn: () => void): void;
  /** `owner` stopped: its requests' callbacks never run, and nothing touches their memory once this returns. */
  abandon(owner: number): void;
  close(): void;
}

function views(req: IoRequest): Uint8Array[] {
  return req.spans.map((s) => new Uint8Array(s.buffer, s.offset, s.length));
}

class BlockBackendEngine implements IoEngine {
  readonly #backend: BlockBackend;

  constructor(backend: BlockBackend) {
    this.#backend = backend;
  }

  execute(_owner: number, req: IoRequest, done: (status: number) => void): void {
    const backend = this.#backend;
    let status: number = BlkStatus.OK;
    try {
      switch (req.op) {
        case 'read':
          for (const s of req.spans) backend.read(new Uint8Array(s.buffer, s.offset, s.length), s.pos);
          break;
        case 'write':
          for (const s of req.spans) backend.write(new Uint8Array(s.buffer, s.offset, s.length), s.pos);
          if (req.fua) backend.flush();
          break;
        case 'zero':
          backend.writeZeroes(req.pos, req.length);
          if (req.fua) backend.flush();
          break;
        case 'flush':
          backend.flush();
          break;
        case 'discard':
          break; // a hint; a file without hole punching keeps its data
      }
    } catch {
      status = BlkStatus.IOERR;
    }
    done(status);
  }

  batch(fn: () => void): void {
    fn();
  }

  abandon(): void {}

  close(): void {
    this.#backend.close();
  }
}

class NbdEngine implements IoEngine {
  readonly #client: NbdClient;

  constructor(options: NbdBackendOptions, onEvent: (event: NbdClientEvent) => void) {
    this.#client = new NbdClient(options.info, { target: options.target, tls: options.tls, timeoutMs: options.timeoutMs, onEvent });
  }

  execute(owner: number, req: IoRequest, done: (status: number) => void): void {
    const info = this.#client.info;
    const finish = (error: number): void => done(error === 0 ? BlkStatus.OK : BlkStatus.IOERR);
    let request: NbdClientRequest;
    switch (req.op) {
      case 'read':
      case 'write': {
        // The queue worker gave the range (`pos`, `length`) and spans that cover it in order.
        request = { command: req.op, offset: req.pos, length: req.length, buffers: views(req), fua: req.fua, owner, done: finish };
        break;
      }
      case 'flush':
        if (!info.canFlush) return done(BlkStatus.OK); // the server writes through
        request = { command: 'flush', offset: 0, length: 0, buffers: [], owner, done: finish };
        break;
      case 'zero':
        if (!info.canWriteZeroes) return done(BlkStatus.UNSUPP);
        request = { command: 'write-zeroes', offset: req.pos, length: req.length, buffers: [], fua: req.fua, noHole: !req.unmap, owner, done: finish };
        break;
      case 'discard':
        if (!info.canTrim) return done(BlkStatus.OK); // a hint
        request = { command: 'trim', offset: req.pos, length: req.length, buffers: [], owner, done: finish };
        break;
    }
    if (request.length === 0 && request.command !== 'flush') return done(BlkStatus.OK);
    this.#client.submit(request);
  }

  batch(fn: () => void): void {
    this.#client.corked(fn);
  }

  abandon(owner: number): void {
    this.#client.abandon(owner);
  }

  close(): void {
    this.#client.close();
  }
}

export function openIoEngine(options: IoEngineOptions, onNbdEvent: (event: NbdClientEvent) => void): IoEngine {
  if (options.kind === 'nbd') return new NbdEngine(options, onNbdEvent);
  return new BlockBackendEngine(openBlockBackend(options));
}
