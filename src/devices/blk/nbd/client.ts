/**
 * An NBD client that outlives its connections: requests are split to the server's largest block, sent on the
 * current connection, and when that connection dies (the server restarted, the network broke, or it sent
 * something that breaks the protocol) every request it had not answered is sent again on the next one. Reads and
 * writes are idempotent, so resending is safe. A request fails with EIO only when no connection could be had for
 * `timeoutMs` after it started waiting for one; while the server has been gone longer than that, new requests
 * fail at once (QEMU's nbd driver with `reconnect-delay` behaves the same way).
 *
 * Buffers (guest memory) are touched only by the live connection; `abandon` and `close` return only once no
 * connection can touch an abandoned request's buffers again (a connection that holds one is destroyed).
 */
import type { Socket } from 'node:net';
import { VhostError } from '../../../errors.js';
import { NbdConnection, type NbdCommand, type NbdRequest } from './connection.js';
import { NbdErrno } from './constants.js';
import { connectNbd, type NbdExportInfo, type NbdTlsOptions } from './handshake.js';
import type { NbdTarget } from './uri.js';

export interface NbdClientOptions {
  target: NbdTarget;
  tls?: NbdTlsOptions | undefined;
  /** How long a request waits for a connection before it fails with EIO; also how long a server may go silent. */
  timeoutMs: number;
  /** What the client is told about its connections (for logs). */
  onEvent?: (event: NbdClientEvent) => void;
}

export type NbdClientEvent =
  | { type: 'connected'; reconnect: boolean }
  | { type: 'disconnected'; reason: VhostError; unfinished: number }
  | { type: 'connect-failed'; reason: VhostError; retryMs: number }
  | { type: 'timed-out'; requests: number };

/**
 * A request as `NbdConnection` takes it (read: `buffers` are the destination, write: the source), plus who submitted
 * it. `fua` on a server without FUA becomes a flush after the write; `done` is never called for an abandoned request.
 */
export interface NbdClientRequest extends NbdRequest {
  /** Who submitted it (`abandon` drops one owner's requests). */
  owner?: number;
}

/** Retry after a failed connect: first at once, then from this doubling to the maximum. */
export const NBD_RETRY_MIN_MS = 50;
export const NBD_RETRY_MAX_MS = 2000;
/** A connection that lasted this long resets the backoff: the next one is tried at once when it breaks. */
const HEALTHY_CONNECTION_MS = 1000;

/** One request, or one piece of a split one, as sent on a connection. */
class Part implements NbdRequest {
  readonly client: NbdClient;
  readonly parent: Parent;
  readonly command: NbdCommand;
  readonly offset: number;
  readonly length: number;
  readonly buffers: readonly Uint8Array[];
  fua: boolean;
  readonly noHole: boolean;
  /** When it fails if it still has no connection; 0 while it has not had to wait. */
  deadline = 0;
  abandoned = false;

  constructor(client: NbdClient, parent: Parent, command: NbdCommand, offset: number, length: number, buffers: readonly Uint8Array[], fua: boolean, noHole: boolean) {
    this.client = client;
    this.parent = parent;
    this.command = command;
    this.offset = offset;
    this.length = length;
    this.buffers = buffers;
    this.fua = fua;
    this.noHole = noHole;
  }

  done(error: number): void {
    this.client.partDone(this, error);
  }
}

/** What a caller submitted: done once all its parts are (the first error wins). */
class Parent {
  readonly request: NbdClientRequest;
  remaining = 0;
  error = 0;
  constructor(request: NbdClientRequest) {
    this.request = request;
  }
}

/** `buffers` bytes [start, start + length) as views of the same memory. */
function sliceBuffers(buffers: readonly Uint8Array[], start: number, length: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  let skip = start;
  let want = length;
  for (const b of buffers) {
    if (want === 0) break;
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    const n = Math.min(b.length - skip, want);
    out.push(b.subarray(skip, skip + n));
    skip = 0;
    want -= n;
  }
  return out;
}

export class NbdClient {
  /** The export as the first connection saw it; a later connection to an export of another size is refused. */
  readonly info: NbdExportInfo;
  readonly #options: NbdClientOptions;
  #conn: NbdConnection | undefined;
  #socket: Socket | undefined;
  /** Parts sent on `#conn` and not answered. */
  readonly #sent = new Set<Part>();
  /** Parts waiting for a connection, oldest first. */
  #waiting: Part[] = [];
  #connecting = false;
  #retryMs = 0;
  #retryTimer: NodeJS.Timeout | undefined;
  #deadlineTimer: NodeJS.Timeout | undefined;
  #watchdog: NodeJS.Timeout | undefined;
  /** When the last connection was lost (or the first attempt started), undefined while connected. */
  #downSince: number | undefined;
  #everConnected = false;
  /** When the current (or last) connection was made. */
  #attachedAt = 0;
  #closed = false;

