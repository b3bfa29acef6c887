// Fairness (CVE-2019-3900, unbounded work): a queue whose driver re-adds requests as fast as they complete (a thread
// keeps avail.idx one full ring ahead of used.idx) must not starve the other queue on the same worker, the control
// thread, or a memory-table change. The worker handles at most BATCH_LIMIT (256) chains of a queue before it looks
// at its other queues and its port, and takes the quiescent point between batches (docs/memory-sync.md), so each of
// these completes within a bound while the busy queue keeps completing tens of thousands of requests.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import { setTimeout as sleep } from 'node:timers/promises';
import type { SyncMode } from '../../src/backend/sync-block.js';
import { VhostUserFrontend } from '../../src/frontend/frontend.js';
import { GuestRam } from '../../src/frontend/guest-ram.js';
import { VirtioFeature, featureBit } from '../../src/protocol/constants.js';
import { bugLines, blkSlot, collect, leftOver, settledBaseline, startServer, submit } from './backend-harness.js';
import { budgetMs } from './config.js';
import type { SpinnerInit } from './ring-spinner.js';
import { splitDriver } from '../helpers/split-driver.js';

const BUSY_SIZE = 256;
/** Bounds on a loaded 2-core machine; the usual values are a few ms (printed as diagnostics). */
const REQUEST_BOUND_MS = 2000;
const MAP_CHANGE_BOUND_MS = 3000;

async function fairness(sync: SyncMode, ms: number): Promise<string> {
  const backend = startServer({ queues: 2, workers: 1, sync, maxQueueSize: 1024 });
  const ram = GuestRam.create(4 * 1024 * 1024);
  const fe = await VhostUserFrontend.connect(backend.socketPath, { timeoutMs: 20_000 });
  const control = new SharedArrayBuffer(12);
  const flags = new Int32Array(control);
  let spinner: Worker | undefined;
  let spinnerExit: Promise<number> | undefined;
  try {
    await fe.start({ features: featureBit(VirtioFeature.VERSION_1), queues: [{ index: 0, size: BUSY_SIZE }, { index: 1, size: 16 }], memory: ram });
    const busy = fe.queue(0);
    const other = fe.queue(1);
    // The busy ring: descriptors 0 -> 1 are a FLUSH request, every avail slot offers head 0.
    const slot = blkSlot(ram);
    splitDriver(busy).writeDescriptor(0, { addr: slot.header, len: 16, flags: 1, next: 1 });
    splitDriver(busy).writeDescriptor(1, { addr: slot.status, len: 1, flags: 2, next: 0 });
    for (let i = 0; i < BUSY_SIZE; i++) splitDriver(busy).pushAvailRaw(0);
    const l = busy.layout;
    const region = ram.findRegion(l.availAddr);
    assert.ok(region !== undefined);
    const init: SpinnerInit = {
      buffer: region.buffer,
      availIdx: l.availAddr + 2 - region.gpa,
      usedFlags: l.usedAddr - region.gpa,
      usedIdx: l.usedAddr + 2 - region.gpa,
      size: BUSY_SIZE,
      kickFd: busy.kickFd,
      control,
    };
    spinner = new Worker(new URL('./ring-spinner.js', import.meta.url), { workerData: init });
    spinnerExit = new Promise((resolve) => spinner?.once('exit', resolve));
    for (let i = 0; i < 500 && Atomics.load(flags, 1) < 10 * BUSY_SIZE; i++) await sleep(10);
    assert.ok(Atomics.load(flags, 1) >= 10 * BUSY_SIZE, 'the busy queue is running');

    const requestMs: number[] = [];
    const statusMs: number[] = [];
    const mapMs: number[] = [];
    const otherSlot = blkSlot(ram);
    const deadline = Date.now() + ms;
    let round = 0;
    do {
      // A request on the other queue of the same worker.
      let t0 = performance.now();
      assert.ok(submit(ram, other, otherSlot, round) >= 0);
      const done = await collect(other, 1, REQUEST_BOUND_MS * 2);
      requestMs.push(performance.now() - t0);
      assert.deepEqual(done, [round], 'the other queue completed its request');
      assert.equal(ram.bytes(otherSlot.status, 1)[0], 0, 'status OK');
      // The control thread answers.
      t0 = performance.now();
      assert.equal((await fe.getStatus()) & 0x40, 0, 'no NEEDS_RESET');
      statusMs.push(performance.now() - t0);
      // A memory-table change: the worker must pass a quiescent point (or release its queue lock) between batches.
      if (round % 3 === 0) {
        const hot = ram.addRegion({ gpa: 0x1_0000_0000 + 0x1000_0000 * (round % 2), size: 1024 * 1024 });
        t0 = performance.now();
        await fe.addMemoryRegion(hot);
        await fe.removeMemoryRegion(hot);
        mapMs.push(performance.now() - t0);
        ram.removeRegion(hot);
      }
      round++;
    } while (Date.now() < deadline);
    const completions = Atomics.load(flags, 1);
    Atomics.store(flags, 0, 1);
    await spinnerExit;
    spinner = undefined;
    const max = (xs: number[]): number => Math.max(...xs);
    const p50 = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;
    assert.ok(max(requestMs) < REQUEST_BOUND_MS, `a request on the other queue took ${max(requestMs).toFixed(0)} ms`);
    assert.ok(max(statusMs) < REQUEST_BOUND_MS, `GET_STATUS took ${max(statusMs).toFixed(0)} ms`);
    assert.ok(max(mapMs) < MAP_CHANGE_BOUND_MS, `ADD_MEM_REG + REM_MEM_REG took ${max(mapMs).toFixed(0)} ms`);
    assert.equal(bugLines(backend.lines).length, 0);
    // The busy queue stops cleanly once its driver does.
    await fe.stopQueue(0);
    return (
      `${sync}: busy-queue completions=${completions} rounds=${round} other-queue p50/max=${p50(requestMs).toFixed(1)}/${max(requestMs).toFixed(1)} ms ` +
      `GET_STATUS p50/max=${p50(statusMs).toFixed(1)}/${max(statusMs).toFixed(1)} ms ` +
      `ADD+REM_MEM_REG p50/max=${p50(mapMs).toFixed(1)}/${max(mapMs).toFixed(1)} ms`
    );
  } finally {
    Atomics.store(flags, 0, 1);
    if (spinnerExit !== undefined) await spinnerExit;
    fe.close();
    ram.close();
    await backend.close();
  }
}

for (const sync of ['qsbr', 'lock', 'copy'] as const) {
  test(`--sync ${sync}: a queue with endless work does not starve the other queue, the control thread or a memory change`, { timeout: 120_000 }, async (t) => {
    const baseline = await settledBaseline();
    t.diagnostic(await fairness(sync, Math.max(1000, budgetMs('fairness') / 3)));
    // Checked here, once fairness() has returned: its locals (the rings' buffers) are garbage only then.
    const left = await leftOver(baseline);
    assert.equal(left, undefined, `resources left over: ${JSON.stringify(left)}`);
  });
}
