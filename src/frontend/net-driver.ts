/**
 * A virtio-net driver (VIRTIO 1.2 §5.1) on top of a started `VhostUserFrontend`: what a guest's virtio_net does with
 * its queue pairs, in this process. Used by tests; kept small rather than fast.
 *
 * Pair p is receive queue 2p and transmit queue 2p + 1. Every frame carries a virtio-net header (12 bytes with
 * VERSION_1 or MRG_RXBUF, else 10), all zero: no offloads are negotiated.
 *
 * - Receive: the ring is kept full of buffers of `rxBufferSize` bytes, each one chain split into `rxSegments`
 *   descriptors (to exercise the device's scatter path). A frame comes back in one chain, or with MRG_RXBUF in
 *   `num_buffers` chains in a row, which are reassembled here; `receive(pair, n)` waits for frames.
 * - Transmit: each frame is copied into a slot of guest memory behind its header and sent as one descriptor
 *   (`single`), header and frame in two (`split`), or those two in an indirect table (`indirect`); `send` resolves
 *   when the device has used the chain.
 *
 * Used buffers are collected when the call eventfd fires (watched on the event loop, never polled), and the
 * notification is re-armed only once the used ring is found empty, as in blk-driver.ts.
 */
import { VhostError } from '../errors.js';
import { MAX_FRAME, NetConfigOffset, NetFeature, NetHdr } from '../devices/net/constants.js';
import { ProtocolFeature, VirtioFeature, featureBit, hasFeature } from '../protocol/constants.js';
import type { Segment } from '../queue/split-queue-driver.js';
import { packedRingFeature, type FrontendQueue, type QueueConfig, type VhostUserFrontend } from './frontend.js';
import type { GuestRam } from './guest-ram.js';

/** Error codes of the net driver (`VhostError.code`). */
export const NetDriverErrorCode = {
  /** `close()` was called while a send or a receive waited. */
  CLOSED: 'VHOST_NET_DRIVER_CLOSED',
  /** The device returned something the ring or the header does not allow; everything waiting failed. */
  BROKEN: 'VHOST_NET_DRIVER_BROKEN',
  /** Options do not fit what the device or the frontend offers. */
  BAD_OPTION: 'VHOST_NET_DRIVER_BAD_OPTION',
} as const;

/** How a transmitted frame is laid out in descriptors. */
export type TxLayout = 'single' | 'split' | 'indirect';

/** `struct virtio_net_config` (§5.1.4) as far as the device exposes it. */
export interface NetConfig {
  readonly mac: readonly number[];
  readonly status: number;
  readonly maxVirtqueuePairs: number;
  readonly mtu: number;
}

/** Decodes a virtio-net config space (little endian); missing bytes read as zero. */
export function parseNetConfig(bytes: Uint8Array): NetConfig {
  const padded = new Uint8Array(NetConfigOffset.size);
  padded.set(bytes.subarray(0, NetConfigOffset.size));
  const v = new DataView(padded.buffer);
  return {
    mac: [...padded.subarray(NetConfigOffset.mac, NetConfigOffset.mac + 6)],
    status: v.getUint16(NetConfigOffset.status, true),
    maxVirtqueuePairs: v.getUint16(NetConfigOffset.maxVirtqueuePairs, true),
    mtu: v.getUint16(NetConfigOffset.mtu, true),
  };
}

/** Options of `new NetDriver` (on a frontend already started with queues 0 .. 2 * pairs - 1). */
export interface NetDriverOptions {
  /** Guest RAM for the buffers (default: the frontend's). */
  readonly memory?: GuestRam;
  /** Bytes per receive chain, header included (default 2048; at least the header). */
  readonly rxBufferSize?: number;
  /** Descriptors per receive chain (default 1); the buffer is cut into this many pieces. */
  readonly rxSegments?: number;
  /** Receive chains per queue (default: as many as the ring's descriptors allow). */
  readonly rxBuffers?: number;
  /** Post the receive buffers at once (default true); otherwise `fillRx` does. */
  readonly fillRx?: boolean;
  /** Largest frame `send` takes (default 9014 bytes). */
  readonly maxFrame?: number;
  /** Default layout of transmitted frames (default `single`). */
  readonly txLayout?: TxLayout;
}

