/**
 * Worker thread for fairness.test.ts: a driver with endless work. Its ring holds one request (descriptors 0 and 1)
 * in every avail slot, and it keeps avail.idx exactly one ring ahead of used.idx: each completion is re-added as
 * fast as the device produces it (never more than `size` ahead of what the device consumed, so the ring stays
 * valid). Kicks whenever the device has notifications enabled. Runs until `control[0]` is nonzero; `control[1]`
 * counts completions, `control[2]` kicks.
 */
import { workerData } from 'node:worker_threads';
import * as native from '../../src/native/index.js';

export interface SpinnerInit {
  readonly buffer: SharedArrayBuffer;
  /** Byte offsets of avail.idx, used.flags and used.idx in `buffer`. */
  readonly availIdx: number;
  readonly usedFlags: number;
  readonly usedIdx: number;
  readonly size: number;
  readonly kickFd: number;
  readonly control: SharedArrayBuffer;
}

const init = workerData as SpinnerInit;
const control = new Int32Array(init.control);
const avail = new Uint16Array(init.buffer, init.availIdx, 1);
const usedFlags = new Uint16Array(init.buffer, init.usedFlags, 1);
const used = new Uint16Array(init.buffer, init.usedIdx, 1);
let last = Atomics.load(used, 0);
let completions = 0;
let kicks = 0;
let published = -1;
while (Atomics.load(control, 0) === 0) {
  const u = Atomics.load(used, 0);
  completions += (u - last) & 0xffff;
  last = u;
  const target = (u + init.size) & 0xffff;
  if (target !== published) {
    Atomics.store(avail, 0, target);
    published = target;
    if ((Atomics.load(usedFlags, 0) & 1) === 0) {
      native.eventfdWrite(init.kickFd);
      kicks++;
    }
  }
  Atomics.store(control, 1, completions | 0);
  Atomics.store(control, 2, kicks);
}
