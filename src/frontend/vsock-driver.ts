/**
 * A virtio-vsock driver (VIRTIO 1.2 §5.10) at the packet level, on top of a started `VhostUserFrontend`: what a
 * guest's virtio transport puts in and takes from the rings, without its connection logic (the tests and the
 * benchmark bring that, or send hostile packets). Kept small rather than fast.
 *
 * - rx (queue 0): kept full of buffers of `rxBufferSize` bytes (default 4 KiB + the header, as Linux posts); each used
 *   buffer is a packet, handed to `onPacket`.
 * - tx (queue 1): `send(packet)` copies the bytes (header and payload) into a slot and sends them as one descriptor;
 *   it resolves once the device has used the chain. Packets wait in order for a slot.
 * - event (queue 2): a few 4-byte buffers; each event's id goes to `onEvent` (0: TRANSPORT_RESET).
 */
import { VhostError } from '../errors.js';
import { VirtioFeature, featureBit } from '../protocol/constants.js';
import type { Segment } from '../queue/split-queue-driver.js';
import type { FrontendQueue, VhostUserFrontend } from './frontend.js';
import type { GuestRam } from './guest-ram.js';

export const VsockDriverErrorCode = {
  CLOSED: 'VHOST_VSOCK_DRIVER_CLOSED',
  BROKEN: 'VHOST_VSOCK_DRIVER_BROKEN',
  BAD_OPTION: 'VHOST_VSOCK_DRIVER_BAD_OPTION',
} as const;

export interface VsockStartOptions {
  readonly memory: GuestRam;
  /** Ring size of every queue (default 256). */
  readonly queueSize?: number;
  /** Bytes per receive buffer (default 4096 + 44). */
  readonly rxBufferSize?: number;
  /** Largest packet `send` takes (default 64 KiB + 44). */
  readonly maxPacket?: number;
  readonly eventIdx?: boolean;
  /** Called for each packet the device delivers (a copy). */
  readonly onPacket?: (packet: Uint8Array) => void;
  /** Called for each event (its id). */
  readonly onEvent?: (id: number) => void;
}

const HEADER = 44;
const EVENT_BUFFERS = 4;

interface Send {
  readonly packet: Uint8Array;
  readonly resolve: () => void;
  readonly reject: (err: Error) => void;
}

export class VsockDriver {
  static async start(frontend: VhostUserFrontend, options: VsockStartOptions): Promise<VsockDriver> {
    const size = options.queueSize ?? 256;
    let features = featureBit(VirtioFeature.VERSION_1) & frontend.backendFeatures;
    if (options.eventIdx ?? true) features |= featureBit(VirtioFeature.RING_EVENT_IDX) & frontend.backendFeatures;
    await frontend.start({ features, queues: [0, 1, 2].map((index) => ({ index, size })), memory: options.memory });
    return new VsockDriver(frontend, options);
  }

  /** The guest CID the device's config space holds. */
  readonly guestCid: number;
  readonly #rx: FrontendQueue;
  readonly #tx: FrontendQueue;
  readonly #event: FrontendQueue;
  readonly #rxBytes: Uint8Array[] = [];
  readonly #rxSegs: Segment[][] = [];
  readonly #rxFree: number[] = [];
  readonly #txAddr: number[] = [];
  readonly #txBytes: Uint8Array[] = [];
  readonly #txFree: number[] = [];
  readonly #txBusy: (Send | undefined)[] = [];
  readonly #txWaiting: Send[] = [];
  readonly #eventBytes: Uint8Array[] = [];
  readonly #eventSegs: Segment[][] = [];
  readonly #onPacket: (packet: Uint8Array) => void;
  readonly #onEvent: (id: number) => void;
  readonly #removeDisconnectListener: () => void;
  readonly maxPacket: number;
  #error: Error | undefined;
  #closed = false;
  /** Receive buffers are not given back (a guest that stops reading). */
  #rxPaused = false;

  constructor(frontend: VhostUserFrontend, options: VsockStartOptions) {
    const memory = options.memory;
    this.guestCid = Number(new DataView(frontend.config.buffer, frontend.config.byteOffset, 8).getBigUint64(0, true));
    this.#rx = frontend.queue(0);
    this.#tx = frontend.queue(1);
    this.#event = frontend.queue(2);
    this.#onPacket = options.onPacket ?? (() => undefined);
    this.#onEvent = options.onEvent ?? (() => undefined);
    this.maxPacket = options.maxPacket ?? HEADER + 64 * 1024;
    const rxSize = options.rxBufferSize ?? HEADER + 4096;
    if (rxSize < HEADER) throw new VhostError(VsockDriverErrorCode.BAD_OPTION, `receive buffers of ${rxSize} bytes cannot hold a header`);
    const rxCount = this.#rx.size;
    const rxBase = memory.alloc(rxCount * rxSize, { align: 4096 });
    for (let b = 0; b < rxCount; b++) {
      this.#rxBytes.push(memory.bytes(rxBase + b * rxSize, rxSize));
      this.#rxSegs.push([{ addr: rxBase + b * rxSize, len: rxSize, writable: true }]);
      this.#rxFree.push(rxCount - 1 - b);
    }
    const txCount = this.#tx.size;
    const txBase = memory.alloc(txCount * this.maxPacket, { align: 4096 });
    for (let s = 0; s < txCount; s++) {
      this.#txAddr.push(txBase + s * this.maxPacket);
      this.#txBytes.push(memory.bytes(txBase + s * this.maxPacket, this.maxPacket));
      this.#txFree.push(txCount - 1 - s);
      this.#txBusy.push(undefined);
    }
    const evBase = memory.alloc(EVENT_BUFFERS * 8, { align: 64 });
    for (let e = 0; e < EVENT_BUFFERS; e++) {
      this.#eventBytes.push(memory.bytes(evBase + e * 8, 4));
      this.#eventSegs.push([{ addr: evBase + e * 8, len: 4, writable: true }]);
      this.#event.driver.addChain(this.#eventSegs[e] as Segment[], e);
    }
    this.#event.publishAndKick();
    this.#rx.watchCall(() => this.#drain(this.#rx, (b, len) => this.#received(b, len), () => this.#fillRx()));
    this.#tx.watchCall(() => this.#drain(this.#tx, (s) => this.#sent(s), () => this.#placeWaiting()));
    this.#event.watchCall(() => this.#drain(this.#event, (e, len) => this.#evented(e, len), () => this.#event.publishAndKick()));
    this.#fillRx();
    this.#removeDisconnectListener = frontend.onDisconnect((err) => this.#fail(err));
  }

