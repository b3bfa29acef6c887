/**
 * The backend's side of one vhost-user connection: the protocol state machine (features, memory table, vrings,
 * status) and the dispatch of each frontend message. Runs on the main thread; queue processing is delegated to
 * worker threads (worker-pool.ts), which this session commands and awaits.
 *
 * Messages are handled strictly one at a time (the connection awaits `handle`), so a handler that waits for
 * workers (a memory-table change, a ring stop) holds back the next message, and the reply is sent only once the
 * change has taken effect in every worker.
 */
import diagnosticsChannel from 'node:diagnostics_channel';
import type { Logger } from 'pino';
import { ProtocolError, VhostError } from '../errors.js';
import { MemoryTable } from '../memory/memory-table.js';
import { mapRegion, regionMatches, type MappedRegion } from '../memory/region.js';
import * as native from '../native/index.js';
import {
  FrontendRequest,
  HeaderFlag,
  MAX_MEM_TABLE_REGIONS,
  ProtocolFeature,
  VirtioFeature,
  VringAddrFlag,
  requestName,
} from '../protocol/constants.js';
import { encodeReply } from '../protocol/message-writer.js';
import type { Message } from '../protocol/message-reader.js';
import {
  deviceConfigPayload,
  inflightPayload,
  logPayload,
  memoryTablePayload,
  packedVringBase,
  singleMemoryRegionPayload,
  splitVringBase,
  u64Payload,
  vringAddrPayload,
  vringFilePayload,
  vringStatePayload,
  type MemoryRegion,
} from '../protocol/payloads.js';
import { isValidQueueSize } from '../queue/split-queue.js';
import { availRingSize, descTableSize, PACKED_EVENT_SIZE, usedRingSize } from '../queue/constants.js';
import type { VirtioDevice } from '../devices/device.js';
import type { RingLog, WorkerLog, WorkerRegion } from './worker-messages.js';
import { mapLog, type LogMapping } from './session-log.js';
import type { PoolLease } from './worker-pool.js';
import { SessionInflight } from './session-inflight.js';
import type { InflightLimits } from './inflight-region.js';

export interface SessionOptions {
  device: VirtioDevice;
  /** This session's share of the worker pool (released by `close`). */
  lease: PoolLease;
  /** Called with the time (ms) from the arrival of each memory-table change to its reply (for metrics). */
  onMemoryChange?: (durationMs: number) => void;
  /**
   * Memory slots offered (GET_MAX_MEM_SLOTS), 1..509, default 509. 0: CONFIGURE_MEM_SLOTS is not offered, so the
   * frontend sends whole tables with SET_MEM_TABLE (at most 8 regions).
   */
  memSlots?: number;
}

/** A session's state for the management API and metrics (`BackendSession.snapshot`). */
export interface SessionSnapshot {
  offeredFeatures: bigint;
  features: bigint;
  protocolFeatures: bigint;
  needsReset: boolean;
  /** Times a guest error stopped a queue. */
  queueFailures: number;
  /** Memory-table changes handled (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG). */
  memoryChanges: number;
  memory: { regions: number; bytes: number };
  queues: { index: number; started: boolean; failed: boolean; worker: number }[];
}

/** Memory slots offered with CONFIGURE_MEM_SLOTS (as rust-vmm; QEMU's own limit for vhost-user is 509 too). */
export const MAX_MEM_SLOTS = 509;

/** virtio device status bits (VIRTIO 1.2 §2.1). */
const STATUS_NEEDS_RESET = 0x40;

const bit = (n: number): bigint => 1n << BigInt(n);

/** Transport features every device gets. */
const TRANSPORT_FEATURES =
  bit(VirtioFeature.VERSION_1) |
  bit(VirtioFeature.RING_INDIRECT_DESC) |
  bit(VirtioFeature.RING_EVENT_IDX) |
  bit(VirtioFeature.RING_PACKED) |
  bit(VirtioFeature.LOG_ALL) |
  bit(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES);

export const OFFERED_PROTOCOL_FEATURES =
  bit(ProtocolFeature.MQ) |
  bit(ProtocolFeature.LOG_SHMFD) |
  bit(ProtocolFeature.REPLY_ACK) |
  bit(ProtocolFeature.CONFIG) |
  bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) |
  bit(ProtocolFeature.STATUS) |
  bit(ProtocolFeature.RESET_DEVICE);

/**
 * Requests whose reply is part of the message (sent whether or not REPLY_ACK asked for one). When one fails there is
 * no reply to send: a REPLY_ACK u64 under its request code would be read as that reply, so the connection is
 * dropped instead. This includes the requests this backend does not implement (their features are not offered)
 * whose reply is a payload of its own: GET_INFLIGHT_FD (inflight description and an fd), POSTCOPY_ADVISE (the
 * userfault fd), SET_DEVICE_STATE_FD (u64 and maybe an fd), CHECK_DEVICE_STATE (a u64 result QEMU awaits without
 * NEED_REPLY), GET_SHARED_OBJECT, CREATE_CRYPTO_SESSION, GET_SHMEM_CONFIG. Not POSTCOPY_LISTEN / POSTCOPY_END nor
 * IOTLB_MSG: their reply is the REPLY_ACK u64 itself (QEMU reads it with process_message_reply), so a nack is right.
 */
const REPLYING_REQUESTS = new Set<number>([
  FrontendRequest.GET_FEATURES,
  FrontendRequest.GET_PROTOCOL_FEATURES,
  FrontendRequest.GET_QUEUE_NUM,
  FrontendRequest.GET_VRING_BASE,
  FrontendRequest.GET_CONFIG,
  FrontendRequest.GET_MAX_MEM_SLOTS,
  FrontendRequest.GET_STATUS,
  FrontendRequest.GET_INFLIGHT_FD,
  FrontendRequest.POSTCOPY_ADVISE,
  FrontendRequest.SET_DEVICE_STATE_FD,
  FrontendRequest.CHECK_DEVICE_STATE,
  FrontendRequest.GET_SHARED_OBJECT,
  FrontendRequest.CREATE_CRYPTO_SESSION,
  FrontendRequest.GET_SHMEM_CONFIG,
]);

