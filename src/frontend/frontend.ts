/**
 * The vhost-user frontend (the driver / VMM side, what QEMU is to a backend): connects to a backend's socket,
 * negotiates features, describes guest memory and sets up virtqueues, in the order QEMU sends its messages
 * (docs anchors §8, hw/virtio/vhost.c and vhost-user.c):
 *
 *   connect:  GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (MQ),
 *             GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), SET_OWNER, GET_CONFIG (CONFIG)
 *   start:    SET_FEATURES, SET_MEM_TABLE (or ADD_MEM_REG per region), per vq SET_VRING_NUM, SET_VRING_BASE,
 *             SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL; then SET_VRING_ENABLE 1 per vq (protocol features),
 *             SET_STATUS (STATUS)
 *
 * Requests and replies: the backend answers strictly in order, so pending replies are a FIFO and each reply must be
 * for the request at its head (anything else drops the connection, `VHOST_FRONTEND_BAD_REPLY`). A request that gets
 * no reply in time drops the connection too (`VHOST_FRONTEND_TIMEOUT`): a late reply would be taken for the next
 * one. With REPLY_ACK, setup messages ask for an ack (NEED_REPLY); a nonzero ack rejects with
 * `VHOST_FRONTEND_NACK` and the connection stays usable. Without REPLY_ACK, `requestWithAck` follows the message with
 * GET_FEATURES, as QEMU does, to know it was processed.
 *
 * The frontend owns the socket, the kick and call eventfds and their watchers; `close()` releases all of them. Guest
 * memory (`GuestRam`) belongs to the caller, who closes it after the frontend, unless `start` was told to take it over
 * (`ownMemory`).
 */
import { VhostError } from '../errors.js';
import * as native from '../native/index.js';
import {
  CONFIG_HEADER_SIZE,
  FrontendRequest,
  HeaderFlag,
  MAX_CONFIG_SIZE,
  MAX_MEM_TABLE_REGIONS,
  ProtocolFeature,
  VirtioFeature,
  VringAddrFlag,
  featureBit,
  hasFeature,
  requestName,
} from '../protocol/constants.js';
import { MessageReader, type Message } from '../protocol/message-reader.js';
import { encodeMessage } from '../protocol/message-writer.js';
import {
  deviceConfigPayload,
  inflightPayload,
  logPayload,
  memoryTablePayload,
  singleMemoryRegionPayload,
  splitVringBase,
  statusPayload,
  u64Payload,
  vringAddrPayload,
  vringFilePayload,
  vringStatePayload,
} from '../protocol/payloads.js';
import type { Inflight } from '../protocol/payloads.js';
import { createQueueDriver, queueDriverLayout, type QueueDriver } from '../queue/queue-driver.js';
import { SplitQueueDriver, type RingLayout } from '../queue/split-queue-driver.js';
import { FdSocket } from '../transport/fd-socket.js';
import type { GuestRam, GuestRamRegion } from './guest-ram.js';
import type { MigrationLog } from './migration-log.js';

/** Protocol features this frontend can use (intersected with the backend's offer). */
export const SUPPORTED_PROTOCOL_FEATURES: bigint =
  featureBit(ProtocolFeature.MQ) |
  featureBit(ProtocolFeature.LOG_SHMFD) |
  featureBit(ProtocolFeature.RARP) |
  featureBit(ProtocolFeature.REPLY_ACK) |
  featureBit(ProtocolFeature.CONFIG) |
  featureBit(ProtocolFeature.CONFIGURE_MEM_SLOTS) |
  featureBit(ProtocolFeature.STATUS) |
  featureBit(ProtocolFeature.RESET_DEVICE) |
  featureBit(ProtocolFeature.INFLIGHT_SHMFD);

/** virtio device status bits (VIRTIO 1.2 §2.1). */
export const DeviceStatus = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  NEEDS_RESET: 0x40,
  FAILED: 0x80,
} as const;

/** Error codes of the frontend (`VhostError.code`). */
export const FrontendErrorCode = {
  /** The backend answered a NEED_REPLY request with a nonzero status. */
  NACK: 'VHOST_FRONTEND_NACK',
  /** No reply within the request timeout; the connection was dropped. */
  TIMEOUT: 'VHOST_FRONTEND_TIMEOUT',
  /** The backend closed the connection (or the socket failed). */
  DISCONNECTED: 'VHOST_FRONTEND_DISCONNECTED',
  /** `close()` was called. */
  CLOSED: 'VHOST_FRONTEND_CLOSED',
  /** A reply could not be framed, was not for the pending request, or had a bad payload. */
  BAD_REPLY: 'VHOST_FRONTEND_BAD_REPLY',
  /** The operation needs a feature that was not negotiated. */
  UNSUPPORTED: 'VHOST_FRONTEND_UNSUPPORTED',
  /** The operation does not fit the current state (not started, queue unknown, ...) or its arguments. */
  BAD_STATE: 'VHOST_FRONTEND_BAD_STATE',
  /** GET_CONFIG failed (empty reply). */
  CONFIG_FAILED: 'VHOST_FRONTEND_CONFIG_FAILED',
} as const;

/** Requests whose reply is part of the protocol (always sent), as opposed to REPLY_ACK acks. */
const REPLYING = new Set<number>([
  FrontendRequest.GET_FEATURES,
  FrontendRequest.GET_PROTOCOL_FEATURES,
  FrontendRequest.GET_QUEUE_NUM,
  FrontendRequest.GET_VRING_BASE,
  FrontendRequest.GET_CONFIG,
  FrontendRequest.GET_MAX_MEM_SLOTS,
  FrontendRequest.GET_STATUS,
  FrontendRequest.GET_INFLIGHT_FD,
  FrontendRequest.CHECK_DEVICE_STATE,
  FrontendRequest.SET_DEVICE_STATE_FD,
  FrontendRequest.GET_SHARED_OBJECT,
  FrontendRequest.POSTCOPY_ADVISE,
  FrontendRequest.POSTCOPY_END,
]);

