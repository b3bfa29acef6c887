/**
 * virtio-net, queue half (runs in worker threads; VIRTIO 1.2 §5.1.6). Queue 2p receives for pair p, 2p + 1
 * transmits; both run in the same worker and share the pair's port (ports/).
 *
 * Transmit: each chain is one frame behind a virtio-net header. The header is read once; offloads were not offered,
 * so a frame asking for one (NEEDS_CSUM, a GSO type) is malformed and dropped (counted, the queue goes on). The frame
 * goes to the port as a view of guest memory when it sits in one buffer (the DPDK and Linux layouts), else it is
 * gathered into a bounce buffer.
 *
 * Receive (a `QueueProducer`): a frame from the port goes behind a zeroed header into the driver's buffers. With
 * MRG_RXBUF it may span several chains (num_buffers in the first header says how many); without, it must fit in
 * one. When the ring runs out of buffers mid-frame, the chains taken are given back and the frame waits in the port
 * (STARVED). A frame that can never fit is dropped. A receive chain with a device-readable part is a driver error that
 * stops the queue (NEEDS_RESET), as for any malformed chain.
 */
import { VhostError, VirtioError } from '../../errors.js';
import type { GuestMemory } from '../../memory/guest-memory.js';
import { RegionCache } from '../../memory/region-cache.js';
import { ChainReader, copyToGuest, DescriptorChain } from '../../queue/descriptor-chain.js';
import { rarpFrame } from './rarp.js';
import type { DeviceQueue } from '../../queue/device-queue.js';
import { VirtioFeature } from '../../protocol/constants.js';
import { ProduceResult, type QueueContext, type QueueHandler, type QueueProducer } from '../device.js';
import {
  isReceiveQueue,
  MAX_TX_FRAME,
  NET_HDR_F_NEEDS_CSUM,
  NET_HDR_GSO_NONE,
  NetFeature,
  NetHdr,
} from './constants.js';
import type { NetPort, PortSpec } from './ports/port.js';
import { LoopbackPort, SinkPort, SourcePort } from './ports/simple.js';
import { SwitchPort } from './ports/switch.js';
import { TapPort } from './ports/tap.js';
import { C, count, statsRow } from './stats.js';

export interface NetQueueOptions {
  port: PortSpec;
  /** Counters, one row per pair (stats.ts). */
  stats: SharedArrayBuffer;
}

function has(features: bigint, bitNumber: number): boolean {
  return (features & (1n << BigInt(bitNumber))) !== 0n;
}

/** The header size the driver and device agreed on (§5.1.6.1). */
export function netHeaderSize(features: bigint): number {
  return has(features, VirtioFeature.VERSION_1) || has(features, NetFeature.MRG_RXBUF) ? NetHdr.size : NetHdr.legacySize;
}

function createPort(spec: PortSpec, pair: number, stats: Float64Array): NetPort {
  switch (spec.kind) {
    case 'loopback':
      return new LoopbackPort();
    case 'sink':
      return new SinkPort();
    case 'source':
      return new SourcePort(spec.frameLen, spec.mac, stats);
    case 'tap': {
      const fd = spec.fds[pair];
      if (fd === undefined) throw new VhostError('VHOST_NET_NO_TAP_QUEUE', `TAP ${spec.name} has no queue for pair ${pair}`);
      return new TapPort(fd);
    }
    case 'switch':
      if (pair !== 0) throw new VhostError('VHOST_NET_SWITCH_PAIRS', 'a switch port has one queue pair');
      return new SwitchPort(spec.shared, spec.index);
  }
}

/** A pair's port, shared by its two queue handlers in this worker; closed when both are. */
class PairPort {
  readonly key: string;
  readonly port: NetPort;
  refs = 0;
  constructor(key: string, port: NetPort) {
    this.key = key;
    this.port = port;
  }
}
/** Ports of this worker by device instance and pair (`instance:pair`): a worker serves pairs of many devices. */
const pairPorts = new Map<string, PairPort>();

function acquirePort(options: NetQueueOptions, instance: number, pair: number): PairPort {
  const key = `${instance}:${pair}`;
  let p = pairPorts.get(key);
  if (p === undefined) {
    p = new PairPort(key, createPort(options.port, pair, statsRow(options.stats, pair)));
    pairPorts.set(key, p);
  }
  p.refs++;
  return p;
}

function releasePort(p: PairPort): void {
  if (--p.refs > 0) return;
  pairPorts.delete(p.key);
  p.port.close();
}

// ---- transmit -------------------------------------------------------------------------------------------------------

class NetTxHandler implements QueueHandler {
  readonly #pairPort: PairPort;
  readonly #port: NetPort;
  readonly #stats: Float64Array;
  readonly #hdrSize: number;
  readonly #regions = new RegionCache();
  readonly #reader = new ChainReader();
  readonly #header = new Uint8Array(NetHdr.size);
  #bounce = new Uint8Array(2048);

