/**
 * virtio-blk, control half: features and configuration space. The queue half is ./blk-queue.ts (worker threads).
 */
import { statSync } from 'node:fs';
import { ProtocolError, VhostError } from '../../errors.js';
import type { VirtioDevice } from '../device.js';
import { BlkConfigOffset, BlkFeature, SECTOR_SIZE, VIRTIO_ID_BLOCK } from './constants.js';
import type { BlkQueueOptions } from './blk-queue.js';
import type { IoEngineOptions } from './io-messages.js';
import type { NbdExportInfo, NbdTlsOptions } from './nbd/handshake.js';
import type { NbdTarget } from './nbd/uri.js';

/**
 * An NBD export as a disk. `info` is what the server said when it was probed (`NbdClient.probe`): the size, and
 * which of flush, trim, write-zeroes, read-only and multi-conn the device offers or uses.
 */
export interface BlkNbdBackend {
  kind: 'nbd';
  target: NbdTarget;
  tls?: NbdTlsOptions | undefined;
  info: NbdExportInfo;
  /** How long a request waits for the server to come back before the guest gets an I/O error (ms). */
  timeoutMs: number;
  /** Connection changes logged by the I/O threads (pino JSON on stderr); default silent. */
  logLevel?: string | undefined;
}

export interface BlkDeviceOptions {
  /**
   * A raw image file, a null device of `size` bytes that completes requests without touching data, or an NBD
   * export (always served from I/O threads: `io` is ignored).
   */
  backend: { kind: 'file'; path: string } | { kind: 'null'; size: number } | BlkNbdBackend;
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
  /** Writes are refused (the option, or a read-only NBD export). */
  readonly readOnly: boolean;
  /**
   * An NBD disk whose server does not allow several connections (no CAN_MULTI_CONN) runs all its queues in one
   * worker with one I/O thread and one connection; otherwise each queue has its own.
   */
  readonly queuesPerWorker: number;
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

    let backend: IoEngineOptions;
    // What the storage can do (an NBD server says; a file or null device can do everything).
    let can = { flush: true, discard: true, writeZeroes: true, readOnly };
    let shareIoThread = false;
    const b = options.backend;
    if (b.kind === 'file') {
      const size = statSync(b.path).size;
      this.capacityBytes = size - (size % SECTOR_SIZE);
      backend = { kind: 'file', path: b.path, readOnly };
    } else if (b.kind === 'null') {
      this.capacityBytes = b.size;
      backend = { kind: 'null', size: b.size, readOnly };
    } else {
      const info = b.info;
      if (info.minBlock > SECTOR_SIZE) {
        throw new VhostError('VHOST_NBD_BLOCK_SIZE', `the export's minimum block is ${info.minBlock} bytes; at most ${SECTOR_SIZE} is supported`);
      }
      this.capacityBytes = info.size - (info.size % SECTOR_SIZE);
      can = { flush: info.canFlush, discard: info.canTrim, writeZeroes: info.canWriteZeroes, readOnly: readOnly || info.readOnly };
      backend = { kind: 'nbd', target: b.target, tls: b.tls, timeoutMs: b.timeoutMs, info, readOnly: can.readOnly, logLevel: b.logLevel };
      shareIoThread = !info.canMultiConn;
    }
    if (this.capacityBytes % SECTOR_SIZE !== 0) throw new VhostError('VHOST_BLK_BAD_SIZE', 'size must be a multiple of 512');
    this.queuesPerWorker = shareIoThread ? this.numQueues : 1;

    // FLUSH unoffered means a write-through disk (writes complete once durable); DISCARD and WRITE_ZEROES only
    // where the storage has them, read-only where it or the option says so.
    let features = bit(BlkFeature.SEG_MAX) | bit(BlkFeature.BLK_SIZE) | bit(BlkFeature.TOPOLOGY);
    if (can.flush) features |= bit(BlkFeature.FLUSH);
    if (can.discard) features |= bit(BlkFeature.DISCARD);
    if (can.writeZeroes) features |= bit(BlkFeature.WRITE_ZEROES);
    if (can.readOnly) features |= bit(BlkFeature.RO);
    this.readOnly = can.readOnly;
    if (this.numQueues > 1) features |= bit(BlkFeature.MQ);
    this.features = features;

    this.worker = {
      module: new URL('./blk-queue.js', import.meta.url).href,
      options: {
        backend,
        serial,
        capacityBytes: this.capacityBytes,
        io: backend.kind === 'nbd' ? 'async' : (options.io ?? 'sync'),
        shareIoThread,
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