const EMPTY = new Uint8Array(0);
const DEFAULT_TIMEOUT_MS = 10_000;
/** Enough of `struct virtio_blk_config` for every field up to write_zeroes_may_unmap (QEMU asks for about this). */
const DEFAULT_CONFIG_SIZE = 60;
/** A fresh packed ring's position: index 0, wrap counter 1 (`index | wrap << 15`). */
const PACKED_RING_START = 0x8000;

/** Options of `VhostUserFrontend.connect`. */
export interface FrontendOptions {
  /** How long a request may wait for its reply, in ms (default 10 000). A timeout drops the connection. */
  readonly timeoutMs?: number;
  /** Protocol feature bits (a mask) not to negotiate even when both sides support them. */
  readonly maskProtocolFeatures?: bigint;
  /** Bytes of config space read with GET_CONFIG during the handshake (default 60; 0 skips GET_CONFIG). */
  readonly configSize?: number;
  /** Keep retrying the connection while the socket is missing or refuses, for this long in ms (default 0). */
  readonly connectTimeoutMs?: number;
}

/** Options of one request. */
export interface RequestOptions {
  /** Overrides `FrontendOptions.timeoutMs` for this request. */
  readonly timeoutMs?: number;
}

/** One virtqueue of `start`. */
export interface QueueConfig {
  readonly index: number;
  /** Queue size, a power of two. */
  readonly size: number;
  /** Where the rings go (their first byte, 16-aligned); default: allocated in the guest RAM (page-aligned). */
  readonly ringGpa?: number;
  /** Initial avail position (SET_VRING_BASE; default the ring's start: split 0, packed 0x8000 = index 0, wrap 1). */
  readonly base?: number;
  /**
   * Carry over a queue of an earlier frontend on the same guest RAM, as QEMU does when a backend restarts: the same
   * ring, untouched, and the same driver with what it has in flight. SET_VRING_BASE, unless `base` says otherwise:
   * split, the ring's used.idx (QEMU's `virtio_queue_restore_last_avail_idx`); packed, the ring's start 0x8000
   * (QEMU cannot restore a packed ring and sends what it last had: only an inflight region says where it is). The
   * old queue is released.
   */
  readonly adopt?: FrontendQueue;
}

/** Options of `start`. */
export interface StartOptions {
  /** Virtio features the driver acknowledges; must be offered. Bit 30 is added when the backend offers it. */
  readonly features: bigint;
  readonly queues: readonly QueueConfig[];
  readonly memory: GuestRam;
  /** How memory is described: one SET_MEM_TABLE (default) or ADD_MEM_REG per region (needs CONFIGURE_MEM_SLOTS). */
  readonly memoryMode?: 'table' | 'regions';
  /** Device status sent with SET_STATUS when STATUS is negotiated (default ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK). */
  readonly status?: number;
  /** The frontend takes the guest RAM over: `close()` closes it too (default false: the caller closes it). */
  readonly ownMemory?: boolean;
  /**
   * Queues per unit of GET_QUEUE_NUM (default 1). vhost-user-net backends answer in queue pairs, as QEMU expects:
   * pass 2 so that queue indices are checked against 2 * GET_QUEUE_NUM.
   */
  readonly queueNumUnit?: number;
}

/**
 * The VIRTIO_F_RING_PACKED bit, for a device driver asked to use packed rings: a `VhostError` with `code` when the
 * backend does not offer it (a driver asked for packed rings must not quietly run split ones).
 */
export function packedRingFeature(offered: bigint, code: `VHOST_${string}`): bigint {
  if (!hasFeature(offered, VirtioFeature.RING_PACKED)) {
    throw new VhostError(code, 'packed rings asked, but the backend does not offer VIRTIO_F_RING_PACKED');
  }
  return featureBit(VirtioFeature.RING_PACKED);
}

/**
 * A virtqueue set up by `start`: the driver side of its ring (split, or packed when VIRTIO_F_RING_PACKED was
 * acknowledged) and its kick and call eventfds (owned by the frontend). Chain tokens are numbers: an index into the
 * caller's own request table. `layout` gives the ring areas under their vhost-user names (packed: `availAddr` is the
 * driver event suppression area, `usedAddr` the device's).
 */
export class FrontendQueue {
  readonly index: number;
  readonly size: number;
  readonly layout: RingLayout;
  readonly driver: QueueDriver<number>;
  /** The eventfd the driver writes to notify the backend (available buffers). */
  readonly kickFd: number;
  /** The eventfd the backend writes to notify the driver (used buffers). */
  readonly callFd: number;
  #running = false;
  #watchId = -1;
  #disposed = false;

  /** @internal Created by `VhostUserFrontend.start`. */
  constructor(index: number, size: number, layout: RingLayout, driver: QueueDriver<number>) {
    this.index = index;
    this.size = size;
    this.layout = layout;
    this.driver = driver;
    this.kickFd = native.eventfdCreate(0, true);
    try {
      this.callFd = native.eventfdCreate(0, true);
    } catch (err) {
      native.close(this.kickFd);
      throw err;
    }
  }

  /** Whether the backend runs the ring (set up and enabled, not stopped by GET_VRING_BASE). */
  get running(): boolean {
    return this.#running;
  }

