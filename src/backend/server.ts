/**
 * The vhost-user backend server: listens on a unix socket (the VMM connects as a client, as it does to
 * qemu-storage-daemon), serves one frontend at a time, and goes back to listening when it leaves.
 */
import { lstatSync, unlinkSync } from 'node:fs';
import pino, { type Logger } from 'pino';
import { VhostError } from '../errors.js';
import * as native from '../native/index.js';
import { MessageReader } from '../protocol/message-reader.js';
import type { Message } from '../protocol/message-reader.js';
import type { VirtioDevice } from '../devices/device.js';
import { FdSocket } from '../transport/fd-socket.js';
import { BackendSession, type SessionOptions } from './session.js';
import type { WorkerSyncMode } from './sync-block.js';

export interface ServerOptions {
  socketPath: string;
  device: VirtioDevice;
  /** pino-compatible logger; silent by default. */
  logger?: Logger;
  /** Worker threads for the queues (default: one per queue). */
  workers?: number;
  /** How workers are kept off memory that is being removed (default qsbr). */
  sync?: WorkerSyncMode;
  /** Memory slots offered; 0 = no CONFIGURE_MEM_SLOTS (SET_MEM_TABLE only). Default 509. */
  memSlots?: number;
}

/** One connected frontend: frames messages and feeds them, one at a time, to its session. */
class Connection {
  readonly session: BackendSession;
  readonly closed: Promise<void>;
  readonly #socket: FdSocket;
  readonly #reader: MessageReader;
  readonly #log: Logger;
  readonly #queue: Message[] = [];
  #draining: Promise<void> | undefined;
  #ending = false;
  #markClosed: () => void = () => undefined;

  constructor(fd: number, options: SessionOptions, log: Logger) {
    this.#log = log;
    this.closed = new Promise((resolve) => (this.#markClosed = resolve));
    this.#reader = new MessageReader({ closeFd: (f) => native.close(f) });
    this.#socket = new FdSocket(fd, {
      onData: (bytes, fds) => this.#onData(bytes, fds),
      onClose: (err) => {
        if (err !== undefined) log.warn({ err }, 'control socket failed');
        else log.info('frontend disconnected');
        void this.end();
      },
    });
    this.session = new BackendSession(options, (bytes, fds) => this.#socket.send(bytes, fds), log);
  }

  #onData(bytes: Uint8Array, fds: number[]): void {
    let messages: Message[];
    try {
      messages = this.#reader.push(bytes, fds);
    } catch (err) {
      this.#log.error({ err }, 'malformed message stream: disconnecting');
      void this.end();
      return;
    }
    this.#queue.push(...messages);
    // Only when there is something to handle: a read that completed no message must not start (and finish) a
    // drain, or #draining would keep a settled promise and no later message would ever be handled.
    if (this.#draining === undefined && this.#queue.length > 0) {
      this.#socket.pauseReading(); // backpressure: what the frontend sends waits in its socket while we handle this
      this.#draining = this.#drain();
    }
  }

  /** Handles queued messages strictly in order: a handler that waits (for workers) holds back the next message. */
  async #drain(): Promise<void> {
    let keep = true;
    while (keep && !this.#ending) {
      const msg = this.#queue.shift(); // taken only when it will be handled: end() releases what is left
      if (msg === undefined) break;
      keep = await this.session.handle(msg);
    }
    this.#draining = undefined;
    if (!keep) void this.end();
    else if (!this.#ending) this.#socket.resumeReading();
  }

  /** Releases everything the frontend gave us: workers, mappings, fds. Idempotent. */
  async end(): Promise<void> {
    if (this.#ending) return this.closed;
    this.#ending = true;
    this.#socket.close();
    for (const msg of this.#queue.splice(0)) for (const fd of msg.fds) native.close(fd);
    this.#reader.close();
    await this.#draining; // a handler may be waiting for workers: let it finish before everything is released
    try {
      await this.session.close();
    } catch (err) {
      this.#log.error({ err }, 'error while releasing the session');
    }
    this.#markClosed();
    return this.closed;
  }
}

export class VhostUserServer {
  readonly socketPath: string;
  readonly #options: SessionOptions;
  readonly #log: Logger;
  #listenFd = -1;
  #watchId = -1;
  #connection: Connection | undefined;
  #closing = false;
  /** Resolves each time a frontend has gone and its resources are released (for tests and the demo). */
  #onIdle: (() => void)[] = [];

  constructor(options: ServerOptions) {
    this.socketPath = options.socketPath;
    this.#log = options.logger ?? pino({ level: 'silent' });
    this.#options = {
      device: options.device,
      ...(options.workers !== undefined ? { workers: options.workers } : {}),
      ...(options.sync !== undefined ? { sync: options.sync } : {}),
      ...(options.memSlots !== undefined ? { memSlots: options.memSlots } : {}),
    };
  }

  /** Starts listening. A stale socket file at the path is replaced; any other file is an error. */
  listen(): void {
    if (this.#listenFd >= 0) throw new VhostError('VHOST_SERVER_LISTENING', 'already listening');
    try {
      if (lstatSync(this.socketPath).isSocket()) unlinkSync(this.socketPath);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    this.#listenFd = native.listenUnix(this.socketPath);
    this.#watchListen();
    this.#log.info({ socket: this.socketPath, device: this.#options.device.name }, 'listening');
  }

  /** The session of the connected frontend, if any. */
  get session(): BackendSession | undefined {
    return this.#connection?.session;
  }

  /** Resolves when no frontend is connected (at once if none is). */
  idle(): Promise<void> {
    if (this.#connection === undefined) return Promise.resolve();
    return new Promise((resolve) => this.#onIdle.push(resolve));
  }

  #watchListen(): void {
    this.#watchId = native.watch(this.#listenFd, native.WATCH_READABLE, () => this.#accept());
  }

  #accept(): void {
    const fd = native.accept(this.#listenFd);
    if (fd < 0) return;
    // One frontend at a time: stop accepting; later connections wait in the backlog until this one leaves.
    native.unwatch(this.#watchId);
    this.#watchId = -1;
    this.#log.info('frontend connected');
    const connection = new Connection(fd, this.#options, this.#log);
    this.#connection = connection;
    void connection.closed.then(() => {
      this.#connection = undefined;
      for (const resolve of this.#onIdle.splice(0)) resolve();
      if (!this.#closing) this.#watchListen();
    });
  }

  /** Disconnects the frontend, releases everything and stops listening. */
  async close(): Promise<void> {
    this.#closing = true;
    if (this.#watchId >= 0) native.unwatch(this.#watchId);
    this.#watchId = -1;
    await this.#connection?.end();
    if (this.#listenFd >= 0) {
      native.close(this.#listenFd);
      this.#listenFd = -1;
      try {
        unlinkSync(this.socketPath);
      } catch {
        // already gone
      }
    }
  }
}
