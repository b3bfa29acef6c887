/**
 * A queue worker thread of a pool: runs virtqueues of any number of sessions (connected frontends, each with its own
 * device, memory table and sync block) and processes them straight out of guest memory.
 *
 * The loop (docs/memory-sync.md has the protocol; model/memory-sync.pml checks it):
 *   quiescent point: load `epoch[w]`; if it changed, drain the port, and for each session whose `gen` changed:
 *                    switch to its new table, store its `seen[w]`
 *   batch:           each queue with work: at most BATCH_LIMIT chains, notifications off while draining, then
 *                    re-enabled and the ring re-checked (both touch guest memory: the worker is still a reader)
 *   idle:            store idle[w] = 1, block in poll() on kick eventfds + control eventfd (+ completion fds),
 *                    store idle[w] = 0, back to the quiescent point before touching guest memory again
 * Commands other than memory tables (start/stop a ring, a new call fd, exit) arrive on the port with a write to the
 * control eventfd, and are acknowledged once applied.
 *
 * Device-to-driver queues (a handler with a `producer`, e.g. net receive) run the same loop with other wake-ups:
 * they have work when input waits (`hasInput`, or their input fd is readable) and the ring has buffers; a kick only
 * says the driver added buffers. Out of buffers with input left, the queue is "starved": it re-enables kicks and
 * waits for one, and stops polling its input fd (the input stays queued where it is, or is dropped by its source).
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { VhostError, VirtioError } from '../errors.js';
import { MemoryTable } from '../memory/memory-table.js';
import type { MappedRegion } from '../memory/region.js';
import * as native from '../native/index.js';
import type { DescriptorChain } from '../queue/descriptor-chain.js';
import { createDeviceQueue, type DeviceQueue } from '../queue/device-queue.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import { PENDING, ProduceResult, type DeviceWorkerModule, type QueueHandler, type QueueProducer } from '../devices/device.js';
import { countStat, QueueStat, queueStatsRow } from '../devices/queue-stats.js';
import { MAX_QUEUES, PoolBlock, SyncBlock, UNSYNCHRONIZED } from './sync-block.js';
import type {
  QueueStart,
  QueueStarted,
  RingLog,
  SessionAttach,
  WorkerCommand,
  WorkerInit,
  WorkerLog,
  WorkerRegion,
  WorkerToControl,
} from './worker-messages.js';
import { startQueueInflight, type QueueInflight } from './queue-inflight.js';
import { DirtyLog } from '../memory/dirty-log.js';
import { LoggingQueue, logChainWritten, WrittenBuffers } from '../queue/written-buffers.js';

/** Most chains handled per queue before the worker looks at its other queues and its port (fairness). */
const BATCH_LIMIT = 256;

/** A session (one connected frontend of one device) as this worker knows it. */
interface WorkerSession {
  readonly id: number;
  readonly sync: SyncBlock;
  /** The table in use, and its generation. */
  memory: MemoryTable;
  memoryGen: number;
  /** Migration: the dirty log of this table's generation while logging is on (every device write is marked). */
  log: DirtyLog | undefined;
  /** The generation last reported in this session's seen[me]. */
  seenGen: number;
  /** undefined while the module loads (no queue of the session can start before the attach is acknowledged). */
  device: DeviceWorkerModule | undefined;
  readonly attach: SessionAttach;
}

interface RunningQueue {
  readonly session: WorkerSession;
  /** The key of `queues`: session and queue index. */
  readonly key: number;
  readonly stats: Float64Array;
  readonly start: QueueStart;
  readonly queue: DeviceQueue;
  readonly chain: DescriptorChain;
  readonly handler: QueueHandler;
  callFd: number;
  errFd: number;
  /** More work is known to be waiting (the batch limit was hit, or the ring was just started). */
  pending: boolean;
  /** Notifications are enabled and the ring was re-checked empty (false while busy-polling it). */
  armed: boolean;
  /** poll() reported the kick eventfd readable and it was not read yet (processQueue reads it, after the batch). */
  kicked: boolean;
  /** Requests the handler completes later: chain head -> the memory slots pinned for it. */
  readonly inflight: Map<number, number[]>;
  /** Completions pushed since the last publication. */
  pushed: number;
  /** INFLIGHT_SHMFD: what this queue takes and completes is recorded there (queue-inflight.ts). */
  readonly tracker: QueueInflight | undefined;
  /** A stop-queue command waiting for the in-flight requests to finish. */
  stopRequest: number | undefined;
  /** Whether (and where) the used ring's writes are logged while the session logs (SET_VRING_ADDR). */
  ringLog: RingLog;
  /** The writable segments of the requests in flight, for the dirty log (queue/written-buffers.ts). */
  readonly written: WrittenBuffers;
  /** Bytes at the writable part's end that every completion writes (`QueueHandler.trailingStatusBytes`). */
  readonly trailer: number;
  /** A producer's queue while its session logs (made on first use). */
  loggingQueue: LoggingQueue | undefined;
  /** Device-to-driver queues (net receive): the handler's producer. */
  readonly producer: QueueProducer | undefined;
  /** The producer has input but the ring had too few buffers: wait for a kick, not for more input. */
  starved: boolean;
  /** While starved: the avail.idx that was not enough. */
  starvedAvail: number;
}