  /** Notifies the backend unconditionally. */
  kick(): void {
    if (!this.#disposed) native.eventfdWrite(this.kickFd);
  }

  /**
   * Publishes the chains added since the last call and notifies the backend if the ring asks for it (EVENT_IDX
   * avail_event, or no VRING_USED_F_NO_NOTIFY). Returns whether it kicked.
   */
  publishAndKick(): boolean {
    this.driver.publish();
    if (!this.driver.kickNeeded() || this.#disposed) return false;
    native.eventfdWrite(this.kickFd);
    return true;
  }

  /**
   * Calls `onCall` on the event loop each time the backend signals the call eventfd (the counter is read first).
   * Pass undefined to stop watching. The watcher keeps the event loop alive.
   */
  watchCall(onCall: (() => void) | undefined): void {
    if (this.#disposed) throw new VhostError(FrontendErrorCode.CLOSED, `queue ${this.index} is released`);
    if (this.#watchId >= 0) {
      native.unwatch(this.#watchId);
      this.#watchId = -1;
    }
    if (onCall === undefined) return;
    const fd = this.callFd;
    this.#watchId = native.watch(fd, native.WATCH_READABLE, (events) => {
      if (events < 0 || this.#disposed) return;
      native.eventfdRead(fd);
      onCall();
    });
  }

  /** @internal */
  setRunning(running: boolean): void {
    this.#running = running;
  }

  /** @internal Unwatches and closes the eventfds. Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#running = false;
    if (this.#watchId >= 0) native.unwatch(this.#watchId);
    this.#watchId = -1;
    native.close(this.kickFd);
    native.close(this.callFd);
  }
}

interface PendingReply {
  readonly request: number;
  readonly resolve: (msg: Message) => void;
  readonly reject: (err: Error) => void;
  readonly timer: NodeJS.Timeout;
}

function decodeU64Reply(msg: Message): bigint {
  try {
    return u64Payload.decode(msg.payload);
  } catch (err) {
    throw new VhostError(FrontendErrorCode.BAD_REPLY, `${requestName(msg.request)}: bad reply payload`, { cause: err });
  }
}

function closeAll(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      native.close(fd);
    } catch {
      // gone already
    }
  }
}

function isRetryableConnectError(err: unknown): boolean {
  const code = (err as { code?: unknown }).code;
  return code === 'ENOENT' || code === 'ECONNREFUSED' || code === 'EAGAIN';
}

/** A connection to a vhost-user backend, seen from the driver side. */
export class VhostUserFrontend {
  /**
   * Connects to the backend at `socketPath` and runs the handshake (features, protocol features, queue count,
   * memory slots, SET_OWNER, config space). Rejects with a `SystemError` when the socket cannot be reached, or with
   * a `VhostError` when the handshake fails (the connection is then closed).
   */
  static async connect(socketPath: string, options: FrontendOptions = {}): Promise<VhostUserFrontend> {
    const deadline = Date.now() + (options.connectTimeoutMs ?? 0);
    let fd: number;
    for (;;) {
      try {
        fd = native.connectUnix(socketPath);
        break;
      } catch (err) {
        if (!isRetryableConnectError(err) || Date.now() >= deadline) throw err;
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    }
    return VhostUserFrontend.fromSocket(fd, options, socketPath);
  }

  /**
   * The handshake over a socket that is already connected (taken over: closed with the frontend), e.g. one accepted
   * from a backend in client mode, as QEMU's `-chardev socket,server=on` accepts it. `name` stands in for the path.
   */
  static async fromSocket(fd: number, options: FrontendOptions = {}, name = `fd ${fd}`): Promise<VhostUserFrontend> {
    const frontend = new VhostUserFrontend(name, fd, options);
    try {
      await frontend.#handshake(options);
    } catch (err) {
      frontend.close();
      throw err;
    }
    return frontend;
  }

  readonly socketPath: string;
  /** Resolves when the connection has ended: with the error that ended it, or undefined after `close()`. */
  readonly closed: Promise<VhostError | undefined>;

  readonly #socket: FdSocket;
  readonly #reader: MessageReader;
  readonly #timeoutMs: number;
  readonly #pending: PendingReply[] = [];
  readonly #disconnectListeners = new Set<(err: VhostError) => void>();
  #markClosed: (err: VhostError | undefined) => void = () => undefined;
  #error: VhostError | undefined;
  #closed = false;

  #backendFeatures = 0n;
  #backendProtocolFeatures = 0n;
  #protocolFeatures = 0n;
  #features = 0n;
  #queueNum = 1;
  #maxMemSlots = 0;
  #config: Uint8Array = EMPTY;
  #memory: GuestRam | undefined;
  #queues = new Map<number, FrontendQueue>();
  #started = false;
  #ownsMemory = false;

  private constructor(socketPath: string, fd: number, options: FrontendOptions) {
    this.socketPath = socketPath;
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.closed = new Promise((resolve) => (this.#markClosed = resolve));
    this.#reader = new MessageReader({ direction: 'replies', closeFd: (f) => native.close(f) });
    try {
      this.#socket = new FdSocket(fd, {
        onData: (bytes, fds) => this.#onData(bytes, fds),
        onClose: (err) =>
          this.#fail(new VhostError(FrontendErrorCode.DISCONNECTED, 'the backend closed the connection', { cause: err })),
      });
    } catch (err) {
      native.close(fd);
      throw err;
    }
  }

  // ---- negotiated state ----------------------------------------------------------------------------------------

  /** Virtio features the backend offers (GET_FEATURES). */
  get backendFeatures(): bigint {
    return this.#backendFeatures;
  }

  /** Protocol features the backend offers (GET_PROTOCOL_FEATURES; 0 without VHOST_USER_F_PROTOCOL_FEATURES). */
  get backendProtocolFeatures(): bigint {
    return this.#backendProtocolFeatures;
  }

  /** Protocol features negotiated (SET_PROTOCOL_FEATURES). */
  get protocolFeatures(): bigint {
    return this.#protocolFeatures;
  }

  /** Virtio features acknowledged with SET_FEATURES (0 before `start`). */
  get features(): bigint {
    return this.#features;
  }

  /** Queues the backend supports (GET_QUEUE_NUM with MQ; 1 otherwise). */
  get queueNum(): number {
    return this.#queueNum;
  }

  /** Memory slots the backend supports (GET_MAX_MEM_SLOTS with CONFIGURE_MEM_SLOTS; 0 otherwise). */
  get maxMemSlots(): number {
    return this.#maxMemSlots;
  }

  /** The config space read during the handshake (empty without CONFIG). */
  get config(): Uint8Array {
    return this.#config;
  }

  /** Whether protocol feature `bit` was negotiated. */
  hasProtocolFeature(bit: number): boolean {
    return hasFeature(this.#protocolFeatures, bit);
  }

  /** Whether virtio feature `bit` was acknowledged in `start`. */
  hasFeature(bit: number): boolean {
    return hasFeature(this.#features, bit);
  }

  /** The guest memory given to `start`. */
  get memory(): GuestRam | undefined {
    return this.#memory;
  }

  /** The queues set up by `start`, by index. */
  get queues(): ReadonlyMap<number, FrontendQueue> {
    return this.#queues;
  }

  /** Queue `index`; throws `VHOST_FRONTEND_BAD_STATE` if it was not set up. */
  queue(index: number): FrontendQueue {
    const q = this.#queues.get(index);
    if (q === undefined) throw new VhostError(FrontendErrorCode.BAD_STATE, `queue ${index} was not set up`);
    return q;
  }

  /** True once the connection has ended (closed or failed). */
  get isClosed(): boolean {
    return this.#closed || this.#error !== undefined;
  }

  /**
   * Calls `listener` (synchronously) when the connection fails or is closed; pending requests have been rejected.
   * Returns a function that removes the listener.
   */
  onDisconnect(listener: (err: VhostError) => void): () => void {
    this.#disconnectListeners.add(listener);
    return () => this.#disconnectListeners.delete(listener);
  }

  // ---- request / reply ------------------------------------------------------------------------------------------

  /** Sends a request that gets no reply. */
  send(request: number, payload: Uint8Array = EMPTY, fds: readonly number[] = []): void {
    this.#checkUsable();
    this.#socket.send(encodeMessage(request, HeaderFlag.VERSION, payload), fds);
  }

  /**
   * Sends a request and resolves with its reply (for requests that have one, such as GET_FEATURES). The reply's fds
   * belong to the caller. Rejects with `VHOST_FRONTEND_TIMEOUT`, `..._DISCONNECTED`, `..._CLOSED` or `..._BAD_REPLY`.
   */
  request(
    request: number,
    payload: Uint8Array = EMPTY,
    fds: readonly number[] = [],
    options: RequestOptions = {},
  ): Promise<Message> {
    return this.#request(request, HeaderFlag.VERSION, payload, fds, options.timeoutMs ?? this.#timeoutMs);
  }

  /**
   * Sends a request and waits until the backend has processed it. With REPLY_ACK: NEED_REPLY, and a nonzero ack
   * rejects with `VHOST_FRONTEND_NACK`. Without: the request is followed by GET_FEATURES, whose reply shows that
   * the backend got that far (QEMU's `enforce_reply`). Requests that have their own reply just wait for it.
   */
  async requestWithAck(
    request: number,
    payload: Uint8Array = EMPTY,
    fds: readonly number[] = [],
    options: RequestOptions = {},
  ): Promise<void> {
    const timeoutMs = options.timeoutMs ?? this.#timeoutMs;
    if (REPLYING.has(request)) {
      const reply = await this.request(request, payload, fds, options);
      closeAll(reply.fds);
      return;
    }
    if (this.hasProtocolFeature(ProtocolFeature.REPLY_ACK)) {
      const reply = await this.#request(request, HeaderFlag.VERSION | HeaderFlag.NEED_REPLY, payload, fds, timeoutMs);
      closeAll(reply.fds);
      const status = decodeU64Reply(reply);
      if (status !== 0n) {
        throw new VhostError(FrontendErrorCode.NACK, `${requestName(request)} was refused by the backend (status ${status})`);
      }
      return;
    }
    this.send(request, payload, fds);
    await this.#sync(timeoutMs);
  }

  #request(
    request: number,
    flags: number,
    payload: Uint8Array,
    fds: readonly number[],
    timeoutMs: number,
  ): Promise<Message> {
    const unusable = this.#unusable();
    if (unusable !== undefined) return Promise.reject(unusable);
    return new Promise<Message>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#fail(new VhostError(FrontendErrorCode.TIMEOUT, `${requestName(request)}: no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.push({ request, resolve, reject, timer });
      this.#socket.send(encodeMessage(request, flags, payload), fds);
    });
  }

  /** A round trip that shows the backend processed everything sent before (GET_FEATURES, as QEMU). */
  async #sync(timeoutMs = this.#timeoutMs): Promise<void> {
    const reply = await this.request(FrontendRequest.GET_FEATURES, EMPTY, [], { timeoutMs });
    decodeU64Reply(reply);
  }

  async #requestU64(request: number, payload: Uint8Array = EMPTY): Promise<bigint> {
    const reply = await this.request(request, payload);
    closeAll(reply.fds);
    return decodeU64Reply(reply);
  }

  /** Sends a setup message: acked with REPLY_ACK, else sent without waiting (a later round trip orders it). */
  async #setup(request: number, payload: Uint8Array = EMPTY, fds: readonly number[] = []): Promise<void> {
    if (this.hasProtocolFeature(ProtocolFeature.REPLY_ACK)) await this.requestWithAck(request, payload, fds);
    else this.send(request, payload, fds);
  }

  #onData(bytes: Uint8Array, fds: number[]): void {
    let messages: Message[];
    try {
      messages = this.#reader.push(bytes, fds);
    } catch (err) {
      this.#fail(new VhostError(FrontendErrorCode.BAD_REPLY, 'malformed reply stream', { cause: err }));
      return;
    }
    for (let i = 0; i < messages.length; i++) {
      const msg = messages[i] as Message;
      const head = this.#pending[0];
      if (head === undefined || head.request !== msg.request) {
        for (let j = i; j < messages.length; j++) closeAll((messages[j] as Message).fds);
        const expected = head === undefined ? 'no request was pending' : `${requestName(head.request)} was pending`;
        this.#fail(new VhostError(FrontendErrorCode.BAD_REPLY, `unexpected ${requestName(msg.request)} reply: ${expected}`));
        return;
      }
      this.#pending.shift();
      clearTimeout(head.timer);
      head.resolve(msg);
    }
  }

