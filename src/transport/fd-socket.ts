/**
 * A connected unix stream socket that carries bytes and fds (SCM_RIGHTS), driven by this thread's event loop.
 * Node's net.Socket cannot be used: libuv reads with read(), which silently drops attached fds.
 *
 * Incoming bytes and fds are handed on as they arrive (`onData(bytes, fds)`); framing is the caller's business
 * (protocol/message-reader.ts), because the kernel merges fd-less bytes with the next fd-bearing send.
 * Outgoing data is sent at once when the socket buffer has room, else queued and flushed when it is writable.
 *
 * A peer that hangs up may have sent data first (its last replies, with fds): that data is always delivered before
 * `onClose`. So a send that fails because the peer is gone (EPIPE) only stops sending, and reading goes on until
 * the end of the stream; a poll error (the peer closed with our data unread: ECONNRESET) reads what is left at once
 * (libuv stops a watcher that reported an error), then reports the close.
 */
import * as native from '../native/index.js';

export interface FdSocketHandlers {
  /** Bytes (a view valid only during the call) and the fds that arrived with them (now owned by the callee). */
  onData(bytes: Uint8Array, fds: number[]): void;
  /**
   * The peer closed the connection or the socket failed. Called once, after every byte and fd the peer sent before
   * that was delivered to `onData`; the socket is closed afterwards.
   */
  onClose(error?: Error): void;
}

const RECV_BUFFER_SIZE = 64 * 1024;
/**
 * The receive buffer of every socket of this thread: `onData` gets a view valid only during the call, so one buffer
 * serves them all (a daemon with hundreds of connected frontends would otherwise keep 64 KiB per connection). A
 * read nested in another's `onData` gets a buffer of its own.
 */
const sharedBuffer = new Uint8Array(RECV_BUFFER_SIZE);
let sharedBufferInUse = false;
/** Messages waiting to be sent beyond which the socket is not read any more (until they are sent). */
const MAX_OUTBOX = 64;

export class FdSocket {
  readonly fd: number;
  readonly #handlers: FdSocketHandlers;
  readonly #watchId: number;
  readonly #outbox: { bytes: Uint8Array; fds: readonly number[] }[] = [];
  #closed = false;
  #waitingWritable = false;
  #reading = true;
  /** A send failed because the peer is gone: nothing more is sent; reading goes on until the end of the stream. */
  #sendError: Error | undefined;
  /** The watcher reported an error (and libuv stopped it): what is left is read without waiting, then close. */
  #hangup: Error | undefined;

