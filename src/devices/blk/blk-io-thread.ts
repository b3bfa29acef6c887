/**
 * An I/O thread of blk queues (`io: 'async'`, and every NBD disk): performs requests that queue workers hand over,
 * outside their batches, then writes the status byte and reports the completion to the request's queue (a message
 * on its port plus a write to its completion eventfd, which the queue worker polls). The queue worker pins the
 * memory regions of a request until it has reaped the completion (docs/memory-sync.md).
 *
 * It serves one or more queues (clients, io-messages.ts): an NBD disk whose server does not allow several
 * connections serves all its queues from one thread and one connection.
 *
 * Stopping a client: the queue worker sets its `STOP` word and posts 'stop'; when this thread handles 'stop' (after
 * the client's requests queued before it) it abandons the client's requests in the engine, sets `STOPPED`, and from
 * then on never touches the client's memory or eventfd.
 */
import pino from 'pino';
import { parentPort, workerData, type MessagePort } from 'node:worker_threads';
import * as native from '../../native/index.js';
import { BlkStatus } from './constants.js';
import { openIoEngine } from './io-engine.js';
import {
  FLUSHED_SEQ,
  FLUSHED_STATUS,
  STOP,
  STOPPED,
  type IoAttach,
  type IoClientMessage,
  type IoCompletion,
  type IoRequest,
  type IoThreadInit,
} from './io-messages.js';

const init = workerData as IoThreadInit;
if (parentPort === null) throw new Error('blk-io-thread runs as a worker');
const owner: MessagePort = parentPort;

const log = pino(
  { level: init.engine.kind === 'nbd' ? (init.engine.logLevel ?? 'silent') : 'silent', base: { component: 'nbd' } },
  pino.destination({ dest: 2, sync: true }),
);
const engine = openIoEngine(init.engine, (event) => {
  switch (event.type) {
    case 'connected':
      log.info({ reconnect: event.reconnect }, 'nbd server connected');
      break;
    case 'disconnected':
      log.warn({ code: event.reason.code, reason: event.reason.message, resend: event.unfinished }, 'nbd connection lost');
      break;
    case 'connect-failed':
      log.debug({ code: event.reason.code, reason: event.reason.message, retryMs: event.retryMs }, 'nbd connect failed');
      break;
    case 'timed-out':
      log.error({ requests: event.requests }, 'nbd server unreachable past the timeout: requests failed');
      break;
  }
});

let clients = 0;
let nextOwner = 1;
/** Reads and writes taken so far (picks each one's delay). */
let taken = 0;

function attach(a: IoAttach): void {
  const id = nextOwner++;
  const control = new Int32Array(a.control);
  const port: MessagePort = a.port;
  clients++;
  const stopping = (): boolean => Atomics.load(control, STOP) !== 0;

  // Completions are sent in batches: those made in one turn of this thread's event loop (the replies of one socket
  // read, say) go in one message with one eventfd write.
  let completed: IoCompletion[] = [];
  const send = (): void => {
    const batch = completed;
    completed = [];
    if (stopping() || batch.length === 0) return;
    port.postMessage(batch);
    native.eventfdWrite(a.completionFd);
  };
  const complete = (req: IoRequest, status: number): void => {
    if (stopping()) return; // abandoned: the queue worker no longer waits for it, and may have released its memory
    new Uint8Array(req.status.buffer, req.status.offset, 1)[0] = status;
    if (completed.length === 0) queueMicrotask(send);
    completed.push({ head: req.head, len: status === BlkStatus.OK ? req.len : 1 });
  };

  port.on('message', (msg: IoClientMessage) => {
    if (!Array.isArray(msg)) {
      if (msg.type === 'stop') {
        engine.abandon(id);
        Atomics.store(control, STOPPED, 1);
        Atomics.notify(control, STOPPED);
        port.close();
        if (--clients === 0) {
          engine.close();
          owner.close();
        }
        return;
      }
      // A flush the queue worker waits for (a stopping queue: what it completed must be durable).
      engine.execute(id, flushRequest, (status) => {
        Atomics.store(control, FLUSHED_STATUS, status);
        Atomics.store(control, FLUSHED_SEQ, msg.seq);
        Atomics.notify(control, FLUSHED_SEQ);
      });
      return;
    }
    if (stopping()) return;
    engine.batch(() => {
      for (const req of msg) {
        // The test knob delays reads and writes only, as when they were the only requests that came here.
        const data = req.op === 'read' || req.op === 'write';
        const delay = data && init.delaysMs.length > 0 ? (init.delaysMs[taken++ % init.delaysMs.length] as number) : 0;
        engine.execute(id, req, (status) => {
          if (delay > 0) setTimeout(() => complete(req, status), delay);
          else complete(req, status);
        });
      }
    });
  });
}

const flushRequest: IoRequest = {
  head: 0,
  op: 'flush',
  spans: [],
  pos: 0,
  length: 0,
  fua: false,
  unmap: false,
  status: { buffer: new SharedArrayBuffer(1), offset: 0 },
  len: 0,
};

owner.on('message', (msg: IoAttach) => attach(msg));
