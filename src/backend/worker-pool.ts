/**
 * The control thread's side of the queue workers: starts them, publishes memory tables to them, sends them commands
 * and awaits the acknowledgements, stops them. Queue `i` runs on worker `floor(i / queuesPerWorker) % workers`.
 */
import { MessageChannel, Worker } from 'node:worker_threads';
import { VhostError } from '../errors.js';
import * as native from '../native/index.js';
import { MAX_WORKERS, UNSYNCHRONIZED, type SyncBlock, type WorkerSyncMode } from './sync-block.js';
import type { QueueStart, WorkerCommand, WorkerEvent, WorkerRegion, WorkerReply, WorkerToControl } from './worker-messages.js';

/** How long a worker may take to acknowledge a command before it is declared stuck. */
const COMMAND_TIMEOUT_MS = 10_000;

type DistributiveOmit<T, K extends keyof T> = T extends unknown ? Omit<T, K> : never;
export type CommandBody = DistributiveOmit<WorkerCommand, 'id'>;

interface Pending {
  resolve: (reply: WorkerReply) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

class QueueWorker {
  readonly id: number;
  readonly #worker: Worker;
  readonly #port: import('node:worker_threads').MessagePort;
  readonly #controlFd: number;
  readonly #pending = new Map<number, Pending>();
  readonly ready: Promise<void>;
  readonly exited: Promise<number>;
  #nextId = 1;
  #closed = false;
  #exited = false;