  get error(): Error | undefined {
    return this.#error;
  }

  /** Sends one packet (header and payload, as bytes); resolves once the device used its chain. */
  send(packet: Uint8Array): Promise<void> {
    if (this.#error !== undefined) return Promise.reject(this.#error);
    if (packet.length > this.maxPacket || packet.length === 0) return Promise.reject(new RangeError(`a packet of ${packet.length} bytes`));
    return new Promise((resolve, reject) => {
      const s: Send = { packet: packet.slice(), resolve, reject };
      const slot = this.#txWaiting.length === 0 ? this.#txFree.pop() : undefined;
      if (slot === undefined) this.#txWaiting.push(s);
      else this.#place(slot, s);
    });
  }

  /** Stops giving receive buffers back (a guest that does not read), or gives them all back again. */
  pauseRx(paused: boolean): void {
    this.#rxPaused = paused;
    if (!paused) this.#fillRx();
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#removeDisconnectListener();
    for (const q of [this.#rx, this.#tx, this.#event]) {
      try {
        q.watchCall(undefined);
      } catch {
        // released already
      }
    }
    this.#fail(new VhostError(VsockDriverErrorCode.CLOSED, 'the vsock driver is closed'));
  }

  #place(slot: number, s: Send): void {
    (this.#txBytes[slot] as Uint8Array).set(s.packet);
    this.#txBusy[slot] = s;
    this.#tx.driver.addChain([{ addr: this.#txAddr[slot] as number, len: s.packet.length, writable: false }], slot);
    this.#tx.publishAndKick();
  }

  #sent(slot: number): void {
    const s = this.#txBusy[slot];
    this.#txBusy[slot] = undefined;
    this.#txFree.push(slot);
    s?.resolve();
  }

  #placeWaiting(): void {
    while (this.#txWaiting.length > 0 && this.#txFree.length > 0 && this.#error === undefined) {
      this.#place(this.#txFree.pop() as number, this.#txWaiting.shift() as Send);
    }
  }

  #fillRx(): void {
    if (this.#error !== undefined || this.#rxPaused || this.#rxFree.length === 0) return;
    while (this.#rxFree.length > 0) {
      const b = this.#rxFree.pop() as number;
      this.#rx.driver.addChain(this.#rxSegs[b] as Segment[], b);
    }
    this.#rx.publishAndKick();
  }

  #received(b: number, len: number): void {
    const bytes = this.#rxBytes[b] as Uint8Array;
    if (len > bytes.length || len < HEADER) throw new VhostError(VsockDriverErrorCode.BROKEN, `rx used length ${len} (buffer ${bytes.length})`);
    const packet = bytes.slice(0, len);
    this.#rxFree.push(b);
    this.#onPacket(packet);
  }

  #evented(e: number, len: number): void {
    const bytes = this.#eventBytes[e] as Uint8Array;
    if (len >= 4) this.#onEvent(new DataView(bytes.buffer, bytes.byteOffset, 4).getUint32(0, true));
    this.#event.driver.addChain(this.#eventSegs[e] as Segment[], e);
  }

  /** Consumes the used ring until empty, re-arms the notification, then `after` (refill, queued sends). */
  #drain(q: FrontendQueue, onUsed: (token: number, len: number) => void, after: () => void): void {
    if (this.#error !== undefined) return;
    try {
      for (;;) {
        if (q.driver.pollUsed(onUsed) > 0) continue;
        if (!q.driver.enableInterrupts()) break;
      }
      after();
    } catch (err) {
      this.#fail(err instanceof VhostError ? err : new VhostError(VsockDriverErrorCode.BROKEN, `bad used ring on queue ${q.index}`, { cause: err }));
    }
  }

  #fail(err: Error): void {
    if (this.#error !== undefined) return;
    this.#error = err;
    for (let i = 0; i < this.#txBusy.length; i++) {
      this.#txBusy[i]?.reject(err);
      this.#txBusy[i] = undefined;
    }
    for (const s of this.#txWaiting.splice(0)) s.reject(err);
  }
}
