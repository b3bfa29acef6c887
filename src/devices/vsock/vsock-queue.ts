/**
 * virtio-vsock, queue half (runs in a worker thread; the three queues of a device share one, `queuesPerWorker` 3):
 * moves whole packets between the virtqueues and the main thread, where the connections live (./host.ts). No
 * connection state is kept here.
 *
 * - tx (queue 1, driver to device): each chain is a packet (44-byte header, then its payload); its readable bytes go
 *   as one record into the `toHost` ring. When that ring has no room for the largest packet, chains stay in the
 *   ring (the guest waits: nothing is dropped) until the main thread has drained records.
 * - rx (queue 0, device to driver): each record of the `toGuest` ring is written into buffers the driver made
 *   available; a data packet larger than a buffer is split over several (the header repeated, its len per piece).
 * - event (queue 2): once per start of the queue, a TRANSPORT_RESET event; the main thread is told through the
 *   ring (a record marked RESET_RECORD) and drops every connection, since the guest does the same.
 *
 * Both rings are FrameRings in one SharedArrayBuffer made by the device (./vsock-device.ts); they are single
 * producer, single consumer. Wake-ups: a record pushed into an empty ring, or room made for a side that said it waits
 * for room (a control word it sets before looking once more), writes the other side's eventfd.
 */
import type { GuestMemory } from '../../memory/guest-memory.js';
import * as native from '../../native/index.js';
import { ChainReader, ChainWriter, type DescriptorChain } from '../../queue/descriptor-chain.js';
import type { DeviceQueue } from '../../queue/device-queue.js';
import { ProduceResult, type QueueContext, type QueueHandler, type QueueProducer } from '../device.js';
import { FrameRing, PUSH_FULL, PUSH_WAKE } from '../net/ports/frame-ring.js';
import type { VnetHeader } from '../net/offload.js';
import { countStat, QueueStat } from '../queue-stats.js';

import { VSOCK_MAX_PAYLOAD, VsockHdr } from './constants.js';

/** Bytes of a packet header (VIRTIO 1.2 §5.10.6). */
const VSOCK_HEADER_BYTES = VsockHdr.size;
/** A record's flags (the FrameRing header's first field): a packet, or the event queue's start. */
export const PACKET_RECORD = 0;
export const RESET_RECORD = 1;

/** Layout of the device's shared buffer: the two rings, then control words. */
export interface VsockShared {
  buffer: SharedArrayBuffer;
  /** Capacity of each ring (FrameRing). */
  ringCapacity: number;
  /** Offsets of the rings and of the control words in `buffer`. */
  toHostOffset: number;
  toGuestOffset: number;
  controlOffset: number;
}

/** Control words (Int32 at `controlOffset`). */
export const HOST_WAITS_FOR_ROOM = 0;
export const WORKER_WAITS_FOR_ROOM = 1;
export const CONTROL_WORDS = 16;

export interface VsockQueueOptions {
  shared: VsockShared;
  /** The main thread's eventfd (records toward the host, or room toward the guest). */
  hostFd: number;
  /** The worker's eventfd (records toward the guest, or room toward the host). */
  workerFd: number;
}

export function recordHeader(flags: number): VnetHeader {
  return { flags, gsoType: 0, hdrLen: 0, gsoSize: 0, csumStart: 0, csumOffset: 0 };
}

/** What a device's three queues share in this worker. */
class Link {
  readonly toHost: FrameRing;
  readonly toGuest: FrameRing;
  readonly control: Int32Array;
  readonly hostFd: number;
  readonly workerFd: number;
  users = 0;

  constructor(o: VsockQueueOptions) {
    const s = o.shared;
    this.toHost = new FrameRing(s.buffer, s.toHostOffset, s.ringCapacity);
    this.toGuest = new FrameRing(s.buffer, s.toGuestOffset, s.ringCapacity);
    this.control = new Int32Array(s.buffer, s.controlOffset, CONTROL_WORDS);
    this.hostFd = o.hostFd;
    this.workerFd = o.workerFd;
  }
}

