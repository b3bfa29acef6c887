/**
 * Devices from their configuration (config.ts): what `vhost-user serve` starts for each entry of its file or each
 * `PUT /devices/{id}`, and what the one-device commands (`blk`, `net`) start from their options.
 */
import { readFile } from 'node:fs/promises';
import { BlkDevice, type BlkDeviceOptions } from '../devices/blk/blk-device.js';
import { NbdClient } from '../devices/blk/nbd/client.js';
import type { NbdExportInfo, NbdTlsOptions } from '../devices/blk/nbd/handshake.js';
import { parseNbdUri } from '../devices/blk/nbd/uri.js';
import { VhostError } from '../errors.js';
import type { VirtioDevice } from '../devices/device.js';
import { NetDevice, type NetPortOption } from '../devices/net/net-device.js';
import { RngDevice } from '../devices/rng/rng-device.js';
import { VsockDevice } from '../devices/vsock/vsock-device.js';
import { DEFAULT_NBD_TIMEOUT_S, parseNetPort, type BlkDeviceConfig, type DeviceConfig, type NetDeviceConfig, type RngDeviceConfig, type VsockDeviceConfig } from './config.js';

/** A device and what releases it once its server is closed (net: the TAP queues). */
export interface ConfiguredDevice<D extends VirtioDevice = VirtioDevice> {
  device: D;
  /** Device-specific counters for the API and metrics (net: frames and drops each way). */
  stats?: () => Record<string, number>;
  close(): void;
}

/** What no config file sets: the blk command's hidden test options, and what `openDevice` learned. */
export interface DeviceTestKnobs {
  /** An nbd disk: the export as the server described it (`openDevice` asks), and the TLS files' contents. */
  readonly nbd?: { readonly info: NbdExportInfo; readonly tls: NbdTlsOptions | undefined };
  /** The level at which an nbd disk's I/O threads log connection changes (default silent). */
  readonly logLevel?: string;
  /**
   * blk with io 'async': each request completes this long after its I/O (requests in flight for restart tests); a
   * list is taken in turn (out-of-order completion).
   */
  readonly completionDelayMs?: number | readonly number[];
}

export function createDevice(config: BlkDeviceConfig, knobs?: DeviceTestKnobs): ConfiguredDevice<BlkDevice>;
export function createDevice(config: NetDeviceConfig): ConfiguredDevice<NetDevice>;
export function createDevice(config: RngDeviceConfig): ConfiguredDevice<RngDevice>;
export function createDevice(config: VsockDeviceConfig): ConfiguredDevice<VsockDevice>;
export function createDevice(config: DeviceConfig, knobs?: DeviceTestKnobs): ConfiguredDevice;
export function createDevice(config: DeviceConfig, knobs: DeviceTestKnobs = {}): ConfiguredDevice {
  if (config.type === 'blk') {
    let backend: BlkDeviceOptions['backend'];
    if (config.nbd !== undefined) {
      if (knobs.nbd === undefined) throw new VhostError('VHOST_NBD_NOT_PROBED', 'an nbd disk is created by openDevice, which asks the server first');
      const { info, tls } = knobs.nbd;
      backend = { kind: 'nbd', target: parseNbdUri(config.nbd), tls, info, timeoutMs: (config.nbdTimeout ?? DEFAULT_NBD_TIMEOUT_S) * 1000, logLevel: knobs.logLevel };
    } else {
      backend = config.image !== undefined ? { kind: 'file', path: config.image } : { kind: 'null', size: config.null ?? 0 };
    }
    const device = new BlkDevice({
      backend,
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
  if (config.type === 'vsock') {
    const device = new VsockDevice({ guestCid: config.guestCid, udsPath: config.udsPath, maxQueueSize: config.queueSize });
    return { device, stats: () => device.stats(), close: () => device.close() };
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

/**
 * `createDevice`, after what has to be asked first: an nbd disk's server is connected to once, to learn the
 * export's size and what it can do (it fails here, with the server's reason, if the export cannot be had), and its
 * TLS files are read; a vsock device's unix socket listens.
 */
export async function openDevice(config: BlkDeviceConfig, knobs?: DeviceTestKnobs): Promise<ConfiguredDevice<BlkDevice>>;
export async function openDevice(config: VsockDeviceConfig, knobs?: DeviceTestKnobs): Promise<ConfiguredDevice<VsockDevice>>;
export async function openDevice(config: DeviceConfig, knobs?: DeviceTestKnobs): Promise<ConfiguredDevice>;
export async function openDevice(config: DeviceConfig, knobs: DeviceTestKnobs = {}): Promise<ConfiguredDevice> {
  if (config.type === 'vsock') {
    // Its hybrid unix socket listens before the device is announced (a path in use fails here).
    const configured = createDevice(config);
    try {
      await configured.device.host.ready();
    } catch (err) {
      configured.close();
      throw err;
    }
    return configured;
  }
  if (config.type !== 'blk' || config.nbd === undefined) return createDevice(config, knobs);
  const text = async (file: string | undefined): Promise<string | undefined> => (file === undefined ? undefined : readFile(file, 'utf8'));
  const [ca, cert, key] = await Promise.all([text(config.nbdTlsCa), text(config.nbdTlsCert), text(config.nbdTlsKey)]);
  const target = parseNbdUri(config.nbd);
  const tls: NbdTlsOptions | undefined = target.tls
    ? { ...(ca !== undefined ? { ca } : {}), ...(cert !== undefined ? { cert } : {}), ...(key !== undefined ? { key } : {}) }
    : undefined;
  const info = await NbdClient.probe(target, tls, Math.min(10_000, (config.nbdTimeout ?? DEFAULT_NBD_TIMEOUT_S) * 1000));
  return createDevice(config, { ...knobs, nbd: { info, tls } });
}
