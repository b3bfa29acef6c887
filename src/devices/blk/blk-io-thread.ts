/**
 * The I/O thread of a blk queue in `io: 'async'` mode: performs file I/O for requests that the queue worker hands
 * over, outside the queue worker's batches, then writes the status byte and reports the completion (a message on
 * its port plus a write to the completion eventfd that the queue worker polls). The queue worker pins the memory
 * regions of a request until it has reaped the completion (docs/memory-sync.md).
 *
 * Stopping: the queue worker sets `control[STOP]` and posts 'stop'; when this thread handles 'stop' (after the
 * requests queued before it) it sets `control[STOPPED]` and from then on never touches guest memory or the eventfd.
 */
import { parentPort, workerData } from 'node:worker_threads';
import * as native from '../../native/index.js';
import { openBlockBackend } from './block-backend.js';
import { BlkStatus } from './constants.js';
import { STOP, STOPPED, type IoCompletion, type IoRequest, type IoThreadInit } from './io-messages.js';

const init = workerData as IoThreadInit;
const control = new Int32Array(init.control);
const backend = openBlockBackend(init.backend);
const requests = parentPort;
if (requests === null) throw new Error('blk-io-thread runs as a worker');

function stopping(): boolean {
  return Atomics.load(control, STOP) !== 0;
}

function execute(req: IoRequest): number {
  try {
    for (const s of req.spans) {
      const view = new Uint8Array(s.buffer, s.offset, s.length);
      if (req.op === 'read') backend.read(view, s.pos);
      else if (req.op === 'write') backend.write(view, s.pos);
      else if (req.op === 'zero') backend.writeZeroes(s.pos, s.length);
    }
    if (req.op === 'flush') backend.flush();
    return BlkStatus.OK;
  } catch {
    return BlkStatus.IOERR;
  }
}

function complete(req: IoRequest, status: number): void {
  if (stopping()) return; // abandoned: the queue worker no longer waits for it, and may have released its memory
  new Uint8Array(req.status.buffer, req.status.offset, 1)[0] = status;
  init.completions.postMessage({ head: req.head, len: status === BlkStatus.OK ? req.len : 1 } satisfies IoCompletion);
  native.eventfdWrite(init.completionFd);
}

/** Requests taken so far (picks each one's delay). */
let taken = 0;

requests.on('message', (msg: IoRequest | 'stop') => {
  if (msg === 'stop') {
    backend.close();
    Atomics.store(control, STOPPED, 1);
    Atomics.notify(control, STOPPED);
    requests.close();
    init.completions.close();
    return;
  }
  if (stopping()) return;
  const status = execute(msg);
  const delay = init.delaysMs.length > 0 ? (init.delaysMs[taken++ % init.delaysMs.length] as number) : 0;
  if (delay > 0) setTimeout(() => complete(msg, status), delay);
  else complete(msg, status);
});
