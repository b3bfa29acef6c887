/**
 * The control thread's side of a pool of queue workers, shared by every device of a process (`vhost-user serve`
 * serves all its devices from one pool; a one-device command has a pool of its own).
 *
 * `WorkerPool` starts and stops the threads and places queues on them; each session (a connected frontend of one
 * device) gets a `PoolLease`, through which it publishes its memory tables, starts and stops its queues, and waits
 * only for the workers that serve its queues (docs/memory-sync.md). A device's queues run in groups of
 * `queuesPerWorker` consecutive queues (a net queue pair); each group goes to the worker with the fewest groups when
 * it first starts, and stays there until the session ends.
 */
import { MessageChannel, Worker } from 'node:worker_threads';
import { VhostError } from '../errors.js';
import * as native from '../native/index.js';
import type { VirtioDevice } from '../devices/device.js';
import { MAX_WORKERS, PoolBlock, SyncBlock, UNSYNCHRONIZED, type WorkerSyncMode } from './sync-block.js';
import type {
  QueueStart,
  QueueStarted,
  RingLog,
  WorkerCommand,
  WorkerEvent,
  WorkerLog,
  WorkerRegion,
  WorkerReply,
  WorkerToControl,
} from './worker-messages.js';

/** How long a worker may take to acknowledge a command before it is declared stuck. */
const COMMAND_TIMEOUT_MS = 10_000;

type DistributiveOmit<T, K extends keyof T> = T extends unknown ? Omit<T, K> : never;
export type CommandBody = DistributiveOmit<WorkerCommand, 'id'>;

interface Pending {
  resolve: (reply: WorkerReply) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

/** One thread of the pool. */
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

