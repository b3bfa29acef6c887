/**
 * virtio-rng, queue half (runs in a worker thread): each chain's device-writable buffers are filled with bytes from
 * the system's CSPRNG (`crypto.randomFillSync`, getrandom(2)), straight into guest memory, and the used length is the
 * number of bytes written (§5.4.6: "the device MUST place one or more random bytes into the buffer", and may place
 * fewer than its size). Device-readable buffers carry nothing for this device and are ignored.
 */
import { randomFillSync } from 'node:crypto';
import { VirtioError } from '../../errors.js';
import type { GuestMemory } from '../../memory/guest-memory.js';
import type { DescriptorChain } from '../../queue/descriptor-chain.js';
import type { QueueContext, QueueHandler } from '../device.js';
import { QueueStat, countStat } from '../queue-stats.js';

export interface RngQueueOptions {
  /** Most bytes given per request. */
  readonly maxBytesPerRequest: number;
}

export class RngQueueHandler implements QueueHandler {
  readonly #maxBytes: number;
  readonly #stats: Float64Array;

  constructor(options: RngQueueOptions, context: QueueContext) {
    this.#maxBytes = options.maxBytesPerRequest;
    this.#stats = context.stats;
  }

  process(mem: GuestMemory, chain: DescriptorChain): number {
    let written = 0;
    for (let i = chain.readableCount; i < chain.count && written < this.#maxBytes; i++) {
      let gpa = chain.addr[i] as number;
      let left = Math.min(chain.len[i] as number, this.#maxBytes - written);
      while (left > 0) {
        // A view of guest memory, shorter than asked where a region ends: the rest comes from the next one.
        const view = mem.view(gpa, left);
        if (view.length === 0) throw new VirtioError('GUEST_MEMORY_UNMAPPED', `guest address 0x${gpa.toString(16)} is not mapped`);
        randomFillSync(view);
        gpa += view.length;
        left -= view.length;
        written += view.length;
      }
    }
    if (written === 0) {
      // Nothing writable: the driver gets a used length of 0 (Linux reads it as "no data") and the request is done.
      countStat(this.#stats, QueueStat.errors);
    }
    countStat(this.#stats, QueueStat.bytesRead, written); // bytes given to the driver
    return written;
  }

  close(): void {}
}

/** The worker module entry (`VirtioDevice.worker.module`). */
export function createQueueHandler(options: unknown, context: QueueContext): QueueHandler {
  return new RngQueueHandler(options as RngQueueOptions, context);
}
