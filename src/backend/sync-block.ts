/**
 * The words that the control thread and the queue workers share to publish memory tables (docs/memory-sync.md).
 * One SharedArrayBuffer per session; every access is an Atomics operation (sequentially consistent in JS), and each
 * one is commented with the access it pairs with on the other side.
 */
import { VhostError } from '../errors.js';

/** How the workers are kept off memory that is being removed. */
export type SyncMode = 'qsbr' | 'lock' | 'copy';
export const SYNC_MODES: readonly SyncMode[] = ['qsbr', 'lock', 'copy'];

/**
 * No synchronization at all: workers switch tables whenever they happen to drain their port, and removed memory is
 * revoked at once. Unsafe (a worker may read revoked memory: zeros, never a crash). It exists only so the sync
 * benchmark can measure the ceiling; the CLI and the package's exports do not offer it.
 */
export const UNSYNCHRONIZED = 'unsynchronized-benchmark-only';
export type WorkerSyncMode = SyncMode | typeof UNSYNCHRONIZED;

export const MAX_WORKERS = 64;
export const MAX_QUEUES = 256;
/** Pin counters: one per memory slot (the backend offers 509 slots). */
export const PIN_SLOTS = 512;

const GEN = 0;
const SEEN = 16; // seen[w] at SEEN + w
const IDLE = SEEN + MAX_WORKERS; // idle[w] at IDLE + w
const LOCK = IDLE + MAX_WORKERS; // lock[q] at LOCK + q
const PINS = LOCK + MAX_QUEUES; // pins[s] at PINS + s
const WORDS = PINS + PIN_SLOTS;

/** lock[q] values. */
const UNLOCKED = 0;
const WORKER_HOLDS = 1;
const CONTROL_HOLDS = 2;

/** Bound on every wait of the control thread: a worker that does not answer by then is declared stuck. */
export const GRACE_PERIOD_TIMEOUT_MS = 5000;

export class SyncBlock {
  readonly buffer: SharedArrayBuffer;
  readonly words: Int32Array;

  constructor(buffer: SharedArrayBuffer = new SharedArrayBuffer(WORDS * 4)) {
    this.buffer = buffer;
    this.words = new Int32Array(buffer);
  }

  // ---- worker side ---------------------------------------------------------------------------------------------

  /** The newest published generation. Pairs with control's store in `publish`. */
  loadGen(): number {
    return Atomics.load(this.words, GEN);
  }

  /** Worker w has switched to generation g: store, then wake a control thread waiting in `waitForReaders`. */
  markSeen(w: number, g: number): void {
    Atomics.store(this.words, SEEN + w, g);
    Atomics.notify(this.words, SEEN + w);
  }

  /**
   * Worker w enters (1) or leaves (0) its idle state. Entering: the store comes after the worker's last touch of
   * guest memory, and control is woken since it may be waiting for this worker. Leaving: the store comes before the
   * worker's load of `gen` (Dekker with control's store of gen then load of idle).
   */
  setIdle(w: number, idle: boolean): void {
    Atomics.store(this.words, IDLE + w, idle ? 1 : 0);
    if (idle) Atomics.notify(this.words, SEEN + w);
  }

  /** Takes lock[q] for a batch; blocks (Atomics.wait, bounded slices) while control holds it. */
  lockQueue(q: number): void {
    for (;;) {
      const prev = Atomics.compareExchange(this.words, LOCK + q, UNLOCKED, WORKER_HOLDS);
      if (prev === UNLOCKED) return;
      Atomics.wait(this.words, LOCK + q, prev, 100);
    }
  }

  unlockQueue(q: number): void {
    Atomics.store(this.words, LOCK + q, UNLOCKED);
    Atomics.notify(this.words, LOCK + q);
  }

  pin(slot: number): void {
    Atomics.add(this.words, PINS + slot, 1);
  }

  /** Drops a pin; the store is seen by control's load in `waitForPins` after the memory use it protected. */
  unpin(slot: number): void {
    if (Atomics.sub(this.words, PINS + slot, 1) === 1) Atomics.notify(this.words, PINS + slot);
  }

  // ---- control side --------------------------------------------------------------------------------------------

  /** Publishes generation g (after the table was posted to every worker). */
  publish(g: number): void {
    Atomics.store(this.words, GEN, g);
  }

  pinCount(slot: number): number {
    return Atomics.load(this.words, PINS + slot);
  }

  /**
   * The grace period: resolves once every worker in [0, workers) is idle or has seen generation g. Reads the idle
   * flags only after `publish(g)` (the caller's order): a worker that stored idle = 0 before our load is waited
   * for; one that stores it later reads gen >= g before touching memory.
   */
  async waitForReaders(workers: number, g: number): Promise<void> {
    for (let w = 0; w < workers; w++) {
      await this.#waitUntil(
        SEEN + w,
        () => Atomics.load(this.words, IDLE + w) === 1 || Atomics.load(this.words, SEEN + w) >= g,
        `worker ${w} did not reach a quiescent state`,
      );
    }
  }

  /** Resolves when no request in flight uses memory slot `slot`. */
  async waitForPins(slot: number): Promise<void> {
    await this.#waitUntil(PINS + slot, () => Atomics.load(this.words, PINS + slot) === 0, `memory slot ${slot} stays pinned`);
  }

  /** Takes lock[q] for control, waiting (without blocking the event loop) while a worker holds it. */
  async lockQueueForControl(q: number): Promise<void> {
    await this.#waitUntil(
      LOCK + q,
      () => Atomics.compareExchange(this.words, LOCK + q, UNLOCKED, CONTROL_HOLDS) === UNLOCKED,
      `queue ${q} stays locked by its worker`,
    );
  }

  unlockQueueForControl(q: number): void {
    Atomics.store(this.words, LOCK + q, UNLOCKED);
    Atomics.notify(this.words, LOCK + q);
  }

  /**
   * Waits until `done()` holds, re-checking whenever word `index` is notified (and every 10 ms, since a change of
   * another word may be what `done` waits for). Bounded by GRACE_PERIOD_TIMEOUT_MS.
   */
  async #waitUntil(index: number, done: () => boolean, what: string): Promise<void> {
    const deadline = Date.now() + GRACE_PERIOD_TIMEOUT_MS;
    while (!done()) {
      if (Date.now() > deadline) throw new VhostError('VHOST_GRACE_PERIOD_TIMEOUT', `${what} within ${GRACE_PERIOD_TIMEOUT_MS} ms`);
      const value = Atomics.load(this.words, index);
      if (done()) return;
      const r = Atomics.waitAsync(this.words, index, value, 10);
      if (r.async) await r.value;
    }
  }
}