const init = workerData as WorkerInit;
const port: MessagePort = init.port;
const pool = new PoolBlock(init.pool);
const me = init.workerId;
const useLocks = init.mode === 'lock';
const unsynchronized = init.mode === UNSYNCHRONIZED;
/**
 * The busy-poll window before going idle (see busyPoll; PoolOptions.busyPollUs), here in ms; 0 = off (default). Not
 * in lock mode, where every look at a ring must hold the queue's lock.
 */
const BUSY_POLL_MS = useLocks ? 0 : init.busyPollUs / 1000;

/**
 * Test hook VHOST_USER_TEST_KILL=before-publish:N | after-publish:N: the process kills itself (SIGKILL) at the first
 * publication of a batch of at least N completions, just before (used elements written, used.idx not) or just after
 * its used.idx store (inflight region not yet committed). For restart tests of what the spec calls the half-done
 * batch; unset, it costs a comparison per publication.
 */
const KILL_HOOK = /^(before|after)-publish:(\d+)$/.exec(process.env.VHOST_USER_TEST_KILL ?? '');
const KILL_BEFORE_PUBLISH = KILL_HOOK?.[1] === 'before' ? Number(KILL_HOOK[2]) : Infinity;
const KILL_AFTER_PUBLISH = KILL_HOOK?.[1] === 'after' ? Number(KILL_HOOK[2]) : Infinity;

const sessions = new Map<number, WorkerSession>();
/** Device worker modules by URL, loaded once per worker. */
const modules = new Map<string, DeviceWorkerModule>();
/** Module loads in progress: the loop awaits them (idle: it touches no guest memory meanwhile). */
const loading: Promise<void>[] = [];
const queues = new Map<number, RunningQueue>();
/**
 * A full garbage collection of this worker's heap. A session's guest memory stays mapped (revoked: anonymous
 * memory, but address space and a mapping) until every thread has dropped its SharedArrayBuffers; a worker that
 * outlives its sessions, idle in poll(), may not collect for a long time. After a detach it collects once before it
 * sleeps. `gc` is exposed through V8's flag, as jest and other leak detectors do: a worker cannot get --expose-gc.
 */
setFlagsFromString('--expose-gc');
const collectGarbage = runInNewContext('gc') as () => void;
let garbage = false;
/** The epoch[me] value of the last scan of the sessions' generations. */
let seenEpoch = 0;
let running = true;

function queueKey(session: number, index: number): number {
  return session * MAX_QUEUES + index;
}

function send(msg: WorkerToControl): void {
  port.postMessage(msg);
}

function toLog(log: WorkerLog | undefined): DirtyLog | undefined {
  return log === undefined ? undefined : new DirtyLog(log.buffer, log.offset, log.size);
}

/** Points the queue's own ring writes at its session's log, when the session logs and the ring asked for it. */
function applyRingLog(q: RunningQueue): void {
  const log = q.ringLog.enabled ? q.session.log : undefined;
  q.queue.setDirtyLog(log, q.ringLog.usedAddr);
}

function toTable(regions: readonly WorkerRegion[]): MemoryTable {
  // The file identity fields are the control thread's business (it compares regions); the worker looks up GPAs.
  return new MemoryTable(regions.map((r): MappedRegion => ({ ...r, fileOffset: 0, dev: 0n, ino: 0n })));
}

function errorInfo(err: unknown): { code: string; message: string } {
  if (err instanceof VhostError) return { code: err.code, message: err.message };
  return { code: 'VHOST_INTERNAL', message: err instanceof Error ? (err.stack ?? err.message) : String(err) };
}

// ---- memory: the quiescent point and pins ---------------------------------------------------------------------------

function setMemory(s: WorkerSession, gen: number, regions: readonly WorkerRegion[], log: WorkerLog | undefined): void {
  if (gen <= s.memoryGen) return;
  s.memoryGen = gen;
  try {
    s.memory = toTable(regions);
    s.log = toLog(log);
  } catch (err) {
    // Control validated this table, so this is a bug; never keep using the old one: stop the session's queues.
    s.memory = MemoryTable.EMPTY;
    s.log = undefined;
    for (const q of [...queues.values()]) if (q.session === s) failQueue(q, err);
    send({ type: 'queue-error', session: s.id, index: -1, ...errorInfo(err) });
    return;
  }
  // Ring views point into the old mappings: rebuild them from the new table before anything touches a ring.
  for (const q of [...queues.values()]) {
    if (q.session !== s) continue;
    try {
      q.queue.attach(s.memory);
      applyRingLog(q);
    } catch (err) {
      failQueue(q, err);
    }
  }
}

