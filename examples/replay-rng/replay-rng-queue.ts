/**
 * The replayable entropy source's queue half (a worker thread): fills every device-writable buffer with the next
 * bytes of an xorshift32 stream (Marsaglia, 2003; not cryptographic, on purpose: reproducible), one byte per step,
 * the stream continuing from request to request. Only type imports from the package: nothing of the backend is
 * loaded into the worker besides this module.
 */
import type { DescriptorChain, GuestMemory, QueueContext, QueueHandler } from '../../src/index.js';

export interface ReplayRngQueueOptions {
  readonly seed: number;
}

/** The next state of an xorshift32 generator (never 0 for a state that is not 0). */
export function xorshift32(x: number): number {
  x ^= x << 13;
  x ^= x >>> 17;
  x ^= x << 5;
  return x >>> 0;
}

class ReplayRngQueue implements QueueHandler {
  #state: number;

  constructor(options: ReplayRngQueueOptions) {
    this.#state = options.seed >>> 0;
  }

  process(mem: GuestMemory, chain: DescriptorChain): number {
    let written = 0;
    for (let i = chain.readableCount; i < chain.count; i++) {
      let gpa = chain.addr[i] as number;
      let left = chain.len[i] as number;
      while (left > 0) {
        // The part of the buffer inside one memory region (checked by the backend: never outside guest memory).
        const view = mem.view(gpa, left);
        if (view.length === 0) throw new RangeError(`guest address 0x${gpa.toString(16)} is not mapped`);
        for (let k = 0; k < view.length; k++) {
          this.#state = xorshift32(this.#state);
          view[k] = this.#state & 0xff;
        }
        gpa += view.length;
        left -= view.length;
        written += view.length;
      }
    }
    return written; // the used length: every writable byte
  }

  close(): void {}
}

/** The worker module's entry point (`VirtioDevice.worker.module`). */
export function createQueueHandler(options: unknown, _context: QueueContext): QueueHandler {
  return new ReplayRngQueue(options as ReplayRngQueueOptions);
}
