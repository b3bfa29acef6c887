/**
 * The ports that need nothing outside the process: loopback, sink and source (benchmarks and tests).
 */
import { newVnetHeader, type VnetHeader } from '../offload.js';
import { C, count } from '../stats.js';
import { FrameRing, frameRingBytes, PUSH_FULL } from './frame-ring.js';
import type { Frame, NetPort } from './port.js';

/** Record bytes of a loopback pair between its transmit and its receive queue (more are dropped: a full NIC queue). */
export const LOOPBACK_RING_BYTES = 1 << 20;

/**
 * Transmit queue -> receive queue of the same pair, in the one thread that runs both: a ring of frame copies with
 * their offload fields (frame-ring.ts, in an ordinary buffer), so a GSO frame comes back as one, to be segmented for
 * a driver that did not negotiate it.
 */
export class LoopbackPort implements NetPort {
  readonly inputFd = undefined;
  readonly frame: Frame;
  readonly #ring = new FrameRing(new ArrayBuffer(frameRingBytes(LOOPBACK_RING_BYTES)), 0, LOOPBACK_RING_BYTES);

  constructor() {
    this.frame = { buf: this.#ring.bytes, offset: 0, length: 0, hdr: newVnetHeader() };
  }

  transmit(buf: Uint8Array, offset: number, length: number, hdr: VnetHeader): boolean {
    return this.#ring.push(buf, offset, length, hdr) !== PUSH_FULL; // one thread: nobody to wake
  }

  hasInput(): boolean {
    return this.#ring.hasRecord();
  }

  next(): boolean {
    const at = this.#ring.peek(this.frame.hdr);
    if (at < 0) return false;
    this.frame.offset = at;
    this.frame.length = this.#ring.currentLength;
    return true;
  }

  consume(): void {
    this.#ring.release();
  }

  close(): void {}
}

/** Takes every frame and keeps none. */
export class SinkPort implements NetPort {
  readonly inputFd = undefined;
  readonly frame: Frame = { buf: new Uint8Array(0), offset: 0, length: 0, hdr: newVnetHeader() };

  transmit(): boolean {
    return true;
  }

  hasInput(): boolean {
    return false;
  }

  next(): boolean {
    return false;
  }

  consume(): void {}

  close(): void {}
}

/** The source's frames: EtherType 0x88b5 (IEEE local experimental), then "VUSR", a sequence number and the pattern. */
export const SOURCE_ETHERTYPE = 0x88b5;
const MAGIC = [0x56, 0x55, 0x53, 0x52]; // "VUSR"
/** Ethernet header (14) + magic (4) + sequence number (4): the pattern starts after it. */
const PATTERN_START = 22;

/**
 * A traffic source: an endless supply of frames of one length for the driver, numbered, whose payload byte i is
 * (seq + i) & 0xff. Frames the driver transmits are taken like a sink's, and those that carry the source's mark are
 * checked (counters `checked` / `corrupt`): with a frontend that echoes (DPDK testpmd's io mode), that proves the
 * bytes went through both directions intact.
 */
export class SourcePort implements NetPort {
  readonly inputFd = undefined;
  readonly frame: Frame;
  /**
   * Distance between two ready frames: the frame length rounded up to 8 bytes, so that every frame starts 8-byte
   * aligned, as a NIC's DMA buffers do. V8 copies into a SharedArrayBuffer (guest memory) word by word only when
   * source and destination agree modulo 8, else byte by byte: 2.8x slower for 1500 bytes (measured here). DPDK's
   * receive buffers put the frame at a 128-byte boundary (the header just before it).
   */
  readonly #stride: number;
  /** 256 ready frames, one per value of seq & 0xff; only the sequence number changes between uses. */
  readonly #frames: Uint8Array;
  readonly #framesView: DataView;
  /** pattern[k] = k & 0xff, long enough for any offset 0..255 plus a frame: the reference for checks. */
  readonly #pattern: Uint8Array;
  readonly #stats: Float64Array;
  #seq = 0;

  constructor(frameLen: number, mac: readonly number[], stats: Float64Array) {
    this.#stride = (frameLen + 7) & ~7;
    this.#stats = stats;
    this.#pattern = new Uint8Array(256 + 65536);
    for (let k = 0; k < this.#pattern.length; k++) this.#pattern[k] = k & 0xff;
    this.#frames = new Uint8Array(256 * this.#stride);
    this.#framesView = new DataView(this.#frames.buffer);
    for (let s = 0; s < 256; s++) {
      const base = s * this.#stride;
      this.#frames.fill(0xff, base, base + 6); // broadcast: any receiver takes it
      this.#frames.set(mac, base + 6);
      this.#framesView.setUint16(base + 12, SOURCE_ETHERTYPE);
      this.#frames.set(MAGIC, base + 14);
      this.#frames.set(this.#pattern.subarray(s, s + frameLen - PATTERN_START), base + PATTERN_START);
    }
    this.frame = { buf: this.#frames, offset: 0, length: frameLen, hdr: newVnetHeader() };
  }

  transmit(buf: Uint8Array, offset: number, length: number): boolean {
    if (length < PATTERN_START || buf[offset + 12] !== SOURCE_ETHERTYPE >> 8 || buf[offset + 13] !== (SOURCE_ETHERTYPE & 0xff)) {
      return true;
    }
    for (let i = 0; i < 4; i++) if (buf[offset + 14 + i] !== MAGIC[i]) return true;
    const seq = ((buf[offset + 18] as number) << 24) | ((buf[offset + 19] as number) << 16) | ((buf[offset + 20] as number) << 8) | (buf[offset + 21] as number);
    const s = seq & 0xff;
    const got = Buffer.from(buf.buffer, buf.byteOffset + offset + PATTERN_START, length - PATTERN_START);
    const want = Buffer.from(this.#pattern.buffer, s, length - PATTERN_START);
    count(this.#stats, C.checked);
    if (!got.equals(want)) count(this.#stats, C.corrupt);
    return true;
  }

  hasInput(): boolean {
    return true;
  }

  next(): boolean {
    const s = this.#seq & 0xff;
    this.frame.offset = s * this.#stride;
    this.#framesView.setUint32(this.frame.offset + 18, this.#seq >>> 0);
    return true;
  }

  consume(): void {
    this.#seq = (this.#seq + 1) >>> 0;
  }

  close(): void {}
}