/** Options of `NetDriver.start`: starts the frontend, then makes the driver. */
export interface NetStartOptions extends NetDriverOptions {
  readonly memory: GuestRam;
  /** Queue pairs (default 1). More than one needs VIRTIO_NET_F_MQ. */
  readonly queuePairs?: number;
  /** Ring size, a power of two (default 256; a packed ring takes any size up to 32768). */
  readonly queueSize?: number;
  /** Acknowledge VIRTIO_NET_F_MRG_RXBUF when offered (default true). */
  readonly mrgRxbuf?: boolean;
  /** Acknowledge VIRTIO_F_VERSION_1 (default true); without it and MRG_RXBUF the header has 10 bytes. */
  readonly version1?: boolean;
  /** Acknowledge VIRTIO_F_RING_EVENT_IDX when offered (default true). */
  readonly eventIdx?: boolean;
  /** Acknowledge VIRTIO_F_RING_INDIRECT_DESC when offered (default true). */
  readonly indirect?: boolean;
  /** Use packed rings: acknowledge VIRTIO_F_RING_PACKED, which the backend must offer (default false: split rings). */
  readonly packed?: boolean;
  /** See `StartOptions.ownMemory`. */
  readonly ownMemory?: boolean;
}

const DEFAULT_QUEUE_SIZE = 256;
const DEFAULT_RX_BUFFER = 2048;
/** Per transmit slot: the header at 0, a two-entry indirect table at 16, the frame from 64. */
const TX_INDIRECT = 16;
const TX_FRAME = 64;

interface Waiter {
  readonly count: number;
  readonly resolve: (frames: Uint8Array[]) => void;
  readonly reject: (err: Error) => void;
}

interface Send {
  readonly frame: Uint8Array;
  readonly layout: TxLayout;
  readonly resolve: () => void;
  readonly reject: (err: Error) => void;
}

interface Pair {
  readonly index: number;
  readonly rx: FrontendQueue;
  readonly tx: FrontendQueue;
  /** Receive chains: their buffer and their descriptors. */
  readonly rxBytes: Uint8Array[];
  readonly rxSegments: Segment[][];
  /** Receive chains not posted. */
  readonly rxFree: number[];
  /** The frame being reassembled from merged buffers, and how many buffers it still needs. */
  partial: Uint8Array[];
  partialLeft: number;
  /** Frames received and not yet taken by `receive`. */
  readonly frames: Uint8Array[];
  readonly waiters: Waiter[];
  /** Transmit slots: guest address and view; free ones; the request in each busy one. */
  readonly txAddr: number[];
  readonly txBytes: Uint8Array[];
  readonly txFree: number[];
  readonly txBusy: (Send | undefined)[];
  readonly txWaiting: Send[];
}