  /** Connects once to learn the export (fails if the server cannot be reached), then closes that connection. */
  static async probe(target: NbdTarget, tls?: NbdTlsOptions, timeoutMs = 10_000): Promise<NbdExportInfo> {
    const { socket, info } = await connectNbd(target, { ...(tls !== undefined ? { tls } : {}), timeoutMs });
    socket.destroy();
    return info;
  }

  /** A client for an export already probed (`info`): it connects in the background; requests wait meanwhile. */
  constructor(info: NbdExportInfo, options: NbdClientOptions) {
    this.info = info;
    this.#options = options;
    this.#downSince = Date.now();
    this.#connect();
  }

  get connected(): boolean {
    return this.#conn !== undefined;
  }

  submit(request: NbdClientRequest): void {
    const parent = new Parent(request);
    if (this.#closed) {
      request.done(NbdErrno.ESHUTDOWN);
      return;
    }
    const { command, offset, length } = request;
    const fua = request.fua === true;
    const noHole = request.noHole === true;
    const parts: Part[] = [];
    if (command === 'flush' || length === 0) {
      parts.push(new Part(this, parent, command, offset, length, [], false, false));
    } else {
      const max = this.info.maxBlock;
      for (let at = 0; at < length; at += max) {
        const n = Math.min(max, length - at);
        // One part (the common case) takes the caller's buffers as they are; only a split needs new views.
        const data = command === 'read' || command === 'write';
        const buffers = !data ? [] : n === length ? request.buffers : sliceBuffers(request.buffers, at, n);
        parts.push(new Part(this, parent, command, offset + at, n, buffers, fua, noHole));
      }
    }
    // Without FUA on the server, a durable write is the write and then a flush (ordered: sent after it completed).
    parent.remaining = parts.length;
    for (const part of parts) this.#send(part);
  }

  /** Runs `fn` with the connection's socket corked: the requests it submits leave in one write. */
  corked(fn: () => void): void {
    const socket = this.#socket;
    socket?.cork();
    try {
      fn();
    } finally {
      socket?.uncork();
    }
  }

