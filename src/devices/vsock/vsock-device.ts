/**
 * virtio-vsock (VIRTIO 1.2 §5.10, device ID 19), control half: three queues (rx, tx, event) that run in one worker
 * (./vsock-queue.ts moves packets), and the host side of every connection on this thread's event loop
 * (`VsockHost`, ./host.ts): the hybrid unix sockets of Firecracker and Cloud Hypervisor, and streams for Node
 * programs (`listen`, `connect`).
 *
 * The worker and this thread exchange packets through two FrameRings in a SharedArrayBuffer and wake each other with
 * two eventfds (this thread watches `hostFd` on its event loop). The rings outlive a frontend: a guest that comes
 * back (QEMU reconnecting) finds them as they were, and the event queue's start resets every connection.
 */
import { ProtocolError, VhostError } from '../../errors.js';
import * as native from '../../native/index.js';
import type { VirtioDevice } from '../device.js';
import { FrameRing, frameRingBytes, PUSH_FULL, PUSH_WAKE } from '../net/ports/frame-ring.js';
import { VIRTIO_ID_VSOCK, VSOCK_MAX_PAYLOAD, VsockHdr } from './constants.js';
import { VsockHost, type VsockHostOptions } from './host.js';
import type { VsockStream } from './stream.js';
import {
  CONTROL_WORDS,
  HOST_WAITS_FOR_ROOM,
  RESET_RECORD,
  recordHeader,
  WORKER_WAITS_FOR_ROOM,
  type VsockQueueOptions,
  type VsockShared,
} from './vsock-queue.js';

/** Bytes of each ring between the worker and this thread. */
const RING_CAPACITY = 1 << 20;

export interface VsockDeviceOptions {
  /** The guest's context ID (config `guest_cid`): 3 .. 2^32 - 2. */
  guestCid: number;
  /** Hybrid unix sockets (see VsockHostOptions.udsPath); undefined: only the Node API. */
  udsPath?: string | undefined;
  /** Largest queue size the driver may choose (a power of two; default 256). */
  maxQueueSize?: number;
  /** buf_alloc advertised per connection (default 256 KiB). */
  bufAlloc?: number;
  /** Connections at once (default 1024). */
  maxConnections?: number;
}

export class VsockDevice implements VirtioDevice {
  readonly name = 'vsock';
  readonly deviceId = VIRTIO_ID_VSOCK;
  /** rx, tx, event (§5.10.2). */
  readonly numQueues = 3;
  /** The three queues share a worker: the packets of both directions meet the same rings. */
  readonly queuesPerWorker = 3;
  readonly maxQueueSize: number;
  /** No feature bits: stream sockets are implied (§5.10.3); SEQPACKET is not offered. */
  readonly features = 0n;
  readonly guestCid: number;
  readonly worker: { readonly module: string; readonly options: VsockQueueOptions };
  /** The connections, and the Node API. */
  readonly host: VsockHost;
  readonly #toHost: FrameRing;
  readonly #toGuest: FrameRing;
  readonly #control: Int32Array;
  readonly #hostFd: number;
  readonly #workerFd: number;
  readonly #watch: number;
  readonly #hdr = recordHeader(0);
  readonly #packet = recordHeader(0);
  /** `toGuest` found the ring full: the host is told `writable()` once the worker made room. */
  #blocked = false;
  #closed = false;

