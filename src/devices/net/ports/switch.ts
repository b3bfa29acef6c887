/**
 * A learning Ethernet switch between the virtio-net devices of one process (`vhost-user switch`): one port per
 * device, each device served by its own vhost-user session and worker thread.
 *
 * Shared state (one SharedArrayBuffer, made by the control thread):
 * - a ring of frame records per (source port, destination port) (frame-ring.ts): single producer (the thread running
 *   the source port's transmit queue), single consumer (the thread running the destination's receive queue). A
 *   record carries the frame's virtio-net offload fields: a GSO frame or a partial checksum crosses the switch
 *   unchanged, and the receiving queue completes it in software only if its driver did not negotiate the offload;
 * - an eventfd per destination port, written when one of its rings goes from empty to non-empty;
 * - the MAC table: entries of MAC and port + 1 under a per-entry version (see `#learn`).
 *
 * Memory ordering: see frame-ring.ts for a ring. "Ring was empty" is judged by the producer from `head` after its
 * store of `tail`; the consumer clears its eventfd before its last check of the rings, so a frame pushed after that
 * check always writes the eventfd (see `next`).
 */
import * as native from '../../../native/index.js';
import { newVnetHeader, type VnetHeader } from '../offload.js';
import { FrameRing, frameRingBytes, PUSH_FULL, PUSH_WAKE } from './frame-ring.js';
import type { Frame, NetPort } from './port.js';

/** Record bytes per ring (frame-ring.ts): sixteen 64 KiB GSO frames, or about 650 of 1500 bytes. */
export const SWITCH_RING_BYTES = 1 << 20;
const MAC_ENTRIES = 1024;
const MAC_PROBES = 8;
/** Int32 words per MAC table entry: version, MAC bytes 2..5, MAC bytes 0..1 | (port + 1) << 16, unused. */
const MAC_WORDS = 4;
export const MAX_SWITCH_PORTS = 16;

/** What every port's thread gets (structured-cloneable). */
export interface SwitchShared {
  ports: number;
  buffer: SharedArrayBuffer;
  /** Per destination port: written when one of its rings becomes non-empty. */
  eventFds: number[];
}

// Layout: the MAC table, then the rings (ring src * ports + dst). Pages of rings that carry no traffic are never touched.
function layout(ports: number): { mac: number; rings: number; total: number } {
  const mac = 0;
  const rings = mac + MAC_ENTRIES * MAC_WORDS * 4;
  return { mac, rings, total: rings + ports * ports * frameRingBytes(SWITCH_RING_BYTES) };
}

/** The control thread's handle: makes the shared state, releases the eventfds. */
export class SwitchFabric {
  readonly shared: SwitchShared;

  constructor(ports: number) {
    if (!Number.isInteger(ports) || ports < 1 || ports > MAX_SWITCH_PORTS) throw new RangeError(`switch ports must be 1..${MAX_SWITCH_PORTS}`);
    const eventFds: number[] = [];
    for (let i = 0; i < ports; i++) eventFds.push(native.eventfdCreate(0, true));
    this.shared = { ports, buffer: new SharedArrayBuffer(layout(ports).total), eventFds };
  }

  close(): void {
    for (const fd of this.shared.eventFds) native.close(fd);
  }
}

/** A MAC address as two numbers: `hi` its first two bytes, `lo` the other four (no BigInt on the frame path). */
function macHi(buf: Uint8Array, at: number): number {
  return ((buf[at] as number) << 8) | (buf[at + 1] as number);
}
function macLo(buf: Uint8Array, at: number): number {
  return ((buf[at + 2] as number) << 24) | ((buf[at + 3] as number) << 16) | ((buf[at + 4] as number) << 8) | (buf[at + 5] as number);
}
function macHash(hi: number, lo: number): number {
  return (Math.imul(lo ^ (hi << 16) ^ hi, 0x9e3779b1) >>> 22) & (MAC_ENTRIES - 1);
}

export class SwitchPort implements NetPort {
  readonly inputFd: number;
  readonly frame: Frame;
  readonly #index: number;
  readonly #ports: number;
  readonly #mac: Int32Array;
  /** Rings from this port to each port (producer end), and from each port to this one (consumer end). */
  readonly #out: FrameRing[] = [];
  readonly #in: FrameRing[] = [];
  readonly #eventFds: readonly number[];
  /** The inbound ring the current frame is from (-1: none), and where the next round-robin scan starts. */
  #current = -1;
  #nextSource = 0;

  constructor(shared: SwitchShared, index: number) {
    const l = layout(shared.ports);
    this.#index = index;
    this.#ports = shared.ports;
    this.#mac = new Int32Array(shared.buffer, l.mac, MAC_ENTRIES * MAC_WORDS);
    const ring = (src: number, dst: number): FrameRing =>
      new FrameRing(shared.buffer, l.rings + (src * shared.ports + dst) * frameRingBytes(SWITCH_RING_BYTES), SWITCH_RING_BYTES);
    for (let p = 0; p < shared.ports; p++) {
      this.#out.push(ring(index, p));
      this.#in.push(ring(p, index));
    }
    this.#eventFds = shared.eventFds;
    this.inputFd = shared.eventFds[index] as number;
    this.frame = { buf: new Uint8Array(shared.buffer), offset: 0, length: 0, hdr: newVnetHeader() };
  }

