/**
 * virtio-net, control half: features, configuration space, and the port the queue pairs are attached to. The queue
 * half is ./net-queue.ts (worker threads); ports are in ./ports/.
 *
 * As for every vhost-user-net backend, the control queue is the frontend's business (QEMU and DPDK's virtio_user
 * handle it and tell the backend which pairs to use with SET_VRING_ENABLE): this device has 2 queues per pair and
 * answers GET_QUEUE_NUM with the number of pairs.
 */
import { ProtocolError, VhostError } from '../../errors.js';
import * as native from '../../native/index.js';
import type { VirtioDevice } from '../device.js';
import { MAX_FRAME, MIN_FRAME, NET_S_LINK_UP, NetConfigOffset, NetFeature, VIRTIO_ID_NET } from './constants.js';
import type { NetQueueOptions } from './net-queue.js';
import type { PortSpec } from './ports/port.js';
import type { SwitchFabric } from './ports/switch.js';
import { createNetStats, readNetStats, type NetStatsSnapshot } from './stats.js';

/** Where the device's frames go (see ports/port.ts). */
export type NetPortOption =
  | { kind: 'loopback' }
  | { kind: 'sink' }
  | { kind: 'source'; frameLen?: number }
  | { kind: 'tap'; name: string }
  | { kind: 'switch'; fabric: SwitchFabric; index: number };

export interface NetDeviceOptions {
  port: NetPortOption;
  /** Queue pairs (MQ when > 1). */
  queuePairs?: number;
  /** The MAC address in the configuration space. */
  mac?: string;
  /** Largest queue size the driver may choose. */
  maxQueueSize?: number;
}

export const DEFAULT_MAC = '52:54:00:12:34:56';
export const MAX_QUEUE_PAIRS = 32;

function bit(n: number): bigint {
  return 1n << BigInt(n);
}

/** Parses "52:54:00:12:34:56"; refuses multicast addresses (bit 0 of the first byte), which a NIC cannot have. */
export function parseMac(text: string): number[] {
  const parts = text.split(':');
  if (parts.length !== 6 || parts.some((p) => !/^[0-9a-fA-F]{2}$/.test(p))) {
    throw new VhostError('VHOST_NET_BAD_MAC', `MAC address "${text}" is not six hex bytes separated by ':'`);
  }
  const bytes = parts.map((p) => parseInt(p, 16));
  if (((bytes[0] as number) & 1) !== 0) throw new VhostError('VHOST_NET_BAD_MAC', `MAC address ${text} is a multicast address`);
  return bytes;
}

export class NetDevice implements VirtioDevice {
  readonly name = 'net';
  readonly deviceId = VIRTIO_ID_NET;
  readonly numQueues: number;
  readonly vhostQueueNum: number;
  readonly queuesPerWorker = 2;
  /** SEND_RARP goes out on the first transmit queue's port. */
  readonly announceQueue = 1;
  readonly maxQueueSize: number;
  readonly features: bigint;
  readonly mac: readonly number[];
  readonly worker: { readonly module: string; readonly options: NetQueueOptions };
  readonly #stats: SharedArrayBuffer;
  readonly #config: Uint8Array;
  /** fds this device owns (TAP queues), closed by `close`. */
  readonly #fds: number[] = [];