/**
 * The quiescent point: called when this worker holds no reference into guest memory that it will use again. While
 * nothing was published for this worker it costs one load (epoch[me]). Otherwise: remember the epoch first (a bump
 * during the scan below makes the next quiescent point scan again: the model's BROKEN_EPOCH_LATE), drain the port,
 * then switch every session whose generation changed and report it. A session's table is posted before its `gen`
 * is stored and `gen` before the epoch is bumped, so once the loads below see generation g the table for g is in
 * the port.
 */
function quiescent(): void {
  if (unsynchronized) return; // the benchmark's ceiling: tables are taken whenever the port is drained
  const e = pool.loadEpoch(me);
  if (e === seenEpoch) return;
  seenEpoch = e;
  drainCommands();
  for (const s of sessions.values()) {
    const g = s.sync.loadGen();
    if (g === s.seenGen) continue;
    // gen may have moved on after the drain above (another control posted and stored meanwhile): its table was
    // posted before gen was stored, so it is in the port now (the model's BROKEN_DRAIN_ONCE).
    if (s.memoryGen < g) drainCommands();
    if (s.memoryGen < g) throw new VhostError('VHOST_INTERNAL', `session ${s.id}: generation ${g} published but its table is not in the port`);
    s.seenGen = g;
    s.sync.markSeen(me, g);
  }
}

/** Pins every region the chain's buffers use (a request that completes outside this batch). */
function pinChain(s: WorkerSession, chain: DescriptorChain): number[] {
  const slots: number[] = [];
  for (let i = 0; i < chain.count; i++) {
    let gpa = chain.addr[i] as number;
    let left = chain.len[i] as number;
    do {
      const r = s.memory.findRegion(gpa);
      if (r === undefined) break; // the handler already validated the buffers; nothing to pin in a hole
      if (!slots.includes(r.slot)) {
        s.sync.pin(r.slot);
        slots.push(r.slot);
      }
      const step = Math.min(left, r.gpa + r.size - gpa);
      gpa += step;
      left -= step;
    } while (left > 0);
  }
  return slots;
}

function unpinAll(s: WorkerSession, slots: readonly number[]): void {
  for (const slot of slots) s.sync.unpin(slot);
}

// ---- queues ---------------------------------------------------------------------------------------------------------

/** A queue hit a guest error (or a handler bug): it stops for good, the error eventfd fires, control is told. */
function failQueue(q: RunningQueue, err: unknown): void {
  queues.delete(q.key);
  countStat(q.stats, QueueStat.failures);
  if (err instanceof VirtioError) countStat(q.stats, QueueStat.malformed);
  q.queue.detach();
  closeHandler(q);
  try {
    if (q.errFd >= 0) native.eventfdWrite(q.errFd);
  } catch {
    // an err fd that cannot be written (not an eventfd, closed by the frontend): control is told below anyway
  }
  send({ type: 'queue-error', session: q.session.id, index: q.start.index, ...errorInfo(err) });
  if (q.stopRequest !== undefined) send({ type: 'queue-stopped', id: q.stopRequest, index: q.start.index, lastAvailIdx: -1 });
}

function closeHandler(q: RunningQueue): void {
  q.handler.close();
  for (const slots of q.inflight.values()) unpinAll(q.session, slots); // abandoned: the handler's thread is gone
  q.inflight.clear();
}