  constructor(id: number, pool: SharedArrayBuffer, mode: WorkerSyncMode, busyPollUs: number, onEvent: (ev: WorkerEvent) => void) {
    this.id = id;
    this.#controlFd = native.eventfdCreate(0, true);
    const { port1, port2 } = new MessageChannel();
    this.#port = port1;
    this.#worker = new Worker(new URL('./queue-worker.js', import.meta.url), {
      workerData: { workerId: id, controlFd: this.#controlFd, pool, mode, busyPollUs, port: port2 },
      transferList: [port2],
    });
    let markReady: () => void = () => undefined;
    this.ready = new Promise((resolve) => (markReady = resolve));
    this.exited = new Promise((resolve) => this.#worker.once('exit', resolve));
    this.#worker.on('error', (err) => {
      // An exception that escaped the worker (a bug): fail whatever waits on it.
      this.#failPending(err);
      onEvent({ type: 'queue-error', session: -1, index: -1, code: 'VHOST_WORKER_CRASHED', message: err.message });
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

/** A queue of a session stopped by an error (index -1: a worker failed as a whole). */
export interface QueueErrorEvent {
  index: number;
  code: string;
  message: string;
}

export interface PoolOptions {
  /** Worker threads (1..64). */
  threads: number;
  /** How workers are kept off memory that is being removed (default qsbr; docs/memory-sync.md). */
  sync?: WorkerSyncMode;
  /**
   * Polling mode, for workers with a core of their own (as DPDK and SPDK run): when its queues run dry, a worker
   * watches them this many microseconds, notifications off, before it re-enables them and sleeps in poll().
   * 0 (default) sleeps at once: on shared cores the spinning takes the CPU the guest needs. Not in lock mode.
   */
  busyPollUs?: number;
}

/** Longest busy-poll window (1 s): past it, a worker sleeps and re-arms notifications. */
export const MAX_BUSY_POLL_US = 1_000_000;

/** A worker as metrics see it. */
export interface WorkerInfo {
  id: number;
  /** Queue groups placed on it (by every session). */
  queueGroups: number;
  /** Milliseconds spent outside poll(-1) since it started. */
  busyMs: number;
}

export class WorkerPool {
  readonly mode: WorkerSyncMode;
  readonly block = new PoolBlock();
  readonly #workers: QueueWorker[] = [];
  /** Queue groups placed on each worker. */
  readonly #load: number[] = [];
  readonly #leases = new Map<number, PoolLease>();
  #nextSession = 1;
  #stopped = false;

  constructor(options: PoolOptions) {
    const count = options.threads;
    if (!Number.isInteger(count) || count < 1 || count > MAX_WORKERS) {
      throw new VhostError('VHOST_BAD_OPTION', `worker threads must be 1..${MAX_WORKERS}`);
    }
    this.mode = options.sync ?? 'qsbr';
    const busyPollUs = options.busyPollUs ?? 0;
    if (!Number.isInteger(busyPollUs) || busyPollUs < 0 || busyPollUs > MAX_BUSY_POLL_US) {
      throw new VhostError('VHOST_BAD_OPTION', `busy-poll must be 0..${MAX_BUSY_POLL_US} microseconds`);
    }
    for (let i = 0; i < count; i++) {
      this.#workers.push(new QueueWorker(i, this.block.buffer, this.mode, busyPollUs, (ev) => this.#onEvent(ev)));
      this.#load.push(0);
    }
  }

  get size(): number {
    return this.#workers.length;
  }

  /** Resolves once every thread has started (loaded its code). */
  async ready(): Promise<void> {
    await Promise.all(this.#workers.map((w) => Promise.race([w.ready, w.exited])));
  }

  /**
   * A lease for one session of `device`: its queues run on this pool. `stats`: the device's per-queue counters
   * (devices/queue-stats.ts).
   */
  lease(device: VirtioDevice, stats: SharedArrayBuffer): PoolLease {
    if (this.#stopped) throw new VhostError('VHOST_WORKER_CLOSED', 'the worker pool is stopped');
    const id = this.#nextSession++;
    const lease = new PoolLease(this, id, device, stats, {
      worker: (w) => this.#workers[w] as QueueWorker,
      place: () => this.#place(),
      unplace: (w) => {
        this.#load[w] = (this.#load[w] as number) - 1;
      },
      forget: () => this.#leases.delete(id),
    });
    this.#leases.set(id, lease);
    return lease;
  }

  /** The worker with the fewest queue groups (the lowest id among equals). */
  #place(): number {
    let best = 0;
    for (let w = 1; w < this.#load.length; w++) if ((this.#load[w] as number) < (this.#load[best] as number)) best = w;
    this.#load[best] = (this.#load[best] as number) + 1;
    return best;
  }

  #onEvent(ev: WorkerEvent): void {
    if (ev.type !== 'queue-error') return;
    if (ev.session < 0) {
      for (const lease of this.#leases.values()) lease.onEvent({ index: -1, code: ev.code, message: ev.message });
      return;
    }
    this.#leases.get(ev.session)?.onEvent({ index: ev.index, code: ev.code, message: ev.message });
  }

  workers(): WorkerInfo[] {
    return this.#workers.map((w, i) => ({ id: w.id, queueGroups: this.#load[i] as number, busyMs: this.block.busyMs(i) }));
  }

  /** Stops every thread (sessions should have released their leases first; whatever they left is abandoned). */
  async stop(): Promise<void> {
    this.#stopped = true;
    await Promise.all(this.#workers.map((w) => w.stop()));
  }
}

/** The pool's internals a lease uses. */
interface LeaseHost {
  worker(w: number): QueueWorker;
  place(): number;
  unplace(w: number): void;
  forget(): void;
}

/**
 * One session's use of the pool: where its queues run, its sync block, and the workers attached to it (those that
 * were given one of its queues). Only those get its memory tables and only those are waited for.
 */
export class PoolLease {
  readonly session: number;
  readonly sync: SyncBlock;
  readonly mode: WorkerSyncMode;
  /** Where the session's queue errors go (the session sets it). */
  onEvent: (ev: QueueErrorEvent) => void = () => undefined;
  readonly #device: VirtioDevice;
  readonly #stats: SharedArrayBuffer;
  readonly #host: LeaseHost;
  readonly #groupSize: number;
  /** Queue group -> worker. */
  readonly #placement = new Map<number, number>();
  /** Workers attached to this session; the promise settles when the attach is acknowledged. */
  readonly #attached = new Map<number, Promise<void>>();
  /** The newest table published, which a newly attached worker starts from. */
  #gen = 0;
  #regions: WorkerRegion[] = [];
  #log: WorkerLog | undefined;
  #released = false;

  constructor(
    pool: WorkerPool,
    session: number,
    device: VirtioDevice,
    stats: SharedArrayBuffer,
    host: LeaseHost,
  ) {
    this.session = session;
    this.mode = pool.mode;
    this.sync = new SyncBlock(pool.block);
    this.#device = device;
    this.#stats = stats;
    this.#host = host;
    this.#groupSize = device.queuesPerWorker ?? 1;
  }

  /** The worker that runs (or will run) queue `index`, if it was placed. */
  workerOf(index: number): number | undefined {
    return this.#placement.get(Math.floor(index / this.#groupSize));
  }

  /** The workers attached to this session. */
  get workers(): number[] {
    return [...this.#attached.keys()];
  }

  /**
   * Publishes memory table generation `gen` (docs/memory-sync.md), its regions and the dirty log the workers write
   * (undefined: logging is off), to the workers of this session, then waits until none of them and no request in
   * flight can use the regions in `removedSlots` any more (nor the previous log: only workers write logs, so the
   * grace period is enough for it), and calls `revoke` (which releases them) at that point.
   * qsbr / copy: post the table to each attached worker, store gen and bump their epochs, wait for the grace period,
   * then for the pins. lock: take the lock of every running queue (`lockedQueues`), post the table and publish,
   * release the locks (a worker takes the new table with its next lock), then wait for the pins. The locks are never
   * held while waiting for pins: a worker needs its queue's lock to reap a completion and drop its pin.
   */
  async publishMemory(
    gen: number,
    regions: WorkerRegion[],
    log: WorkerLog | undefined,
    removedSlots: readonly number[],
    lockedQueues: readonly number[],
    revoke: () => void,
  ): Promise<void> {
    const sync = this.sync;
    const workers = this.workers;
    if (this.mode === 'lock') {
      const locked: number[] = [];
      try {
        for (const q of lockedQueues) {
          await sync.lockQueueForControl(q);
          locked.push(q);
        }
        this.#post(gen, regions, log, workers);
      } finally {
        for (const q of locked) sync.unlockQueueForControl(q);
      }
    } else {
      this.#post(gen, regions, log, workers);
      if (this.mode === UNSYNCHRONIZED) {
        for (const w of workers) this.#host.worker(w).wake(); // they take the table whenever they next drain their port
        revoke();
        return;
      }
      await sync.waitForReaders(workers, gen);
    }
    for (const slot of removedSlots) await sync.waitForPins(slot);
    revoke();
  }

  /** The grace period of generation `gen` again (a retry after a timeout). */
  async waitForReaders(gen: number): Promise<void> {
    await this.sync.waitForReaders(this.workers, gen);
  }

  /** The table goes into every port before gen says it exists, and gen is stored before the epochs are bumped. */
  #post(gen: number, regions: WorkerRegion[], log: WorkerLog | undefined, workers: readonly number[]): void {
    this.#gen = gen;
    this.#regions = regions;
    this.#log = log;
    for (const w of workers) this.#host.worker(w).post({ type: 'memory', session: this.session, gen, regions, log });
    this.sync.publish(gen, workers);
  }

  /** Places the queue's group (first start) and attaches its worker to this session (first queue there). */
  async #workerFor(index: number): Promise<QueueWorker> {
    if (this.#released) throw new VhostError('VHOST_WORKER_CLOSED', `session ${this.session} released its workers`);
    const group = Math.floor(index / this.#groupSize);
    let w = this.#placement.get(group);
    if (w === undefined) {
      w = this.#host.place();
      this.#placement.set(group, w);
    }
    const worker = this.#host.worker(w);
    let attached = this.#attached.get(w);
    if (attached === undefined) {
      attached = worker
        .request({
          type: 'attach',
          session: this.session,
          attach: {
            sync: this.sync.buffer,
            gen: this.#gen,
            regions: this.#regions,
            log: this.#log,
            deviceModule: this.#device.worker.module,
            deviceOptions: this.#device.worker.options,
            stats: this.#stats,
          },
        })
        .then(() => undefined);
      // In the set before the attach is acknowledged: a table published meanwhile is posted to it (after the
      // attach, in port order) and its grace period waits for it.
      this.#attached.set(w, attached);
      attached.catch(() => this.#attached.delete(w));
    }
    await attached;
    return worker;
  }

  /** Starts a queue on its worker; resolves with where it resumed (see the `queue-started` reply). */
  async startQueue(queue: QueueStart): Promise<QueueStarted> {
    const worker = await this.#workerFor(queue.index);
    const reply = await worker.request({ type: 'start-queue', session: this.session, queue });
    if (reply.type !== 'queue-started') throw new VhostError('VHOST_INTERNAL', `start-queue answered with ${reply.type}`);
    const { type: _type, id: _id, ...started } = reply;
    return started;
  }

  /** Stops a queue; resolves with its last avail index (-1 if it was not running). */
  async stopQueue(index: number): Promise<number> {
    const w = this.workerOf(index);
    if (w === undefined || !this.#attached.has(w)) return -1;
    const reply = await this.#host.worker(w).request({ type: 'stop-queue', session: this.session, index });
    return reply.type === 'queue-stopped' ? reply.lastAvailIdx : -1;
  }

  async setCall(index: number, callFd: number): Promise<void> {
    await this.#requestForQueue(index, { type: 'set-call', session: this.session, index, callFd });
  }

  /** A running ring's used-ring logging changed (SET_VRING_ADDR with or without VHOST_VRING_F_LOG). */
  async setRingLog(index: number, ringLog: RingLog): Promise<void> {
    await this.#requestForQueue(index, { type: 'set-ring-log', session: this.session, index, ringLog });
  }

  /** Has queue `index`'s handler announce `mac` (SEND_RARP). */
  async announce(index: number, mac: Uint8Array): Promise<void> {
    await this.#requestForQueue(index, { type: 'announce', session: this.session, index, mac });
  }

  async setErr(index: number, errFd: number): Promise<void> {
    await this.#requestForQueue(index, { type: 'set-err', session: this.session, index, errFd });
  }

  /** A command for queue `index`'s worker; nothing when the queue never ran (no worker has it). */
  async #requestForQueue(index: number, body: CommandBody): Promise<void> {
    const w = this.workerOf(index);
    if (w !== undefined && this.#attached.has(w)) await this.#host.worker(w).request(body);
  }

  /**
   * Detaches every worker (its queues of this session stop, requests in flight are abandoned) and gives the queue
   * groups back to the pool. When it resolves no worker references the session's memory any more; a worker that
   * did not answer is reported by the rejection (the caller must then not reuse the memory: revoke it).
   */
  async release(): Promise<void> {
    if (this.#released) return;
    this.#released = true;
    const results = await Promise.allSettled(
      [...this.#attached.keys()].map((w) => this.#host.worker(w).request({ type: 'detach', session: this.session })),
    );
    this.#attached.clear();
    for (const w of this.#placement.values()) this.#host.unplace(w);
    this.#placement.clear();
    this.#host.forget();
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed !== undefined) throw failed.reason;
  }
}
