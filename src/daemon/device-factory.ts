/**
 * Devices from their configuration (config.ts): what `vhost-user serve` starts for each entry of its file or each
 * `PUT /devices/{id}`, and what the one-device commands (`blk`, `net`) start from their options.
 */
import { BlkDevice } from '../devices/blk/blk-device.js';
import type { VirtioDevice } from '../devices/device.js';
import { NetDevice, type NetPortOption } from '../devices/net/net-device.js';
import { RngDevice } from '../devices/rng/rng-device.js';
import { parseNetPort, type BlkDeviceConfig, type DeviceConfig, type NetDeviceConfig, type RngDeviceConfig } from './config.js';

/** A device and what releases it once its server is closed (net: the TAP queues). */
export interface ConfiguredDevice<D extends VirtioDevice = VirtioDevice> {
  device: D;
  /** Device-specific counters for the API and metrics (net: frames and drops each way). */
  stats?: () => Record<string, number>;
  close(): void;
}

/** Test knobs that no config file sets (the blk command's hidden options). */
export interface DeviceTestKnobs {
  /**
   * blk with io 'async': each request completes this long after its I/O (requests in flight for restart tests); a
   * list is taken in turn (out-of-order completion).
   */
  readonly completionDelayMs?: number | readonly number[];
}

export function createDevice(config: BlkDeviceConfig, knobs?: DeviceTestKnobs): ConfiguredDevice<BlkDevice>;
export function createDevice(config: NetDeviceConfig): ConfiguredDevice<NetDevice>;
export function createDevice(config: RngDeviceConfig): ConfiguredDevice<RngDevice>;
export function createDevice(config: DeviceConfig): ConfiguredDevice;
export function createDevice(config: DeviceConfig, knobs: DeviceTestKnobs = {}): ConfiguredDevice {
  if (config.type === 'blk') {
    const device = new BlkDevice({
      backend: config.image !== undefined ? { kind: 'file', path: config.image } : { kind: 'null', size: config.null ?? 0 },
      readOnly: config.readOnly,
      queues: config.queues,
      maxQueueSize: config.queueSize,
      serial: config.serial,
      io: config.io,
      ...(knobs.completionDelayMs !== undefined ? { completionDelayMs: knobs.completionDelayMs } : {}),
    });
    return { device, close: () => undefined };
  }
  if (config.type === 'rng') {
    const rateLimit = config.rateBytes !== undefined ? { rateLimit: { bytes: config.rateBytes, periodMs: config.ratePeriodMs } } : {};
    return { device: new RngDevice({ maxQueueSize: config.queueSize, maxBytesPerRequest: config.maxBytes, ...rateLimit }), close: () => undefined };
  }
  const parsed = parseNetPort(config.port);
  const port: NetPortOption = parsed.kind === 'source' ? { kind: 'source', frameLen: config.frameLen } : parsed;
  const device = new NetDevice({
    port,
    queuePairs: config.queues,
    maxQueueSize: config.queueSize,
    ...(config.mac !== undefined ? { mac: config.mac } : {}),
  });
  return { device, stats: () => ({ ...device.stats() }), close: () => device.close() };
}