/**
 * An error no reply can express (a memory change that took effect but could not complete): the connection is
 * dropped even when REPLY_ACK asked for an ack.
 */
class DisconnectError extends VhostError {}

/**
 * How long a memory change that already took effect in the workers may wait for them and for I/O in flight on its
 * old regions (docs/memory-sync.md) before the connection is dropped. Well above a slow disk's I/O time; QEMU and
 * the kernel's vhost wait without a bound.
 */
const APPLIED_CHANGE_TIMEOUT_MS = 60_000;

/** Requests that change the memory table. */
const MEMORY_REQUESTS = new Set<number>([FrontendRequest.SET_MEM_TABLE, FrontendRequest.ADD_MEM_REG, FrontendRequest.REM_MEM_REG]);

/**
 * diagnostics_channel `vhost-user:memory-change`: one `MemoryChangeEvent` per memory-table change that took effect,
 * with the time from the message's arrival to its reply (grace period, pins and revoke included). Free when nobody
 * subscribes.
 */
export interface MemoryChangeEvent {
  request: string;
  gen: number;
  durationMs: number;
}
export const memoryChannel = diagnosticsChannel.channel('vhost-user:memory-change');

interface Vring {
  num: number;
  /** Frontend virtual addresses from SET_VRING_ADDR, or undefined before it. */
  addr: { desc: number; used: number; avail: number } | undefined;
  /** SET_VRING_ADDR's VHOST_VRING_F_LOG and `log_guest_addr`: log the used ring's writes there while logging. */
  ringLog: RingLog;
  base: number;
  kickFd: number;
  callFd: number;
  errFd: number;
  enabled: boolean;
  /** Running in a worker. */
  started: boolean;
  /** Stopped for good by a guest error until the device is reset. */
  failed: boolean;
}

function newVring(): Vring {
  return { num: 0, addr: undefined, ringLog: { enabled: false, usedAddr: 0 }, base: 0, kickFd: -1, callFd: -1, errFd: -1, enabled: false, started: false, failed: false };
}

/**
 * SET_VRING_BASE of a packed ring: where to resume, `avail index | avail wrap << 15`. The used half (bits 16-31) is
 * QEMU's; it equals the avail half whenever the ring was stopped by GET_VRING_BASE (we drain first), and DPDK's
 * virtio_user sends 0 there (0x8000 at start): the used position is taken to be the avail position.
 */
function packedResumePosition(num: number): number {
  const b = packedVringBase(num);
  return b.availIndex | (b.availWrapCounter ? 0x8000 : 0);
}

function addressOf(value: bigint, what: string): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new ProtocolError('VHOST_PROTOCOL_BAD_RING_ADDRESS', `${what} address 0x${value.toString(16)} is out of range`);
  }
  return Number(value);
}

/** A reply that carries fds (GET_INFLIGHT_FD): sent with them, then our copies are closed. */
interface ReplyWithFds {
  readonly payload: Uint8Array;
  readonly fds: number[];
}

export class BackendSession {
  readonly device: VirtioDevice;
  readonly #inflight: SessionInflight;
  readonly #send: (bytes: Uint8Array, fds: readonly number[]) => void;
  readonly #log: Logger;
  readonly #offeredFeatures: bigint;
  #features = 0n;
  #protocolFeatures = 0n;
  #memory: MemoryTable = MemoryTable.EMPTY;
  /** Regions added again by identical ADD_MEM_REGs (QEMU's per-queue-pair vhost devices): how many times more. */
  readonly #extraRegionRefs = new Map<MappedRegion, number>();
  #vrings: Vring[];
  #status = 0;
  #needsReset = false;
  /** Times a guest error stopped a queue (NEEDS_RESET), for metrics. */
  #queueFailures = 0;
  /** Memory-table changes that took effect, for metrics. */
  #memoryChanges = 0;
  readonly #pool: PoolLease;
  readonly #onMemoryChange: ((durationMs: number) => void) | undefined;
  #closed = false;
  /** Generation of #memory (published in the sync block). */
  #gen = 0;
  /** Memory slots not used by any region (each slot has a pin counter in the sync block). */
  readonly #freeSlots: number[] = Array.from({ length: MAX_MEM_SLOTS }, (_, i) => MAX_MEM_SLOTS - 1 - i);
  readonly #memSlots: number;
  readonly #offeredProtocolFeatures: bigint;
  /** Migration: the dirty log SET_LOG_BASE mapped (session-log.ts), and the one the workers were last given. */
  #logMapping: LogMapping | undefined;
  #publishedLog: LogMapping | undefined;

