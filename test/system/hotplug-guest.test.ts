// Live guest-memory changes with a real QEMU + Linux guest and our backend (started through the real CLI): a
// memfd pc-dimm is hot-plugged and unplugged over QMP while the guest keeps /dev/vda busy with O_DIRECT I/O
// (test/guest/hotplug.sh), once with ADD_MEM_REG/REM_MEM_REG (CONFIGURE_MEM_SLOTS) and once with whole tables
// (SET_MEM_TABLE); and a 3 GiB guest, whose RAM QEMU hands over as two regions of one memfd. What QEMU sends,
// and when: /work/shared/guest/README.md "Memory hotplug with a live vhost-user device"; what the backend must do:
// docs/memory-sync.md.
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { test, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import assert from 'node:assert/strict';
import { startBackend, type BackendProcess } from '../helpers/backend.js';
import { GUEST_TOOLS, guestScript, startGuest, type GuestResult, type RunningGuest } from '../helpers/guest.js';
import { GUEST_PATTERN_TEXT, HOST_PATTERN_TEXT, md5, pattern, result } from '../helpers/patterns.js';
import { QmpClient } from '../helpers/qmp.js';
import { requireTools } from '../helpers/require-tool.js';
import { testTempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const TIMEOUT = { timeout: 5 * 60_000 };
const DIMM_SIZE = 256 * MiB;
/** Where QEMU puts the first DIMM of a 512 MiB q35 guest (above the 4 GiB boundary). */
const DIMM_GPA = 4 * GiB;

// The layout hotplug.sh writes (its header comment): pattern A by the I/O checks, B by the loop, the final one last.
const PAT_A = { text: 'vhost-user hotplug pattern A 0123456789', offset: 1 * MiB, size: 4 * MiB };
const PAT_B = { text: 'vhost-user hotplug pattern B abcdefghij', offset: 16 * MiB, size: 2 * MiB };
const FINAL = { text: 'vhost-user hotplug final pattern 9876543210', offset: 32 * MiB, size: 4 * MiB };

// ------------------------------------------------------------------------------------------ helpers

interface Region {
  readonly gpa: number;
  readonly size: number;
}

interface TableLog {
  readonly gen: number;
  readonly regions: readonly Region[];
}

/** The backend's 'memory table' log entries (gen, regions sorted by gpa), oldest first. */
function memoryTables(backend: BackendProcess): TableLog[] {
  return backend
    .logs()
    .filter((l) => l.msg === 'memory table')
    .map((l) => ({
      gen: l.gen as number,
      regions: [...(l.regions as Region[])].map(({ gpa, size }) => ({ gpa, size })).sort((a, b) => a.gpa - b.gpa),
    }));
}

const fmt = (regions: readonly Region[]): string =>
  regions.map((r) => `0x${r.gpa.toString(16)}+${r.size / MiB}M`).join(' ') || '(empty)';

/** A shared mapping of a memfd in a process, from /proc/PID/smaps. */
interface MemfdMapping {
  readonly start: string;
  readonly size: number;
  /** File offset of the mapping. */
  readonly offset: number;
  readonly inode: string;
  /** Resident pages of this mapping in this process, i.e. pages the process has touched. */
  readonly rssKiB: number;
}

/** The mappings of memfds of at least 64 MiB (guest RAM) in process pid. */
async function memfdMappings(pid: number): Promise<MemfdMapping[]> {
  const text = await readFile(`/proc/${pid}/smaps`, 'utf8');
  const out: MemfdMapping[] = [];
  let current: { start: string; size: number; offset: number; inode: string; rssKiB: number } | undefined;
  for (const line of text.split('\n')) {
    const head = /^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ (\d+)\s+(.*)$/.exec(line);
    if (head !== null) {
      const [, start = '', end = '', offset = '', inode = '', path = ''] = head;
      const size = Number(BigInt(`0x${end}`) - BigInt(`0x${start}`));
      current = path.startsWith('/memfd:') && size >= 64 * MiB ? { start, size, offset: parseInt(offset, 16), inode, rssKiB: 0 } : undefined;
      if (current !== undefined) out.push(current);
      continue;
    }
    const rss = /^Rss:\s+(\d+) kB/.exec(line);
    if (rss !== null && current !== undefined) current.rssKiB = Number(rss[1]);
  }
  return out;
}

const fmtMaps = (maps: readonly MemfdMapping[]): string =>
  maps.map((m) => `${m.start} ${m.size / MiB}M off=0x${m.offset.toString(16)} ino=${m.inode} rss=${m.rssKiB}k`).join('; ') ||
  '(none)';

/** What to show when a step fails: the backend's warnings, its memory tables, and the end of the console. */
function context(backend: BackendProcess, serial: string): string {
  const logs = backend.logs();
  const bad = logs.filter((l) => (l.level as number) >= 40).map((l) => JSON.stringify(l));
  const tables = memoryTables(backend).map((tb) => `gen ${tb.gen}: ${fmt(tb.regions)}`);
  const lastLogs = logs.slice(-15).map((l) => JSON.stringify(l));
  return [
    `--- backend warnings/errors:\n${bad.join('\n') || '(none)'}`,
    `--- backend memory tables:\n${tables.join('\n') || '(none)'}`,
    `--- last backend log lines:\n${lastLogs.join('\n')}`,
    `--- console tail:\n${serial.split('\n').slice(-40).join('\n')}`,
  ].join('\n');
}

/** Rejects once the backend has logged an error (a queue that needs a reset: the guest's I/O would hang). */
async function backendError(backend: BackendProcess, signal: AbortSignal): Promise<never> {
  for (;;) {
    const err = backend.logs().find((l) => (l.level as number) >= 50);
    if (err !== undefined) throw new Error(`the backend logged an error: ${JSON.stringify(err)}`);
    await sleep(500, undefined, { signal });
  }
}

/**
 * Runs one step of a scenario; it fails early if the backend logs an error meanwhile, and a failure carries the
 * context (which step, the backend's log, the console) in its message.
 */
async function step<T>(name: string, backend: BackendProcess, guest: RunningGuest, fn: () => Promise<T>): Promise<T> {
  const stopWatching = new AbortController();
  const watch = backendError(backend, stopWatching.signal);
  watch.catch(() => undefined);
  try {
    return await Promise.race([fn(), watch]);
  } catch (err) {
    throw new Error(`step "${name}" failed: ${err instanceof Error ? err.message : String(err)}\n${context(backend, guest.serial())}`, {
      cause: err,
    });
  } finally {
    stopWatching.abort();
  }
}

interface HotplugRun {
  readonly backend: BackendProcess;
  readonly r: GuestResult;
  readonly image: string;
  /** The backend's guest-RAM mappings before the plug, while the DIMM is plugged, and after the unplug. */
  readonly maps: { readonly before: MemfdMapping[]; readonly plugged: MemfdMapping[]; readonly after: MemfdMapping[] };
  readonly ms: Record<string, number>;
}

/**
 * Our backend with backendArgs serves a 64 MiB image to a 512 MiB guest (slots=4, maxmem=2G) that runs hotplug.sh;
 * the host plugs a 256 MiB memfd DIMM when the guest is ready, and unplugs it (device_del, DEVICE_DELETED,
 * object-del) once the guest has onlined it and done I/O through it.
 */
async function runHotplug(t: TestContext, backendArgs: readonly string[]): Promise<HotplugRun> {
  const dir = await testTempDir(t);
  const image = dir.join('disk.img');
  await writeFile(image, '');
  await truncate(image, 64 * MiB);
  const backend = await startBackend({ socketPath: dir.join('blk.sock'), args: ['--image', image, ...backendArgs] });
  t.after(() => backend.stop());
  const t0 = Date.now();
  const ms: Record<string, number> = {};
  const guest = await startGuest({
    blk: [{ socketPath: backend.socketPath }],
    script: { file: guestScript('hotplug.sh') },
    env: { PAT_A_TEXT: PAT_A.text, PAT_B_TEXT: PAT_B.text, FINAL_TEXT: FINAL.text, HOTPLUG_TIMEOUT: '30' },
    memory: { size: '512M', slots: 4, maxmem: '2G' },
    serialLog: dir.join('serial.log'),
    timeoutMs: 120_000,
    signal: t.signal,
  });
  t.after(() => guest.kill());
  const s = <T>(name: string, fn: () => Promise<T>): Promise<T> => step(name, backend, guest, fn);

  await s('boot until ready-for-plug', () => guest.waitForMarker('GUEST-MARK: ready-for-plug', 60_000));
  ms.boot = Date.now() - t0;
  const before = await memfdMappings(backend.pid);
  const q = await QmpClient.connect(guest.qmpSocket, { timeoutMs: 20_000 });
  let plugged: MemfdMapping[];
  try {
    await s('object-add + device_add pc-dimm', async () => {
      await q.execute('object-add', { 'qom-type': 'memory-backend-memfd', id: 'hmem1', size: DIMM_SIZE, share: true });
      await q.execute('device_add', { driver: 'pc-dimm', id: 'dimm1', memdev: 'hmem1' });
    });
    const tPlug = Date.now();
    await s('guest onlines the DIMM and does I/O (ready-for-unplug)', () => guest.waitForMarker('GUEST-MARK: ready-for-unplug', 30_000));
    ms.plugged = Date.now() - tPlug;
    plugged = await memfdMappings(backend.pid);
    const tUnplug = Date.now();
    await s('device_del until DEVICE_DELETED', async () => {
      await q.execute('device_del', { id: 'dimm1' });
      await q.waitForEvent('DEVICE_DELETED', { timeoutMs: 30_000, match: (d) => d.device === 'dimm1' });
    });
    ms.unplug = Date.now() - tUnplug;
    await s('object-del', () => q.execute('object-del', { id: 'hmem1' }));
    assert.deepEqual(await q.execute('query-memory-devices'), [], 'no memory device left');
  } finally {
    q.close();
  }
  const after = await memfdMappings(backend.pid);
  const tEnd = Date.now();
  const r = await s('guest I/O after the unplug, until GUEST-EXIT', () => guest.done);
  ms.afterUnplug = Date.now() - tEnd;
  ms.total = Date.now() - t0;
  t.diagnostic(`timings (ms): ${JSON.stringify(ms)}; ${result(r.results, 'background-io', 'iterations')} loop iterations`);
  return { backend, r, image, maps: { before, plugged, after }, ms };
}

/** The checks both hotplug tests make. */
async function checkHotplug(run: HotplugRun): Promise<void> {
  const { backend, r, maps } = run;
  const ctx = (): string => context(backend, r.serial);
  // The guest: every I/O check passed and the loop ran through the plug and the unplug without an error.
  assert.equal(r.exitCode, 0, ctx());
  assert.ok(r.results.includes('PASS'), ctx());
  assert.equal(result(r.results, 'plugged', 'onlined'), String(DIMM_SIZE / (128 * MiB)), 'the guest onlined the DIMM');
  assert.equal(result(r.results, 'background-io', 'errors'), '0', ctx());
  const iterations = Number(result(r.results, 'background-io', 'iterations'));
  assert.ok(iterations > 0, `background loop iterations: ${iterations}`);
  const bgPlugged = Number(result(r.results, 'plugged', 'bg'));
  const bgReady = Number(/\bbg=(\d+)/.exec(r.serial.split('\n').find((l) => l.startsWith('GUEST-MARK: ready-for-unplug')) ?? '')?.[1]);
  assert.ok(bgReady > bgPlugged, `the loop made progress while the DIMM was online (${bgPlugged} -> ${bgReady})`);

  // The backend's memory tables: the base RAM, then the DIMM added at 4 GiB, then removed again.
  const base: Region = { gpa: 0, size: 512 * MiB };
  const dimm: Region = { gpa: DIMM_GPA, size: DIMM_SIZE };
  const tables = memoryTables(backend);
  const gens = tables.map((tb) => tb.gen);
  assert.deepEqual(gens, [...gens].sort((a, b) => a - b), 'generations increase');
  assert.equal(new Set(gens).size, gens.length, 'generations are unique');
  const distinct = tables.map((tb) => fmt(tb.regions)).filter((x, i, all) => i === 0 || all[i - 1] !== x);
  assert.deepEqual(distinct, [fmt([base]), fmt([base, dimm]), fmt([base])], `memory tables:\n${ctx()}`);

  // The backend's mappings: the base RAM stays mapped at the same address through both changes; the DIMM's memfd
  // is mapped while plugged (and the backend touched it: the guest's I/O buffers were in it), and gone afterwards.
  const baseBefore = maps.before.filter((m) => m.size === 512 * MiB);
  assert.equal(maps.before.length, 1, `before the plug: ${fmtMaps(maps.before)}`);
  assert.equal(baseBefore.length, 1, `before the plug: ${fmtMaps(maps.before)}`);
  const baseMap = baseBefore[0] as MemfdMapping;
  const same = (m: MemfdMapping): boolean => m.start === baseMap.start && m.inode === baseMap.inode && m.size === baseMap.size;
  assert.equal(maps.plugged.length, 2, `while plugged: ${fmtMaps(maps.plugged)}`);
  assert.ok(maps.plugged.some(same), `the base RAM kept its mapping while plugged: ${fmtMaps(maps.before)} -> ${fmtMaps(maps.plugged)}`);
  const dimmMap = maps.plugged.find((m) => !same(m));
  assert.ok(dimmMap !== undefined && dimmMap.size === DIMM_SIZE && dimmMap.offset === 0, fmtMaps(maps.plugged));
  assert.notEqual(dimmMap.inode, baseMap.inode, 'the DIMM is another memfd');
  assert.ok(dimmMap.rssKiB > 0, `the backend did I/O through the DIMM: ${fmtMaps(maps.plugged)}`);
  assert.equal(maps.after.length, 1, `after the unplug: ${fmtMaps(maps.after)}`);
  assert.ok(same(maps.after[0] as MemfdMapping), `the base RAM kept its mapping: ${fmtMaps(maps.before)} -> ${fmtMaps(maps.after)}`);

  assert.ok(backend.logs().some((l) => l.msg === 'frontend disconnected'), 'the guest left');
  assert.deepEqual(backend.logs().filter((l) => (l.level as number) >= 40), [], 'no warnings or errors');
  assert.equal(await backend.stop(), 0, 'SIGTERM: exit code 0');

  // The image holds what the guest wrote, and nothing else.
  const data = await readFile(run.image);
  assert.equal(data.length, 64 * MiB);
  let end = 0;
  for (const p of [PAT_A, PAT_B, FINAL]) {
    assert.ok(data.subarray(end, p.offset).every((b) => b === 0), `zeros before ${p.text}`);
    assert.equal(md5(data.subarray(p.offset, p.offset + p.size)), md5(pattern(p.text, p.size)), `the image holds "${p.text}"`);
    end = p.offset + p.size;
  }
  assert.ok(data.subarray(end).every((b) => b === 0), 'nothing written past the final pattern');
  assert.equal(result(r.results, 'final-pattern', 'readback'), md5(pattern(FINAL.text, FINAL.size)));
}

/** The vhost-user requests the backend received (its debug 'message' log lines). */
function requests(backend: BackendProcess): Set<string> {
  return new Set(backend.logs().filter((l) => l.msg === 'message').map((l) => l.request as string));
}

// ------------------------------------------------------------------------------------------ tests

test('memory hotplug and unplug during guest I/O: ADD_MEM_REG/REM_MEM_REG, async I/O (pins)', TIMEOUT, async (t) => {
  if (!requireTools(t, GUEST_TOOLS)) return;
  const run = await runHotplug(t, ['--io', 'async']);
  const got = requests(run.backend);
  assert.ok(got.has('ADD_MEM_REG') && got.has('REM_MEM_REG'), `requests: ${[...got].join(' ')}`);
  assert.ok(!got.has('SET_MEM_TABLE'), 'CONFIGURE_MEM_SLOTS: QEMU never sends SET_MEM_TABLE');
  await checkHotplug(run);
});

test('memory hotplug and unplug during guest I/O: whole tables (--mem-slots 0), --sync lock', TIMEOUT, async (t) => {
  if (!requireTools(t, GUEST_TOOLS)) return;
  const run = await runHotplug(t, ['--mem-slots', '0', '--sync', 'lock']);
  const got = requests(run.backend);
  assert.ok(got.has('SET_MEM_TABLE'), `requests: ${[...got].join(' ')}`);
  assert.ok(!got.has('ADD_MEM_REG') && !got.has('REM_MEM_REG'), `requests: ${[...got].join(' ')}`);
  // QEMU re-sends the unchanged table on every device start (SeaBIOS, then Linux), then one with the DIMM, then
  // one without: at least 4 tables, each published, and none of them remapped the base RAM (checked below).
  const tables = memoryTables(run.backend);
  assert.ok(tables.length >= 4, `memory tables: ${tables.map((tb) => fmt(tb.regions)).join(' | ')}`);
  await checkHotplug(run);
});

test('a 3 GiB guest: two regions of one memfd (the second at mmap offset 2 GiB), --sync copy', TIMEOUT, async (t) => {
  if (!requireTools(t, GUEST_TOOLS)) return;
  const dir = await testTempDir(t);
  const image = dir.join('disk.img');
  const hostPattern = pattern(HOST_PATTERN_TEXT, MiB);
  const guestPattern = pattern(GUEST_PATTERN_TEXT, 4 * MiB);
  await writeFile(image, hostPattern);
  await truncate(image, 64 * MiB);
  const backend = await startBackend({ socketPath: dir.join('blk.sock'), args: ['--image', image, '--sync', 'copy'] });
  t.after(() => backend.stop());
  const t0 = Date.now();
  const guest = await startGuest({
    blk: [{ socketPath: backend.socketPath }],
    files: [{ file: guestScript('blk-pattern.sh') }],
    // The marker lets the host look at the backend's mappings while the guest still runs (the pattern test takes
    // over a second under TCG; the pause only adds margin).
    script: 'echo "GUEST-MARK: running"; sleep 0.5; sh /guest/blk-pattern.sh',
    memory: { size: '3G' },
    serialLog: dir.join('serial.log'),
    signal: t.signal,
  });
  t.after(() => guest.kill());
  await step('boot until running', backend, guest, () => guest.waitForMarker('GUEST-MARK: running', 60_000));
  const maps = await memfdMappings(backend.pid);
  const r = await step('blk-pattern.sh until GUEST-EXIT', backend, guest, () => guest.done);
  t.diagnostic(`guest: ${Date.now() - t0} ms`);
  const ctx = (): string => context(backend, r.serial);
  assert.equal(r.exitCode, 0, ctx());
  assert.ok(r.results.includes('PASS'), ctx());
  assert.equal(result(r.results, 'host-pattern', 'md5'), md5(hostPattern), 'the guest read the host pattern');
  assert.equal(result(r.results, 'guest-pattern readback', 'md5'), md5(guestPattern));

  // q35 puts 2 GiB below 4 GiB and the rest at 4 GiB; QEMU sends both as regions of the one RAM memfd.
  const tables = memoryTables(backend);
  assert.ok(tables.length >= 1, ctx());
  const last = tables.at(-1) as TableLog;
  assert.equal(last.regions.length, 2, ctx());
  assert.deepEqual(last.regions, [
    { gpa: 0, size: 2 * GiB },
    { gpa: 4 * GiB, size: GiB },
  ]);
  // The backend honoured mmap_offset: one memfd, mapped twice, the second mapping from file offset 2 GiB.
  assert.equal(maps.length, 2, fmtMaps(maps));
  const [low, high] = [...maps].sort((a, b) => a.offset - b.offset) as [MemfdMapping, MemfdMapping];
  assert.equal(low.inode, high.inode, `one memfd: ${fmtMaps(maps)}`);
  assert.deepEqual([low.offset, low.size], [0, 2 * GiB], fmtMaps(maps));
  assert.deepEqual([high.offset, high.size], [2 * GiB, GiB], fmtMaps(maps));

  assert.deepEqual(backend.logs().filter((l) => (l.level as number) >= 40), [], 'no warnings or errors');
  assert.equal(await backend.stop(), 0, 'SIGTERM: exit code 0');
  const data = await readFile(image);
  assert.equal(md5(data.subarray(0, MiB)), md5(hostPattern), 'host pattern untouched');
  assert.equal(md5(data.subarray(MiB, 5 * MiB)), md5(guestPattern), 'the image holds the guest pattern');
  assert.ok(data.subarray(5 * MiB).every((b) => b === 0), 'nothing written past the guest pattern');
});