  constructor(options: NetQueueOptions, instance: number, pair: number, features: bigint) {
    this.#pairPort = acquirePort(options, instance, pair);
    this.#port = this.#pairPort.port;
    this.#stats = statsRow(options.stats, pair);
    this.#hdrSize = netHeaderSize(features);
  }

  process(mem: GuestMemory, chain: DescriptorChain): number {
    const stats = this.#stats;
    const hdrSize = this.#hdrSize;
    const frameLen = chain.readableBytes - hdrSize;
    if (frameLen < 14 || frameLen > MAX_TX_FRAME) {
      count(stats, C.txErrors);
      return 0;
    }
    this.#regions.use(mem);
    const len0 = chain.len[0] as number;
    const addr0 = chain.addr[0] as number;
    // Fast paths: header and frame in one buffer (DPDK, Linux with any_layout), or the header alone then the frame.
    let at = len0 >= hdrSize ? this.#regions.locate(addr0, len0) : -1;
    let flags: number;
    let gsoType: number;
    if (at >= 0) {
      const u8 = this.#regions.u8;
      flags = u8[at] as number;
      gsoType = u8[at + 1] as number;
    } else {
      this.#reader.reset(mem, chain).readExact(this.#header.subarray(0, hdrSize));
      flags = this.#header[0] as number;
      gsoType = this.#header[1] as number;
    }
    if ((flags & NET_HDR_F_NEEDS_CSUM) !== 0 || gsoType !== NET_HDR_GSO_NONE) {
      count(stats, C.txErrors); // offloads were not offered: the frame is not complete without them
      return 0;
    }
    let sent: boolean;
    if (at >= 0 && len0 === hdrSize + frameLen) {
      sent = this.#port.transmit(this.#regions.u8, at + hdrSize, frameLen);
    } else if (len0 === hdrSize && chain.readableCount === 2 && (at = this.#regions.locate(chain.addr[1] as number, frameLen)) >= 0) {
      sent = this.#port.transmit(this.#regions.u8, at, frameLen);
    } else {
      if (this.#bounce.length < frameLen) this.#bounce = new Uint8Array(MAX_TX_FRAME);
      const reader = this.#reader.reset(mem, chain);
      reader.skip(hdrSize);
      reader.readExact(this.#bounce.subarray(0, frameLen));
      sent = this.#port.transmit(this.#bounce, 0, frameLen);
    }
    if (sent) {
      count(stats, C.txFrames);
      count(stats, C.txBytes, frameLen);
    } else {
      count(stats, C.txDropped);
    }
    return 0; // nothing is written into a transmit chain
  }

  /** SEND_RARP: a RARP frame from `mac` on this pair's port (rarp.ts). */
  announce(mac: Uint8Array): void {
    const frame = rarpFrame(mac);
    if (this.#port.transmit(frame, 0, frame.length)) count(this.#stats, C.txFrames);
    else count(this.#stats, C.txDropped);
  }

  close(): void {
    releasePort(this.#pairPort);
  }
}

// ---- receive --------------------------------------------------------------------------------------------------------

/** `deliver` results besides a count of chains. */
const NO_BUFFERS = -1;
const TOO_LARGE = -2;

class NetRxHandler implements QueueHandler, QueueProducer {
  readonly producer: QueueProducer = this;
  readonly inputFd: number | undefined;
  readonly #pairPort: PairPort;
  readonly #port: NetPort;
  readonly #stats: Float64Array;
  readonly #hdrSize: number;
  readonly #mergeable: boolean;
  readonly #regions = new RegionCache();
  readonly #header = new Uint8Array(NetHdr.size);
  #chain: DescriptorChain | undefined;
  /** Chains used by the frame being delivered: heads and used lengths. */
  #heads = new Uint32Array(0);
  #lens = new Uint32Array(0);

  constructor(options: NetQueueOptions, instance: number, pair: number, features: bigint) {
    this.#pairPort = acquirePort(options, instance, pair);
    this.#port = this.#pairPort.port;
    this.inputFd = this.#port.inputFd;
    this.#stats = statsRow(options.stats, pair);
    this.#hdrSize = netHeaderSize(features);
    this.#mergeable = has(features, NetFeature.MRG_RXBUF);
  }

  process(): number {
    throw new VhostError('VHOST_INTERNAL', 'a receive queue is driven by its producer');
  }

  hasInput(): boolean {
    return this.#port.hasInput();
  }

  produce(mem: GuestMemory, queue: DeviceQueue, budget: number): ProduceResult {
    this.#regions.use(mem);
    if (this.#chain === undefined || this.#heads.length !== queue.size) {
      this.#chain = queue.createChain();
      this.#heads = new Uint32Array(queue.size);
      this.#lens = new Uint32Array(queue.size);
    }
    const port = this.#port;
    const stats = this.#stats;
    for (let n = 0; n < budget; n++) {
      if (!port.next()) return ProduceResult.IDLE;
      const frame = port.frame;
      const used = this.#deliver(mem, queue, this.#chain, frame.buf, frame.offset, frame.length);
      if (used === NO_BUFFERS) return ProduceResult.STARVED; // the frame stays current in the port
      if (used === TOO_LARGE) {
        count(stats, C.rxDropped);
      } else {
        for (let i = 0; i < used; i++) queue.pushUsed(this.#heads[i] as number, this.#lens[i] as number);
        count(stats, C.rxFrames);
        count(stats, C.rxBytes, frame.length);
      }
      port.consume();
    }
    return ProduceResult.BUDGET;
  }

  /**
   * Writes header + frame into as many chains as it takes; returns how many (their heads and lengths in #heads /
   * #lens, not yet pushed), or NO_BUFFERS / TOO_LARGE with every chain given back.
   */
  #deliver(mem: GuestMemory, queue: DeviceQueue, chain: DescriptorChain, buf: Uint8Array, offset: number, length: number): number {
    const hdrSize = this.#hdrSize;
    const total = hdrSize + length;
    // Fast path: one chain, one buffer that holds it all (DPDK's 2060-byte buffers, Linux's mergeable pages).
    if (!queue.popChain(mem, chain)) return NO_BUFFERS;
    if (chain.readableCount !== 0) {
      throw new VirtioError('VIRTIO_NET_RX_READABLE', `receive chain ${chain.head} has device-readable descriptors`);
    }
    if (chain.count === 1 && (chain.len[0] as number) >= total) {
      const at = this.#regions.locate(chain.addr[0] as number, total);
      if (at >= 0) {
        const u8 = this.#regions.u8;
        u8.fill(0, at, at + hdrSize);
        if (hdrSize === NetHdr.size) u8[at + NetHdr.numBuffers] = 1; // num_buffers = 1 (little-endian u16)
        u8.set(buf.subarray(offset, offset + length), at + hdrSize);
        this.#heads[0] = chain.head;
        this.#lens[0] = total;
        return 1;
      }
    }
    // General path: byte stream over the chains' writable segments; header first (num_buffers patched at the end).
    const header = this.#header;
    header.fill(0);
    let count = 0;
    let done = 0; // bytes of header + frame written
    let numBuffersGpa = -1; // where the first chain's num_buffers field landed (one or two byte addresses)
    let numBuffersGpa2 = -1;
    for (;;) {
      if (count > 0) {
        if (!queue.popChain(mem, chain)) {
          for (let i = 0; i < count; i++) queue.unpop();
          return NO_BUFFERS;
        }
        if (chain.readableCount !== 0) {
          throw new VirtioError('VIRTIO_NET_RX_READABLE', `receive chain ${chain.head} has device-readable descriptors`);
        }
      }
      let written = 0;
      for (let i = 0; i < chain.count && done < total; i++) {
        const gpa = chain.addr[i] as number;
        const segLen = chain.len[i] as number;
        let segDone = 0;
        while (segDone < segLen && done < total) {
          let n = Math.min(segLen - segDone, total - done);
          if (done < hdrSize) {
            n = Math.min(n, hdrSize - done);
            if (hdrSize === NetHdr.size) {
              // Remember where bytes 10 and 11 of the header go, to write num_buffers once it is known. The header is
              // a byte stream like the frame: with buffers smaller than it (a driver error, §5.1.6.3.1) it continues
              // in the next chain, as in Linux vhost-net.
              for (let b = 0; b < n; b++) {
                if (done + b === NetHdr.numBuffers) numBuffersGpa = gpa + segDone + b;
                if (done + b === NetHdr.numBuffers + 1) numBuffersGpa2 = gpa + segDone + b;
              }
            }
            copyToGuest(mem, gpa + segDone, header, done, n);
          } else {
            const from = offset + done - hdrSize;
            copyToGuest(mem, gpa + segDone, buf, from, n);
          }
          segDone += n;
          done += n;
          written += n;
        }
      }
      this.#heads[count] = chain.head;
      this.#lens[count] = written;
      count++;
      if (done === total) break;
      if (!this.#mergeable || count === queue.size) {
        // Without MRG_RXBUF a frame must fit one chain; with it, in the whole ring. Give the chains back, drop it.
        for (let i = 0; i < count; i++) queue.unpop();
        return TOO_LARGE;
      }
    }
    if (hdrSize === NetHdr.size) {
      // num_buffers is little-endian; with MRG_RXBUF it counts the chains, without it is 1 (VERSION_1).
      const lo = new Uint8Array([count & 0xff]);
      const hi = new Uint8Array([count >> 8]);
      copyToGuest(mem, numBuffersGpa, lo, 0, 1);
      copyToGuest(mem, numBuffersGpa2, hi, 0, 1);
    }
    return count;
  }

  close(): void {
    releasePort(this.#pairPort);
  }
}

export function createQueueHandler(options: unknown, context: QueueContext): QueueHandler {
  const o = options as NetQueueOptions;
  const pair = context.queueIndex >> 1;
  return isReceiveQueue(context.queueIndex)
    ? new NetRxHandler(o, context.instance, pair, context.features)
    : new NetTxHandler(o, context.instance, pair, context.features);
}