/** Starts a queue; returns where it resumed. */
function startQueue(s: WorkerSession, start: QueueStart): QueueStarted {
  if (s.device === undefined) throw new VhostError('VHOST_INTERNAL', `session ${s.id}: queue started before its device module loaded`);
  const key = queueKey(s.id, start.index);
  if (queues.has(key)) throw new VhostError('VHOST_INTERNAL', `session ${s.id}: queue ${start.index} is already running`);
  const queue = createDeviceQueue({ ...start, cacheViews: init.mode !== 'copy' });
  queue.attach(s.memory);
  // Logged from the first write on (a restored packed ring's descriptors included).
  queue.setDirtyLog(start.ringLog.enabled ? s.log : undefined, start.ringLog.usedAddr);
  // Resume where the driver's state says: avail from SET_VRING_BASE; split: used from the ring itself (as
  // libvhost-user and DPDK do), which is what the driver last saw; packed: used = avail (the ring was drained).
  queue.resume(start.lastAvailIdx);
  const resyncedFrom = start.resyncToUsed ? queue.resyncToUsed() : -1;
  // With an inflight region, the region says where to resume, repairs a half-published batch and lines up what was
  // in flight to be taken again first.
  const tracker =
    start.inflight !== undefined ? startQueueInflight(queue, start.inflight.buffer, start.inflight.geometry, start.index, start.lastAvailIdx) : undefined;
  const stats = queueStatsRow(s.attach.stats, start.index);
  const handler = s.device.createQueueHandler(s.attach.deviceOptions, { queueIndex: start.index, features: start.features, instance: s.id, stats });
  queues.set(key, {
    session: s,
    key,
    stats,
    start,
    queue,
    chain: queue.createChain(),
    handler,
    callFd: start.callFd,
    errFd: start.errFd,
    pending: true, // look at the ring at once: a kick may have come before we watched the fd
    armed: false,
    kicked: false,
    inflight: new Map(),
    stopRequest: undefined,
    producer: handler.producer,
    starved: false,
    starvedAvail: 0,
    tracker,
    pushed: 0,
    ringLog: start.ringLog,
    written: new WrittenBuffers(queue.size),
    trailer: handler.trailingStatusBytes ?? 0,
    loggingQueue: undefined,
  });
  return { index: start.index, base: queue.getBase(), resyncedFrom, ...(tracker !== undefined ? { inflight: tracker.recovered } : {}) };
}

/** Stops a queue once nothing is in flight; reports where it stopped. */
function finishStop(q: RunningQueue): void {
  if (q.stopRequest === undefined || q.inflight.size > 0) return;
  queues.delete(q.key);
  const lastAvailIdx = q.queue.getBase();
  q.queue.detach();
  try {
    // Everything it completed is durable before the stop is reported: a migration's destination reads it next.
    q.handler.flush?.();
  } catch (err) {
    send({ type: 'queue-error', session: q.session.id, index: q.start.index, ...errorInfo(err) });
  }
  closeHandler(q);
  send({ type: 'queue-stopped', id: q.stopRequest, index: q.start.index, lastAvailIdx });
}

/** The session a command names; unknown: the command fails (control attaches before anything else). */
function sessionOf(id: number): WorkerSession {
  const s = sessions.get(id);
  if (s === undefined) throw new VhostError('VHOST_INTERNAL', `session ${id} is not attached to worker ${me}`);
  return s;
}

function attachSession(id: number, cmdId: number, a: SessionAttach): void {
  if (sessions.has(id)) throw new VhostError('VHOST_INTERNAL', `session ${id} is already attached to worker ${me}`);
  const s: WorkerSession = {
    id,
    sync: new SyncBlock(pool, a.sync),
    memory: toTable(a.regions),
    memoryGen: a.gen,
    log: toLog(a.log),
    seenGen: a.gen,
    device: modules.get(a.deviceModule),
    attach: a,
  };
  sessions.set(id, s);
  s.sync.markSeen(me, a.gen);
  if (s.device !== undefined) {
    send({ type: 'ack', id: cmdId });
    return;
  }
  loading.push(
    import(a.deviceModule).then(
      (m: DeviceWorkerModule) => {
        modules.set(a.deviceModule, m);
        s.device = m;
        send({ type: 'ack', id: cmdId });
      },
      (err: unknown) => {
        sessions.delete(id);
        send({ type: 'failed', id: cmdId, ...errorInfo(err) });
      },
    ),
  );
}

/** Forgets a session: its queues stop here (requests in flight are abandoned: the frontend is gone). */
function detachSession(id: number): void {
  const s = sessions.get(id);
  if (s === undefined) return;
  for (const q of [...queues.values()]) {
    if (q.session !== s) continue;
    queues.delete(q.key);
    q.queue.detach();
    closeHandler(q);
    if (q.stopRequest !== undefined) send({ type: 'queue-stopped', id: q.stopRequest, index: q.start.index, lastAvailIdx: -1 });
  }
  sessions.delete(id);
  garbage = true;
}