/** A virtio-net driver over a started frontend; see the module comment. */
export class NetDriver {
  /**
   * Acknowledges the net features this driver understands, starts `queuePairs` pairs on the frontend, and returns
   * the driver. The frontend must be connected (handshake done, GET_CONFIG read) and not yet started.
   */
  static async start(frontend: VhostUserFrontend, options: NetStartOptions): Promise<NetDriver> {
    const offered = frontend.backendFeatures;
    const pairs = options.queuePairs ?? 1;
    const size = options.queueSize ?? DEFAULT_QUEUE_SIZE;
    if (!Number.isInteger(pairs) || pairs < 1) throw new VhostError(NetDriverErrorCode.BAD_OPTION, `bad queue pair count ${pairs}`);
    let features = (featureBit(NetFeature.MAC) | featureBit(NetFeature.STATUS)) & offered;
    if (options.version1 ?? true) features |= featureBit(VirtioFeature.VERSION_1) & offered;
    if (options.mrgRxbuf ?? true) features |= featureBit(NetFeature.MRG_RXBUF) & offered;
    if (options.eventIdx ?? true) features |= featureBit(VirtioFeature.RING_EVENT_IDX) & offered;
    if (options.indirect ?? true) features |= featureBit(VirtioFeature.RING_INDIRECT_DESC) & offered;
    if (options.packed ?? false) features |= packedRingFeature(offered, NetDriverErrorCode.BAD_OPTION);
    if (pairs > 1) {
      if (!hasFeature(offered, NetFeature.MQ)) {
        throw new VhostError(NetDriverErrorCode.BAD_OPTION, `${pairs} queue pairs need VIRTIO_NET_F_MQ, which is not offered`);
      }
      const max = parseNetConfig(frontend.config).maxVirtqueuePairs;
      if (frontend.hasProtocolFeature(ProtocolFeature.CONFIG) && pairs > max) {
        throw new VhostError(NetDriverErrorCode.BAD_OPTION, `${pairs} queue pairs asked, the device has ${max}`);
      }
      // The control queue is the frontend's (as QEMU's): the backend only learns that it was negotiated.
      features |= featureBit(NetFeature.MQ) | featureBit(NetFeature.CTRL_VQ);
    }
    const queues: QueueConfig[] = [];
    for (let index = 0; index < 2 * pairs; index++) queues.push({ index, size });
    await frontend.start({
      features,
      queues,
      memory: options.memory,
      queueNumUnit: 2, // GET_QUEUE_NUM counts pairs
      ...(options.ownMemory !== undefined ? { ownMemory: options.ownMemory } : {}),
    });
    return new NetDriver(frontend, options);
  }

  readonly frontend: VhostUserFrontend;
  readonly config: NetConfig;
  /** Bytes of the virtio-net header: 12 with VERSION_1 or MRG_RXBUF, else 10. */
  readonly headerSize: number;
  /** MRG_RXBUF was negotiated: a frame may span several receive chains. */
  readonly mergeable: boolean;
  readonly maxFrame: number;
  readonly txLayout: TxLayout;
  readonly #pairs: Pair[] = [];
  readonly #removeDisconnectListener: () => void;
  #error: Error | undefined;
  #closed = false;

