/**
 * A queue worker thread: owns some virtqueues of one device and processes them straight out of guest memory.
 *
 * The loop blocks in poll() on its control eventfd plus the kick eventfds of its running queues. A kick makes it
 * process that queue in batches (notifications disabled while it drains the ring, re-enabled and re-checked before
 * it sleeps again). The control eventfd means "commands are waiting on your port": the worker drains the port
 * synchronously, applies each command and acknowledges it. Commands are applied only between batches, so once a
 * command is acknowledged no request is in the middle of using what it replaced (this is the worker's quiescent
 * state: the control thread releases old memory only after every worker acknowledged the new table).
 */
import { receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { VhostError } from '../errors.js';
import { MemoryTable } from '../memory/memory-table.js';
import type { MappedRegion } from '../memory/region.js';
import * as native from '../native/index.js';
import type { DescriptorChain } from '../queue/descriptor-chain.js';
import { SplitQueue } from '../queue/split-queue.js';
import type { DeviceWorkerModule, QueueHandler } from '../devices/device.js';
import type { QueueStart, WorkerCommand, WorkerInit, WorkerRegion, WorkerToControl } from './worker-messages.js';

/** Most chains handled per queue before the worker looks at its other queues and its port (fairness). */
const BATCH_LIMIT = 256;

interface RunningQueue {
  readonly start: QueueStart;
  readonly queue: SplitQueue;
  readonly chain: DescriptorChain;
  readonly handler: QueueHandler;
  callFd: number;
  errFd: number;
  /** More work is known to be waiting (the batch limit was hit). */
  pending: boolean;
}

const init = workerData as WorkerInit;
const port: MessagePort = init.port;
const device = (await import(init.deviceModule)) as DeviceWorkerModule;

let memory: MemoryTable = MemoryTable.EMPTY;
const queues = new Map<number, RunningQueue>();
let running = true;

function send(msg: WorkerToControl): void {
  port.postMessage(msg);
}

function toTable(regions: readonly WorkerRegion[]): MemoryTable {
  // The worker only needs GPA lookups; the identity fields are the control thread's business.
  return new MemoryTable(
    regions.map(
      (r): MappedRegion => ({ ...r, uva: 0, fileOffset: 0, dev: 0n, ino: 0n }),
    ),
  );
}

function errorInfo(err: unknown): { code: string; message: string } {
  if (err instanceof VhostError) return { code: err.code, message: err.message };
  return { code: 'VHOST_INTERNAL', message: err instanceof Error ? (err.stack ?? err.message) : String(err) };
}

/** A queue hit a guest error (or a handler bug): it stops for good, the error eventfd fires, control is told. */
function failQueue(q: RunningQueue, err: unknown): void {
  queues.delete(q.start.index);
  q.queue.detach();
  q.handler.close();
  if (q.errFd >= 0) native.eventfdWrite(q.errFd);
  send({ type: 'queue-error', index: q.start.index, ...errorInfo(err) });
}

function startQueue(start: QueueStart): void {
  const queue = new SplitQueue({
    size: start.size,
    descAddr: start.descAddr,
    availAddr: start.availAddr,
    usedAddr: start.usedAddr,
    eventIdx: start.eventIdx,
    indirect: start.indirect,
  });
  queue.attach(memory);
  // Resume where the driver's state says: avail from SET_VRING_BASE, used from the ring itself (as libvhost-user
  // and DPDK do), which is what the driver last saw.
  queue.setBase(start.lastAvailIdx, queue.ringUsedIdx());
  const handler = device.createQueueHandler(init.deviceOptions, { queueIndex: start.index, features: start.features });
  const q: RunningQueue = {
    start,
    queue,
    chain: queue.createChain(),
    handler,
    callFd: start.callFd,
    errFd: start.errFd,
    pending: true, // look at the ring at once: a kick may have come before we watched the fd
  };
  queues.set(start.index, q);
}

function apply(cmd: WorkerCommand): void {
  try {
    switch (cmd.type) {
      case 'memory': {
        memory = toTable(cmd.regions);
        // Ring views point into the old mappings: rebuild them from the new table before anything touches a ring.
        for (const q of [...queues.values()]) {
          try {
            q.queue.attach(memory);
          } catch (err) {
            failQueue(q, err);
          }
        }
        send({ type: 'ack', id: cmd.id });
        break;
      }
      case 'start-queue':
        startQueue(cmd.queue);
        send({ type: 'ack', id: cmd.id });
        break;
      case 'set-call':
      case 'set-err': {
        const q = queues.get(cmd.index);
        if (q !== undefined) {
          if (cmd.type === 'set-call') q.callFd = cmd.callFd;
          else q.errFd = cmd.errFd;
        }
        send({ type: 'ack', id: cmd.id });
        break;
      }
      case 'stop-queue': {
        const q = queues.get(cmd.index);
        let lastAvailIdx = -1;
        if (q !== undefined) {
          queues.delete(cmd.index);
          lastAvailIdx = q.queue.lastAvailIdx;
          q.queue.detach();
          q.handler.close();
        }
        send({ type: 'queue-stopped', id: cmd.id, index: cmd.index, lastAvailIdx });
        break;
      }
      case 'exit':
        for (const q of queues.values()) q.handler.close();
        queues.clear();
        running = false;
        send({ type: 'ack', id: cmd.id });
        break;
    }
  } catch (err) {
    send({ type: 'failed', id: cmd.id, ...errorInfo(err) });
  }
}

function drainCommands(): void {
  for (;;) {
    const msg = receiveMessageOnPort(port);
    if (msg === undefined) return;
    apply(msg.message as WorkerCommand);
  }
}

/** Processes up to BATCH_LIMIT chains of one queue; leaves notifications enabled only when the ring is empty. */
function processQueue(q: RunningQueue): void {
  const { queue, chain, handler } = q;
  try {
    queue.disableNotification();
    let handled = 0;
    for (;;) {
      while (handled < BATCH_LIMIT && queue.popChain(memory, chain)) {
        const len = handler.process(memory, chain);
        queue.pushUsed(chain.head, len);
        handled++;
      }
      queue.publishUsed();
      if (q.callFd >= 0 && queue.needsNotification()) native.eventfdWrite(q.callFd);
      if (handled >= BATCH_LIMIT) {
        q.pending = true; // come back after the other queues and the port had their turn
        return;
      }
      // Re-enable notifications, then re-check: a request that raced in is processed now (its kick may not come).
      if (!queue.enableNotification()) break;
      queue.disableNotification();
    }
    q.pending = false;
  } catch (err) {
    failQueue(q, err);
  }
}

// ---- the loop ---------------------------------------------------------------------------------------------------

const MAX_POLL_FDS = 1 + 64;
const pollFds = new Int32Array(MAX_POLL_FDS);
const revents = new Int32Array(MAX_POLL_FDS);
const pollQueues: (RunningQueue | undefined)[] = new Array<RunningQueue | undefined>(MAX_POLL_FDS);

send({ type: 'ready' });
while (running) {
  let n = 1;
  pollFds[0] = init.controlFd;
  let anyPending = false;
  for (const q of queues.values()) {
    if (n === MAX_POLL_FDS) break;
    pollFds[n] = q.start.kickFd;
    pollQueues[n] = q;
    n++;
    anyPending ||= q.pending;
  }
  native.poll(pollFds.subarray(0, n), revents, anyPending ? 0 : -1);
  if ((revents[0] ?? 0) !== 0) {
    native.eventfdRead(init.controlFd);
    drainCommands();
    continue; // the queue set may have changed
  }
  for (let i = 1; i < n; i++) {
    const q = pollQueues[i] as RunningQueue;
    const ev = revents[i] ?? 0;
    pollQueues[i] = undefined;
    if (ev & (native.POLLNVAL | native.POLLERR)) {
      failQueue(q, new VhostError('VHOST_KICK_FD_INVALID', `kick fd ${q.start.kickFd} of queue ${q.start.index} failed`));
      continue;
    }
    if (ev & native.POLLIN) native.eventfdRead(q.start.kickFd);
    if (ev !== 0 || q.pending) processQueue(q);
  }
}
port.close();