  constructor(
    id: number,
    device: { module: string; options: unknown },
    sync: { buffer: SharedArrayBuffer; mode: WorkerSyncMode },
    onEvent: (ev: WorkerEvent) => void,
  ) {
    this.id = id;
    this.#controlFd = native.eventfdCreate(0, true);
    const { port1, port2 } = new MessageChannel();
    this.#port = port1;
    this.#worker = new Worker(new URL('./queue-worker.js', import.meta.url), {
      workerData: {
        workerId: id,
        controlFd: this.#controlFd,
        sync: sync.buffer,
        mode: sync.mode,
        port: port2,
        deviceModule: device.module,
        deviceOptions: device.options,
      },
      transferList: [port2],
    });
    let markReady: () => void = () => undefined;
    this.ready = new Promise((resolve) => (markReady = resolve));
    this.exited = new Promise((resolve) => this.#worker.once('exit', resolve));
    this.#worker.on('error', (err) => {
      // An exception that escaped the worker (a bug): fail whatever waits on it.
      this.#failPending(err);
      onEvent({ type: 'queue-error', index: -1, code: 'VHOST_WORKER_CRASHED', message: err.message });
    });
    this.#worker.once('exit', () => {
      this.#exited = true;
      this.#failPending(new VhostError('VHOST_WORKER_EXITED', `worker ${id} exited`));
    });
    this.#port.on('message', (msg: WorkerToControl) => {
      if (msg.type === 'ready') return markReady();
      if (msg.type === 'queue-error') return onEvent(msg);
      const p = this.#pending.get(msg.id);
      if (p === undefined) return;
      this.#pending.delete(msg.id);
      clearTimeout(p.timer);
      p.resolve(msg);
    });
  }

  #failPending(err: Error): void {
    for (const p of this.#pending.values()) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this.#pending.clear();
  }

  /** Posts a command without waiting for (or expecting) an answer and without waking the worker. */
  post(body: CommandBody): void {
    if (!this.#closed && !this.#exited) this.#port.postMessage({ ...body, id: 0 });
  }

  /** Writes the control eventfd: the worker drains its port at its next poll. */
  wake(): void {
    if (!this.#closed) native.eventfdWrite(this.#controlFd);
  }

  /** Sends a command and resolves with the worker's reply once it has taken effect. */
  async request(body: CommandBody): Promise<WorkerReply> {
    if (this.#closed || this.#exited) throw new VhostError('VHOST_WORKER_CLOSED', `worker ${this.id} is stopped`);
    await Promise.race([this.ready, this.exited]);
    if (this.#exited) throw new VhostError('VHOST_WORKER_CLOSED', `worker ${this.id} exited`);
    const id = this.#nextId++;
    const cmd = { ...body, id };
    const reply = await new Promise<WorkerReply>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new VhostError('VHOST_WORKER_STUCK', `worker ${this.id} did not answer '${body.type}' within ${COMMAND_TIMEOUT_MS} ms`));
      }, COMMAND_TIMEOUT_MS);
      this.#pending.set(id, { resolve, reject, timer });
      this.#port.postMessage(cmd);
      // The worker may be blocked in poll(): the eventfd wakes it; it then drains its port.
      native.eventfdWrite(this.#controlFd);
    });
    if (reply.type === 'failed') throw new VhostError(reply.code, `worker ${this.id}: ${reply.message}`);
    return reply;
  }

  /** Asks the worker to exit; terminates it if it does not. Always releases the control eventfd. */
  async stop(): Promise<void> {
    if (this.#closed) return;
    try {
      await this.request({ type: 'exit' }); // settles on the ack, on the worker's exit, or on the timeout
    } catch {
      // exited before acknowledging, stuck or crashed: terminate below
    }
    this.#closed = true;
    // A worker blocked in poll() cannot be terminated: wake it first (it polls the control eventfd).
    native.eventfdWrite(this.#controlFd);
    await this.#worker.terminate();
    this.#port.close();
    native.close(this.#controlFd);
  }
}

export class WorkerPool {
  readonly #workers: QueueWorker[] = [];
  readonly #sync: SyncBlock;
  readonly #mode: WorkerSyncMode;
  readonly #queuesPerWorker: number;

  constructor(
    count: number,
    device: { module: string; options: unknown },
    sync: SyncBlock,
    mode: WorkerSyncMode,
    onEvent: (ev: WorkerEvent) => void,
    queuesPerWorker = 1,
  ) {
    if (count < 1 || count > MAX_WORKERS) throw new VhostError('VHOST_BAD_OPTION', `workers must be 1..${MAX_WORKERS}`);
    this.#sync = sync;
    this.#mode = mode;
    this.#queuesPerWorker = queuesPerWorker;
    for (let i = 0; i < count; i++) {
      this.#workers.push(new QueueWorker(i, device, { buffer: sync.buffer, mode }, onEvent));
    }
  }

  get size(): number {
    return this.#workers.length;
  }

  #workerFor(queueIndex: number): QueueWorker {
    return this.#workers[Math.floor(queueIndex / this.#queuesPerWorker) % this.#workers.length] as QueueWorker;
  }

  /**
   * Publishes memory table generation `gen` (docs/memory-sync.md), then waits until no worker and no request in
   * flight can use the regions in `removedSlots` any more, and calls `revoke` (which releases them) at that point.
   * qsbr / copy: post the table to every worker, store gen, wait for the grace period, then for the pins.
   * lock: take the lock of every running queue (`lockedQueues`), post the table and store gen, release the locks
   * (a worker takes the new table with its next lock), then wait for the pins. The locks are never held while
   * waiting for pins: a worker needs its queue's lock to reap a completion and drop its pin.
   */
  async publishMemory(
    gen: number,
    regions: WorkerRegion[],
    removedSlots: readonly number[],
    lockedQueues: readonly number[],
    revoke: () => void,
  ): Promise<void> {
    const sync = this.#sync;
    if (this.#mode === 'lock') {
      const locked: number[] = [];
      try {
        for (const q of lockedQueues) {
          await sync.lockQueueForControl(q);
          locked.push(q);
        }
        this.#post(gen, regions);
      } finally {
        for (const q of locked) sync.unlockQueueForControl(q);
      }
    } else {
      this.#post(gen, regions);
      if (this.#mode === UNSYNCHRONIZED) {
        for (const w of this.#workers) w.wake(); // they take the table whenever they next drain their port
        revoke();
        return;
      }
      await sync.waitForReaders(this.#workers.length, gen);
    }
    for (const slot of removedSlots) await sync.waitForPins(slot);
    revoke();
  }

  /** The table goes into every port before gen says it exists (workers drain their port when they see a new gen). */
  #post(gen: number, regions: WorkerRegion[]): void {
    for (const w of this.#workers) w.post({ type: 'memory', gen, regions });
    this.#sync.publish(gen);
  }

  async startQueue(queue: QueueStart): Promise<void> {
    await this.#workerFor(queue.index).request({ type: 'start-queue', queue });
  }

  /** Stops a queue; resolves with its last avail index (-1 if it was not running). */
  async stopQueue(index: number): Promise<number> {
    const reply = await this.#workerFor(index).request({ type: 'stop-queue', index });
    return reply.type === 'queue-stopped' ? reply.lastAvailIdx : -1;
  }

  async setCall(index: number, callFd: number): Promise<void> {
    await this.#workerFor(index).request({ type: 'set-call', index, callFd });
  }

  async setErr(index: number, errFd: number): Promise<void> {
    await this.#workerFor(index).request({ type: 'set-err', index, errFd });
  }

  async stop(): Promise<void> {
    await Promise.all(this.#workers.map((w) => w.stop()));
  }
}