  constructor(options: SessionOptions, send: (bytes: Uint8Array, fds: readonly number[]) => void, log: Logger) {
    this.device = options.device;
    this.#send = send;
    this.#log = log;
    this.#pool = options.lease;
    this.#onMemoryChange = options.onMemoryChange;
    this.#pool.onEvent = (ev) => this.#onQueueError(ev);
    this.#memSlots = options.memSlots ?? MAX_MEM_SLOTS;
    if (!Number.isInteger(this.#memSlots) || this.#memSlots < 0 || this.#memSlots > MAX_MEM_SLOTS) {
      throw new VhostError('VHOST_BAD_OPTION', `memSlots must be 0..${MAX_MEM_SLOTS}`);
    }
    this.#offeredProtocolFeatures =
      (this.#memSlots === 0 ? OFFERED_PROTOCOL_FEATURES & ~bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) : OFFERED_PROTOCOL_FEATURES) |
      (options.device.inflightTracking === true ? bit(ProtocolFeature.INFLIGHT_SHMFD) : 0n) |
      (options.device.announceQueue !== undefined ? bit(ProtocolFeature.RARP) : 0n);
    this.#inflight = new SessionInflight(this.#log);
    this.#offeredFeatures = options.device.features | TRANSPORT_FEATURES;
    this.#vrings = Array.from({ length: options.device.numQueues }, newVring);
  }

  /** The memory table in use (for tests and diagnostics). */
  get memory(): MemoryTable {
    return this.#memory;
  }

  /** True when a guest error stopped a queue: the device needs a reset (reported in GET_STATUS). */
  get needsReset(): boolean {
    return this.#needsReset;
  }

  /** What the management API and metrics report of this session. */
  snapshot(): SessionSnapshot {
    return {
      offeredFeatures: this.#offeredFeatures,
      features: this.#features,
      protocolFeatures: this.#protocolFeatures,
      needsReset: this.#needsReset,
      queueFailures: this.#queueFailures,
      memoryChanges: this.#memoryChanges,
      memory: { regions: this.#memory.regions.length, bytes: this.#memory.regions.reduce((n, r) => n + r.size, 0) },
      queues: this.#vrings.map((v, index) => ({ index, started: v.started, failed: v.failed, worker: this.#pool.workerOf(index) ?? -1 })),
    };
  }

  /**
   * Handles one message and sends its reply. Returns false when the connection must be dropped (a protocol error
   * the frontend cannot be told about through a reply).
   */
  async handle(msg: Message): Promise<boolean> {
    const name = requestName(msg.request);
    // SET_LOG_BASE with LOG_SHMFD is always answered (QEMU waits for that reply): a u64, 0 or a refusal, as an ack.
    const ackWanted =
      ((msg.flags & HeaderFlag.NEED_REPLY) !== 0 && (this.#protocolFeatures & bit(ProtocolFeature.REPLY_ACK)) !== 0n) ||
      (msg.request === FrontendRequest.SET_LOG_BASE && (this.#protocolFeatures & bit(ProtocolFeature.LOG_SHMFD)) !== 0n);
    this.#log.debug({ request: name, size: msg.payload.length, fds: msg.fds.length }, 'message');
    const t0 = MEMORY_REQUESTS.has(msg.request) ? performance.now() : -1;
    let reply: Uint8Array | ReplyWithFds | undefined;
    try {
      reply = await this.#dispatch(msg);
      if (t0 >= 0) {
        const durationMs = performance.now() - t0;
        this.#memoryChanges++;
        this.#onMemoryChange?.(durationMs);
        if (memoryChannel.hasSubscribers) {
          const event: MemoryChangeEvent = { request: name, gen: this.#gen, durationMs };
          memoryChannel.publish(event);
        }
      }
    } catch (err) {
      this.#log.warn({ err, request: name }, 'request failed');
      if (ackWanted && !REPLYING_REQUESTS.has(msg.request) && !(err instanceof DisconnectError)) {
        this.#reply(msg.request, u64Payload.encode(1n));
        return true;
      }
      return false;
    } finally {
      // A handler that keeps an fd shifts it out of msg.fds; whatever is left is closed here.
      for (const fd of msg.fds.splice(0)) native.close(fd);
    }
    if (reply instanceof Uint8Array) {
      this.#reply(msg.request, reply);
    } else if (reply !== undefined) {
      try {
        this.#send(encodeReply(msg.request, reply.payload), reply.fds);
      } finally {
        for (const fd of reply.fds) native.close(fd); // the peer has its own copies now
      }
    } else if (ackWanted) this.#reply(msg.request, u64Payload.encode(0n));
    return true;
  }

  #reply(request: number, payload: Uint8Array): void {
    this.#send(encodeReply(request, payload), []);
  }

  #vring(index: number): Vring {
    const vring = this.#vrings[index];
    if (vring === undefined) {
      throw new ProtocolError('VHOST_PROTOCOL_BAD_VRING_INDEX', `vring index ${index} is not below ${this.#vrings.length}`);
    }
    return vring;
  }

  #expectNoFds(msg: Message): void {
    if (msg.fds.length !== 0) throw new ProtocolError('VHOST_PROTOCOL_UNEXPECTED_FDS', `${requestName(msg.request)} carries no fds`);
  }

  async #dispatch(msg: Message): Promise<Uint8Array | ReplyWithFds | undefined> {
    const R = FrontendRequest;
    const p = msg.payload;
    switch (msg.request) {
      case R.GET_FEATURES:
        return u64Payload.encode(this.#offeredFeatures);
      case R.SET_FEATURES: {
        const features = u64Payload.decode(p);
        if ((features & ~this.#offeredFeatures) !== 0n) {
          throw new ProtocolError('VHOST_PROTOCOL_BAD_FEATURES', `features 0x${features.toString(16)} were not offered`);
        }
        const logAll = (features & bit(VirtioFeature.LOG_ALL)) !== 0n;
        if (logAll && !this.#hasFeature(VirtioFeature.LOG_ALL) && !this.#logCovers(this.#memory) && this.#vrings.some((v) => v.started)) {
          // Running rings would write memory that no log records. (A device being started with logging on gets
          // SET_LOG_BASE after SET_FEATURES, vhost_dev_start: its rings wait for the log, #maybeStartRing.)
          throw new ProtocolError('VHOST_PROTOCOL_LOG_NOT_MAPPED', 'LOG_ALL while rings run needs a log covering guest memory (SET_LOG_BASE) first');
        }
        this.#features = features;
        // Logging on: once this is answered, every worker marks what it writes (QEMU waits for the reply); off:
        // they stop, and the log is dropped.
        await this.#publishLog();
        if (!logAll) this.#dropLog();
        // Without protocol features, rings are enabled as soon as they are started (spec "Ring states").
        return undefined;
      }
      case R.GET_PROTOCOL_FEATURES:
        return u64Payload.encode(this.#offeredProtocolFeatures);
      case R.SET_PROTOCOL_FEATURES: {
        const features = u64Payload.decode(p);
        if ((features & ~this.#offeredProtocolFeatures) !== 0n) {
          throw new ProtocolError('VHOST_PROTOCOL_BAD_FEATURES', `protocol features 0x${features.toString(16)} were not offered`);
        }
        this.#protocolFeatures = features;
        return undefined;
      }
      case R.SET_OWNER:
        return undefined;
      case R.RESET_OWNER:
      case R.RESET_DEVICE:
        await this.#resetDevice();
        return undefined;
      case R.GET_INFLIGHT_FD: {
        this.#expectNoFds(msg);
        this.#needProtocolFeature(ProtocolFeature.INFLIGHT_SHMFD, 'GET_INFLIGHT_FD');
        const request = inflightPayload.decode(p);
        let reply: ReplyWithFds | undefined;
        await this.#withRingsStopped(() => (reply = this.#inflight.get(request, this.#inflightLimits())));
        return reply;
      }
      case R.SET_INFLIGHT_FD: {
        this.#needProtocolFeature(ProtocolFeature.INFLIGHT_SHMFD, 'SET_INFLIGHT_FD');
        const fd = msg.fds[0];
        if (fd === undefined || msg.fds.length !== 1) throw new ProtocolError('VHOST_PROTOCOL_MISSING_FDS', 'SET_INFLIGHT_FD needs one fd');
        const request = inflightPayload.decode(p);
        await this.#withRingsStopped(() => this.#inflight.set(request, fd, this.#inflightLimits())); // fd closed by handle()
        return undefined;
      }
      case R.SET_LOG_BASE:
        await this.#setLogBase(msg);
        return u64Payload.encode(0n);
      case R.SET_LOG_FD:
        // An eventfd to signal after logging (libvhost-user's log_call_fd); QEMU never sends it, and a frontend that
        // syncs the log reads it anyway. Accepted and closed (by handle()).
        this.#needProtocolFeature(ProtocolFeature.LOG_SHMFD, 'SET_LOG_FD');
        if (msg.fds.length !== 1) throw new ProtocolError('VHOST_PROTOCOL_MISSING_FDS', 'SET_LOG_FD needs one fd');
        return undefined;
      case R.SEND_RARP: {
        // After a migration, for a guest that does not announce itself (no GUEST_ANNOUNCE): the first 6 bytes of the
        // u64 are its MAC. The frame goes out through the running queue the device names.
        this.#expectNoFds(msg);
        this.#needProtocolFeature(ProtocolFeature.RARP, 'SEND_RARP');
        u64Payload.decode(p); // 8 bytes
        const mac = p.slice(0, 6);
        const index = this.device.announceQueue as number; // RARP is offered only with an announce queue
        if (!this.#vring(index).started) throw new ProtocolError('VHOST_PROTOCOL_RING_STOPPED', `SEND_RARP: queue ${index} does not run`);
        await this.#pool.announce(index, mac);
        this.#log.info({ mac: [...mac].map((b) => b.toString(16).padStart(2, '0')).join(':') }, 'SEND_RARP: announced');
        return undefined;
      }
      case R.GET_QUEUE_NUM:
        return u64Payload.encode(BigInt(this.device.vhostQueueNum ?? this.device.numQueues));
      case R.GET_MAX_MEM_SLOTS:
        return u64Payload.encode(BigInt(this.#memSlots));
      case R.SET_MEM_TABLE:
        await this.#setMemTable(memoryTablePayload.decode(p).regions, msg.fds);
        return undefined;
      case R.ADD_MEM_REG: {
        const region = singleMemoryRegionPayload.decode(p);
        const fd = msg.fds[0];
        if (fd === undefined || msg.fds.length !== 1) throw new ProtocolError('VHOST_PROTOCOL_MISSING_FDS', 'ADD_MEM_REG needs one fd');
        await this.#addRegion(region, fd);
        return undefined;
      }
      case R.REM_MEM_REG:
        await this.#removeRegion(singleMemoryRegionPayload.decode(p)); // a stray fd (old QEMU) is closed unused
        return undefined;
      case R.SET_VRING_NUM: {
        this.#expectNoFds(msg);
        const { index, num } = vringStatePayload.decode(p);
        const vring = this.#vring(index);
        // Packed rings take any size up to the maximum; split rings a power of two.
        const packed = this.#hasFeature(VirtioFeature.RING_PACKED);
        if (!(packed ? Number.isInteger(num) && num >= 1 : isValidQueueSize(num)) || num > this.device.maxQueueSize) {
          const what = packed ? 'a packed ring size' : 'a power of two';
          throw new ProtocolError('VHOST_PROTOCOL_BAD_QUEUE_SIZE', `queue size ${num} is not ${what} up to ${this.device.maxQueueSize}`);
        }
        await this.#changeRunningRing(index, () => (vring.num = num));
        return undefined;
      }
      case R.SET_VRING_ADDR: {
        this.#expectNoFds(msg);
        const a = vringAddrPayload.decode(p);
        const vring = this.#vring(a.index);
        const addr = { desc: addressOf(a.desc, 'descriptor table'), used: addressOf(a.used, 'used ring'), avail: addressOf(a.avail, 'available ring') };
        const logged = (a.flags & VringAddrFlag.LOG) !== 0;
        const ringLog: RingLog = { enabled: logged, usedAddr: logged ? addressOf(a.log, 'log') : 0 };
        const old = vring.addr;
        if (old !== undefined && old.desc === addr.desc && old.used === addr.used && old.avail === addr.avail) {
          // The same rings again with logging switched (QEMU at migration start and end): the ring keeps running,
          // only its used-ring logging changes (acknowledged once the worker applied it).
          vring.ringLog = ringLog;
          if (vring.started) await this.#pool.setRingLog(a.index, ringLog);
          return undefined;
        }
        await this.#changeRunningRing(a.index, () => {
          vring.addr = addr;
          vring.ringLog = ringLog;
        });
        return undefined;
      }
      case R.SET_VRING_BASE: {
        this.#expectNoFds(msg);
        const { index, num } = vringStatePayload.decode(p);
        const vring = this.#vring(index);
        const base = this.#hasFeature(VirtioFeature.RING_PACKED) ? packedResumePosition(num) : splitVringBase(num);
        await this.#changeRunningRing(index, () => (vring.base = base));
        return undefined;
      }
      case R.GET_VRING_BASE: {
        this.#expectNoFds(msg);
        const { index } = vringStatePayload.decode(p);
        const vring = this.#vring(index);
        await this.#stopRing(index);
        vring.failed = false; // the frontend knows the ring stopped; a new setup may start it again
        // The ring is stopped: its kick and call fds are released; the frontend sends new ones to start it again.
        for (const key of ['kickFd', 'callFd'] as const) {
          if (vring[key] >= 0) native.close(vring[key]);
          vring[key] = -1;
        }
        // Packed: both halves, used == avail (the ring was drained before the reply; vhost-user-next.md §4.2).
        const num = this.#hasFeature(VirtioFeature.RING_PACKED) ? (vring.base | (vring.base << 16)) >>> 0 : vring.base;
        return vringStatePayload.encode({ index, num });
      }
      case R.SET_VRING_KICK:
      case R.SET_VRING_CALL:
      case R.SET_VRING_ERR:
        await this.#setVringFd(msg);
        return undefined;
      case R.SET_VRING_ENABLE: {
        this.#expectNoFds(msg);
        const { index, num } = vringStatePayload.decode(p);
        const vring = this.#vring(index);
        if (num > 1) throw new ProtocolError('VHOST_PROTOCOL_BAD_PAYLOAD', `SET_VRING_ENABLE num ${num} is not 0 or 1`);
        vring.enabled = num === 1;
        if (vring.enabled) await this.#maybeStartRing(index);
        else await this.#stopRing(index);
        return undefined;
      }
      case R.GET_CONFIG: {
        const req = deviceConfigPayload.decode(p);
        const space = this.device.configSpace();
        const data = new Uint8Array(req.data.length); // bytes past the device's config space read as zero
        if (req.offset < space.length) data.set(space.subarray(req.offset, req.offset + data.length));
        return deviceConfigPayload.encode({ offset: req.offset, size: data.length, flags: req.flags, data });
      }
      case R.SET_CONFIG: {
        const req = deviceConfigPayload.decode(p);
        this.device.writeConfig(req.offset, req.data);
        return undefined;
      }
      case R.SET_STATUS: {
        // QEMU sends SET_STATUS 0 when it stops the device, *before* GET_VRING_BASE: the rings keep their state
        // (a reset of the rings is RESET_DEVICE's job). A driver reset does clear NEEDS_RESET.
        this.#status = Number(u64Payload.decode(p) & 0xffn);
        if (this.#status === 0) this.#needsReset = false;
        return undefined;
      }
      case R.GET_STATUS:
        return u64Payload.encode(BigInt(this.#status | (this.#needsReset ? STATUS_NEEDS_RESET : 0)));
      default:
        throw new ProtocolError('VHOST_PROTOCOL_UNSUPPORTED_REQUEST', `${requestName(msg.request)} is not supported`);
    }
  }

  // ---- memory ----------------------------------------------------------------------------------------------------

  /** SET_MEM_TABLE: regions that did not change keep their mapping; new ones are mapped; gone ones are released. */
  async #setMemTable(regions: readonly MemoryRegion[], fds: readonly number[]): Promise<void> {
    if (fds.length !== regions.length) throw new ProtocolError('VHOST_PROTOCOL_MISSING_FDS', `${regions.length} regions with ${fds.length} fds`);
    if (regions.length > this.#regionLimit()) {
      throw new ProtocolError('VHOST_PROTOCOL_TOO_MANY_REGIONS', `${regions.length} regions, at most ${this.#regionLimit()}`);
    }
    const kept: MappedRegion[] = [];
    const added: MappedRegion[] = [];
    try {
      regions.forEach((desc, i) => {
        const fd = fds[i] as number;
        const same = this.#findMapped(desc, fd);
        if (same !== undefined) kept.push(same);
        else added.push(this.#mapRegion(desc, fd));
      });
      await this.#publish(new MemoryTable([...kept, ...added]));
      this.#extraRegionRefs.clear(); // a whole new table: every region is in it once
    } catch (err) {
      this.#release(added.filter((r) => !this.#memory.regions.includes(r)));
      throw err;
    }
  }

  /** The region of the current table that `desc` and `fd` describe again (same file, offset and addresses). */
  #findMapped(desc: MemoryRegion, fd: number): MappedRegion | undefined {
    let stat: native.FileStat;
    try {
      stat = native.fstat(fd); // once, not per region compared
    } catch (err) {
      throw new ProtocolError('VHOST_PROTOCOL_BAD_REGION', 'region fd is not usable', { cause: err });
    }
    return this.#memory.regions.find((r) => regionMatches(r, desc, stat));
  }

  async #addRegion(desc: MemoryRegion, fd: number): Promise<void> {
    const same = this.#findMapped(desc, fd);
    if (same !== undefined) {
      // QEMU runs one vhost device per virtio-net queue pair over the same socket, and each adds every region
      // (SET_MEM_TABLE is sent once, ADD_MEM_REG is not): the same region, same file, same addresses. Count it,
      // and remove it with the last matching REM_MEM_REG.
      this.#extraRegionRefs.set(same, (this.#extraRegionRefs.get(same) ?? 0) + 1);
      return;
    }
    if (this.#memory.regions.length >= this.#regionLimit()) {
      throw new ProtocolError('VHOST_PROTOCOL_TOO_MANY_REGIONS', `all ${this.#regionLimit()} memory slots are in use`);
    }
    const region = this.#mapRegion(desc, fd);
    try {
      await this.#publish(this.#memory.with([region]));
    } catch (err) {
      if (!this.#memory.regions.includes(region)) this.#release([region]);
      throw err;
    }
  }

  async #removeRegion(desc: MemoryRegion): Promise<void> {
    const region = this.#memory.regions.find(
      (r) => BigInt(r.gpa) === desc.guestPhysAddr && BigInt(r.size) === desc.memorySize && BigInt(r.uva) === desc.userspaceAddr,
    );
    if (region === undefined) {
      throw new ProtocolError('VHOST_PROTOCOL_BAD_REGION', `no region at guest address 0x${desc.guestPhysAddr.toString(16)} to remove`);
    }
    const extra = this.#extraRegionRefs.get(region) ?? 0;
    if (extra > 0) {
      if (extra === 1) this.#extraRegionRefs.delete(region);
      else this.#extraRegionRefs.set(region, extra - 1);
      return;
    }
    await this.#publish(this.#memory.with([], [region]));
  }

  /** Most regions a table may have: the memory slots offered, or SET_MEM_TABLE's 8 without CONFIGURE_MEM_SLOTS. */
  #regionLimit(): number {
    return this.#memSlots === 0 ? MAX_MEM_TABLE_REGIONS : this.#memSlots;
  }

  #mapRegion(desc: MemoryRegion, fd: number): MappedRegion {
    // The table-size limit is checked by the callers against the new table; the 509 slots leave room for the
    // regions of a transition (old and new table mapped at once).
    const slot = this.#freeSlots.pop();
    if (slot === undefined) throw new ProtocolError('VHOST_PROTOCOL_TOO_MANY_REGIONS', `all ${MAX_MEM_SLOTS} memory slots are in use`);
    try {
      return mapRegion(desc, fd, slot);
    } catch (err) {
      this.#freeSlots.push(slot);
      throw err;
    }
  }

  /** Revokes regions no worker can reach any more, and frees their slots. */
  #release(regions: readonly MappedRegion[]): void {
    for (const r of regions) {
      native.revoke(r.buffer);
      this.#freeSlots.push(r.slot);
    }
  }

  /**
   * Makes `next` the memory table (docs/memory-sync.md): the workers switch to it, and the regions that are not in
   * it are revoked only once no worker and no request in flight can use them. Resolves after that, so the reply to
   * the frontend comes after the change took effect.
   */
  async #publish(next: MemoryTable): Promise<void> {
    const previous = this.#memory;
    if (this.#hasFeature(VirtioFeature.LOG_ALL) && this.#logMapping !== undefined && !this.#logCovers(next)) {
      // QEMU grows the log (SET_LOG_BASE) before it adds memory: memory the log cannot record is refused.
      throw new ProtocolError(
        'VHOST_PROTOCOL_LOG_TOO_SMALL',
        `the dirty log covers guest memory up to 0x${this.#logMapping.covers.toString(16)}, the new table ends at 0x${next.end.toString(16)}`,
      );
    }
    const removed = previous.regions.filter((r) => !next.regions.includes(r));
    const gen = ++this.#gen;
    this.#memory = next;
    const log = this.#loggingTo(next);
    const revoke = (): void => this.#release(removed);
    const pool = this.#pool;
    const running = this.#vrings.flatMap((v, i) => (v.started ? [i] : []));
    try {
      await pool.publishMemory(gen, toWorkerRegions(next), workerLog(log), removed.map((r) => r.slot), running, revoke);
      this.#publishedLog = log;
    } catch (err) {
      // Not published (--sync lock: a queue lock could not be taken before the table was posted): nothing
      // changed, so the request can be refused.
      if (pool.sync.loadGen() < gen) {
        this.#memory = previous;
        throw err;
      }
      this.#publishedLog = log;
      // Published: workers may already use the new table, so a NACK would be a lie (the frontend would believe
      // the regions are still there, and retry a removal we would refuse). The 5 s bound of each wait only
      // means "slow" now: keep waiting for the grace period and the pins (I/O in flight), up to a bound after
      // which no reply is right (neither "refused" nor "done": the memory may still be in use): disconnect.
      const deadline = Date.now() + APPLIED_CHANGE_TIMEOUT_MS;
      let last = err;
      for (;;) {
        if (Date.now() >= deadline) {
          revoke(); // stale readers see anonymous memory, never the frontend's; the session is ending anyway
          throw new DisconnectError('VHOST_GRACE_PERIOD_TIMEOUT', `memory table ${gen} took effect but its old regions stay in use after ${APPLIED_CHANGE_TIMEOUT_MS} ms`, { cause: last });
        }
        this.#log.warn({ err: last, gen }, 'memory change took effect; still waiting for workers or I/O in flight');
        try {
          if (pool.mode !== 'lock') await pool.waitForReaders(gen); // lock: passed already
          for (const r of removed) await pool.sync.waitForPins(r.slot);
          break;
        } catch (again) {
          last = again;
        }
      }
      revoke();
    }
    this.#log.info({ gen, regions: next.regions.map((r) => ({ gpa: r.gpa, size: r.size })) }, 'memory table');
    // memory/region.ts: files that cannot be sealed (DPDK --no-huge memfds, tmpfs / hugetlbfs / regular files).
    const truncatable = next.regions.filter((r) => r.truncatable === true && !previous.regions.includes(r));
    if (truncatable.length > 0) {
      this.#log.warn(
        { gpas: truncatable.map((r) => r.gpa) },
        'guest memory in files that cannot be sealed against shrinking: if the frontend truncates them, this process dies (SIGBUS)',
      );
    }
  }

  // ---- dirty log (migration) -------------------------------------------------------------------------------------

  /**
   * SET_LOG_BASE: maps the new log (session-log.ts checks it), gives it to the workers if logging is on, and unmaps
   * the old one once no worker can write to it (the grace period of that publication): the reply means every bit
   * from now on goes to the new log. Rings that waited for a log start.
   */
  async #setLogBase(msg: Message): Promise<void> {
    this.#needProtocolFeature(ProtocolFeature.LOG_SHMFD, 'SET_LOG_BASE');
    const fd = msg.fds[0];
    if (fd === undefined || msg.fds.length !== 1) throw new ProtocolError('VHOST_PROTOCOL_MISSING_FDS', 'SET_LOG_BASE needs one fd (LOG_SHMFD)');
    const mapping = mapLog(logPayload.decode(msg.payload), fd, this.#memory.end); // fd closed by handle()
    const old = this.#logMapping;
    this.#logMapping = mapping;
    try {
      await this.#publishLog();
    } catch (err) {
      if (this.#publishedLog !== mapping) {
        this.#logMapping = old; // not published: nothing changed
        native.revoke(mapping.buffer);
      }
      throw err;
    }
    if (old !== undefined && old !== this.#publishedLog) native.revoke(old.buffer);
    this.#log.info({ bytes: mapping.size, covers: mapping.covers }, 'SET_LOG_BASE: dirty log mapped');
    for (let i = 0; i < this.#vrings.length; i++) await this.#maybeStartRing(i);
  }

  /** The log the workers must write along with memory table `table`: while LOG_ALL is on and a log covers it. */
  #loggingTo(table: MemoryTable): LogMapping | undefined {
    return this.#hasFeature(VirtioFeature.LOG_ALL) && this.#logCovers(table) ? this.#logMapping : undefined;
  }

  /** Whether a log is mapped and covers every guest address of `table`. */
  #logCovers(table: MemoryTable): boolean {
    return this.#logMapping !== undefined && this.#logMapping.covers >= table.end;
  }

  /** Gives the workers the log they must write now when it is not the one they have: a generation of its own. */
  async #publishLog(): Promise<void> {
    const before = this.#publishedLog;
    if (this.#loggingTo(this.#memory) === before) return;
    await this.#publish(this.#memory);
    const after = this.#publishedLog;
    if ((before === undefined) !== (after === undefined)) this.#log.info({ logging: after !== undefined, bytes: after?.size }, 'dirty logging');
  }

  /** Logging is off: the log is unmapped (no worker has it: the publication without it came first). */
  #dropLog(): void {
    const m = this.#logMapping;
    if (m === undefined || m === this.#publishedLog) return;
    this.#logMapping = undefined;
    native.revoke(m.buffer);
  }

  // ---- vrings ----------------------------------------------------------------------------------------------------

  async #setVringFd(msg: Message): Promise<void> {
    const { index, noFd } = vringFilePayload.decode(msg.payload);
    const vring = this.#vring(index);
    if (msg.fds.length !== (noFd ? 0 : 1)) {
      throw new ProtocolError('VHOST_PROTOCOL_MISSING_FDS', `${requestName(msg.request)} fd count does not match its payload`);
    }
    if (noFd && msg.request === FrontendRequest.SET_VRING_KICK) {
      throw new ProtocolError('VHOST_PROTOCOL_UNSUPPORTED_REQUEST', 'polling mode (SET_VRING_KICK without fd) is not supported');
    }
    // The workers read and write these fds as eventfds (8-byte counters): anything else (a socket, a file) would
    // fail or misbehave later in a worker, blamed on the guest. Refused here, the fd is closed with the message.
    if (!noFd && !native.isEventfd(msg.fds[0] as number)) {
      throw new ProtocolError('VHOST_PROTOCOL_BAD_FD', `${requestName(msg.request)} fd is not an eventfd`);
    }
    const fd = noFd ? -1 : (msg.fds.shift() as number); // this session owns the fd from here on
    switch (msg.request) {
      case FrontendRequest.SET_VRING_KICK: {
        let taken = false;
        try {
          await this.#changeRunningRing(index, () => {
            if (vring.kickFd >= 0) native.close(vring.kickFd);
            vring.kickFd = fd;
            taken = true;
            // Without protocol features a ring starts enabled once it has a kick fd (spec "Ring states").
            if (!this.#hasFeature(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES)) vring.enabled = true;
          });
        } finally {
          if (!taken) native.close(fd);
        }
        await this.#maybeStartRing(index);
        return;
      }
      case FrontendRequest.SET_VRING_CALL:
      case FrontendRequest.SET_VRING_ERR: {
        const key = msg.request === FrontendRequest.SET_VRING_CALL ? 'callFd' : 'errFd';
        const old = vring[key];
        vring[key] = fd;
        // The worker switches before the old fd is closed, so it never writes to a closed (or reused) fd number.
        if (vring.started) {
          if (key === 'callFd') await this.#pool.setCall(index, fd);
          else await this.#pool.setErr(index, fd);
        }
        if (old >= 0) native.close(old);
        return;
      }
    }
  }

  #needProtocolFeature(feature: number, request: string): void {
    if ((this.#protocolFeatures & bit(feature)) === 0n) {
      throw new ProtocolError('VHOST_PROTOCOL_NOT_NEGOTIATED', `${request} needs protocol feature ${feature}, which was not negotiated`);
    }
  }

  #inflightLimits(): InflightLimits {
    return { maxQueues: this.device.numQueues, packed: this.#hasFeature(VirtioFeature.RING_PACKED) };
  }

  /** Runs `change` with every ring stopped (restarting those that ran): what workers see must not change under them. */
  async #withRingsStopped(change: () => void): Promise<void> {
    const running = this.#vrings.flatMap((v, i) => (v.started ? [i] : []));
    for (const i of running) await this.#stopRing(i);
    change();
    for (const i of running) await this.#maybeStartRing(i);
  }

  #hasFeature(feature: number): boolean {
    return (this.#features & bit(feature)) !== 0n;
  }

  /** Applies a change to a ring's setup; a running ring is stopped first and started again with the change. */
  async #changeRunningRing(index: number, change: () => void): Promise<void> {
    const wasRunning = this.#vring(index).started;
    if (wasRunning) await this.#stopRing(index);
    change();
    if (wasRunning) await this.#maybeStartRing(index);
  }