  /** Why no request can be sent now, or undefined. */
  #unusable(): VhostError | undefined {
    if (this.#error !== undefined) return this.#error;
    if (this.#closed) return new VhostError(FrontendErrorCode.CLOSED, 'the frontend is closed');
    return undefined;
  }

  #checkUsable(): void {
    const err = this.#unusable();
    if (err !== undefined) throw err;
  }

  /** The connection is unusable: reject everything pending, drop the socket, tell listeners. */
  #fail(err: VhostError): void {
    if (this.#error !== undefined || this.#closed) return;
    this.#error = err;
    this.#dropConnection(err);
    this.#markClosed(err);
  }

  #dropConnection(err: VhostError): void {
    this.#socket.close();
    this.#reader.close();
    for (const p of this.#pending.splice(0)) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    for (const q of this.#queues.values()) q.setRunning(false);
    for (const listener of [...this.#disconnectListeners]) {
      try {
        listener(err);
      } catch {
        // a listener's bug must not stop the others
      }
    }
  }

  /**
   * Disconnects and releases every fd and watcher the frontend owns (socket, kick and call eventfds, and the guest
   * RAM when `start` was given `ownMemory`). Pending requests reject with `VHOST_FRONTEND_CLOSED`. Idempotent.
   */
  close(): void {
    if (this.#closed) return;
    const err = new VhostError(FrontendErrorCode.CLOSED, 'the frontend is closed');
    const alreadyFailed = this.#error !== undefined;
    this.#closed = true;
    if (!alreadyFailed) this.#dropConnection(err);
    this.#disconnectListeners.clear();
    for (const q of this.#queues.values()) q.dispose();
    this.#queues.clear();
    if (this.#ownsMemory) this.#memory?.close();
    this.#memory = undefined;
    this.#markClosed(this.#error);
  }

  // ---- handshake -------------------------------------------------------------------------------------------------

  async #handshake(options: FrontendOptions): Promise<void> {
    const R = FrontendRequest;
    this.#backendFeatures = await this.#requestU64(R.GET_FEATURES);
    if (hasFeature(this.#backendFeatures, VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES)) {
      this.#backendProtocolFeatures = await this.#requestU64(R.GET_PROTOCOL_FEATURES);
      const wanted = this.#backendProtocolFeatures & SUPPORTED_PROTOCOL_FEATURES & ~(options.maskProtocolFeatures ?? 0n);
      // No NEED_REPLY here: whether REPLY_ACK applies to this very message differs between backends.
      this.send(R.SET_PROTOCOL_FEATURES, u64Payload.encode(wanted));
      this.#protocolFeatures = wanted;
      if (this.hasProtocolFeature(ProtocolFeature.MQ)) {
        this.#queueNum = Number(await this.#requestU64(R.GET_QUEUE_NUM));
      }
      if (this.hasProtocolFeature(ProtocolFeature.CONFIGURE_MEM_SLOTS)) {
        this.#maxMemSlots = Number(await this.#requestU64(R.GET_MAX_MEM_SLOTS));
      }
    }
    await this.requestWithAck(R.SET_OWNER);
    const configSize = options.configSize ?? DEFAULT_CONFIG_SIZE;
    if (configSize > 0 && this.hasProtocolFeature(ProtocolFeature.CONFIG)) {
      this.#config = await this.getConfig(0, configSize);
    }
  }

  /**
   * GET_INFLIGHT_FD (needs INFLIGHT_SHMFD), as QEMU's vhost-user-blk asks before it starts the device: the backend's
   * inflight region for `numQueues` queues of `queueSize` entries. Keep it (the fd is the caller's to close) and
   * hand it back with `setInflightFd`, now and to a restarted backend. `fd` is -1 when the backend tracks nothing
   * (`mmapSize` 0).
   */
  async getInflightFd(numQueues: number, queueSize: number): Promise<Inflight & { fd: number }> {
    this.#need(ProtocolFeature.INFLIGHT_SHMFD, 'GET_INFLIGHT_FD');
    const reply = await this.request(FrontendRequest.GET_INFLIGHT_FD, inflightPayload.encode({ mmapSize: 0n, mmapOffset: 0n, numQueues, queueSize }));
    let region: Inflight;
    try {
      region = inflightPayload.decode(reply.payload);
    } catch (err) {
      closeAll(reply.fds);
      throw new VhostError(FrontendErrorCode.BAD_REPLY, 'GET_INFLIGHT_FD: bad reply payload', { cause: err });
    }
    const expected = region.mmapSize === 0n ? 0 : 1;
    if (reply.fds.length !== expected) {
      closeAll(reply.fds);
      throw new VhostError(FrontendErrorCode.BAD_REPLY, `GET_INFLIGHT_FD: ${reply.fds.length} fds with mmap_size ${region.mmapSize}`);
    }
    return { ...region, fd: reply.fds[0] ?? -1 };
  }

  /** SET_INFLIGHT_FD (needs INFLIGHT_SHMFD): the region `getInflightFd` returned (its fd stays the caller's). */
  async setInflightFd(region: Inflight & { fd: number }): Promise<void> {
    this.#need(ProtocolFeature.INFLIGHT_SHMFD, 'SET_INFLIGHT_FD');
    const { fd, ...payload } = region;
    await this.requestWithAck(FrontendRequest.SET_INFLIGHT_FD, inflightPayload.encode(payload), [fd]);
  }

  /**
   * SET_FEATURES (bit 30 added when the backend offers it: QEMU keeps it, and without it a backend enables rings as
   * soon as they are kicked). `start` sends it; QEMU also sends it before GET/SET_INFLIGHT_FD
   * (`vhost_dev_prepare_inflight`), since the backend lays the region out for the negotiated ring layout.
   */
  async setFeatures(features: bigint): Promise<void> {
    let f = features;
    if (hasFeature(this.#backendFeatures, VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES)) f |= featureBit(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES);
    await this.#setup(FrontendRequest.SET_FEATURES, u64Payload.encode(f));
    this.#features = f;
  }

  /** GET_CONFIG: `size` bytes of the device config space from `offset`. Needs CONFIG. */
  async getConfig(offset: number, size: number): Promise<Uint8Array> {
    this.#need(ProtocolFeature.CONFIG, 'GET_CONFIG');
    if (!Number.isInteger(size) || size < 1 || size > MAX_CONFIG_SIZE) {
      throw new RangeError(`config size must be 1..${MAX_CONFIG_SIZE}: ${size}`);
    }
    const payload = deviceConfigPayload.encode({ offset, size, flags: 0, data: new Uint8Array(size) });
    const reply = await this.request(FrontendRequest.GET_CONFIG, payload);
    closeAll(reply.fds);
    if (reply.payload.length <= CONFIG_HEADER_SIZE) {
      throw new VhostError(FrontendErrorCode.CONFIG_FAILED, `GET_CONFIG of ${size} bytes at ${offset} failed`);
    }
    let config;
    try {
      config = deviceConfigPayload.decode(reply.payload);
    } catch (err) {
      throw new VhostError(FrontendErrorCode.BAD_REPLY, 'GET_CONFIG: bad reply payload', { cause: err });
    }
    if (config.size !== size) {
      throw new VhostError(FrontendErrorCode.BAD_REPLY, `GET_CONFIG: asked for ${size} bytes, got ${config.size}`);
    }
    return config.data;
  }

  // ---- start -----------------------------------------------------------------------------------------------------

  /**
   * Acknowledges features, describes memory and starts the queues (see the module comment for the message order).
   * The rings are zeroed and a driver is made for each queue: packed when `features` has VIRTIO_F_RING_PACKED, split
   * otherwise, with EVENT_IDX when acknowledged.
   */
  async start(options: StartOptions): Promise<void> {
    this.#checkUsable();
    if (this.#started) throw new VhostError(FrontendErrorCode.BAD_STATE, 'already started (resetDevice first)');
    const { memory, queues } = options;
    if ((options.features & ~this.#backendFeatures) !== 0n) {
      throw new VhostError(
        FrontendErrorCode.BAD_STATE,
        `features 0x${(options.features & ~this.#backendFeatures).toString(16)} are not offered by the backend`,
      );
    }
    if (queues.length === 0) throw new VhostError(FrontendErrorCode.BAD_STATE, 'start needs at least one queue');
    const seen = new Set<number>();
    for (const q of queues) {
      if (seen.has(q.index)) throw new VhostError(FrontendErrorCode.BAD_STATE, `queue ${q.index} is listed twice`);
      seen.add(q.index);
      const queueCount = this.#queueNum * (options.queueNumUnit ?? 1);
      if (this.hasProtocolFeature(ProtocolFeature.MQ) && q.index >= queueCount) {
        throw new VhostError(FrontendErrorCode.BAD_STATE, `queue ${q.index}: the backend has ${queueCount} queues`);
      }
    }
    const mode = options.memoryMode ?? 'table';
    if (mode === 'regions') this.#need(ProtocolFeature.CONFIGURE_MEM_SLOTS, 'ADD_MEM_REG');
    else if (memory.regions.length > MAX_MEM_TABLE_REGIONS) {
      throw new VhostError(FrontendErrorCode.BAD_STATE, `SET_MEM_TABLE carries at most ${MAX_MEM_TABLE_REGIONS} regions`);
    }

    const R = FrontendRequest;
    this.#started = true;
    await this.setFeatures(options.features);
    const features = this.#features;
    this.#memory = memory;
    this.#ownsMemory = options.ownMemory ?? false;

    if (mode === 'regions') {
      for (const region of memory.regions) await this.addMemoryRegion(region);
    } else {
      await this.setMemTable(memory);
    }

    const eventIdx = hasFeature(features, VirtioFeature.RING_EVENT_IDX);
    const packed = hasFeature(features, VirtioFeature.RING_PACKED);
    for (const qc of queues) {
      if (qc.adopt !== undefined) {
        const old = qc.adopt;
        if (old.driver.packed !== packed) throw new VhostError(FrontendErrorCode.BAD_STATE, 'an adopted queue keeps its ring layout');
        old.dispose();
        const queue = new FrontendQueue(qc.index, old.size, old.layout, old.driver);
        this.#queues.set(qc.index, queue);
        const restored = old.driver instanceof SplitQueueDriver ? old.driver.readUsedIdx() : PACKED_RING_START;
        await this.#setupRing(queue, qc.base ?? restored);
        continue;
      }
      const base = qc.ringGpa ?? memory.alloc(queueDriverLayout(packed, qc.size, 0).end, { align: 4096 });
      const { layout, driver } = createQueueDriver<number>(memory, { packed, size: qc.size, base, eventIdx });
      if (qc.base !== undefined) driver.resetPositions(qc.base);
      const queue = new FrontendQueue(qc.index, qc.size, layout, driver);
      this.#queues.set(qc.index, queue);
      await this.#setupRing(queue, driver.availPosition);
    }
    if (hasFeature(features, VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES)) {
      for (const queue of this.#queues.values()) {
        await this.#setup(R.SET_VRING_ENABLE, vringStatePayload.encode({ index: queue.index, num: 1 }));
      }
    }
    if (this.hasProtocolFeature(ProtocolFeature.STATUS)) {
      const status =
        options.status ??
        DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK;
      await this.#setup(R.SET_STATUS, statusPayload.encode(status));
    }
    // Without REPLY_ACK nothing above was confirmed: one round trip shows the backend processed all of it.
    if (!this.hasProtocolFeature(ProtocolFeature.REPLY_ACK)) await this.#sync();
    for (const queue of this.#queues.values()) queue.setRunning(true);
  }

  /** SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR (UVAs), SET_VRING_KICK, SET_VRING_CALL. */
  async #setupRing(queue: FrontendQueue, base: number): Promise<void> {
    const R = FrontendRequest;
    const memory = this.#requireMemory();
    const { index } = queue;
    await this.#setup(R.SET_VRING_NUM, vringStatePayload.encode({ index, num: queue.size }));
    // Packed: both halves, the used position equal to the avail one (nothing in flight when a ring is set up).
    const num = queue.driver.packed ? (base | (base << 16)) >>> 0 : base & 0xffff;
    await this.#setup(R.SET_VRING_BASE, vringStatePayload.encode({ index, num }));
    await this.#setup(R.SET_VRING_ADDR, this.#vringAddr(queue, memory));
    await this.#setup(R.SET_VRING_KICK, vringFilePayload.encode({ index, noFd: false }), [queue.kickFd]);
    await this.#setup(R.SET_VRING_CALL, vringFilePayload.encode({ index, noFd: false }), [queue.callFd]);
  }

  /**
   * SET_VRING_ADDR's payload for `queue`: its rings as frontend addresses, and while logging is on (`setLogging`)
   * VHOST_VRING_F_LOG with the used ring's guest-physical address (as QEMU: `log_guest_addr` = `used_phys`).
   */
  #vringAddr(queue: FrontendQueue, memory: GuestRam): Uint8Array {
    const { layout } = queue;
    const logging = hasFeature(this.#features, VirtioFeature.LOG_ALL);
    return vringAddrPayload.encode({
      index: queue.index,
      flags: logging ? VringAddrFlag.LOG : 0,
      desc: BigInt(memory.gpaToUva(layout.descAddr)),
      used: BigInt(memory.gpaToUva(layout.usedAddr)),
      avail: BigInt(memory.gpaToUva(layout.availAddr)),
      log: BigInt(layout.usedAddr),
    });
  }

  // ---- migration -------------------------------------------------------------------------------------------------

  /**
   * SET_LOG_BASE (needs LOG_SHMFD): the backend logs into `log` (migration-log.ts) from the reply on; a log given
   * while logging is on replaces the old one (QEMU's resize), which the backend no longer writes once this resolves.
   * Rejects with `VHOST_FRONTEND_NACK` when the backend refuses it.
   */
  async setLogBase(log: MigrationLog): Promise<void> {
    this.#need(ProtocolFeature.LOG_SHMFD, 'SET_LOG_BASE');
    const reply = await this.request(FrontendRequest.SET_LOG_BASE, logPayload.encode({ mmapSize: BigInt(log.size), mmapOffset: 0n }), [log.fd]);
    closeAll(reply.fds);
    // Backends answer with no payload (DPDK), a u64 (this package: 0, or nonzero for a refusal; libvhost-user, as in
    // qemu-storage-daemon: the log's size) or the log description again (rust-vmm). QEMU reads none of it; here a
    // u64 other than 0 and the size sent is a refusal.
    const status = reply.payload.length === 8 ? decodeU64Reply(reply) : 0n;
    if (status !== 0n && status !== BigInt(log.size)) {
      throw new VhostError(FrontendErrorCode.NACK, 'SET_LOG_BASE was refused by the backend');
    }
  }

  /**
   * Turns dirty logging on or off, as QEMU's `vhost_dev_set_log` at a migration's start and end: SET_FEATURES with
   * or without VHOST_F_LOG_ALL, then SET_VRING_ADDR again for every running queue with or without
   * VHOST_VRING_F_LOG, each acknowledged before the next (QEMU waits: from then on, the backend logs). Give the log
   * first (`setLogBase`).
   */
  async setLogging(on: boolean): Promise<void> {
    const logAll = featureBit(VirtioFeature.LOG_ALL);
    const features = on ? this.#features | logAll : this.#features & ~logAll;
    await this.requestWithAck(FrontendRequest.SET_FEATURES, u64Payload.encode(features));
    this.#features = features;
    const memory = this.#requireMemory();
    for (const queue of this.#queues.values()) {
      if (queue.running) await this.requestWithAck(FrontendRequest.SET_VRING_ADDR, this.#vringAddr(queue, memory));
    }
  }

  /**
   * Stops every running queue (GET_VRING_BASE: the backend completes what it took, logs it and flushes before it
   * answers) and returns where each stopped: what a migration carries over to the destination, which starts a new
   * frontend on the same guest RAM with `start({ queues: [{ index, size, adopt, base }] })`.
   */
  async suspend(): Promise<Map<number, number>> {
    const bases = new Map<number, number>();
    for (const queue of this.#queues.values()) if (queue.running) bases.set(queue.index, await this.stopQueue(queue.index));
    return bases;
  }

  /**
   * Stops queue `index` (GET_VRING_BASE) and resolves with the backend's next avail position (split: index; packed:
   * `index | wrap << 15`, the avail half of the reply). The driver keeps its ring state (and the requests in flight),
   * so `restartQueue` can resume it.
   */
  async stopQueue(index: number): Promise<number> {
    const queue = this.queue(index);
    const reply = await this.request(FrontendRequest.GET_VRING_BASE, vringStatePayload.encode({ index, num: 0 }));
    closeAll(reply.fds);
    let state;
    try {
      state = vringStatePayload.decode(reply.payload);
      if (!queue.driver.packed) splitVringBase(state.num);
    } catch (err) {
      throw new VhostError(FrontendErrorCode.BAD_REPLY, 'GET_VRING_BASE: bad reply payload', { cause: err });
    }
    if (state.index !== index) {
      throw new VhostError(FrontendErrorCode.BAD_REPLY, `GET_VRING_BASE for queue ${index} answered for ${state.index}`);
    }
    queue.setRunning(false);
    return queue.driver.packed ? state.num & 0xffff : state.num;
  }

  /**
   * Sets a stopped queue up again with the same rings and eventfds (SET_VRING_NUM ... SET_VRING_CALL, then
   * SET_VRING_ENABLE 1), resuming at avail position `base` (default: the driver's next avail position).
   */
  async restartQueue(index: number, base?: number): Promise<void> {
    const queue = this.queue(index);
    if (queue.running) throw new VhostError(FrontendErrorCode.BAD_STATE, `queue ${index} is running`);
    await this.#setupRing(queue, base ?? queue.driver.availPosition);
    if (hasFeature(this.#features, VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES)) {
      await this.#setup(FrontendRequest.SET_VRING_ENABLE, vringStatePayload.encode({ index, num: 1 }));
    }
    if (!this.hasProtocolFeature(ProtocolFeature.REPLY_ACK)) await this.#sync();
    queue.setRunning(true);
  }

  /**
   * Moves a stopped queue's rings to `ringGpa` (fresh rings, resuming at the driver's avail position) and starts it
   * there, with new eventfds: SET_VRING_NUM ... SET_VRING_ENABLE with the new addresses. The queue must have no
   * requests in flight. Returns the new queue object (the old one is released).
   */
  async moveQueue(index: number, ringGpa: number): Promise<FrontendQueue> {
    const old = this.queue(index);
    if (old.running || old.driver.inFlight !== 0) {
      throw new VhostError(FrontendErrorCode.BAD_STATE, `queue ${index} must be stopped and idle to move its rings`);
    }
    const memory = this.#requireMemory();
    const { packed, eventIdx } = old.driver;
    const { layout, driver } = createQueueDriver<number>(memory, { packed, size: old.size, base: ringGpa, eventIdx });
    const base = old.driver.availPosition;
    driver.resetPositions(base);
    const queue = new FrontendQueue(index, old.size, layout, driver);
    old.dispose();
    this.#queues.set(index, queue);
    await this.restartQueue(index, base);
    return queue;
  }

  /** SET_VRING_ENABLE: enables or disables a ring (needs VHOST_USER_F_PROTOCOL_FEATURES). */
  async setVringEnable(index: number, enable: boolean): Promise<void> {
    this.queue(index);
    await this.requestWithAck(FrontendRequest.SET_VRING_ENABLE, vringStatePayload.encode({ index, num: enable ? 1 : 0 }));
  }

  // ---- memory ----------------------------------------------------------------------------------------------------

  /** SET_MEM_TABLE with every region of `memory` (at most 8), one fd per region. */
  async setMemTable(memory: GuestRam = this.#requireMemory()): Promise<void> {
    const regions = memory.regions;
    if (regions.length === 0 || regions.length > MAX_MEM_TABLE_REGIONS) {
      throw new VhostError(FrontendErrorCode.BAD_STATE, `SET_MEM_TABLE needs 1 to ${MAX_MEM_TABLE_REGIONS} regions, got ${regions.length}`);
    }
    const payload = memoryTablePayload.encode({ regions: regions.map((r) => memory.describe(r)) });
    await this.requestWithAck(FrontendRequest.SET_MEM_TABLE, payload, regions.map((r) => r.file.fd));
    this.#memory = memory;
  }

  /** ADD_MEM_REG for a region already mapped in the guest RAM (needs CONFIGURE_MEM_SLOTS). */
  async addMemoryRegion(region: GuestRamRegion): Promise<void> {
    this.#need(ProtocolFeature.CONFIGURE_MEM_SLOTS, 'ADD_MEM_REG');
    const memory = this.#requireMemory();
    const payload = singleMemoryRegionPayload.encode(memory.describe(region));
    await this.requestWithAck(FrontendRequest.ADD_MEM_REG, payload, [region.file.fd]);
  }

  /**
   * REM_MEM_REG (needs CONFIGURE_MEM_SLOTS). The region stays mapped here: unmap it with `GuestRam.removeRegion`
   * once this resolves.
   */
  async removeMemoryRegion(region: GuestRamRegion): Promise<void> {
    this.#need(ProtocolFeature.CONFIGURE_MEM_SLOTS, 'REM_MEM_REG');
    const memory = this.#requireMemory();
    const payload = singleMemoryRegionPayload.encode(memory.describe(region));
    await this.requestWithAck(FrontendRequest.REM_MEM_REG, payload);
  }

  // ---- device state ----------------------------------------------------------------------------------------------

  /**
   * RESET_DEVICE (needs RESET_DEVICE): the backend disables every ring and forgets features and rings. The queues are
   * released here too (their eventfds closed); `start` may be called again.
   */
  async resetDevice(): Promise<void> {
    this.#need(ProtocolFeature.RESET_DEVICE, 'RESET_DEVICE');
    await this.requestWithAck(FrontendRequest.RESET_DEVICE);
    for (const q of this.#queues.values()) q.dispose();
    this.#queues.clear();
    this.#features = 0n;
    this.#started = false;
  }

  /** GET_STATUS (needs STATUS): the virtio device status byte. */
  async getStatus(): Promise<number> {
    this.#need(ProtocolFeature.STATUS, 'GET_STATUS');
    const reply = await this.request(FrontendRequest.GET_STATUS);
    closeAll(reply.fds);
    try {
      return statusPayload.decode(reply.payload);
    } catch (err) {
      throw new VhostError(FrontendErrorCode.BAD_REPLY, 'GET_STATUS: bad reply payload', { cause: err });
    }
  }

  /** SET_STATUS (needs STATUS). */
  async setStatus(status: number): Promise<void> {
    this.#need(ProtocolFeature.STATUS, 'SET_STATUS');
    await this.requestWithAck(FrontendRequest.SET_STATUS, statusPayload.encode(status));
  }

  #need(bit: number, what: string): void {
    if (!this.hasProtocolFeature(bit)) {
      throw new VhostError(FrontendErrorCode.UNSUPPORTED, `${what} needs a protocol feature that was not negotiated (bit ${bit})`);
    }
  }

  #requireMemory(): GuestRam {
    if (this.#memory === undefined) throw new VhostError(FrontendErrorCode.BAD_STATE, 'no guest memory yet (start first)');
    return this.#memory;
  }
}