  /**
   * Drops `owner`'s requests: their callbacks never run, and once this returns no connection touches their
   * buffers (a connection with one of them in flight is closed; the others' requests go on the next one).
   */
  abandon(owner: number): void {
    this.#waiting = this.#waiting.filter((p) => {
      if (p.parent.request.owner !== owner) return true;
      p.abandoned = true;
      return false;
    });
    let holdsOne = false;
    for (const p of this.#sent) {
      if (p.parent.request.owner === owner) {
        p.abandoned = true;
        holdsOne = true;
      }
    }
    if (holdsOne) this.#conn?.close(); // destroys the socket now; the rest come back through onClose
  }

  /** Closes the connection; waiting and unanswered requests are dropped without callbacks. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#deadlineTimer);
    clearInterval(this.#watchdog);
    for (const p of this.#sent) p.abandoned = true;
    for (const p of this.#waiting) p.abandoned = true;
    this.#waiting = [];
    this.#conn?.close();
    this.#socket?.destroy();
  }

  /** Called by a part's `done`. */
  partDone(part: Part, error: number): void {
    this.#sent.delete(part);
    if (part.abandoned) return;
    const parent = part.parent;
    if (error !== 0 && parent.error === 0) parent.error = error;
    if (--parent.remaining > 0) return;
    const req = parent.request;
    // A durable write on a server without FUA: flush once the write is done (not for a failed write).
    if (req.fua === true && parent.error === 0 && !this.info.canFua && this.info.canFlush && req.command !== 'flush' && req.command !== 'read') {
      this.submit({ command: 'flush', offset: 0, length: 0, buffers: [], ...(req.owner !== undefined ? { owner: req.owner } : {}), done: (e) => req.done(e) });
      return;
    }
    req.done(parent.error);
  }

  #send(part: Part): void {
    if (this.#conn !== undefined) {
      try {
        if (part.fua && !this.info.canFua) part.fua = false; // the flush follows (partDone)
        this.#sent.add(part);
        this.#conn.submit(part);
        return;
      } catch (err) {
        this.#sent.delete(part);
        if (!(err instanceof VhostError) || err.code !== 'VHOST_NBD_CLOSED') {
          // The request does not fit the export (range, size, a command the server lacks): the caller's bug.
          part.done(NbdErrno.EINVAL);
          return;
        }
      }
    }
    this.#wait(part);
  }

  #wait(part: Part): void {
    const now = Date.now();
    if (this.#downSince !== undefined && now - this.#downSince >= this.#options.timeoutMs && this.#everConnected) {
      part.done(NbdErrno.EIO); // the server has been gone for longer than the timeout: fail at once
      return;
    }
    if (part.deadline === 0) part.deadline = now + this.#options.timeoutMs;
    this.#waiting.push(part);
    this.#armDeadline();
  }

  #armDeadline(): void {
    if (this.#deadlineTimer !== undefined || this.#waiting.length === 0) return;
    let first = Infinity;
    for (const p of this.#waiting) first = Math.min(first, p.deadline);
    this.#deadlineTimer = setTimeout(() => this.#expire(), Math.max(0, first - Date.now()));
  }

  #expire(): void {
    this.#deadlineTimer = undefined;
    const now = Date.now();
    const expired = this.#waiting.filter((p) => p.deadline <= now);
    if (expired.length > 0) {
      this.#waiting = this.#waiting.filter((p) => p.deadline > now);
      this.#options.onEvent?.({ type: 'timed-out', requests: expired.length });
      for (const p of expired) p.done(NbdErrno.EIO);
    }
    this.#armDeadline();
  }

  #connect(): void {
    if (this.#closed || this.#connecting) return;
    this.#connecting = true;
    const { target, tls } = this.#options;
    connectNbd(target, { ...(tls !== undefined ? { tls } : {}), timeoutMs: Math.min(10_000, Math.max(1000, this.#options.timeoutMs)) }).then(
      ({ socket, info, leftover }) => {
        this.#connecting = false;
        if (this.#closed) {
          socket.destroy();
          return;
        }
        if (info.size !== this.info.size || info.maxBlock < Math.min(this.info.maxBlock, 4096)) {
          socket.destroy();
          this.#retry(new VhostError('VHOST_NBD_EXPORT', `the export changed: ${info.size} bytes, was ${this.info.size}`));
          return;
        }
        this.#attach(socket, info, leftover);
      },
      (err: unknown) => {
        this.#connecting = false;
        this.#retry(err instanceof VhostError ? err : new VhostError('VHOST_NBD_CONNECT', String(err), { cause: err }));
      },
    );
  }

  #retry(reason: VhostError): void {
    if (this.#closed) return;
    this.#retryMs = this.#retryMs === 0 ? NBD_RETRY_MIN_MS : Math.min(NBD_RETRY_MAX_MS, this.#retryMs * 2);
    this.#options.onEvent?.({ type: 'connect-failed', reason, retryMs: this.#retryMs });
    this.#retryTimer = setTimeout(() => this.#connect(), this.#retryMs);
  }

  #attach(socket: Socket, info: NbdExportInfo, leftover: Buffer): void {
    const conn = new NbdConnection(socket, info, leftover, (reason, unfinished) => this.#lost(conn, reason, unfinished));
    this.#conn = conn;
    this.#socket = socket;
    this.#attachedAt = Date.now();
    this.#downSince = undefined;
    this.#options.onEvent?.({ type: 'connected', reconnect: this.#everConnected });
    this.#everConnected = true;
    // A server that holds requests and sends nothing for `timeoutMs` is treated as gone.
    let lastRead = socket.bytesRead;
    let quietSince = Date.now();
    this.#watchdog = setInterval(() => {
      const now = Date.now();
      if (socket.bytesRead !== lastRead || conn.inFlight === 0) {
        lastRead = socket.bytesRead;
        quietSince = now;
      } else if (now - quietSince >= this.#options.timeoutMs) {
        conn.close();
      }
    }, Math.max(50, this.#options.timeoutMs / 4));
    this.#watchdog.unref();
    const waiting = this.#waiting;
    this.#waiting = [];
    clearTimeout(this.#deadlineTimer);
    this.#deadlineTimer = undefined;
    for (const p of waiting) this.#send(p);
  }

  #lost(conn: NbdConnection, reason: VhostError, unfinished: NbdRequest[]): void {
    if (this.#conn !== conn) return;
    this.#conn = undefined;
    this.#socket = undefined;
    clearInterval(this.#watchdog);
    this.#downSince = Date.now();
    const parts = unfinished as Part[];
    for (const p of parts) this.#sent.delete(p);
    const live = parts.filter((p) => !p.abandoned);
    if (!this.#closed) this.#options.onEvent?.({ type: 'disconnected', reason, unfinished: live.length });
    if (this.#closed) return;
    // Requests go back in the order they were sent, ahead of those that arrived while it was dying.
    const now = Date.now();
    for (const p of live) if (p.deadline === 0) p.deadline = now + this.#options.timeoutMs;
    this.#waiting = [...live, ...this.#waiting];
    this.#armDeadline();
    // A server that breaks each connection at once (or sends garbage) is retried with backoff, not in a loop.
    if (Date.now() - this.#attachedAt < HEALTHY_CONNECTION_MS) {
      this.#retry(reason);
    } else {
      this.#retryMs = 0;
      this.#connect();
    }
  }
}
