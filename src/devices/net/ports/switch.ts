/**
 * A learning Ethernet switch between the virtio-net devices of one process (`vhost-user switch`): one port per
 * device, each device served by its own vhost-user session and worker thread.
 *
 * Shared state (one SharedArrayBuffer, made by the control thread):
 * - a ring per (source port, destination port): single producer (the thread running the source port's transmit
 *   queue), single consumer (the thread running the destination's receive queue), fixed slots of SLOT_SIZE bytes;
 * - an eventfd per destination port, written when one of its rings goes from empty to non-empty;
 * - the MAC table: 64-bit entries (MAC in the low 48 bits, port + 1 above), each stored with one atomic store.
 *
 * Memory ordering (all Atomics, sequentially consistent): the producer writes the slot and its length, then stores
 * `tail` (release); the consumer loads `tail` before reading the slot (acquire) and stores `head` after it is done
 * with the slot. "Ring was empty" is judged by the producer from `head` after its store of `tail`; the consumer
 * clears its eventfd before its last check of the rings, so a frame pushed after that check always writes the
 * eventfd (see `next`).
 */
import * as native from '../../../native/index.js';
import type { Frame, NetPort } from './port.js';

/** Slots per ring (a power of two: indices are masked). */
export const SWITCH_SLOTS = 256;
/** A standard frame with a VLAN tag fits (1518); larger frames are dropped by the switch. */
export const SLOT_SIZE = 2048;
const MAC_ENTRIES = 1024;
const MAC_PROBES = 8;
export const MAX_SWITCH_PORTS = 16;

/** What every port's thread gets (structured-cloneable). */
export interface SwitchShared {
  ports: number;
  buffer: SharedArrayBuffer;
  /** Per destination port: written when one of its rings becomes non-empty. */
  eventFds: number[];
}

// Layout: control words (head, tail per ring, 16 words apart to keep them off each other's cache lines), the MAC
// table, the frame lengths, the frame slots.
const CTRL_STRIDE = 16;

