/**
 * One vsock connection as a Node Duplex, made by VsockHost (a guest connecting to a port the host listens on, or
 * VsockHost.connect). Writes go to the guest, reads come from it, with backpressure both ways:
 *
 * - To the guest: a write's callback runs once its bytes have been handed to the guest (as far as the guest's credit
 *   and the path to it allow), so the Writable's own buffering (`write()` returning false, 'drain') is what holds a
 *   writer that is faster than the guest.
 * - From the guest: the stream takes the guest's bytes only when its read buffer has room (`_read`), and only bytes it
 *   took count as consumed (fwd_cnt, the credit the guest gets back). A reader that stops reading therefore stops the
 *   guest once the connection's buf_alloc is used up; what waits meanwhile is bounded by buf_alloc plus the read
 *   buffer's highWaterMark.
 *
 * `end()` sends SHUTDOWN(SEND) once everything written has gone; the readable side ends when the guest sent
 * SHUTDOWN(SEND) (or closed cleanly). Once both sides are done, or on `destroy()`, the connection is closed (SHUTDOWN
 * both, then RST). An abrupt end (the guest's RST, VsockHost.reset(), close(), a credit overrun) destroys the stream
 * with a VhostError: code VHOST_VSOCK_RESET or VHOST_VSOCK_CLOSED.
 */
import { Duplex } from 'node:stream';
import type { VhostError } from '../../errors.js';
import { VMADDR_CID_HOST } from './constants.js';
import type { HostSide, VsockEndpoint } from './host.js';

export interface VsockStreamInfo {
  /** Our port (CID 2). */
  localPort: number;
  /** The guest's CID and port. */
  remoteCid: number;
  remotePort: number;
}

/** Made in the class's static block: the host's handle on a stream's private state. */
let sideOf: (stream: VsockStream) => HostSide;

export class VsockStream extends Duplex {
  readonly localCid = VMADDR_CID_HOST;
  readonly localPort: number;
  readonly remoteCid: number;
  readonly remotePort: number;
  readonly #endpoint: VsockEndpoint;
  /** Guest bytes the stream has not taken yet (its read buffer is full, or nobody reads). */
  readonly #pending: Buffer[] = [];
  /** `_read` asked for data and no push has answered it yet. */
  #wanted = false;
  /** The guest sends no more: the readable side ends once #pending is empty. */
  #eof = false;
  #pushedEof = false;
  #flushing = false;

  /** Made by VsockHost (see createVsockStream); not for users. */
  constructor(endpoint: VsockEndpoint, info: VsockStreamInfo) {
    super({ allowHalfOpen: true, decodeStrings: true });
    this.#endpoint = endpoint;
    this.localPort = info.localPort;
    this.remoteCid = info.remoteCid;
    this.remotePort = info.remotePort;
  }

  /** Guest bytes received and not yet taken by the stream's read buffer. */
  get pendingBytes(): number {
    let n = 0;
    for (const b of this.#pending) n += b.length;
    return n;
  }

  override _read(): void {
    this.#wanted = true;
    this.#flush();
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.#endpoint.send(chunk, callback);
  }

  override _final(callback: (error?: Error | null) => void): void {
    this.#endpoint.sendEnd(callback);
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.#pending.length = 0;
    this.#endpoint.gone();
    callback(error);
  }

  /** Hands pending guest bytes to the read buffer while it wants them; ends the readable side after the last. */
  #flush(): void {
    if (this.#flushing || this.destroyed) return;
    this.#flushing = true;
    try {
      while (this.#wanted && this.#pending.length > 0 && !this.destroyed) {
        const chunk = this.#pending.shift()!;
        this.#endpoint.consumed(chunk.length);
        this.#wanted = this.push(chunk);
      }
      if (this.#eof && this.#pending.length === 0 && !this.#pushedEof && !this.destroyed) {
        this.#pushedEof = true;
        this.push(null);
      }
    } finally {
      this.#flushing = false;
    }
  }

  static {
    sideOf = (s: VsockStream): HostSide => ({
      deliver: (bytes: Buffer): void => {
        if (s.destroyed) return;
        s.#pending.push(bytes);
        s.#flush();
      },
      deliverEnd: (): void => {
        s.#eof = true;
        s.#flush();
      },
      setReading: (): void => {
        // Writes are pulled through their callbacks: nothing to pause.
      },
      finish: (): void => {
        // The connection is over cleanly: the readable side ends after what the guest sent, the writable side too.
        s.#eof = true;
        s.#flush();
        if (!s.writableEnded && !s.destroyed) s.end();
      },
      abort: (err: VhostError): void => {
        s.destroy(err);
      },
    });
  }
}

/** A stream over `endpoint`, and the handle through which the host drives it. */
export function createVsockStream(endpoint: VsockEndpoint, info: VsockStreamInfo): { stream: VsockStream; side: HostSide } {
  const stream = new VsockStream(endpoint, info);
  return { stream, side: sideOf(stream) };
}
