/**
 * The vhost-user backend server of one device. It serves one frontend at a time, reached one of two ways:
 * - `listen()`: on a unix socket the VMM connects to (as it does to qemu-storage-daemon); it listens again when the
 *   frontend leaves;
 * - `connect()` (client mode): it connects to a VMM that listens (QEMU `-chardev socket,server=on,wait=off`, DPDK
 *   virtio_user `server=1`, OVS-DPDK's dpdkvhostuserclient ports the other way round), and connects again, with
 *   backoff, whenever that fails or the connection drops, for as long as it runs.
 * Its queues run on a worker pool: the daemon's, shared with other devices, or one of its own.
 */
import { lstatSync, unlinkSync } from 'node:fs';
import pino, { type Logger } from 'pino';
import { VhostError } from '../errors.js';
import * as native from '../native/index.js';
import { MessageReader } from '../protocol/message-reader.js';
import type { Message } from '../protocol/message-reader.js';
import type { VirtioDevice } from '../devices/device.js';
import { FdSocket } from '../transport/fd-socket.js';
import { createQueueStats } from '../devices/queue-stats.js';
import { BackendSession, type SessionOptions } from './session.js';
import type { WorkerSyncMode } from './sync-block.js';
import { WorkerPool } from './worker-pool.js';

export interface ServerOptions {
  socketPath: string;
  device: VirtioDevice;
  /** pino-compatible logger; silent by default. */
  logger?: Logger;
  /**
   * The worker pool to run the queues on, shared with other servers (not stopped by `close`). Without one the
   * server starts a pool of its own when it listens (`workers` threads, `sync` mode) and stops it when it closes.
   */
  pool?: WorkerPool;
  /** Own pool only: worker threads (default: one per queue, or per queue pair for net). */
  workers?: number;
  /** Own pool only: how workers are kept off memory that is being removed (default qsbr). */
  sync?: WorkerSyncMode;
  /** Own pool only: busy-poll window in microseconds (PoolOptions.busyPollUs; default 0). */
  busyPollUs?: number;
  /** Memory slots offered; 0 = no CONFIGURE_MEM_SLOTS (SET_MEM_TABLE only). Default 509. */
  memSlots?: number;
  /** Called with the duration (ms) of each memory-table change, from its arrival to its reply. */
  onMemoryChange?: (durationMs: number) => void;
}