  constructor(fd: number, handlers: FdSocketHandlers) {
    this.fd = fd;
    this.#handlers = handlers;
    this.#watchId = native.watch(fd, native.WATCH_READABLE, (events) => this.#onEvents(events));
  }

  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Sends bytes with fds. The fds stay owned by the caller, who must keep them open until they are sent: when the
   * socket buffer is full the message waits in the outbox, and the kernel duplicates the fds only at sendmsg().
   */
  send(bytes: Uint8Array, fds: readonly number[] = []): void {
    if (this.#closed || this.#sendError !== undefined || this.#hangup !== undefined) return;
    this.#outbox.push({ bytes, fds });
    if (this.#outbox.length === 1) this.#flush();
    else if (this.#outbox.length === MAX_OUTBOX) this.#rewatch();
  }

  /** Stops reading (backpressure) until `resumeReading`; sending goes on. */
  pauseReading(): void {
    this.#reading = false;
    this.#rewatch();
  }

  resumeReading(): void {
    this.#reading = true;
    if (this.#hangup !== undefined) this.#readAvailable();
    else this.#rewatch();
  }

  /**
   * Reading goes on unless the owner paused it or the peer does not read what we send: a frontend that never reads
   * its replies stops being read once MAX_OUTBOX messages wait (memory stays bounded whatever it sends).
   */
  #readable(): boolean {
    return this.#reading && this.#outbox.length < MAX_OUTBOX;
  }

  #rewatch(): void {
    if (this.#closed || this.#hangup !== undefined) return; // after a poll error libuv has stopped the watcher
    const events = (this.#readable() ? native.WATCH_READABLE : 0) | (this.#waitingWritable ? native.WATCH_WRITABLE : 0);
    native.rewatch(this.#watchId, events);
  }

  /** Closes the socket without calling onClose. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    native.unwatch(this.#watchId);
    native.close(this.fd);
  }

  /** Sends what the outbox holds; when the socket buffer is full, waits for writability to continue. */
  #flush(): void {
    while (this.#outbox.length > 0 && !this.#closed) {
      const next = this.#outbox[0] as { bytes: Uint8Array; fds: readonly number[] };
      let n: number;
      try {
        n = native.sendmsg(this.fd, next.bytes, next.fds);
      } catch (err) {
        const code = (err as { code?: unknown }).code;
        if (code !== 'EPIPE' && code !== 'ECONNRESET') return this.#fail(err as Error);
        return this.#stopSending(err as Error);
      }
      if (n === next.bytes.length) {
        this.#outbox.shift();
        continue;
      }
      // Partly sent (the fds went with the first byte) or not at all: continue when the socket is writable.
      if (n > 0) this.#outbox[0] = { bytes: next.bytes.subarray(n), fds: [] };
      this.#waitingWritable = true;
      this.#rewatch();
      return;
    }
    if (this.#waitingWritable && !this.#closed) {
      this.#waitingWritable = false;
      this.#rewatch();
    }
  }

  /**
   * The peer is gone (EPIPE): drop what waits to be sent and keep reading; the end of the stream (recvmsg 0) or a
   * read error then closes the socket, reporting this error.
   */
  #stopSending(error: Error): void {
    this.#sendError = error;
    this.#outbox.length = 0;
    this.#waitingWritable = false;
    this.#rewatch();
  }

  #onEvents(events: number): void {
    if (this.#closed) return;
    if (events < 0) {
      // POLLERR, typically ECONNRESET: the peer closed while data we sent was unread. What it sent before is still
      // in our receive queue. libuv stopped the watcher, so it is read now (or when reading resumes).
      this.#hangup = new Error(`socket poll failed (libuv status ${events})`);
      this.#outbox.length = 0;
      this.#waitingWritable = false;
      if (this.#reading) this.#readAvailable();
      return;
    }
    if (events & native.WATCH_WRITABLE) this.#flush();
    if ((events & native.WATCH_READABLE) !== 0 && this.#readable()) this.#readAvailable();
  }

  /**
   * Delivers what the receive queue holds, until it is drained (recvmsg -1: the watcher reports more), the end of
   * the stream (0) or a read error, which close the socket. After a poll error (#hangup) there is no watcher left
   * (libuv stopped it), so a drained queue ends the connection too. Stops early when the owner pauses reading in
   * onData (resumeReading continues) or closes the socket. The outbox is empty after a hangup, so #readable() is
   * #reading then.
   */
  #readAvailable(): void {
    if (sharedBufferInUse) {
      this.#readInto(new Uint8Array(RECV_BUFFER_SIZE));
      return;
    }
    sharedBufferInUse = true;
    try {
      this.#readInto(sharedBuffer);
    } finally {
      sharedBufferInUse = false;
    }
  }

  #readInto(buffer: Uint8Array): void {
    for (;;) {
      const fds: number[] = [];
      let n: number;
      try {
        n = native.recvmsg(this.fd, buffer, fds);
      } catch (err) {
        return this.#fail(err as Error); // after a hangup: the pending socket error, e.g. ECONNRESET
      }
      if (n < 0 && this.#hangup === undefined) return; // drained
      if (n <= 0) {
        for (const fd of fds) native.close(fd);
        return this.#fail(this.#hangup ?? this.#sendError);
      }
      this.#handlers.onData(buffer.subarray(0, n), fds);
      if (this.#closed || !this.#readable()) return;
    }
  }

  #fail(error?: Error): void {
    if (this.#closed) return;
    this.close();
    this.#handlers.onClose(error);
  }
}