  /** A driver on a started frontend: uses queues 0 .. 2p + 1 for every pair p whose two queues `start` set up. */
  constructor(frontend: VhostUserFrontend, options: NetDriverOptions = {}) {
    const memory = options.memory ?? frontend.memory;
    if (memory === undefined || frontend.queues.size === 0) {
      throw new VhostError(NetDriverErrorCode.BAD_OPTION, 'the frontend is not started');
    }
    this.frontend = frontend;
    this.config = parseNetConfig(frontend.config);
    this.mergeable = frontend.hasFeature(NetFeature.MRG_RXBUF);
    this.headerSize = this.mergeable || frontend.hasFeature(VirtioFeature.VERSION_1) ? NetHdr.size : NetHdr.legacySize;
    this.maxFrame = options.maxFrame ?? MAX_FRAME;
    this.txLayout = options.txLayout ?? 'single';
    const rxBufferSize = options.rxBufferSize ?? DEFAULT_RX_BUFFER;
    const rxSegments = options.rxSegments ?? 1;
    if (!Number.isInteger(rxSegments) || rxSegments < 1 || !Number.isInteger(rxBufferSize) || rxBufferSize < this.headerSize * rxSegments) {
      throw new VhostError(NetDriverErrorCode.BAD_OPTION, `bad receive buffers: ${rxSegments} segments of ${rxBufferSize} bytes in all`);
    }
    if (this.txLayout === 'indirect' && !frontend.hasFeature(VirtioFeature.RING_INDIRECT_DESC)) {
      throw new VhostError(NetDriverErrorCode.BAD_OPTION, 'indirect descriptors were not negotiated');
    }
    for (let p = 0; frontend.queues.has(2 * p) && frontend.queues.has(2 * p + 1); p++) {
      const rx = frontend.queue(2 * p);
      const tx = frontend.queue(2 * p + 1);
      const rxBuffers = options.rxBuffers ?? Math.floor(rx.size / rxSegments);
      if (!Number.isInteger(rxBuffers) || rxBuffers < 1 || rxBuffers * rxSegments > rx.size) {
        throw new VhostError(NetDriverErrorCode.BAD_OPTION, `${rxBuffers} receive chains of ${rxSegments} do not fit a ring of ${rx.size}`);
      }
      const rxBase = memory.alloc(rxBuffers * rxBufferSize, { align: 4096 });
      const pieces = Array.from({ length: rxSegments }, (_, i) =>
        i < rxSegments - 1 ? Math.floor(rxBufferSize / rxSegments) : rxBufferSize - (rxSegments - 1) * Math.floor(rxBufferSize / rxSegments),
      );
      const rxBytes: Uint8Array[] = [];
      const rxSegs: Segment[][] = [];
      for (let b = 0; b < rxBuffers; b++) {
        const addr = rxBase + b * rxBufferSize;
        rxBytes.push(memory.bytes(addr, rxBufferSize));
        let at = addr;
        rxSegs.push(
          pieces.map((len) => {
            const s = { addr: at, len, writable: true };
            at += len;
            return s;
          }),
        );
      }
      // Two descriptors per frame at most (split layout): half the ring's descriptors.
      const txSlots = Math.max(1, tx.size >> 1);
      const slotBytes = TX_FRAME + this.maxFrame;
      const txBase = memory.alloc(txSlots * slotBytes, { align: 4096 });
      const pair: Pair = {
        index: p,
        rx,
        tx,
        rxBytes,
        rxSegments: rxSegs,
        rxFree: Array.from({ length: rxBuffers }, (_, i) => rxBuffers - 1 - i),
        partial: [],
        partialLeft: 0,
        frames: [],
        waiters: [],
        txAddr: Array.from({ length: txSlots }, (_, i) => txBase + i * slotBytes),
        txBytes: Array.from({ length: txSlots }, (_, i) => memory.bytes(txBase + i * slotBytes, slotBytes)),
        txFree: Array.from({ length: txSlots }, (_, i) => txSlots - 1 - i),
        txBusy: new Array<Send | undefined>(txSlots).fill(undefined),
        txWaiting: [],
      };
      this.#pairs.push(pair);
    }
    if (this.#pairs.length === 0) throw new VhostError(NetDriverErrorCode.BAD_OPTION, 'the frontend has no queue pair 0 (queues 0 and 1)');
    for (const pair of this.#pairs) {
      pair.rx.watchCall(() => this.#drainRx(pair));
      pair.tx.watchCall(() => this.#drainTx(pair));
      if (options.fillRx ?? true) this.fillRx(pair.index);
    }
    this.#removeDisconnectListener = frontend.onDisconnect((err) => this.#failAll(err));
  }

  /** Number of queue pairs. */
  get pairCount(): number {
    return this.#pairs.length;
  }

  /** Why the driver stopped (disconnect, broken ring, `close()`), or undefined while it works. */
  get error(): Error | undefined {
    return this.#error;
  }

  /** Posts every receive chain of pair `pair` that is not in the ring, and kicks if the ring asks for it. */
  fillRx(pair: number): void {
    const p = this.#pair(pair);
    if (this.#error !== undefined) return;
    if (p.rxFree.length === 0) return;
    while (p.rxFree.length > 0) {
      const b = p.rxFree.pop() as number;
      if (p.rx.driver.addChain(p.rxSegments[b] as Segment[], b) < 0) {
        p.rxFree.push(b);
        break;
      }
    }
    p.rx.publishAndKick();
  }

  /**
   * Sends `frame` (an Ethernet frame without FCS, at most `maxFrame` bytes) on pair `pair`; resolves once the device
   * has taken it (used its chain). Frames wait in order for a transmit slot.
   */
  send(pair: number, frame: Uint8Array, layout: TxLayout = this.txLayout): Promise<void> {
    if (this.#error !== undefined) return Promise.reject(this.#error);
    const p = this.#pairs[pair];
    if (p === undefined) return Promise.reject(new RangeError(`pair ${pair} is not in 0..${this.#pairs.length - 1}`));
    if (frame.length > this.maxFrame) return Promise.reject(new RangeError(`frame of ${frame.length} bytes is over maxFrame (${this.maxFrame})`));
    if (layout === 'indirect' && !this.frontend.hasFeature(VirtioFeature.RING_INDIRECT_DESC)) {
      return Promise.reject(new VhostError(NetDriverErrorCode.BAD_OPTION, 'indirect descriptors were not negotiated'));
    }
    return new Promise<void>((resolve, reject) => {
      const s: Send = { frame: frame.slice(), layout, resolve, reject };
      const slot = p.txWaiting.length === 0 ? p.txFree.pop() : undefined;
      if (slot === undefined) p.txWaiting.push(s);
      else this.#place(p, slot, s);
    });
  }

  /**
   * Resolves with the next `count` frames received on pair `pair` (in order), as soon as they are there. Frames are
   * taken once: a later call gets the ones after.
   */
  receive(pair: number, count = 1): Promise<Uint8Array[]> {
    if (this.#error !== undefined) return Promise.reject(this.#error);
    const p = this.#pairs[pair];
    if (p === undefined) return Promise.reject(new RangeError(`pair ${pair} is not in 0..${this.#pairs.length - 1}`));
    return new Promise<Uint8Array[]>((resolve, reject) => {
      p.waiters.push({ count, resolve, reject });
      this.#drainRx(p); // frames may be in the used ring already
      this.#settle(p);
    });
  }

  /** Takes the frames received on pair `pair` so far, without waiting (after collecting what the used ring holds). */
  takeReceived(pair: number): Uint8Array[] {
    const p = this.#pair(pair);
    this.#drainRx(p);
    return p.waiters.length === 0 ? p.frames.splice(0) : [];
  }

  /** Stops watching the call eventfds and rejects everything waiting with `VHOST_NET_DRIVER_CLOSED`. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#removeDisconnectListener();
    for (const p of this.#pairs) {
      for (const q of [p.rx, p.tx]) {
        try {
          q.watchCall(undefined);
        } catch {
          // the frontend released the queue already
        }
      }
    }
    this.#failAll(new VhostError(NetDriverErrorCode.CLOSED, 'the net driver is closed'));
  }

  // ---- transmit ----------------------------------------------------------------------------------------------------

  #place(p: Pair, slot: number, s: Send): void {
    const h = this.headerSize;
    const addr = p.txAddr[slot] as number;
    const bytes = p.txBytes[slot] as Uint8Array;
    // single: [header | frame] contiguous at TX_FRAME - h; split and indirect: the header at 0, the frame at TX_FRAME.
    let segments: Segment[];
    if (s.layout === 'single') {
      bytes.fill(0, TX_FRAME - h, TX_FRAME);
      segments = [{ addr: addr + TX_FRAME - h, len: h + s.frame.length, writable: false }];
    } else {
      bytes.fill(0, 0, h);
      segments = [
        { addr, len: h, writable: false },
        { addr: addr + TX_FRAME, len: s.frame.length, writable: false },
      ];
    }
    bytes.set(s.frame, TX_FRAME);
    const head = p.tx.driver.addChain(segments, slot, s.layout === 'indirect' ? { indirectAddr: addr + TX_INDIRECT } : {});
    if (head < 0) {
      // Cannot happen: slots are bounded by the ring's descriptors.
      p.txFree.push(slot);
      s.reject(new VhostError(NetDriverErrorCode.BROKEN, `pair ${p.index}: transmit ring out of descriptors`));
      return;
    }
    p.txBusy[slot] = s;
    p.tx.publishAndKick();
  }

  #drainTx(p: Pair): void {
    this.#drain(p, p.tx, (slot) => {
      const s = p.txBusy[slot];
      p.txBusy[slot] = undefined;
      p.txFree.push(slot);
      s?.resolve();
    });
    while (p.txWaiting.length > 0 && p.txFree.length > 0 && this.#error === undefined) {
      this.#place(p, p.txFree.pop() as number, p.txWaiting.shift() as Send);
    }
  }

  // ---- receive -----------------------------------------------------------------------------------------------------

  #drainRx(p: Pair): void {
    const before = p.rxFree.length;
    this.#drain(p, p.rx, (b, len) => this.#onReceived(p, b, len));
    if (this.#error !== undefined) return;
    if (p.rxFree.length > before) this.fillRx(p.index);
    this.#settle(p);
  }

  /** A used receive chain: the start of a frame (header, num_buffers) or the next piece of a merged one. */
  #onReceived(p: Pair, b: number, len: number): void {
    const bytes = p.rxBytes[b] as Uint8Array;
    const h = this.headerSize;
    if (len > bytes.length) throw new VhostError(NetDriverErrorCode.BROKEN, `pair ${p.index}: used length ${len} is over the buffer's ${bytes.length}`);
    if (p.partialLeft === 0) {
      if (len < h) throw new VhostError(NetDriverErrorCode.BROKEN, `pair ${p.index}: used length ${len} is shorter than the header`);
      const numBuffers = h === NetHdr.size ? (bytes[NetHdr.numBuffers] as number) | ((bytes[NetHdr.numBuffers + 1] as number) << 8) : 1;
      if (numBuffers < 1 || (!this.mergeable && numBuffers !== 1)) {
        throw new VhostError(NetDriverErrorCode.BROKEN, `pair ${p.index}: num_buffers ${numBuffers}`);
      }
      p.partial = [bytes.slice(h, len)];
      p.partialLeft = numBuffers - 1;
    } else {
      p.partial.push(bytes.slice(0, len));
      p.partialLeft--;
    }
    p.rxFree.push(b);
    if (p.partialLeft === 0) {
      const parts = p.partial;
      p.partial = [];
      p.frames.push(parts.length === 1 ? (parts[0] as Uint8Array) : Uint8Array.from(Buffer.concat(parts)));
    }
  }

  /** Resolves the receive waiters whose frames are there, in order. */
  #settle(p: Pair): void {
    for (;;) {
      const w = p.waiters[0];
      if (w === undefined || p.frames.length < w.count) return;
      p.waiters.shift();
      w.resolve(p.frames.splice(0, w.count));
    }
  }

  // ---- common ------------------------------------------------------------------------------------------------------

  /** Consumes the used ring until it is empty, then re-arms the notification (and goes on if more came meanwhile). */
  #drain(p: Pair, q: FrontendQueue, onUsed: (token: number, len: number) => void): void {
    if (this.#error !== undefined) return;
    try {
      for (;;) {
        if (q.driver.pollUsed(onUsed) > 0) continue;
        if (!q.driver.enableInterrupts()) break;
      }
    } catch (err) {
      this.#failAll(new VhostError(NetDriverErrorCode.BROKEN, `pair ${p.index}: bad used ring on queue ${q.index}`, { cause: err }));
    }
  }

  #pair(index: number): Pair {
    const p = this.#pairs[index];
    if (p === undefined) throw new RangeError(`pair ${index} is not in 0..${this.#pairs.length - 1}`);
    return p;
  }

  #failAll(err: Error): void {
    if (this.#error !== undefined) return;
    this.#error = err;
    for (const p of this.#pairs) {
      for (const w of p.waiters.splice(0)) w.reject(err);
      for (let i = 0; i < p.txBusy.length; i++) {
        p.txBusy[i]?.reject(err);
        p.txBusy[i] = undefined;
      }
      for (const s of p.txWaiting.splice(0)) s.reject(err);
    }
  }
}