/** Client mode: the first retry comes after this long, each next one after twice as long, up to the maximum. */
export const RECONNECT_MIN_MS = 50;
export const RECONNECT_MAX_MS = 2000;

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
  /** `finish()` began: no further message is handled. */
  #finishing = false;
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
    if (this.#finishing) return; // released by end()
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
    while (keep && !this.#ending && !this.#finishing) {
      const msg = this.#queue.shift(); // taken only when it will be handled: end() releases what is left
      if (msg === undefined) break;
      keep = await this.session.handle(msg);
    }
    this.#draining = undefined;
    if (!keep) void this.end();
    else if (!this.#ending && !this.#finishing) this.#socket.resumeReading();
  }

  /**
   * A graceful end: no further message is handled, every running ring stops once the requests it took have
   * completed and their completions are in the used ring (at most `timeoutMs`; then what is left is abandoned as by
   * `end()`), then everything is released as by `end()`.
   */
  async finish(timeoutMs: number): Promise<void> {
    if (this.#ending || this.#finishing) return this.closed;
    this.#finishing = true;
    this.#socket.pauseReading();
    await this.#draining;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<'timeout'>((resolve) => (timer = setTimeout(() => resolve('timeout'), timeoutMs)));
    try {
      const r = await Promise.race([this.session.stopRings(), timedOut]);
      if (r === 'timeout') this.#log.warn({ timeoutMs }, 'requests still in flight after the drain timeout: abandoned');
    } catch (err) {
      this.#log.error({ err }, 'error while stopping the rings');
    } finally {
      clearTimeout(timer);
    }
    return this.end();
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
  readonly device: VirtioDevice;
  /** The device's per-queue counters (devices/queue-stats.ts), kept across connections. */
  readonly queueStats: SharedArrayBuffer;
  readonly #options: ServerOptions;
  readonly #log: Logger;
  #pool: WorkerPool | undefined;
  readonly #ownPool: boolean;
  /** Frontends accepted so far. */
  #connections = 0;
  #connectedAt: Date | undefined;
  #listenFd = -1;
  #watchId = -1;
  /** Client mode: set by `connect()`; the pending retry and the delay of the next one. */
  #clientMode = false;
  #retryTimer: NodeJS.Timeout | undefined;
  #retryMs = RECONNECT_MIN_MS;
  #connection: Connection | undefined;
  #closing = false;
  /** Resolves each time a frontend has gone and its resources are released (for tests and the demo). */
  #onIdle: (() => void)[] = [];

  constructor(options: ServerOptions) {
    this.socketPath = options.socketPath;
    this.device = options.device;
    this.queueStats = createQueueStats(options.device.numQueues);
    this.#log = options.logger ?? pino({ level: 'silent' });
    this.#options = options;
    this.#pool = options.pool;
    this.#ownPool = options.pool === undefined;
  }

  /**
   * Starts listening. A stale socket file at the path (nothing accepts on it) is replaced; a live socket or any
   * other file is VHOST_SOCKET_IN_USE; a path where no socket can be made is VHOST_SOCKET_UNAVAILABLE.
   */
  listen(): void {
    if (this.#listenFd >= 0 || this.#clientMode) throw new VhostError('VHOST_SERVER_LISTENING', 'already listening or connecting');
    claimSocketPath(this.socketPath);
    try {
      this.#listenFd = native.listenUnix(this.socketPath);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new VhostError(
        code === 'EADDRINUSE' ? 'VHOST_SOCKET_IN_USE' : 'VHOST_SOCKET_UNAVAILABLE',
        `cannot listen on ${this.socketPath}: ${(err as Error).message}`,
        { cause: err },
      );
    }
    this.#startPool();
    this.#watchListen();
    this.#log.info({ socket: this.socketPath, deviceType: this.device.name }, 'listening');
  }

  /**
   * Client mode: connects to the frontend listening at `socketPath`, now and again whenever the connection fails or
   * drops (after RECONNECT_MIN_MS, doubling up to RECONNECT_MAX_MS while it keeps failing), until `close()`.
   */
  connect(): void {
    if (this.#listenFd >= 0 || this.#clientMode) throw new VhostError('VHOST_SERVER_LISTENING', 'already listening or connecting');
    this.#clientMode = true;
    this.#startPool();
    this.#log.info({ socket: this.socketPath, deviceType: this.device.name }, 'connecting');
    this.#tryConnect();
  }

  #startPool(): void {
    if (this.#pool !== undefined) return;
    const device = this.#options.device;
    const threads = this.#options.workers ?? Math.ceil(device.numQueues / (device.queuesPerWorker ?? 1));
    this.#pool = new WorkerPool({
      threads,
      ...(this.#options.sync !== undefined ? { sync: this.#options.sync } : {}),
      ...(this.#options.busyPollUs !== undefined ? { busyPollUs: this.#options.busyPollUs } : {}),
    });
  }

  #tryConnect(): void {
    this.#retryTimer = undefined;
    if (this.#closing) return;
    let fd: number;
    try {
      fd = native.connectUnix(this.socketPath);
    } catch (err) {
      // Not there yet (ENOENT), not listening (ECONNREFUSED), or anything else: all are worth another try later.
      const delay = this.#retryMs;
      this.#retryMs = Math.min(2 * delay, RECONNECT_MAX_MS);
      this.#log.debug({ code: (err as NodeJS.ErrnoException).code, retryMs: delay }, 'frontend not reachable');
      this.#retryTimer = setTimeout(() => this.#tryConnect(), delay);
      return;
    }
    this.#retryMs = RECONNECT_MIN_MS;
    this.#serve(fd);
  }

  /** Frontends accepted since the server started, and since when the current one is connected. */
  get connections(): { total: number; connectedSince: Date | undefined } {
    return { total: this.#connections, connectedSince: this.#connection !== undefined ? this.#connectedAt : undefined };
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
    this.#serve(fd);
  }

  /** Serves the frontend on `fd` until it leaves, then listens or connects again. */
  #serve(fd: number): void {
    this.#log.info('frontend connected');
    this.#connections++;
    this.#connectedAt = new Date();
    const pool = this.#pool as WorkerPool; // made by listen()
    const options: SessionOptions = {
      device: this.device,
      lease: pool.lease(this.device, this.queueStats),
      ...(this.#options.memSlots !== undefined ? { memSlots: this.#options.memSlots } : {}),
      ...(this.#options.onMemoryChange !== undefined ? { onMemoryChange: this.#options.onMemoryChange } : {}),
    };
    const connection = new Connection(fd, options, this.#log);
    this.#connection = connection;
    void connection.closed.then(() => {
      this.#connection = undefined;
      for (const resolve of this.#onIdle.splice(0)) resolve();
      if (this.#closing) return;
      // Client mode: the frontend went away (a VMM restarting, or it dropped us): reach it again after a pause.
      if (this.#clientMode) this.#retryTimer = setTimeout(() => this.#tryConnect(), RECONNECT_MIN_MS);
      else this.#watchListen();
    });
  }

  /**
   * Disconnects the frontend, releases everything and stops listening or connecting (and its own pool, if any).
   * With `drainMs`, the frontend's requests in flight complete first (up to that long): nothing it was told is lost.
   */
  async close(options: { drainMs?: number } = {}): Promise<void> {
    this.#closing = true;
    if (this.#watchId >= 0) native.unwatch(this.#watchId);
    this.#watchId = -1;
    if (this.#retryTimer !== undefined) clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    if (options.drainMs !== undefined) await this.#connection?.finish(options.drainMs);
    else await this.#connection?.end();
    if (this.#listenFd >= 0) {
      native.close(this.#listenFd);
      this.#listenFd = -1;
      try {
        unlinkSync(this.socketPath);
      } catch {
        // already gone
      }
    }
    if (this.#ownPool) {
      await this.#pool?.stop();
      this.#pool = undefined;
    }
  }
}

/**
 * Makes `path` free for a new listening socket: a stale socket file (nothing accepts on it: ECONNREFUSED) is removed;
 * a live socket or another kind of file is VHOST_SOCKET_IN_USE. A missing path is fine.
 */
function claimSocketPath(path: string): void {
  let isSocket: boolean;
  try {
    isSocket = lstatSync(path).isSocket();
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return;
    throw new VhostError('VHOST_SOCKET_UNAVAILABLE', `cannot use ${path}: ${(err as Error).message}`, { cause: err });
  }
  if (!isSocket) throw new VhostError('VHOST_SOCKET_IN_USE', `${path} exists and is not a socket`);
  let fd: number;
  try {
    fd = native.connectUnix(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ECONNREFUSED') {
      throw new VhostError('VHOST_SOCKET_IN_USE', `${path} is a socket that cannot be probed: ${(err as Error).message}`, { cause: err });
    }
    unlinkSync(path); // stale: left by a process that is gone
    return;
  }
  native.close(fd);
  throw new VhostError('VHOST_SOCKET_IN_USE', `${path} is a socket another process listens on`);
}
