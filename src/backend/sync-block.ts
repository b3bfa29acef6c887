/**
 * The words that the control thread and the queue workers share to publish memory tables (docs/memory-sync.md).
 * Two kinds of SharedArrayBuffer: one `PoolBlock` per worker pool (per worker: idle flag, epoch, busy time) and one
 * `SyncBlock` per session (generation, what each worker has seen, pins, queue locks). Every access to a word that
 * the other side reads is an Atomics operation (sequentially consistent in JS, one total order across all
 * buffers), and each one is commented with the access it pairs with on the other side.
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
const LOCK = SEEN + MAX_WORKERS; // lock[q] at LOCK + q
const PINS = LOCK + MAX_QUEUES; // pins[s] at PINS + s
const WORDS = PINS + PIN_SLOTS;

/** lock[q] values. */
const UNLOCKED = 0;
const WORKER_HOLDS = 1;
const CONTROL_HOLDS = 2;

/** Bound on every wait of the control thread: a worker that does not answer by then is declared stuck. */
export const GRACE_PERIOD_TIMEOUT_MS = 5000;

/**
 * The pool's words: per worker one 64-byte line (so that workers do not share cache lines) holding
 * - `idle[w]` (Int32 0): 1 while worker w is in (or about to enter) poll() and touches no guest memory. Control
 *   waits on this word (Atomics.waitAsync) in every grace period of a session that w serves, so the worker notifies
 *   it both when it goes idle and when it reports a new generation of any session (`SyncBlock.markSeen`);
 * - `epoch[w]` (Int32 1): bumped by a session's control after it published a new generation for sessions that w
 *   serves. The worker's quiescent point loads only this word while nothing changed: one load per round, however
 *   many sessions the worker serves;
 * - `busy[w]` (Float64 1, bytes 8..15): milliseconds worker w spent outside poll(-1); written by w only (plain
 *   stores), read at scrape time.
 */
export class PoolBlock {
  static readonly STRIDE_WORDS = 16;
  readonly buffer: SharedArrayBuffer;
  readonly words: Int32Array;
  readonly #busy: Float64Array;

  constructor(buffer: SharedArrayBuffer = new SharedArrayBuffer(MAX_WORKERS * PoolBlock.STRIDE_WORDS * 4)) {
    this.buffer = buffer;
    this.words = new Int32Array(buffer);
    this.#busy = new Float64Array(buffer);
  }

  // ---- worker side ---------------------------------------------------------------------------------------------

  /**
   * Worker w enters (1) or leaves (0) its idle state. Entering: the store comes after the worker's last touch of
   * guest memory, and control is woken since it may be waiting for this worker. Leaving: the store comes before the
   * worker's load of `epoch[w]` (Dekker with control's store of gen and bump of epoch, then load of idle).
   */
  setIdle(w: number, idle: boolean): void {
    const at = w * PoolBlock.STRIDE_WORDS;
    Atomics.store(this.words, at, idle ? 1 : 0);
    if (idle) Atomics.notify(this.words, at);
  }

  /** Pairs with `bumpEpoch`: a changed value means some session w serves may have a new generation. */
  loadEpoch(w: number): number {
    return Atomics.load(this.words, w * PoolBlock.STRIDE_WORDS + 1);
  }

  /** Wakes a control thread waiting for worker w (after a store it may be waiting for). */
  notify(w: number): void {
    Atomics.notify(this.words, w * PoolBlock.STRIDE_WORDS);
  }

  /** Adds to worker w's busy time (worker w only). */
  addBusy(w: number, ms: number): void {
    const i = (w * PoolBlock.STRIDE_WORDS) / 2 + 1;
    this.#busy[i] = (this.#busy[i] as number) + ms;
  }

  // ---- control side --------------------------------------------------------------------------------------------

  /** After a session's `publish(g)`: worker w's next quiescent point scans its sessions. */
  bumpEpoch(w: number): void {
    Atomics.add(this.words, w * PoolBlock.STRIDE_WORDS + 1, 1);
  }

  isIdle(w: number): boolean {
    return Atomics.load(this.words, w * PoolBlock.STRIDE_WORDS) === 1;
  }

  busyMs(w: number): number {
    return this.#busy[(w * PoolBlock.STRIDE_WORDS) / 2 + 1] as number;
  }

  /** Index of the word control parks on while it waits for worker w. */
  waitWord(w: number): number {
    return w * PoolBlock.STRIDE_WORDS;
  }
}

export class SyncBlock {
  readonly buffer: SharedArrayBuffer;
  readonly words: Int32Array;
  readonly pool: PoolBlock;

  constructor(pool: PoolBlock, buffer: SharedArrayBuffer = new SharedArrayBuffer(WORDS * 4)) {
    this.pool = pool;
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
    this.pool.notify(w);
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

  /**
   * Publishes generation g to `workers` (after the table was posted to each of them): the store of gen, then the bump
   * of each worker's epoch, in that order (a worker that sees the new epoch then loads the new gen; the model's
   * BROKEN_EPOCH_BEFORE_GEN).
   */
  publish(g: number, workers: Iterable<number>): void {
    Atomics.store(this.words, GEN, g);
    for (const w of workers) this.pool.bumpEpoch(w);
  }

  pinCount(slot: number): number {
    return Atomics.load(this.words, PINS + slot);
  }

  /**
   * The grace period: resolves once every worker of `workers` (those serving this session) is idle or has seen
   * generation g. Reads the idle flags only after `publish(g)` (the caller's order): a worker that stored idle = 0
   * before our load is waited for; one that stores it later loads its epoch, then gen >= g, before touching memory.
   */
  async waitForReaders(workers: Iterable<number>, g: number): Promise<void> {
    for (const w of [...workers]) {
      await this.#waitUntil(
        this.pool.words,
        this.pool.waitWord(w),
        () => this.pool.isIdle(w) || Atomics.load(this.words, SEEN + w) >= g,
        `worker ${w} did not reach a quiescent state`,
      );
    }
  }

  /** Resolves when no request in flight uses memory slot `slot`. */
  async waitForPins(slot: number): Promise<void> {
    await this.#waitUntil(this.words, PINS + slot, () => Atomics.load(this.words, PINS + slot) === 0, `memory slot ${slot} stays pinned`);
  }

  /** Takes lock[q] for control, waiting (without blocking the event loop) while a worker holds it. */
  async lockQueueForControl(q: number): Promise<void> {
    await this.#waitUntil(
      this.words,
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
   * Waits until `done()` holds, re-checking whenever word `index` of `words` is notified (and every 10 ms, since a
   * change of another word may be what `done` waits for, and a notify that lands between the check and the park is
   * lost). Bounded by GRACE_PERIOD_TIMEOUT_MS.
   */
  async #waitUntil(words: Int32Array, index: number, done: () => boolean, what: string): Promise<void> {
    const deadline = Date.now() + GRACE_PERIOD_TIMEOUT_MS;
    while (!done()) {
      if (Date.now() > deadline) throw new VhostError('VHOST_GRACE_PERIOD_TIMEOUT', `${what} within ${GRACE_PERIOD_TIMEOUT_MS} ms`);
      const value = Atomics.load(words, index);
      if (done()) return;
      const r = Atomics.waitAsync(words, index, value, 10);
      if (r.async) await r.value;
    }
  }
}
