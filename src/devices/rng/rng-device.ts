/**
 * virtio-rng (VIRTIO 1.2 §5.4, device ID 4), control half: one request queue, no feature bits, no configuration
 * space. The queue half, ./rng-queue.ts, fills each buffer the driver makes available with bytes from the system's
 * CSPRNG. The smallest complete device of this project: a model for devices of your own.
 */
import { ProtocolError, VhostError } from '../../errors.js';
import type { VirtioDevice } from '../device.js';
import type { RngQueueOptions } from './rng-queue.js';

/** The virtio device ID of an entropy source. */
export const VIRTIO_ID_RNG = 4;

export interface RngDeviceOptions {
  /** Largest queue size the driver may choose (a power of two; default 1024). */
  maxQueueSize?: number;
  /** Most bytes given per request (default 64 KiB): a larger buffer is filled this far, its used length says so. */
  maxBytesPerRequest?: number;
  /** At most `bytes` every `periodMs` milliseconds (QEMU's `max-bytes` and `period`); requests beyond it wait. */
  rateLimit?: { bytes: number; periodMs: number };
}

export class RngDevice implements VirtioDevice {
  readonly name = 'rng';
  readonly deviceId = VIRTIO_ID_RNG;
  /** requestq: the driver makes device-writable buffers available, the device fills them (§5.4.2). */
  readonly numQueues = 1;
  readonly maxQueueSize: number;
  /** virtio-rng defines no feature bits (§5.4.3). */
  readonly features = 0n;
  readonly worker: { readonly module: string; readonly options: RngQueueOptions };

  constructor(options: RngDeviceOptions = {}) {
    this.maxQueueSize = options.maxQueueSize ?? 1024;
    if (!Number.isInteger(Math.log2(this.maxQueueSize)) || this.maxQueueSize < 1 || this.maxQueueSize > 32768) {
      throw new VhostError('VHOST_RNG_BAD_OPTION', 'queue size must be a power of two up to 32768');
    }
    const maxBytes = options.maxBytesPerRequest ?? 65536;
    if (!Number.isInteger(maxBytes) || maxBytes < 1 || maxBytes > 0xffff_ffff) {
      throw new VhostError('VHOST_RNG_BAD_OPTION', 'maxBytesPerRequest must be 1..2^32-1');
    }
    const rate = options.rateLimit;
    if (rate !== undefined && !(Number.isInteger(rate.bytes) && rate.bytes >= 1 && Number.isInteger(rate.periodMs) && rate.periodMs >= 1)) {
      throw new VhostError('VHOST_RNG_BAD_OPTION', 'a rate limit is a positive number of bytes per a positive number of milliseconds');
    }
    const queueOptions: RngQueueOptions = { maxBytesPerRequest: maxBytes, ...(rate !== undefined ? { rateLimit: { ...rate } } : {}) };
    this.worker = { module: new URL('./rng-queue.js', import.meta.url).href, options: queueOptions };
  }

  /** No configuration space (§5.4.4). */
  configSpace(): Uint8Array {
    return new Uint8Array(0);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    throw new ProtocolError('VHOST_PROTOCOL_CONFIG_READ_ONLY', `virtio-rng has no configuration space (write at ${offset}, ${data.length} bytes)`);
  }
}
