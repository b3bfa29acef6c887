/**
 * virtio-net, queue half (runs in worker threads; VIRTIO 1.2 §5.1.6). Queue 2p receives for pair p, 2p + 1
 * transmits; both run in the same worker and share the pair's port (ports/).
 *
 * Transmit: each chain is one frame behind a virtio-net header. The header's offload fields are checked against
 * what the driver negotiated (CSUM, HOST_TSO4/6, HOST_ECN; offload.ts `validateOffload`): a frame asking for one it
 * did not negotiate, or with a malformed request (gso_size 0, a checksum field outside the frame, GSO without
 * NEEDS_CSUM), is dropped and counted (txErrors), and the queue goes on. The frame goes to the port with its offload
 * fields, as a view of guest memory when it sits in one buffer (the DPDK and Linux layouts), else gathered into a
 * bounce buffer.
 *
 * Receive (a `QueueProducer`): a frame from the port goes behind a virtio-net header into the driver's buffers.
 * Offloads the driver negotiated (GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN) pass through in the header: a GSO frame goes
 * whole, a partial checksum stays partial. Those it did not are completed here: a GSO frame is segmented in
 * software (each segment a frame with full checksums), a partial checksum is computed. With MRG_RXBUF a frame may
 * span several chains (num_buffers in the first header says how many); without, it must fit in one. When the ring
 * runs out of buffers mid-frame, the chains taken are given back and the frame (or the rest of its segments) waits
 * in the port (STARVED). A frame that can never fit is dropped. A receive chain with a device-readable part is a
 * driver error that stops the queue (NEEDS_RESET), as for any malformed chain.
 */
import { VhostError, VirtioError } from '../../errors.js';
import type { GuestMemory } from '../../memory/guest-memory.js';
import { RegionCache } from '../../memory/region-cache.js';
import { ChainReader, copyBytes, copyToGuest, copyWords, DescriptorChain, WORD_COPY_MAX } from '../../queue/descriptor-chain.js';
import { rarpFrame } from './rarp.js';
import type { DeviceQueue } from '../../queue/device-queue.js';
import { VirtioFeature } from '../../protocol/constants.js';
import { ProduceResult, type QueueContext, type QueueHandler, type QueueProducer } from '../device.js';
import { isReceiveQueue, MAX_TX_FRAME, NetFeature, NetHdr } from './constants.js';
import {
  clearVnetHeader,
  completeChecksum,
  maxSegments,
  newVnetHeader,
  OffloadCap,
  OffloadError,
  readVnetHeader,
  segmentScratchSize,
  segmentTcp,
  validateOffload,
  VNET_HDR_F_DATA_VALID,
  VNET_HDR_F_NEEDS_CSUM,
  VNET_HDR_GSO_ECN,
  VNET_HDR_GSO_NONE,
  VNET_HDR_GSO_TCPV4,
  VNET_HDR_GSO_TCPV6,
  writeVnetHeader,
  type VnetHeader,
} from './offload.js';
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

/** OffloadCap bits for the features of one direction: its checksum, TSO4, TSO6 and ECN feature bits. */
function offloadCaps(features: bigint, csum: number, tso4: number, tso6: number, ecn: number): number {
  return (
    (has(features, csum) ? OffloadCap.CSUM : 0) |
    (has(features, tso4) ? OffloadCap.TSO4 : 0) |
    (has(features, tso6) ? OffloadCap.TSO6 : 0) |
    (has(features, ecn) ? OffloadCap.ECN : 0)
  );
}

/** The offloads a driver takes on transmit (CSUM, HOST_TSO4/6, HOST_ECN) as OffloadCap bits. */
export function transmitOffloads(features: bigint): number {
  return offloadCaps(features, NetFeature.CSUM, NetFeature.HOST_TSO4, NetFeature.HOST_TSO6, NetFeature.HOST_ECN);
}

/** The offloads a driver takes on receive (GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN) as OffloadCap bits. */
export function receiveOffloads(features: bigint): number {
  return offloadCaps(features, NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6, NetFeature.GUEST_ECN);
}