function apply(cmd: WorkerCommand): void {
  try {
    switch (cmd.type) {
      case 'memory': {
        const s = sessions.get(cmd.session);
        if (s !== undefined) setMemory(s, cmd.gen, cmd.regions, cmd.log);
        break;
      }
      case 'attach':
        attachSession(cmd.session, cmd.id, cmd.attach);
        break;
      case 'detach':
        detachSession(cmd.session);
        send({ type: 'ack', id: cmd.id });
        break;
      case 'start-queue':
        send({ type: 'queue-started', id: cmd.id, ...startQueue(sessionOf(cmd.session), cmd.queue) });
        break;
      case 'set-call':
      case 'set-err': {
        const q = queues.get(queueKey(cmd.session, cmd.index));
        if (q !== undefined) {
          if (cmd.type === 'set-call') q.callFd = cmd.callFd;
          else q.errFd = cmd.errFd;
        }
        send({ type: 'ack', id: cmd.id });
        break;
      }
      case 'set-ring-log': {
        const q = queues.get(queueKey(cmd.session, cmd.index));
        if (q !== undefined) {
          q.ringLog = cmd.ringLog;
          applyRingLog(q);
        }
        send({ type: 'ack', id: cmd.id });
        break;
      }
      case 'announce': {
        const q = queues.get(queueKey(cmd.session, cmd.index));
        if (q === undefined) throw new VhostError('VHOST_QUEUE_NOT_RUNNING', `queue ${cmd.index} does not run: nothing to announce on`);
        q.handler.announce?.(cmd.mac);
        send({ type: 'ack', id: cmd.id });
        break;
      }
      case 'stop-queue': {
        const q = queues.get(queueKey(cmd.session, cmd.index));
        if (q === undefined) {
          send({ type: 'queue-stopped', id: cmd.id, index: cmd.index, lastAvailIdx: -1 });
          break;
        }
        // Requests in flight finish first: the frontend must get every completion before GET_VRING_BASE's reply.
        q.stopRequest = cmd.id;
        q.pending = false;
        finishStop(q);
        break;
      }
      case 'exit':
        for (const id of [...sessions.keys()]) detachSession(id);
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

/** Publishes pushed used elements and signals the driver if it asked for it. */
function publish(q: RunningQueue): void {
  // INFLIGHT_SHMFD: the batch is linked for recovery before used.idx is stored, and cleared after it.
  q.tracker?.prepareUsed();
  if (q.pushed >= KILL_BEFORE_PUBLISH) process.kill(process.pid, 'SIGKILL');
  q.queue.publishUsed();
  if (q.pushed >= KILL_AFTER_PUBLISH) process.kill(process.pid, 'SIGKILL');
  q.pushed = 0;
  q.tracker?.commitUsed();
  if (q.callFd >= 0 && q.queue.needsNotification()) native.eventfdWrite(q.callFd);
}

/**
 * Takes the next request into `q.chain`: first what the inflight region said was in flight at start (already marked
 * there), then the ring's next chain, marked in the region before it has any side effect. False when there is none.
 */
function nextChain(q: RunningQueue, memory: GuestMemory): boolean {
  const { chain } = q;
  if (!(q.tracker !== undefined ? q.tracker.next(memory, chain) : q.queue.popChain(memory, chain))) return false;
  if (q.inflight.has(chain.head)) {
    // The driver made a head available again while its request is still in flight (async I/O): a driver bug;
    // accepting it would lose the first request's pins. This also bounds requests in flight by the size.
    throw new VirtioError('VIRTIO_HEAD_IN_FLIGHT', `queue ${q.start.index}: descriptor ${chain.head} is already in flight`);
  }
  return true;
}

/**
 * Writes a completion to the used ring (published by `publish`), and records it in the inflight region. While the
 * session logs, the pages the device wrote into the request's buffers are logged first (after the data, before the
 * used element): from `chain` when it still holds the request (completed in the batch), else from its record.
 */
function complete(q: RunningQueue, head: number, len: number, chain: DescriptorChain | undefined): void {
  const log = q.session.log;
  if (log !== undefined) {
    if (chain !== undefined) logChainWritten(log, chain, len, q.trailer);
    else q.written.logUsed(log, head, len, q.trailer);
  }
  q.queue.pushUsed(head, len);
  q.tracker?.pushUsed(head);
  q.pushed++;
}

/**
 * Processes up to BATCH_LIMIT chains of one queue. Completions are written to the used ring as they finish and
 * published with one store of used.idx at the end of the batch (one signal at most per batch, and only if the
 * driver asked for it). With `rearm` (the default), leaves notifications enabled when the ring is empty, after the
 * re-check; without (busy-poll), leaves them off, and the caller must come back. In lock mode the whole batch runs
 * under the queue's lock, and the quiescent point is taken inside it.
 */
function processQueue(q: RunningQueue, rearm: boolean): void {
  if (q.stopRequest !== undefined) return;
  if (q.producer !== undefined) {
    produceQueue(q, q.producer, rearm);
    return;
  }
  const { queue, chain, handler } = q;
  const index = q.start.index;
  if (useLocks) {
    q.session.sync.lockQueue(index);
    quiescent();
  }
  try {
    if (queues.get(q.key) !== q) return; // failed by a table switch in quiescent()
    const memory = q.session.memory; // no quiescent point inside the batch: the table stays the same
    const stats = q.stats;
    queue.disableNotification();
    let handled = 0;
    for (let round = 1; ; round++) {
      while (handled < BATCH_LIMIT && nextChain(q, memory)) {
        countStat(stats, QueueStat.requests);
        const len = handler.process(memory, chain);
        if (len === PENDING) {
          // Logging may start before it completes: its buffers are logged then, from this record.
          q.written.record(chain);
          q.inflight.set(chain.head, pinChain(q.session, chain));
        } else {
          complete(q, chain.head, len, chain);
        }
        handled++;
      }
      handler.endBatch?.();
      publish(q);
      // Consume the kick only now, after the completions were published and signalled: any request it announced
      // is either processed above or seen by the re-check below, which comes after this read.
      if (q.kicked) {
        q.kicked = false;
        native.eventfdRead(q.start.kickFd);
      }
      if (handled >= BATCH_LIMIT || round >= BATCH_LIMIT) {
        // Come back after the other queues and the port had their turn. Rounds are bounded too: each re-check that
        // finds "more" takes a chain or fails (split-queue.ts enableNotification), but a turn must end whatever
        // the ring says.
        q.pending = true;
        return;
      }
      if (!rearm) break;
      // Re-enable notifications, then re-check: a request that raced in is processed now (its kick may not come).
      if (!queue.enableNotification()) break;
      queue.disableNotification();
    }
    q.pending = false;
    q.armed = rearm;
  } catch (err) {
    handler.endBatch?.(); // what the batch handed over before the error goes out (its pins wait for it)
    failQueue(q, err);
  } finally {
    if (useLocks) q.session.sync.unlockQueue(index);
  }
}

/**
 * The batch of a device-to-driver queue: up to BATCH_LIMIT units of input go into the driver's buffers, published
 * at the end. Notifications (kicks) stay off while the producer has input and buffers; they are re-enabled (and the
 * ring re-checked) only when it runs out of buffers, since then a kick is what tells that buffers came back.
 * With no input left they stay off: buffers the driver adds then are found when input comes.
 */
function produceQueue(q: RunningQueue, producer: QueueProducer, rearm: boolean): void {
  const { queue } = q;
  const index = q.start.index;
  if (useLocks) {
    q.session.sync.lockQueue(index);
    quiescent();
  }
  try {
    if (queues.get(q.key) !== q) return; // failed by a table switch in quiescent()
    const memory = q.session.memory;
    const log = q.session.log;
    // While the session logs, the producer's pops are recorded and its completions logged (LoggingQueue).
    const target = log === undefined ? queue : (q.loggingQueue ??= new LoggingQueue(queue, q.written, log, q.trailer)).use(log, q.trailer);
    queue.disableNotification();
    for (let round = 1; ; round++) {
      const result = producer.produce(memory, target, BATCH_LIMIT);
      publish(q);
      if (q.kicked) {
        q.kicked = false;
        native.eventfdRead(q.start.kickFd); // after the batch, as in processQueue: buffers it announced were seen
      }
      if (result === ProduceResult.BUDGET) {
        q.pending = true;
        return;
      }
      if (result === ProduceResult.IDLE) {
        q.starved = false;
        break;
      }
      // STARVED: the ring may still hold some chains (too few for the frame): wait until the driver adds more, told
      // by a kick or (busy-poll, where kicks stay off) by busyPoll seeing avail.idx move.
      q.starved = true;
      q.starvedAvail = queue.seenAvailIdx;
      if (!rearm) break;
      if (round >= BATCH_LIMIT) {
        // A driver that keeps adding one buffer too few per re-check: the turn ends, the next one goes on.
        q.pending = true;
        return;
      }
      // Ask for a kick when buffers come, then re-check: buffers that raced in are used now.
      if (!queue.enableNotification(q.starvedAvail)) break;
      queue.disableNotification();
      q.starved = false;
    }
    q.pending = false;
    q.armed = rearm;
  } catch (err) {
    failQueue(q, err);
  } finally {
    if (useLocks) q.session.sync.unlockQueue(index);
  }
}

/** Whether a queue has work now without waiting: kicked, over its batch limit, or a producer with input and room. */
function hasWork(q: RunningQueue): boolean {
  return q.pending || (q.producer !== undefined && !q.starved && q.stopRequest === undefined && q.producer.hasInput());
}

/**
 * The optional busy-poll (`--busy-poll US`, PoolOptions.busyPollUs; default 0 = off): before going idle, watch the
 * rings (one Atomics.load of avail.idx each) for up to that long, with notifications still off, so a driver that
 * sends its next requests within the window neither kicks nor waits for this thread to wake up. Every round is a
 * quiescent point (no guest memory is referenced between rounds), so a memory change is never held up by it. Every
 * BUSY_POLL_FDS_EVERY rounds a poll(0) collects commands, completions and port input (a TAP's fd: its frames are
 * seen only by reading it). Returns whether a ring got work.
 */
const BUSY_POLL_FDS_EVERY = 256;

function busyPoll(): boolean {
  const deadline = performance.now() + BUSY_POLL_MS;
  let rounds = 0;
  do {
    quiescent();
    let found = false;
    if (++rounds % BUSY_POLL_FDS_EVERY === 0) {
      const n = buildPollSet();
      if (native.poll(pollSet(n), revents, 0) > 0) dispatchReady(n);
      if (loading.length > 0) return true; // a command needs the main loop (a device module to load)
      for (const q of queues.values()) if (hasWork(q)) found = true;
    }
    for (const q of queues.values()) {
      if (q.stopRequest !== undefined || q.armed) continue;
      try {
        // A producer has work only with input as well as buffers; a starved one only once the driver added some.
        const work =
          q.producer === undefined
            ? q.queue.hasAvailable()
            : q.starved
              ? q.queue.availableSince(q.starvedAvail)
              : q.queue.hasAvailable() && q.producer.hasInput();
        if (work) {
          q.pending = true;
          q.starved = false;
          found = true;
        }
      } catch (err) {
        failQueue(q, err);
      }
    }
    if (found) return true;
    // The clock every 32 rounds: reading it costs as much as a round of looking at the rings.
  } while ((rounds & 31) !== 0 || performance.now() < deadline);
  return false;
}

/** Collects the requests a handler finished in another thread, then releases their pins. */
function reapQueue(q: RunningQueue): void {
  const index = q.start.index;
  if (useLocks) {
    q.session.sync.lockQueue(index);
    quiescent();
  }
  try {
    if (queues.get(q.key) !== q) return;
    const released: number[][] = [];
    q.handler.reap?.((head, len) => {
      const slots = q.inflight.get(head);
      if (slots === undefined) return;
      q.inflight.delete(head);
      complete(q, head, len, undefined);
      released.push(slots);
    });
    publish(q);
    // The other thread is done with these buffers (reap's contract) and the completions are published: drop the
    // pins now, so a removal that waited for them is acknowledged after the driver can see the completions.
    for (const slots of released) unpinAll(q.session, slots);
    finishStop(q);
  } catch (err) {
    failQueue(q, err);
  } finally {
    if (useLocks) q.session.sync.unlockQueue(index);
  }
}

// ---- the loop -------------------------------------------------------------------------------------------------------

/** poll set capacity: the control eventfd, then per queue its kick, its producer's input and its completion fd. */
let pollCapacity = 0;
let pollFds = new Int32Array(0);
let revents = new Int32Array(0);
/** For poll slot i: the queue, and what the fd is: 1 its kick, 2 its producer's input, 0 its completion fd. */
let pollQueues: (RunningQueue | undefined)[] = [];
let pollIsKick = new Uint8Array(0);
/** `pollFds` views by length, made once each (poll takes the set as a typed array). */
let pollViews: Int32Array[] = [];

/** Grows the poll set's arrays to hold every running queue (allocates only when queues are added). */
function reservePollSet(): void {
  const need = 1 + 3 * queues.size;
  if (need <= pollCapacity) return;
  pollCapacity = Math.max(need, 2 * pollCapacity, 16);
  pollFds = new Int32Array(pollCapacity);
  revents = new Int32Array(pollCapacity);
  pollQueues = new Array<RunningQueue | undefined>(pollCapacity);
  pollIsKick = new Uint8Array(pollCapacity);
  pollViews = [];
}

function pollSet(n: number): Int32Array {
  return (pollViews[n] ??= pollFds.subarray(0, n));
}
/** Set by buildPollSet: some queue already has work. */
let anyPending = false;
/** The size of the last poll set built (its slots past a smaller new set are cleared: no stale queue is kept). */
let lastPollSize = 1;

/** Fills the poll set; returns its size and sets `anyPending`. */
function buildPollSet(): number {
  reservePollSet();
  let n = 1;
  pollFds[0] = init.controlFd;
  anyPending = false;
  for (const q of queues.values()) {
    if (q.stopRequest === undefined) {
      pollFds[n] = q.start.kickFd;
      pollQueues[n] = q;
      pollIsKick[n] = 1;
      n++;
      const input = q.producer?.inputFd;
      if (input !== undefined && !q.starved) {
        pollFds[n] = input;
        pollQueues[n] = q;
        pollIsKick[n] = 2;
        n++;
      }
    }
    const cfd = q.handler.completionFd;
    if (cfd !== undefined && q.inflight.size > 0) {
      pollFds[n] = cfd;
      pollQueues[n] = q;
      pollIsKick[n] = 0;
      n++;
    }
    anyPending ||= hasWork(q);
  }
  // A stopped or detached queue must not stay reachable from a slot (it holds views of its session's memory).
  pollQueues.fill(undefined, n, lastPollSize);
  lastPollSize = n;
  return n;
}

/** Handles what poll reported: commands first, then kicks (marking queues pending) and completions. */
function dispatchReady(n: number): void {
  if ((revents[0] ?? 0) !== 0) {
    native.eventfdRead(init.controlFd);
    drainCommands();
  }
  for (let i = 1; i < n; i++) {
    const q = pollQueues[i] as RunningQueue;
    pollQueues[i] = undefined;
    const ev = revents[i] ?? 0;
    if (ev === 0 || queues.get(q.key) !== q) continue;
    if (ev & (native.POLLNVAL | native.POLLERR)) {
      failQueue(q, new VhostError('VHOST_FD_INVALID', `an eventfd of queue ${q.start.index} failed (revents ${ev})`));
      continue;
    }
    if (pollIsKick[i] === 1) {
      q.kicked = true; // read after the batch: the syscall is then off the path from kick to completion
      q.pending = true;
      q.starved = false;
    } else if (pollIsKick[i] === 2) {
      q.pending = true; // the producer reads its input fd itself
    } else {
      native.eventfdRead(q.handler.completionFd ?? -1);
      reapQueue(q);
    }
  }
}

/** While work is waiting, poll(0) for kicks and commands once per this many rounds of the loop. */
const POLL_EVERY = 16;
let busyRounds = 0;

/** When this worker last left poll(-1): the time since is busy time (PoolBlock.addBusy). */
let awakeSince = performance.now();

/**
 * One round of the loop, up to the decision to sleep: runs the queues with work, then either collects kicks and
 * commands without sleeping (and returns -1) or returns the size of the poll set to sleep on. A function of its own
 * so that no local of it (a queue, a chain) outlives the round in a frame: `collectGarbage` runs outside it.
 */
function round(): number {
  if (!useLocks) quiescent();
  // Map iteration tolerates queues failed (deleted) or started (added) by what runs inside.
  for (const q of queues.values()) if (hasWork(q)) processQueue(q, BUSY_POLL_MS === 0);
  if (BUSY_POLL_MS > 0) {
    let idle = true;
    for (const q of queues.values()) if (hasWork(q)) idle = false;
    // Nothing came within the window: re-enable notifications and re-check every ring before poll() may sleep.
    // (When work came, the poll below does not sleep: it only collects commands and kicks.)
    if (idle && !busyPoll()) for (const q of queues.values()) if (!q.armed || q.pending) processQueue(q, true);
  }
  const n = buildPollSet();
  if (!anyPending) return n;
  // Work is waiting: collect kicks and commands without sleeping, but only every POLL_EVERY rounds while busy: a
  // syscall per round costs as much as the work of a short batch (a producer kept short of buffers, a busy-poll).
  // Memory changes do not wait for it (quiescent() loads the epoch every round), other commands and kicks at most
  // POLL_EVERY rounds.
  if (++busyRounds % POLL_EVERY === 0) {
    native.poll(pollSet(n), revents, 0);
    dispatchReady(n);
  }
  return -1;
}

/** Sleeps in poll() on a set of `n` fds, as an idle worker, and handles what woke it. */
function sleep(n: number): void {
  // Every queue's notifications are enabled and its ring was re-checked empty. From the store of idle = 1 until
  // the store of idle = 0 this worker touches no guest memory; a kick in between stays counted in its eventfd.
  pool.addBusy(me, performance.now() - awakeSince);
  pool.setIdle(me, true);
  native.poll(pollSet(n), revents, -1);
  pool.setIdle(me, false);
  awakeSince = performance.now();
  // Next: the quiescent point (load epoch, then gen) before anything below touches guest memory.
  if (!useLocks) quiescent();
  dispatchReady(n);
}

send({ type: 'ready' });
while (running) {
  if (loading.length > 0) {
    // A session's device module is loading: wait for it as an idle worker (no guest memory is referenced here).
    pool.setIdle(me, true);
    await Promise.all(loading.splice(0));
    pool.setIdle(me, false);
  }
  const n = round();
  // Commands taken during the round (busyPoll's poll(0)) may have started a device module's load: await it first.
  if (n < 0 || loading.length > 0) continue;
  if (garbage) {
    garbage = false;
    collectGarbage(); // a detached session's memory: see collectGarbage
  }
  sleep(n);
}
pool.addBusy(me, performance.now() - awakeSince);
pool.setIdle(me, true);
port.close();
