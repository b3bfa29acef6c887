/**
 * An example device written outside the package, on its public API only: a *replayable* entropy source. It looks
 * like virtio-rng to the guest (device ID 4, QEMU's `vhost-user-rng-pci`, Linux's virtio_rng), but its bytes are a
 * fixed stream from a seed: a test harness that boots the same guest twice with the same seed gets the same "random"
 * bytes in /dev/hwrng both times, which makes a guest bug that depends on them reproducible. Fake hardware for tests,
 * in two files; docs/writing-a-device.md explains the parts.
 *
 *   const server = new VhostUserServer({ socketPath: '/tmp/rng.sock', device: new ReplayRngDevice({ seed: 42 }) });
 *   server.listen();
 *
 * Every session starts the stream again from the seed.
 */
import { ProtocolError, VhostError, VIRTIO_ID_RNG, type VirtioDevice } from '../../src/index.js';
import type { ReplayRngQueueOptions } from './replay-rng-queue.js';

export interface ReplayRngOptions {
  /** The stream's seed: any integer 1..2^32-1. */
  readonly seed: number;
}

export class ReplayRngDevice implements VirtioDevice {
  readonly name = 'replay-rng';
  readonly deviceId = VIRTIO_ID_RNG;
  readonly numQueues = 1;
  readonly maxQueueSize = 256;
  readonly features = 0n;
  readonly worker: { readonly module: string; readonly options: ReplayRngQueueOptions };

  constructor(options: ReplayRngOptions) {
    if (!Number.isInteger(options.seed) || options.seed < 1 || options.seed > 0xffff_ffff) {
      throw new VhostError('REPLAY_RNG_BAD_SEED', 'the seed must be an integer 1..2^32-1');
    }
    this.worker = { module: new URL('./replay-rng-queue.js', import.meta.url).href, options: { seed: options.seed } };
  }

  configSpace(): Uint8Array {
    return new Uint8Array(0);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    throw new ProtocolError('VHOST_PROTOCOL_CONFIG_READ_ONLY', `no configuration space (write at ${offset}, ${data.length} bytes)`);
  }
}