function layout(ports: number): { ctrl: number; mac: number; lens: number; data: number; total: number } {
  const rings = ports * ports;
  const ctrl = 0;
  const mac = ctrl + rings * CTRL_STRIDE * 4;
  const lens = mac + MAC_ENTRIES * 8;
  const data = lens + rings * SWITCH_SLOTS * 4;
  return { ctrl, mac, lens, data, total: data + rings * SWITCH_SLOTS * SLOT_SIZE };
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

function macAt(buf: Uint8Array, at: number): bigint {
  const hi = ((buf[at] as number) << 8) | (buf[at + 1] as number);
  const lo = (((buf[at + 2] as number) << 24) | ((buf[at + 3] as number) << 16) | ((buf[at + 4] as number) << 8) | (buf[at + 5] as number)) >>> 0;
  return (BigInt(hi) << 32n) | BigInt(lo);
}

const MAC_MASK = (1n << 48n) - 1n;

export class SwitchPort implements NetPort {
  readonly inputFd: number;
  readonly frame: Frame;
  readonly #index: number;
  readonly #ports: number;
  readonly #ctrl: Int32Array;
  readonly #mac: BigInt64Array;
  readonly #lens: Int32Array;
  readonly #data: Uint8Array;
  readonly #eventFds: readonly number[];
  /** The inbound ring the current frame is from (-1: none), and where the next round-robin scan starts. */
  #current = -1;
  #nextSource = 0;

  constructor(shared: SwitchShared, index: number) {
    const l = layout(shared.ports);
    this.#index = index;
    this.#ports = shared.ports;
    this.#ctrl = new Int32Array(shared.buffer, l.ctrl, shared.ports * shared.ports * CTRL_STRIDE);
    this.#mac = new BigInt64Array(shared.buffer, l.mac, MAC_ENTRIES);
    this.#lens = new Int32Array(shared.buffer, l.lens, shared.ports * shared.ports * SWITCH_SLOTS);
    this.#data = new Uint8Array(shared.buffer, l.data);
    this.#eventFds = shared.eventFds;
    this.inputFd = shared.eventFds[index] as number;
    this.frame = { buf: this.#data, offset: 0, length: 0 };
  }

  #ring(src: number, dst: number): number {
    return src * this.#ports + dst;
  }

  transmit(buf: Uint8Array, offset: number, length: number): boolean {
    if (length < 14 || length > SLOT_SIZE) return false;
    this.#learn(macAt(buf, offset + 6));
    if (((buf[offset] as number) & 1) === 0) {
      const dst = this.#lookup(macAt(buf, offset));
      if (dst === this.#index) return true; // addressed to a MAC behind this port: a switch does not send it back
      if (dst >= 0) return this.#push(dst, buf, offset, length);
    }
    // Broadcast, multicast or an unknown destination: flood to every other port.
    let ok = true;
    for (let p = 0; p < this.#ports; p++) if (p !== this.#index) ok = this.#push(p, buf, offset, length) && ok;
    return ok;
  }

  #learn(mac: bigint): void {
    if ((mac >> 40n) & 1n) return; // a multicast source address is bogus: never learn it
    const entry = mac | (BigInt(this.#index + 1) << 48n);
    const h = Number(mac % BigInt(MAC_ENTRIES));
    for (let i = 0; i < MAC_PROBES; i++) {
      const slot = (h + i) % MAC_ENTRIES;
      const cur = Atomics.load(this.#mac, slot);
      if (cur === entry) return;
      if (cur === 0n || (cur & MAC_MASK) === mac) {
        Atomics.store(this.#mac, slot, entry); // one 64-bit store: readers see the old or the new port, never a mix
        return;
      }
    }
    Atomics.store(this.#mac, h, entry); // table full around h: evict
  }

  #lookup(mac: bigint): number {
    const h = Number(mac % BigInt(MAC_ENTRIES));
    for (let i = 0; i < MAC_PROBES; i++) {
      const cur = Atomics.load(this.#mac, (h + i) % MAC_ENTRIES);
      if (cur === 0n) return -1;
      if ((cur & MAC_MASK) === mac) return Number(cur >> 48n) - 1;
    }
    return -1;
  }

  #push(dst: number, buf: Uint8Array, offset: number, length: number): boolean {
    const r = this.#ring(this.#index, dst);
    const headAt = r * CTRL_STRIDE;
    const tailAt = headAt + 1;
    const tail = Atomics.load(this.#ctrl, tailAt); // only this thread stores it
    if (((tail - Atomics.load(this.#ctrl, headAt)) | 0) >= SWITCH_SLOTS) return false; // full: drop (the receiver is slow)
    const slot = r * SWITCH_SLOTS + (tail & (SWITCH_SLOTS - 1));
    this.#data.set(buf.subarray(offset, offset + length), slot * SLOT_SIZE);
    Atomics.store(this.#lens, slot, length);
    Atomics.store(this.#ctrl, tailAt, (tail + 1) | 0); // publishes the slot (indices wrap at 2^32; only differences count)
    // Judged after publishing: if the consumer had emptied the ring, it may be asleep (or about to sleep) on its eventfd.
    if (Atomics.load(this.#ctrl, headAt) === tail) native.eventfdWrite(this.#eventFds[dst] as number);
    return true;
  }

  #findInbound(): number {
    for (let k = 0; k < this.#ports; k++) {
      const src = (this.#nextSource + k) % this.#ports;
      if (src === this.#index) continue;
      const r = this.#ring(src, this.#index);
      if (Atomics.load(this.#ctrl, r * CTRL_STRIDE + 1) !== Atomics.load(this.#ctrl, r * CTRL_STRIDE)) return r;
    }
    return -1;
  }

  hasInput(): boolean {
    return this.#current >= 0 || this.#findInbound() >= 0;
  }

  next(): boolean {
    if (this.#current < 0) {
      let r = this.#findInbound();
      if (r < 0) {
        // Clear the eventfd, then look once more: a frame pushed after this look finds its ring empty and writes
        // the eventfd again, so the worker's poll() cannot sleep through it.
        native.eventfdRead(this.inputFd);
        r = this.#findInbound();
        if (r < 0) return false;
      }
      this.#current = r;
    }
    const r = this.#current;
    const head = Atomics.load(this.#ctrl, r * CTRL_STRIDE);
    const slot = r * SWITCH_SLOTS + (head & (SWITCH_SLOTS - 1));
    this.frame.offset = slot * SLOT_SIZE;
    this.frame.length = Atomics.load(this.#lens, slot);
    return true;
  }

  consume(): void {
    const r = this.#current;
    if (r < 0) return;
    const headAt = r * CTRL_STRIDE;
    Atomics.store(this.#ctrl, headAt, (Atomics.load(this.#ctrl, headAt) + 1) | 0); // the slot may be reused from now on
    this.#current = -1;
    this.#nextSource = (Math.floor(r / this.#ports) + 1) % this.#ports; // round robin between sources
  }

  close(): void {}
}