const links = new Map<number, Link>();

/** rx: records of the `toGuest` ring into the driver's buffers. */
class RxProducer implements QueueProducer {
  readonly inputFd: number;
  readonly #link: Link;
  #chain: DescriptorChain | undefined;
  readonly #writer = new ChainWriter();
  readonly #hdr = recordHeader(0);
  readonly #header = new Uint8Array(VSOCK_HEADER_BYTES);
  readonly #headerView = new DataView(this.#header.buffer);
  readonly #stats: Float64Array;
  /** Payload bytes of the current record already delivered (a packet split over buffers). */
  #delivered = 0;

  constructor(link: Link, stats: Float64Array) {
    this.#link = link;
    this.inputFd = link.workerFd;
    this.#stats = stats;
  }

  hasInput(): boolean {
    return this.#link.toGuest.hasRecord();
  }

  produce(mem: GuestMemory, queue: DeviceQueue, budget: number): ProduceResult {
    const ring = this.#link.toGuest;
    native.eventfdRead(this.inputFd);
    for (let n = 0; n < budget; n++) {
      const at = ring.peek(this.#hdr);
      if (at < 0) return ProduceResult.IDLE;
      const length = ring.currentLength;
      if (length < VSOCK_HEADER_BYTES) {
        this.#done(ring); // not a packet (the host never makes one): skipped
        continue;
      }
      const chain = (this.#chain ??= queue.createChain());
      if (!queue.popChain(mem, chain)) return ProduceResult.STARVED;
      const writable = chain.writableBytes;
      if (writable < VSOCK_HEADER_BYTES) {
        // A buffer that cannot hold a header: given back empty (the packet waits for the next one).
        queue.pushUsed(chain.head, 0);
        countStat(this.#stats, QueueStat.errors);
        continue;
      }
      const payload = length - VSOCK_HEADER_BYTES;
      const piece = Math.min(payload - this.#delivered, writable - VSOCK_HEADER_BYTES);
      const bytes = ring.bytes;
      this.#header.set(bytes.subarray(at, at + VSOCK_HEADER_BYTES));
      this.#headerView.setUint32(VsockHdr.len, piece, true);
      const w = this.#writer.reset(mem, chain);
      w.write(this.#header);
      if (piece > 0) w.write(bytes.subarray(at + VSOCK_HEADER_BYTES + this.#delivered, at + VSOCK_HEADER_BYTES + this.#delivered + piece));
      queue.pushUsed(chain.head, VSOCK_HEADER_BYTES + piece);
      countStat(this.#stats, QueueStat.bytesWritten, piece);
      this.#delivered += piece;
      if (this.#delivered >= payload) this.#done(ring);
    }
    return ProduceResult.BUDGET;
  }

  /** The current record is delivered: its room goes back, and a host waiting for room is woken. */
  #done(ring: FrameRing): void {
    ring.release();
    this.#delivered = 0;
    if (Atomics.exchange(this.#link.control, HOST_WAITS_FOR_ROOM, 0) !== 0) native.eventfdWrite(this.#link.hostFd);
  }
}

/** tx: each chain the driver sends, as one record into the `toHost` ring. */
class TxConsumer implements QueueProducer {
  readonly inputFd: number;
  readonly #link: Link;
  #chain: DescriptorChain | undefined;
  readonly #reader = new ChainReader();
  readonly #scratch = new Uint8Array(VSOCK_HEADER_BYTES + VSOCK_MAX_PAYLOAD);
  readonly #record = recordHeader(PACKET_RECORD);
  readonly #stats: Float64Array;

  constructor(link: Link, stats: Float64Array) {
    this.#link = link;
    this.inputFd = link.workerFd;
    this.#stats = stats;
  }

  /** "Input" for a transmit queue is room in the ring toward the host (chains are announced by kicks). */
  hasInput(): boolean {
    return this.#link.toHost.canPush(this.#scratch.length);
  }

  produce(mem: GuestMemory, queue: DeviceQueue, budget: number): ProduceResult {
    const link = this.#link;
    native.eventfdRead(this.inputFd);
    for (let n = 0; n < budget; n++) {
      if (!link.toHost.canPush(this.#scratch.length)) {
        // Say so, then look once more: room the host made meanwhile is not missed (it clears the word and wakes us).
        Atomics.store(link.control, WORKER_WAITS_FOR_ROOM, 1);
        if (!link.toHost.canPush(this.#scratch.length)) return ProduceResult.IDLE;
        Atomics.store(link.control, WORKER_WAITS_FOR_ROOM, 0);
      }
      const chain = (this.#chain ??= queue.createChain());
      if (!queue.popChain(mem, chain)) return ProduceResult.STARVED;
      const length = chain.readableBytes;
      if (length < VSOCK_HEADER_BYTES || length > this.#scratch.length) {
        // Not a packet this device takes (no header, or a payload over 64 KiB): completed unread, counted.
        queue.pushUsed(chain.head, 0);
        countStat(this.#stats, QueueStat.errors);
        continue;
      }
      this.#reader.reset(mem, chain).readExact(this.#scratch.subarray(0, length));
      queue.pushUsed(chain.head, 0);
      countStat(this.#stats, QueueStat.bytesRead, length - VSOCK_HEADER_BYTES);
      const r = link.toHost.pushParts(this.#scratch.subarray(0, length), undefined, this.#record);
      if (r === PUSH_WAKE) native.eventfdWrite(link.hostFd);
      else if (r === PUSH_FULL) countStat(this.#stats, QueueStat.errors); // cannot happen: room was checked
    }
    return ProduceResult.BUDGET;
  }
}

/** event: one TRANSPORT_RESET per start of the queue (virtio_vsock_event, id 0). */
class EventProducer implements QueueProducer {
  readonly inputFd = undefined;
  #pending = true;
  #chain: DescriptorChain | undefined;
  readonly #writer = new ChainWriter();
  readonly #event = new Uint8Array(4); // id 0: VIRTIO_VSOCK_EVENT_TRANSPORT_RESET

  hasInput(): boolean {
    return this.#pending;
  }

  produce(mem: GuestMemory, queue: DeviceQueue): ProduceResult {
    if (!this.#pending) return ProduceResult.IDLE;
    const chain = (this.#chain ??= queue.createChain());
    if (!queue.popChain(mem, chain)) return ProduceResult.STARVED;
    const written = this.#writer.reset(mem, chain).write(this.#event);
    queue.pushUsed(chain.head, written);
    this.#pending = false;
    return ProduceResult.IDLE;
  }
}

class VsockQueueHandler implements QueueHandler {
  readonly producer: QueueProducer;
  readonly #instance: number;
  readonly #link: Link;

  constructor(producer: QueueProducer, instance: number, link: Link) {
    this.producer = producer;
    this.#instance = instance;
    this.#link = link;
  }

  process(): number {
    return 0; // every queue of this device is driven through its producer
  }

  close(): void {
    if (--this.#link.users === 0) links.delete(this.#instance);
  }
}

/** The worker-module entry point (see devices/device.ts `DeviceWorkerModule`). */
export function createQueueHandler(options: unknown, context: QueueContext): QueueHandler {
  const o = options as VsockQueueOptions;
  let link = links.get(context.instance);
  if (link === undefined) {
    link = new Link(o);
    links.set(context.instance, link);
  }
  link.users++;
  const stats = context.stats;
  switch (context.queueIndex) {
    case 0:
      return new VsockQueueHandler(new RxProducer(link, stats), context.instance, link);
    case 1:
      return new VsockQueueHandler(new TxConsumer(link, stats), context.instance, link);
    default: {
      // The event queue (re)started: the guest is about to drop its connections; the host drops its own.
      const r = link.toHost.pushParts(new Uint8Array(0), undefined, recordHeader(RESET_RECORD));
      if (r === PUSH_WAKE) native.eventfdWrite(link.hostFd);
      return new VsockQueueHandler(new EventProducer(), context.instance, link);
    }
  }
}
