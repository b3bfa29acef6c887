/**
 * virtio-blk, control half: features and configuration space. The queue half is ./blk-queue.ts (worker threads).
 */
import { statSync } from 'node:fs';
import { ProtocolError, VhostError } from '../../errors.js';
import type { VirtioDevice } from '../device.js';
import type { BlockBackendOptions } from './block-backend.js';
import { BlkConfigOffset, BlkFeature, SECTOR_SIZE, VIRTIO_ID_BLOCK } from './constants.js';
import type { BlkQueueOptions } from './blk-queue.js';

export interface BlkDeviceOptions {
  /** A raw image file, or a null device of `size` bytes that completes requests without touching data. */
  backend: { kind: 'file'; path: string } | { kind: 'null'; size: number };
  readOnly?: boolean;
  /** Number of request queues (F_MQ when > 1). */
  queues?: number;
  /** Largest queue size the driver may choose. */
  maxQueueSize?: number;
  /** The GET_ID serial (at most 20 bytes). */
  serial?: string;
  /** Where reads and writes run: in the queue worker ('sync', default) or an I/O thread per queue ('async'). */
  io?: 'sync' | 'async';
  /** With io 'async': complete each request this long after its I/O; a list: in turn (tests and torture runs). */
  completionDelayMs?: number | readonly number[];
}

/** Most data segments per request that the driver may use (config seg_max). */
export const BLK_SEG_MAX = 254;
/** Limits for discard and write-zeroes (one segment per request). */
const MAX_DISCARD_SECTORS = 0x3fffff;
const MAX_WRITE_ZEROES_SECTORS = 0x3fffff;

function bit(n: number): bigint {
  return 1n << BigInt(n);
}

export class BlkDevice implements VirtioDevice {
  readonly name = 'blk';
  readonly deviceId = VIRTIO_ID_BLOCK;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly features: bigint;
  /** Requests survive a backend restart (INFLIGHT_SHMFD), as with libvhost-user's and SPDK's blk backends. */
  readonly inflightTracking = true;
  readonly capacityBytes: number;
  readonly worker: { readonly module: string; readonly options: BlkQueueOptions };
  readonly #config: Uint8Array;

  constructor(options: BlkDeviceOptions) {
    const readOnly = options.readOnly ?? false;
    this.numQueues = options.queues ?? 1;
    this.maxQueueSize = options.maxQueueSize ?? 1024;
    if (!Number.isInteger(this.numQueues) || this.numQueues < 1 || this.numQueues > 64) {
      throw new VhostError('VHOST_BLK_BAD_OPTION', 'queues must be 1..64');
    }
    if (![1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768].includes(this.maxQueueSize)) {
      throw new VhostError('VHOST_BLK_BAD_OPTION', 'queue size must be a power of two up to 32768');
    }
    const serial = options.serial ?? 'vhost-user-ts';
    if (Buffer.byteLength(serial) > 20) throw new VhostError('VHOST_BLK_BAD_OPTION', 'serial is over 20 bytes');

    let backend: BlockBackendOptions;
    if (options.backend.kind === 'file') {
      const size = statSync(options.backend.path).size;
      this.capacityBytes = size - (size % SECTOR_SIZE);
      backend = { kind: 'file', path: options.backend.path, readOnly };
    } else {
      this.capacityBytes = options.backend.size;
      backend = { kind: 'null', size: options.backend.size, readOnly };
    }
    if (this.capacityBytes % SECTOR_SIZE !== 0) throw new VhostError('VHOST_BLK_BAD_SIZE', 'size must be a multiple of 512');

    let features =
      bit(BlkFeature.SEG_MAX) |
      bit(BlkFeature.BLK_SIZE) |
      bit(BlkFeature.FLUSH) |
      bit(BlkFeature.TOPOLOGY) |
      bit(BlkFeature.DISCARD) |
      bit(BlkFeature.WRITE_ZEROES);
    if (readOnly) features |= bit(BlkFeature.RO);
    if (this.numQueues > 1) features |= bit(BlkFeature.MQ);
    this.features = features;

    this.worker = {
      module: new URL('./blk-queue.js', import.meta.url).href,
      options: {
        backend,
        serial,
        capacityBytes: this.capacityBytes,
        io: options.io ?? 'sync',
        completionDelayMs: options.completionDelayMs ?? 0,
      },
    };

    const config = new DataView(new ArrayBuffer(BlkConfigOffset.size));
    const O = BlkConfigOffset;
    config.setBigUint64(O.capacity, BigInt(this.capacityBytes / SECTOR_SIZE), true);
    config.setUint32(O.sizeMax, 0, true);
    config.setUint32(O.segMax, BLK_SEG_MAX, true);
    config.setUint32(O.blkSize, SECTOR_SIZE, true);
    config.setUint16(O.numQueues, this.numQueues, true);
    config.setUint32(O.maxDiscardSectors, MAX_DISCARD_SECTORS, true);
    config.setUint32(O.maxDiscardSeg, 1, true);
    config.setUint32(O.discardSectorAlignment, 1, true);
    config.setUint32(O.maxWriteZeroesSectors, MAX_WRITE_ZEROES_SECTORS, true);
    config.setUint32(O.maxWriteZeroesSeg, 1, true);
    config.setUint8(O.writeZeroesMayUnmap, 0);
    this.#config = new Uint8Array(config.buffer);
  }

  configSpace(): Uint8Array {
    return this.#config.slice();
  }

  writeConfig(offset: number, data: Uint8Array): void {
    // Only the writeback byte is driver-writable, and only with CONFIG_WCE, which is not offered: writes are
    // always write-through here.
    throw new ProtocolError(
      'VHOST_PROTOCOL_CONFIG_READ_ONLY',
      `virtio-blk config write at ${offset} (+${data.length}) refused: the config space is read-only`,
    );
  }
}