/** The offloads a GSO type needs of its receiver. */
function gsoNeeds(gsoType: number): number {
  const base = gsoType & ~VNET_HDR_GSO_ECN;
  const tso = base === VNET_HDR_GSO_TCPV4 ? OffloadCap.TSO4 : base === VNET_HDR_GSO_TCPV6 ? OffloadCap.TSO6 : 0x100; // 0x100: none can
  return tso | OffloadCap.CSUM | ((gsoType & VNET_HDR_GSO_ECN) !== 0 ? OffloadCap.ECN : 0);
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
  /** OffloadCap bits the driver negotiated for transmit. */
  readonly #offloads: number;
  readonly #regions = new RegionCache();
  readonly #reader = new ChainReader();
  /** The header when it is not in the first buffer whole (read with the chain reader). */
  readonly #header: Uint8Array;
  readonly #hdr = newVnetHeader();
  #bounce = new Uint8Array(2048);

  constructor(options: NetQueueOptions, instance: number, pair: number, features: bigint) {
    this.#pairPort = acquirePort(options, instance, pair);
    this.#port = this.#pairPort.port;
    this.#stats = statsRow(options.stats, pair);
    this.#hdrSize = netHeaderSize(features);
    this.#header = new Uint8Array(this.#hdrSize);
    this.#offloads = transmitOffloads(features);
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
    const hdr = this.#hdr;
    if (at >= 0) {
      readVnetHeader(this.#regions.u8, at, hdr);
    } else {
      this.#reader.reset(mem, chain).readExact(this.#header);
      readVnetHeader(this.#header, 0, hdr);
    }
    hdr.flags &= VNET_HDR_F_NEEDS_CSUM; // DATA_VALID and the rest mean nothing on transmit (§5.1.6.2)
    if ((hdr.flags | hdr.gsoType) !== 0) {
      if (validateOffload(hdr, frameLen, this.#offloads) !== 0) {
        count(stats, C.txErrors); // malformed, or an offload the driver did not negotiate: the frame is not whole
        return 0;
      }
      if (hdr.gsoType !== VNET_HDR_GSO_NONE) count(stats, C.txGso);
    }
    let sent: boolean;
    if (at >= 0 && len0 === hdrSize + frameLen) {
      sent = this.#port.transmit(this.#regions.u8, at + hdrSize, frameLen, hdr);
    } else if (len0 === hdrSize && chain.readableCount === 2 && (at = this.#regions.locate(chain.addr[1] as number, frameLen)) >= 0) {
      sent = this.#port.transmit(this.#regions.u8, at, frameLen, hdr);
    } else {
      if (this.#bounce.length < frameLen) this.#bounce = new Uint8Array(MAX_TX_FRAME);
      const reader = this.#reader.reset(mem, chain);
      reader.skip(hdrSize);
      reader.read(this.#bounce); // the frameLen bytes left (the bounce buffer holds at least that many): no view per frame
      sent = this.#port.transmit(this.#bounce, 0, frameLen, hdr);
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
    clearVnetHeader(this.#hdr);
    if (this.#port.transmit(frame, 0, frame.length, this.#hdr)) count(this.#stats, C.txFrames);
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

/** Most segments one GSO frame is cut into for a driver without the offload (64 KiB with an MSS of 32 bytes). */
const MAX_SOFTWARE_SEGMENTS = 2048;

function copyHeader(out: VnetHeader, hdr: VnetHeader): void {
  out.flags = hdr.flags & VNET_HDR_F_NEEDS_CSUM;
  out.gsoType = hdr.gsoType;
  out.hdrLen = hdr.hdrLen;
  out.gsoSize = hdr.gsoSize;
  out.csumStart = hdr.csumStart;
  out.csumOffset = hdr.csumOffset;
}

class NetRxHandler implements QueueHandler, QueueProducer {
  readonly producer: QueueProducer = this;
  readonly inputFd: number | undefined;
  readonly #pairPort: PairPort;
  readonly #port: NetPort;
  readonly #stats: Float64Array;
  readonly #hdrSize: number;
  readonly #mergeable: boolean;
  /** OffloadCap bits the driver negotiated for receive. */
  readonly #offloads: number;
  readonly #regions = new RegionCache();
  readonly #header = new Uint8Array(NetHdr.size);
  /** The header given to the driver with the frame being delivered. */
  readonly #out = newVnetHeader();
  #chain: DescriptorChain | undefined;
  /** Chains used by the frame being delivered: heads and used lengths. */
  #heads = new Uint32Array(0);
  #lens = new Uint32Array(0);
  /** Software segmentation of the current port frame: the segments, and the next one to deliver (of #segCount). */
  #segments = new Uint8Array(0);
  #segOffsets = new Uint32Array(0);
  #segLengths = new Uint32Array(0);
  #segCount = 0;
  #segNext = 0;
  /** Whether the port's current frame went through #prepare (#out is its header). */
  #prepared = false;
  /** A DataView of the port's frame buffer (the same buffer frame after frame), for short copies. */
  #frameBuf: Uint8Array | undefined;
  #frameDv: DataView<ArrayBufferLike> = new DataView(new ArrayBuffer(0));

  constructor(options: NetQueueOptions, instance: number, pair: number, features: bigint) {
    this.#pairPort = acquirePort(options, instance, pair);
    this.#port = this.#pairPort.port;
    this.inputFd = this.#port.inputFd;
    this.#stats = statsRow(options.stats, pair);
    this.#hdrSize = netHeaderSize(features);
    this.#mergeable = has(features, NetFeature.MRG_RXBUF);
    this.#offloads = receiveOffloads(features);
    this.#port.acceptOffloads?.(this.#offloads);
  }

  process(): number {
    throw new VhostError('VHOST_INTERNAL', 'a receive queue is driven by its producer');
  }

  hasInput(): boolean {
    return this.#segCount > 0 || this.#port.hasInput();
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
    const out = this.#out;
    for (let n = 0; n < budget; n++) {
      if (this.#segCount > 0) {
        // The rest of a frame segmented in software: one segment per round, complete frames with zeroed headers.
        clearVnetHeader(out);
        const k = this.#segNext;
        const len = this.#segLengths[k] as number;
        const used = this.#deliver(mem, queue, this.#chain, this.#segments, this.#segOffsets[k] as number, len, out);
        if (used === NO_BUFFERS) return ProduceResult.STARVED; // the segment (and the frame) stays current
        this.#pushUsed(queue, used, len);
        if (++this.#segNext === this.#segCount) {
          this.#segCount = 0;
          this.#prepared = false;
          port.consume();
        }
        continue;
      }
      if (!port.next()) return ProduceResult.IDLE;
      const frame = port.frame;
      if (!this.#prepared) {
        if (!this.#prepare(frame.buf, frame.offset, frame.length, frame.hdr)) {
          count(stats, C.rxDropped); // not deliverable (a GSO frame that cannot be segmented)
          port.consume();
          continue;
        }
        this.#prepared = true; // once: a completed checksum must not be completed again after a STARVED round
        if (this.#segCount > 0) continue; // segmented: delivered from the top of the loop
      }
      const used = this.#deliver(mem, queue, this.#chain, frame.buf, frame.offset, frame.length, out);
      if (used === NO_BUFFERS) return ProduceResult.STARVED; // the frame stays current in the port, prepared
      this.#pushUsed(queue, used, frame.length);
      if (used !== TOO_LARGE && out.gsoType !== VNET_HDR_GSO_NONE) count(stats, C.rxGso);
      this.#prepared = false;
      port.consume();
    }
    return ProduceResult.BUDGET;
  }

  #frameView(buf: Uint8Array): DataView {
    if (buf !== this.#frameBuf) {
      this.#frameBuf = buf;
      this.#frameDv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    }
    return this.#frameDv;
  }

  #pushUsed(queue: DeviceQueue, used: number, length: number): void {
    if (used === TOO_LARGE) {
      count(this.#stats, C.rxDropped);
      return;
    }
    for (let i = 0; i < used; i++) queue.pushUsed(this.#heads[i] as number, this.#lens[i] as number);
    count(this.#stats, C.rxFrames);
    count(this.#stats, C.rxBytes, length);
  }

  /**
   * Decides how a port frame with offload fields `hdr` reaches this driver, and sets the header it gets (#out):
   * what the driver negotiated passes through; a partial checksum it did not is completed in place (the port's
   * bytes are ours until consume); a GSO frame it did not is segmented into #segments (#segCount > 0). Returns false
   * for a frame that cannot be delivered.
   */
  #prepare(buf: Uint8Array, offset: number, length: number, hdr: VnetHeader): boolean {
    const out = this.#out;
    const offloads = this.#offloads;
    clearVnetHeader(out);
    if (hdr.gsoType !== VNET_HDR_GSO_NONE) {
      if ((gsoNeeds(hdr.gsoType) & ~offloads) === 0) {
        copyHeader(out, hdr);
        return true;
      }
      const segments = maxSegments(length, hdr.gsoSize);
      if (segments > MAX_SOFTWARE_SEGMENTS) return false;
      const scratch = segmentScratchSize(length, hdr.gsoSize);
      if (this.#segments.length < scratch) this.#segments = new Uint8Array(scratch);
      if (this.#segOffsets.length < segments) {
        this.#segOffsets = new Uint32Array(segments);
        this.#segLengths = new Uint32Array(segments);
      }
      const n = segmentTcp(buf, offset, length, hdr, this.#segments, this.#segOffsets, this.#segLengths);
      if (n <= 0) return false;
      this.#segCount = n;
      this.#segNext = 0;
      count(this.#stats, C.rxSegmented);
      return true;
    }
    if ((hdr.flags & VNET_HDR_F_NEEDS_CSUM) !== 0) {
      if ((offloads & OffloadCap.CSUM) !== 0) {
        copyHeader(out, hdr);
        return true;
      }
      if (completeChecksum(buf, offset, length, hdr.csumStart, hdr.csumOffset) !== OffloadError.OK) return false;
      count(this.#stats, C.rxChecksummed);
      return true;
    }
    // DATA_VALID (a TAP frame whose checksum the host verified) only for a driver with GUEST_CSUM (§5.1.6.3.1).
    if ((hdr.flags & VNET_HDR_F_DATA_VALID) !== 0 && (offloads & OffloadCap.CSUM) !== 0) out.flags = VNET_HDR_F_DATA_VALID;
    return true;
  }

  /**
   * Writes header + frame into as many chains as it takes; returns how many (their heads and lengths in #heads /
   * #lens, not yet pushed), or NO_BUFFERS / TOO_LARGE with every chain given back.
   */
  #deliver(mem: GuestMemory, queue: DeviceQueue, chain: DescriptorChain, buf: Uint8Array, offset: number, length: number, hdr: VnetHeader): number {
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
        writeVnetHeader(u8, at, hdr);
        if (hdrSize === NetHdr.size) {
          u8[at + NetHdr.numBuffers] = 1; // num_buffers = 1 (little-endian u16)
          u8[at + NetHdr.numBuffers + 1] = 0;
        }
        if (length <= WORD_COPY_MAX) copyWords(this.#regions.dv, at + hdrSize, this.#frameView(buf), offset, length);
        else copyBytes(u8, at + hdrSize, buf, offset, length);
        this.#heads[0] = chain.head;
        this.#lens[0] = total;
        return 1;
      }
    }
    // General path: byte stream over the chains' writable segments; header first (num_buffers patched at the end).
    const header = this.#header;
    writeVnetHeader(header, 0, hdr);
    header[NetHdr.numBuffers] = 0;
    header[NetHdr.numBuffers + 1] = 0;
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
      header[0] = count & 0xff; // the header was written: its first two bytes are scratch now
      header[1] = count >> 8;
      copyToGuest(mem, numBuffersGpa, header, 0, 1);
      copyToGuest(mem, numBuffersGpa2, header, 1, 1);
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