  constructor(options: NetDeviceOptions) {
    const pairs = options.queuePairs ?? 1;
    if (!Number.isInteger(pairs) || pairs < 1 || pairs > MAX_QUEUE_PAIRS) {
      throw new VhostError('VHOST_NET_BAD_OPTION', `queue pairs must be 1..${MAX_QUEUE_PAIRS}`);
    }
    this.maxQueueSize = options.maxQueueSize ?? 1024;
    if (![2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768].includes(this.maxQueueSize)) {
      throw new VhostError('VHOST_NET_BAD_OPTION', 'queue size must be a power of two from 2 to 32768');
    }
    this.numQueues = 2 * pairs;
    this.vhostQueueNum = pairs;
    this.mac = parseMac(options.mac ?? DEFAULT_MAC);
    this.#stats = createNetStats(pairs);

    // Offloads, both ways: every port honours them (net-queue.ts completes in software what a receiving driver did
    // not negotiate; a TAP takes them with its vnet header). Not UFO (IP fragmentation) nor CTRL_GUEST_OFFLOADS
    // (QEMU cannot forward offload changes to a vhost-user backend).
    let features = [
      NetFeature.CSUM,
      NetFeature.GUEST_CSUM,
      NetFeature.HOST_TSO4,
      NetFeature.HOST_TSO6,
      NetFeature.HOST_ECN,
      NetFeature.GUEST_TSO4,
      NetFeature.GUEST_TSO6,
      NetFeature.GUEST_ECN,
      NetFeature.MAC,
      NetFeature.STATUS,
      NetFeature.MRG_RXBUF,
      // The control queue is the frontend's (QEMU and virtio_user run it); offered so that the driver gets it.
      NetFeature.CTRL_VQ,
      NetFeature.CTRL_RX,
      // After a migration the guest announces itself (QEMU then sends no SEND_RARP); needs CTRL_VQ.
      NetFeature.GUEST_ANNOUNCE,
    ].reduce((f, b) => f | bit(b), 0n);
    if (pairs > 1) features |= bit(NetFeature.MQ); // MQ needs CTRL_VQ (§5.1.3.1)
    this.features = features;

    const port = this.#portSpec(options.port, pairs);
    this.worker = { module: new URL('./net-queue.js', import.meta.url).href, options: { port, stats: this.#stats } };

    const config = new DataView(new ArrayBuffer(NetConfigOffset.size));
    this.mac.forEach((b, i) => config.setUint8(NetConfigOffset.mac + i, b));
    config.setUint16(NetConfigOffset.status, NET_S_LINK_UP, true);
    config.setUint16(NetConfigOffset.maxVirtqueuePairs, pairs, true);
    config.setUint16(NetConfigOffset.mtu, 1500, true);
    this.#config = new Uint8Array(config.buffer);
  }

  #portSpec(option: NetPortOption, pairs: number): PortSpec {
    switch (option.kind) {
      case 'loopback':
      case 'sink':
        return { kind: option.kind };
      case 'source': {
        const frameLen = option.frameLen ?? 64;
        if (!Number.isInteger(frameLen) || frameLen < MIN_FRAME || frameLen > MAX_FRAME) {
          throw new VhostError('VHOST_NET_BAD_OPTION', `frame length must be ${MIN_FRAME}..${MAX_FRAME}`);
        }
        return { kind: 'source', frameLen, mac: this.mac };
      }
      case 'tap': {
        try {
          for (let p = 0; p < pairs; p++) this.#fds.push(native.tunOpen(option.name, pairs > 1, true).fd);
        } catch (err) {
          this.close();
          throw err;
        }
        return { kind: 'tap', name: option.name, fds: [...this.#fds] };
      }
      case 'switch':
        if (pairs !== 1) throw new VhostError('VHOST_NET_BAD_OPTION', 'a switch port has one queue pair');
        return { kind: 'switch', shared: option.fabric.shared, index: option.index };
    }
  }

  /** The counters summed over the pairs (stats.ts). */
  stats(): NetStatsSnapshot {
    return readNetStats(this.#stats);
  }

  configSpace(): Uint8Array {
    return this.#config.slice();
  }

  writeConfig(offset: number, data: Uint8Array): void {
    // The MAC is writable only through the control queue (CTRL_MAC_ADDR) in VERSION_1, which is the frontend's.
    throw new ProtocolError(
      'VHOST_PROTOCOL_CONFIG_READ_ONLY',
      `virtio-net config write at ${offset} (+${data.length}) refused: the config space is read-only`,
    );
  }

  /** Releases the TAP queues. Call after the server using this device is closed. */
  close(): void {
    for (const fd of this.#fds.splice(0)) native.close(fd);
  }
}