  transmit(buf: Uint8Array, offset: number, length: number, hdr: VnetHeader): boolean {
    if (length < 14) return false;
    this.#learn(macHi(buf, offset + 6), macLo(buf, offset + 6));
    if (((buf[offset] as number) & 1) === 0) {
      const dst = this.#lookup(macHi(buf, offset), macLo(buf, offset));
      if (dst === this.#index) return true; // addressed to a MAC behind this port: a switch does not send it back
      if (dst >= 0) return this.#push(dst, buf, offset, length, hdr);
    }
    // Broadcast, multicast or an unknown destination: flood to every other port.
    let ok = true;
    for (let p = 0; p < this.#ports; p++) if (p !== this.#index) ok = this.#push(p, buf, offset, length, hdr) && ok;
    return ok;
  }

  /**
   * MAC table entries are written under a per-entry version (a seqlock): odd while an entry changes. A writer takes
   * it with compareExchange (another port's thread may be learning the same entry: then this one skips learning;
   * the next frame learns), readers retry nothing: an entry that changed under them reads as a miss (a flood).
   */
  #learn(hi: number, lo: number): void {
    if ((hi & 0x100) !== 0) return; // a multicast source address is bogus: never learn it
    const mac = this.#mac;
    const portWord = hi | ((this.#index + 1) << 16);
    const h = macHash(hi, lo);
    let slot = -1;
    for (let i = 0; i < MAC_PROBES; i++) {
      const e = ((h + i) & (MAC_ENTRIES - 1)) * MAC_WORDS;
      const word = Atomics.load(mac, e + 2);
      if (word === 0 || (Atomics.load(mac, e + 1) === lo && (word & 0xffff) === hi)) {
        if (word === portWord) return; // known, behind this port: the common case, four loads and no store
        slot = e;
        break;
      }
    }
    if (slot < 0) slot = h * MAC_WORDS; // the table is full around h: evict
    const v = Atomics.load(mac, slot);
    if ((v & 1) !== 0 || Atomics.compareExchange(mac, slot, v, (v + 1) | 0) !== v) return;
    Atomics.store(mac, slot + 1, lo);
    Atomics.store(mac, slot + 2, portWord);
    Atomics.store(mac, slot, (v + 2) | 0);
  }

  #lookup(hi: number, lo: number): number {
    const mac = this.#mac;
    const h = macHash(hi, lo);
    for (let i = 0; i < MAC_PROBES; i++) {
      const e = ((h + i) & (MAC_ENTRIES - 1)) * MAC_WORDS;
      const v = Atomics.load(mac, e);
      const eLo = Atomics.load(mac, e + 1);
      const word = Atomics.load(mac, e + 2);
      if ((v & 1) !== 0 || Atomics.load(mac, e) !== v) return -1; // being written: flood this frame
      if (word === 0) return -1;
      if (eLo === lo && (word & 0xffff) === hi) return (word >>> 16) - 1;
    }
    return -1;
  }

  #push(dst: number, buf: Uint8Array, offset: number, length: number, hdr: VnetHeader): boolean {
    const r = (this.#out[dst] as FrameRing).push(buf, offset, length, hdr);
    if (r === PUSH_WAKE) native.eventfdWrite(this.#eventFds[dst] as number);
    return r !== PUSH_FULL; // full (the receiver is slow) or larger than a ring: drop
  }

  #findInbound(): number {
    for (let k = 0; k < this.#ports; k++) {
      let src = this.#nextSource + k;
      if (src >= this.#ports) src -= this.#ports;
      if (src !== this.#index && (this.#in[src] as FrameRing).hasRecord()) return src;
    }
    return -1;
  }

  hasInput(): boolean {
    return this.#current >= 0 || this.#findInbound() >= 0;
  }

  next(): boolean {
    for (;;) {
      if (this.#current < 0) {
        let src = this.#findInbound();
        if (src < 0) {
          // Clear the eventfd, then look once more: a frame pushed after this look finds its ring empty and writes
          // the eventfd again, so the worker's poll() cannot sleep through it.
          native.eventfdRead(this.inputFd);
          src = this.#findInbound();
          if (src < 0) return false;
        }
        this.#current = src;
      }
      const ring = this.#in[this.#current] as FrameRing;
      const at = ring.peek(this.frame.hdr);
      if (at >= 0) {
        this.frame.offset = at;
        this.frame.length = ring.currentLength;
        return true;
      }
      this.#current = -1; // only a SKIP was left in that ring
    }
  }

  consume(): void {
    const src = this.#current;
    if (src < 0) return;
    (this.#in[src] as FrameRing).release();
    this.#current = -1;
    this.#nextSource = src + 1 < this.#ports ? src + 1 : 0; // round robin between sources
  }

  close(): void {}
}