  constructor(options: VsockDeviceOptions) {
    const cid = options.guestCid;
    if (!Number.isInteger(cid) || cid < 3 || cid > 0xffff_fffe) throw new VhostError('VHOST_VSOCK_BAD_OPTION', 'guest CID must be 3..4294967294');
    this.guestCid = cid;
    this.maxQueueSize = options.maxQueueSize ?? 256;
    if (!Number.isInteger(Math.log2(this.maxQueueSize)) || this.maxQueueSize < 1 || this.maxQueueSize > 32768) {
      throw new VhostError('VHOST_VSOCK_BAD_OPTION', 'queue size must be a power of two up to 32768');
    }
    const ringBytes = frameRingBytes(RING_CAPACITY);
    const shared: VsockShared = {
      buffer: new SharedArrayBuffer(2 * ringBytes + CONTROL_WORDS * 4),
      ringCapacity: RING_CAPACITY,
      toHostOffset: 0,
      toGuestOffset: ringBytes,
      controlOffset: 2 * ringBytes,
    };
    this.#toHost = new FrameRing(shared.buffer, shared.toHostOffset, RING_CAPACITY);
    this.#toGuest = new FrameRing(shared.buffer, shared.toGuestOffset, RING_CAPACITY);
    this.#control = new Int32Array(shared.buffer, shared.controlOffset, CONTROL_WORDS);
    this.#hostFd = native.eventfdCreate(0, true);
    this.#workerFd = native.eventfdCreate(0, true);
    this.worker = {
      module: new URL('./vsock-queue.js', import.meta.url).href,
      options: { shared, hostFd: this.#hostFd, workerFd: this.#workerFd },
    };
    const hostOptions: VsockHostOptions = {
      guestCid: cid,
      udsPath: options.udsPath,
      toGuest: (header, payload) => this.#toGuestPacket(header, payload),
      ...(options.bufAlloc !== undefined ? { bufAlloc: options.bufAlloc } : {}),
      ...(options.maxConnections !== undefined ? { maxConnections: options.maxConnections } : {}),
    };
    this.host = new VsockHost(hostOptions);
    this.#watch = native.watch(this.#hostFd, native.WATCH_READABLE, () => this.#onHostFd());
  }

  /** config: guest_cid, le64 (§5.10.4). */
  configSpace(): Uint8Array {
    const config = new DataView(new ArrayBuffer(8));
    config.setBigUint64(0, BigInt(this.guestCid), true);
    return new Uint8Array(config.buffer);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    throw new ProtocolError('VHOST_PROTOCOL_CONFIG_READ_ONLY', `virtio-vsock config write at ${offset} (+${data.length}) refused: read-only`);
  }

  /** Guest connections to host port `port` become streams (see VsockHost.listen). */
  listen(port: number, onConnection: (stream: VsockStream) => void): { close(): void } {
    return this.host.listen(port, onConnection);
  }

  /** A stream to the guest's port `port` (see VsockHost.connect). */
  connect(port: number, options?: { timeoutMs?: number }): Promise<VsockStream> {
    return this.host.connect(port, options);
  }

  stats(): Record<string, number> {
    return this.host.stats();
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.host.close();
    native.unwatch(this.#watch);
    native.close(this.#hostFd);
    native.close(this.#workerFd);
  }

  /** VsockHost's `toGuest`: one record in the ring toward the guest; false when it has no room (retried later). */
  #toGuestPacket(header: Uint8Array, payload: Uint8Array | undefined): boolean {
    if (this.#closed) return false;
    if (header.length !== VsockHdr.size || (payload?.length ?? 0) > VSOCK_MAX_PAYLOAD) {
      throw new RangeError(`vsock: a packet of ${header.length} + ${payload?.length ?? 0} bytes`);
    }
    let r = this.#toGuest.pushParts(header, payload, this.#packet);
    if (r === PUSH_FULL) {
      // Say that we wait, then look once more: room the worker made meanwhile is not missed.
      Atomics.store(this.#control, HOST_WAITS_FOR_ROOM, 1);
      r = this.#toGuest.pushParts(header, payload, this.#packet);
      if (r === PUSH_FULL) {
        this.#blocked = true;
        return false;
      }
      Atomics.store(this.#control, HOST_WAITS_FOR_ROOM, 0);
    }
    if (r === PUSH_WAKE) native.eventfdWrite(this.#workerFd);
    return true;
  }

  /** The worker pushed packets (or a reset), or made room toward the guest. */
  #onHostFd(): void {
    if (this.#closed) return;
    native.eventfdRead(this.#hostFd);
    const ring = this.#toHost;
    let drained = false;
    for (let at = ring.peek(this.#hdr); at >= 0; at = ring.peek(this.#hdr)) {
      const length = ring.currentLength;
      try {
        if (this.#hdr.flags === RESET_RECORD) this.host.reset();
        else this.host.fromGuest(ring.bytes.subarray(at, at + length));
      } finally {
        ring.release();
      }
      drained = true;
    }
    if (drained && Atomics.exchange(this.#control, WORKER_WAITS_FOR_ROOM, 0) !== 0) native.eventfdWrite(this.#workerFd);
    if (this.#blocked) {
      this.#blocked = false;
      this.host.writable();
    }
  }
}