  /** Starts a ring in its worker once it has everything: size, addresses, kick fd, enabled, memory. */
  async #maybeStartRing(index: number): Promise<void> {
    const vring = this.#vring(index);
    if (vring.started || vring.failed || !vring.enabled || vring.kickFd < 0 || vring.addr === undefined || vring.num === 0) return;
    if (this.#memory.regions.length === 0) return;
    if (this.#hasFeature(VirtioFeature.LOG_ALL) && !this.#logCovers(this.#memory)) {
      // Logging is on but there is no log to write yet (QEMU starts a device under migration with SET_LOG_BASE
      // after the rings): the ring starts with SET_LOG_BASE.
      this.#log.info({ queue: index }, 'ring waits for SET_LOG_BASE (LOG_ALL is negotiated)');
      return;
    }
    const n = vring.num;
    // Packed: `desc` is the ring, `avail` the driver's event suppression area, `used` the device's (4 bytes each).
    const packed = this.#hasFeature(VirtioFeature.RING_PACKED);
    if (!packed && !isValidQueueSize(n)) {
      throw new ProtocolError('VHOST_PROTOCOL_BAD_QUEUE_SIZE', `queue size ${n} is not a power of two (split ring)`);
    }
    if (packed && (vring.base & 0x7fff) >= n) {
      throw new ProtocolError('VHOST_PROTOCOL_BAD_VRING_BASE', `packed ring base index ${vring.base & 0x7fff} is not below the queue size ${n}`);
    }
    const start = {
      index,
      size: n,
      packed,
      descAddr: this.#memory.uvaToGpa(vring.addr.desc, descTableSize(n)),
      availAddr: this.#memory.uvaToGpa(vring.addr.avail, packed ? PACKED_EVENT_SIZE : availRingSize(n)),
      usedAddr: this.#memory.uvaToGpa(vring.addr.used, packed ? PACKED_EVENT_SIZE : usedRingSize(n)),
      lastAvailIdx: vring.base,
      kickFd: vring.kickFd,
      callFd: vring.callFd,
      errFd: vring.errFd,
      eventIdx: this.#hasFeature(VirtioFeature.RING_EVENT_IDX),
      indirect: this.#hasFeature(VirtioFeature.RING_INDIRECT_DESC),
      features: this.#features,
      ringLog: vring.ringLog,
    };
    const inflight = this.#inflight.forQueue(index);
    if (inflight !== undefined && inflight.geometry.packed !== packed) {
      // The layout was chosen from the features at GET/SET_INFLIGHT_FD (as DPDK does); tracking in the other
      // layout would read the region wrong.
      throw new ProtocolError(
        'VHOST_PROTOCOL_INFLIGHT_LAYOUT_MISMATCH',
        `the inflight region is laid out for ${inflight.geometry.packed ? 'packed' : 'split'} rings but ring ${index} is ${packed ? 'packed' : 'split'}`,
      );
    }
    // Without an inflight region a split ring resumes at used.idx when SET_VRING_BASE disagrees with it; with one,
    // the region says where (DeviceQueue.resyncToUsed, inflight-region.ts).
    const { base, resyncedFrom, inflight: recovered } = await this.#pool.startQueue(
      inflight !== undefined ? { ...start, resyncToUsed: false, inflight } : { ...start, resyncToUsed: true },
    );
    vring.started = true;
    if (recovered !== undefined && (recovered.resubmitted > 0 || recovered.repaired > 0 || Object.keys(recovered.anomalies).length > 0)) {
      this.#log.warn({ queue: index, ...recovered }, 'inflight region: requests in flight before the restart are taken again');
    }
    if (resyncedFrom >= 0) {
      // DPDK's backend does the same ("some packets maybe resent for Tx and dropped for Rx"): see DeviceQueue.
      this.#log.warn({ queue: index, setVringBase: resyncedFrom, usedIdx: base }, 'SET_VRING_BASE disagrees with used.idx: resuming at used.idx');
    }
    this.#log.info({ queue: index, size: n, base, packed }, 'ring started');
  }

  /** Stops a running ring; its base becomes where the worker stopped. */
  async #stopRing(index: number): Promise<void> {
    const vring = this.#vring(index);
    if (!vring.started) return;
    const last = await this.#pool.stopQueue(index);
    vring.started = false;
    if (last >= 0) vring.base = last;
    this.#log.info({ queue: index, base: vring.base }, 'ring stopped');
  }

  #onQueueError(ev: { index: number; code: string; message: string }): void {
    this.#log.error({ queue: ev.index, code: ev.code, message: ev.message }, 'queue stopped by an error: device needs reset');
    this.#needsReset = true;
    this.#queueFailures++;
    const vring = this.#vrings[ev.index];
    if (vring !== undefined) {
      vring.started = false;
      vring.failed = true;
    }
  }

  async #resetDevice(): Promise<void> {
    for (let i = 0; i < this.#vrings.length; i++) await this.#stopRing(i);
    for (const vring of this.#vrings) this.#closeVringFds(vring);
    this.#vrings = this.#vrings.map(newVring);
    this.#features = 0n;
    this.#status = 0;
    this.#needsReset = false;
    await this.#publishLog(); // logging is off
    this.#dropLog();
  }

  #closeVringFds(vring: Vring): void {
    for (const fd of [vring.kickFd, vring.callFd, vring.errFd]) if (fd >= 0) native.close(fd);
    vring.kickFd = vring.callFd = vring.errFd = -1;
  }

  /** Releases everything: workers first (nothing touches guest memory after that), then fds and mappings. */
  /** Stops every running ring, each once the requests it took have completed (their completions published). */
  async stopRings(): Promise<void> {
    await Promise.all(this.#vrings.flatMap((v, i) => (v.started ? [this.#stopRing(i)] : [])));
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      await this.#pool.release();
    } finally {
      for (const vring of this.#vrings) this.#closeVringFds(vring);
      this.#inflight.close();
      if (this.#logMapping !== undefined) native.revoke(this.#logMapping.buffer);
      this.#logMapping = this.#publishedLog = undefined;
      this.#release(this.#memory.regions);
      this.#memory = MemoryTable.EMPTY;
      this.#extraRegionRefs.clear();
    }
  }
}

function workerLog(log: LogMapping | undefined): WorkerLog | undefined {
  return log === undefined ? undefined : { buffer: log.buffer, offset: log.offset, size: log.size };
}

function toWorkerRegions(table: MemoryTable): WorkerRegion[] {
  return table.regions.map((r) => ({
    gpa: r.gpa,
    size: r.size,
    uva: r.uva,
    buffer: r.buffer,
    bufferOffset: r.bufferOffset,
    slot: r.slot,
  }));
}


