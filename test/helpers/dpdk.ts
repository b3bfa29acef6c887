/**
 * DPDK's `dpdk-testpmd` (Debian: dpdk-dev) as a third-party vhost-user-net peer, without hugepages, PCI devices or
 * kernel modules:
 *
 * - role 'frontend': the net_virtio_user PMD is the driver side (what a guest would be). It connects to a
 *   vhost-user-net backend listening on a unix socket (or listens itself, `client: true` on the other side) and
 *   sends (txonly), receives (rxonly) or echoes (io, macswap) frames.
 * - role 'backend': the net_vhost PMD is the device side, DPDK's reference vhost-user-net backend.
 *
 * What the arguments must be, and why (all found the hard way on Debian 12, DPDK 22.11):
 * - `--no-huge` makes EAL back its memory with one memfd mapped MAP_SHARED, which virtio_user passes in
 *   SET_MEM_TABLE as a single region. `--in-memory` is refused with it; `--no-shconf` avoids runtime files, but EAL
 *   still creates /var/run/dpdk/<prefix> (as root; else $XDG_RUNTIME_DIR/dpdk or /tmp/dpdk): removed on stop.
 * - `-m 256` and `--total-num-mbufs=16384`: the default mbuf pool does not fit in no-huge memory.
 * - `--mbuf-size` must come before `--txpkts` (checked against the mbuf size parsed so far), or frames over
 *   2048 bytes are silently sent as 64 bytes.
 * - Non-interactive testpmd without `--stats-period` exits at once on EOF: `--stats-period=1` makes it run until
 *   SIGINT/SIGTERM, then print its totals. It flushes stdout after every block, so a pipe works.
 * - A listening vhost PMD fails on a leftover socket file; a connecting virtio_user fails at once if nobody listens,
 *   and testpmd then keeps running with no ports: both are detected and reported.
 * - `--no-flush-rx`: otherwise testpmd silently drains its RX queues just before forwarding starts, so its RX counts
 *   miss frames a backend sent early (what a backend counted can then only exceed testpmd's by a ring's worth).
 * - 2 CPUs: each testpmd has a main lcore (mostly asleep) and a forwarding lcore (busy-polls 100 %). The frontend's
 *   main lcore goes on the first allowed CPU and its forwarding lcore on the last; the backend's the other way
 *   round, so two testpmds (or a testpmd frontend and a backend pinned to the first CPU) get a CPU each.
 */
import type { ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ToolRequirement } from './require-tool.js';
import { hasExited, spawnOwned } from './tmp.js';
import { tryConnect } from './unix-socket.js';

/** dpdk-testpmd is only in dpdk-dev (not in the dpdk runtime package); it pulls in the virtio and vhost PMDs. */
export const DPDK_TOOLS: readonly ToolRequirement[] = [{ bin: 'dpdk-testpmd', pkg: 'dpdk-dev' }];

export type TestpmdRole = 'frontend' | 'backend';
export type TestpmdMode = 'txonly' | 'rxonly' | 'io' | 'macswap';

export interface TestpmdOptions {
  readonly role: TestpmdRole;
  /** The vhost-user socket (under 108 bytes). */
  readonly socketPath: string;
  readonly mode: TestpmdMode;
  /** Frame length for txonly / --tx-first (default 64, 42..9000), without the virtio-net header. */
  readonly pktlen?: number;
  /** Queue pairs (default 1): `queues=N` devarg and `--rxq=N --txq=N`. */
  readonly queues?: number;
  /** Extra devargs for the vdev (e.g. `mrg_rxbuf=0,in_order=0` for virtio_user, `linear-buffer=1` for vhost). */
  readonly devargs?: string;
  /**
   * Who listens: by default the backend (net_vhost client=0) listens and the frontend connects. true = the frontend
   * listens (virtio_user server=1) and the backend connects (net_vhost client=1).
   */
  readonly frontendListens?: boolean;
  /** Send one burst first (io / macswap seed); default true for a frontend in io or macswap mode. */
  readonly txFirst?: boolean;
  /** CPUs for the main and the forwarding lcore (default: see the file comment). */
  readonly mainCpu?: number;
  readonly fwdCpu?: number;
  /** EAL memory in MiB (256): also the size of the one region a backend has to mmap. */
  readonly memMb?: number;
  readonly mbufs?: number;
  readonly burst?: number;
  /** Log feature negotiation (frontend) or every vhost-user message (backend). */
  readonly debug?: boolean;
  /** Wait this long for the socket (frontend connecting) and for forwarding to start (default 30 s). */
  readonly startTimeoutMs?: number;
  readonly binary?: string;
}

/** One forwarding stream's totals (printed by testpmd when there are more streams than ports). */
export interface TestpmdStream {
  readonly rxQueue: number;
  readonly txQueue: number;
  readonly rxPackets: number;
  readonly txPackets: number;
  readonly txDropped: number;
}

export interface TestpmdResult {
  readonly role: TestpmdRole;
  readonly mode: TestpmdMode;
  /**
   * Mean of testpmd's per-interval packet rate in millions per second (Tx-pps for txonly, Rx-pps otherwise): the
   * intervals before traffic and the first one with traffic (warm-up) are dropped; for a backend also those after
   * the peer left and the partial last one.
   */
  readonly mpps: number;
  readonly samples: number;
  readonly minMpps: number;
  readonly maxMpps: number;
  /** Frame bits per second (no CRC, no virtio-net header), over the same intervals. */
  readonly gbit: number;
  /** Frame length seen, from the bit and packet rates of those intervals (0 without samples). */
  readonly pktlen: number;
  /** Per-interval rates (pps), every interval, in order. */
  readonly intervalsPps: readonly number[];
  /** Accumulated forward statistics (all ports). */
  readonly rxPackets: number;
  readonly rxDropped: number;
  readonly txPackets: number;
  readonly txDropped: number;
  /** The last periodic NIC statistics: cumulative packets and bytes (frame bytes, no CRC, no virtio-net header). */
  readonly nic: { rxPackets: number; rxBytes: number; txPackets: number; txBytes: number } | undefined;
  readonly streams: readonly TestpmdStream[];
  /** CPU share testpmd got (utime + stime of all its threads / wall time) between forwarding start and stop. */
  readonly cpu: number;
  readonly seconds: number;
}

export interface Testpmd {
  readonly pid: number;
  readonly prefix: string;
  readonly options: TestpmdOptions;
  /** Everything it printed so far (escape sequences removed). */
  output(): string;
  /**
   * SIGINT, SIGKILL after 10 s; removes the runtime dir; parses the totals testpmd printed (throws if it printed
   * none, e.g. killed). Safe to call more than once: later calls return the same result.
   */
  stop(): Promise<TestpmdResult>;
}

const FAIL_RE = /No probed ethernet devices|EAL: Error|Cause:|Failed to start port|failed to bind|Fail to start port|- give up/;
const STARTED_RE = /packet forwarding - ports=/;

let seq = 0;
const liveRuntimeDirs = new Set<string>();
let exitHook = false;

/** EAL's runtime directory for a file prefix (created even with --no-shconf). */
export function dpdkRuntimeDir(prefix: string): string {
  const base = process.getuid?.() === 0 ? '/var/run/dpdk' : `${process.env.XDG_RUNTIME_DIR ?? '/tmp'}/dpdk`;
  return `${base}/${prefix}`;
}

function removeRuntimeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
  liveRuntimeDirs.delete(dir);
}

/** CPUs this process may run on (Cpus_allowed_list), ascending. */
export function allowedCpus(): number[] {
  try {
    const line = /^Cpus_allowed_list:\s*(\S+)/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1];
    if (line === undefined) return [0];
    const out: number[] = [];
    for (const part of line.split(',')) {
      const [a, b] = part.split('-').map(Number) as [number, number | undefined];
      for (let c = a; c <= (b ?? a); c++) out.push(c);
    }
    return out.length > 0 ? out : [0];
  } catch {
    return [0];
  }
}

/** utime + stime of a process (all threads), in seconds; undefined once it is gone. */
export function processCpuSeconds(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may contain spaces): state is field 3, utime 14, stime 15.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(rest[11]) + Number(rest[12])) / 100; // USER_HZ is 100 on Linux
  } catch {
    return undefined;
  }
}


/** The testpmd command line for these options (without the binary). */
export function testpmdArgs(o: TestpmdOptions, prefix: string): string[] {
  const cpus = allowedCpus();
  const first = cpus[0] as number;
  const last = cpus[cpus.length - 1] as number;
  const frontend = o.role === 'frontend';
  const mainCpu = o.mainCpu ?? (frontend ? first : last);
  const fwdCpu = o.fwdCpu ?? (frontend ? last : first);
  const queues = o.queues ?? 1;
  const pktlen = o.pktlen ?? 64;
  if (!Number.isInteger(pktlen) || pktlen < 42 || pktlen > 9000) throw new RangeError(`pktlen ${pktlen}: 42..9000`);
  const eal = ['--lcores', `0@${mainCpu},1@${fwdCpu}`, '--no-huge', '-m', String(o.memMb ?? 256), '--no-shconf', '--no-pci', '--file-prefix', prefix];
  let vdev: string;
  if (frontend) {
    vdev = `net_virtio_user0,path=${o.socketPath},queues=${queues}${o.frontendListens === true ? ',server=1' : ''}`;
    if (o.debug === true) eal.push('--log-level=pmd.net.virtio.init:debug');
  } else {
    vdev = `net_vhost0,iface=${o.socketPath},queues=${queues},client=${o.frontendListens === true ? 1 : 0}`;
    if (o.debug === true) eal.push('--log-level=lib.vhost.config:debug');
  }
  if (o.devargs !== undefined && o.devargs !== '') vdev += `,${o.devargs}`;
  const tp = [
    `--forward-mode=${o.mode}`,
    '--nb-cores=1',
    `--rxq=${queues}`,
    `--txq=${queues}`,
    '--stats-period=1',
    `--total-num-mbufs=${o.mbufs ?? 16384}`,
    `--burst=${o.burst ?? 32}`,
    // By default testpmd drains (and does not count) its RX queues before forwarding starts, for as long as frames
    // keep coming: a backend that sends at once would count frames testpmd never reports.
    '--no-flush-rx',
  ];
  // --mbuf-size must precede --txpkts (testpmd checks the length against the mbuf size parsed so far).
  if (pktlen + 128 > 2176) tp.push(`--mbuf-size=${pktlen + 128}`);
  tp.push(`--txpkts=${pktlen}`);
  if (o.txFirst ?? (frontend && (o.mode === 'io' || o.mode === 'macswap'))) tp.push('--tx-first');
  return [...eal, '--vdev', vdev, '--', ...tp];
}

/** Starts testpmd and resolves once it forwards (its ports are up; a backend then waits for its frontend). */
export async function startTestpmd(o: TestpmdOptions): Promise<Testpmd> {
  const timeoutMs = o.startTimeoutMs ?? 30_000;
  const deadline = Date.now() + timeoutMs;
  const connecting = (o.role === 'frontend') !== (o.frontendListens === true);
  if (connecting) {
    // The peer must be listening: virtio_user / a vhost client gives up at once otherwise.
    while (!existsSync(o.socketPath)) {
      if (Date.now() > deadline) throw new Error(`testpmd ${o.role}: no socket at ${o.socketPath} after ${timeoutMs} ms`);
      await sleep(50);
    }
  } else if (existsSync(o.socketPath)) {
    // A listener refuses to bind over a leftover file; never take over a live one.
    if (await tryConnect(o.socketPath)) throw new Error(`testpmd ${o.role}: something already listens on ${o.socketPath}`);
    rmSync(o.socketPath, { force: true });
  }

  const prefix = `vut${process.pid}x${++seq}${o.role === 'frontend' ? 'fe' : 'be'}`;
  const runtimeDir = dpdkRuntimeDir(prefix);
  if (!exitHook) {
    exitHook = true;
    // spawnOwned SIGKILLs live children when the test process exits; their runtime dirs go too.
    process.on('exit', () => {
      for (const dir of liveRuntimeDirs) rmSync(dir, { recursive: true, force: true });
    });
  }
  liveRuntimeDirs.add(runtimeDir);
  const args = testpmdArgs(o, prefix);
  const child: ChildProcess = spawnOwned(o.binary ?? 'dpdk-testpmd', args);
  let raw = '';
  const onData = (chunk: string): void => {
    raw += chunk;
    // Keep the head (configuration, errors) and the tail (totals) of a long (debug) log.
    if (raw.length > 32 * 1024 * 1024) raw = `${raw.slice(0, 1024 * 1024)}\n[...]\n${raw.slice(-8 * 1024 * 1024)}`;
  };
  child.stdout?.setEncoding('utf8');
  child.stderr?.setEncoding('utf8');
  child.stdout?.on('data', onData);
  child.stderr?.on('data', onData);
  const exited = new Promise<void>((resolve) => {
    if (hasExited(child)) resolve();
    else child.once('exit', () => resolve());
  });
  const output = (): string => stripAnsi(raw);
  const pid = child.pid ?? -1;

  let cpu0 = 0;
  let wall0 = 0;
  let result: Promise<TestpmdResult> | undefined;
  const stop = (): Promise<TestpmdResult> => {
    result ??= (async () => {
      const cpu1 = processCpuSeconds(pid);
      const wall1 = performance.now();
      if (!hasExited(child)) {
        child.kill('SIGINT');
        const killer = setTimeout(() => child.kill('SIGKILL'), 10_000);
        await exited;
        clearTimeout(killer);
      }
      removeRuntimeDir(runtimeDir);
      if (!connecting) rmSync(o.socketPath, { force: true });
      const seconds = wall0 > 0 ? (wall1 - wall0) / 1000 : 0;
      const cpu = seconds > 0 && cpu1 !== undefined ? (cpu1 - cpu0) / seconds : 0;
      return parseTestpmdOutput(output(), { role: o.role, mode: o.mode, cpu, seconds });
    })();
    return result;
  };

  const tp: Testpmd = { pid, prefix, options: o, output, stop };
  try {
    for (;;) {
      const text = output();
      const fail = FAIL_RE.exec(text);
      if (fail !== null) throw new Error(`testpmd ${o.role} failed (${fail[0]})`);
      if (STARTED_RE.test(text)) break;
      if (hasExited(child)) throw new Error(`testpmd ${o.role} exited (code ${child.exitCode}, signal ${child.signalCode})`);
      if (Date.now() > deadline) throw new Error(`testpmd ${o.role} did not start forwarding in ${timeoutMs} ms`);
      await sleep(50);
    }
  } catch (err) {
    await stop().catch(() => undefined);
    const tail = output().split('\n').slice(-30).join('\n');
    throw new Error(`${(err as Error).message}\ncommand: dpdk-testpmd ${args.join(' ')}\n${tail}`, { cause: err });
  }
  cpu0 = processCpuSeconds(pid) ?? 0;
  wall0 = performance.now();
  return tp;
}

/** Starts testpmd, lets it forward for `seconds`, stops it and returns its figures. */
export async function runTestpmd(o: TestpmdOptions & { seconds: number; signal?: AbortSignal }): Promise<TestpmdResult> {
  const tp = await startTestpmd(o);
  try {
    await sleep(o.seconds * 1000, undefined, o.signal !== undefined ? { signal: o.signal } : {});
  } finally {
    // stop() is also what cleans up when the wait was aborted.
    await tp.stop().catch(() => undefined);
  }
  return tp.stop();
}

export function stripAnsi(s: string): string {
  // eslint-disable-next-line no-control-regex
  return s.replace(/\x1b\[[0-9;]*[A-Za-z]/g, '');
}

/**
 * testpmd's output -> figures. The rate is computed as the DPDK pair recipe this helper was adapted from does:
 * mean of the per-interval Tx-pps (txonly) or Rx-pps (other modes), without the leading intervals with no traffic
 * and the first one with traffic (warm-up, only when there are at least two); a backend also drops the intervals
 * after its peer left and, when at least three remain, the partial last one.
 */
export function parseTestpmdOutput(
  text: string,
  ctx: { role: TestpmdRole; mode: TestpmdMode; cpu?: number; seconds?: number },
): TestpmdResult {
  const lines = stripAnsi(text).split('\n');
  const key = ctx.mode === 'txonly' ? 'Tx-pps:' : 'Rx-pps:';
  const pps: number[] = [];
  const bps: number[] = [];
  let nic: TestpmdResult['nic'];
  let cur: { rxPackets: number; rxBytes: number; txPackets: number; txBytes: number } | undefined;
  let acc = false;
  let accRx: [number, number] | undefined;
  let accTx: [number, number] | undefined;
  const streams: TestpmdStream[] = [];
  let stream: { rxQueue: number; txQueue: number } | undefined;
  const num = (s: string | undefined): number => Number(s ?? NaN);
  for (const line of lines) {
    const f = line.trim().split(/\s+/);
    if (/NIC statistics for port/.test(line)) {
      cur = { rxPackets: 0, rxBytes: 0, txPackets: 0, txBytes: 0 };
      continue;
    }
    if (f[0] === key) {
      pps.push(num(f[1]));
      bps.push(num(f[3]));
      continue;
    }
    const sm = /Forward Stats for RX Port=\s*\d+\/Queue=\s*(\d+) -> TX Port=\s*\d+\/Queue=\s*(\d+)/.exec(line);
    if (sm !== null) {
      stream = { rxQueue: num(sm[1]), txQueue: num(sm[2]) };
      continue;
    }
    if (/Accumulated forward statistics/.test(line)) {
      acc = true;
      continue;
    }
    if (f[0] === 'RX-packets:') {
      if (stream !== undefined && f[2] === 'TX-packets:') {
        streams.push({ ...stream, rxPackets: num(f[1]), txPackets: num(f[3]), txDropped: num(f[5]) });
        stream = undefined;
      } else if (acc && f[2] === 'RX-dropped:') {
        accRx = [num(f[1]), num(f[3])];
      } else if (cur !== undefined && f[2] === 'RX-missed:') {
        cur.rxPackets = num(f[1]);
        cur.rxBytes = num(f[5]);
      }
      continue;
    }
    if (f[0] === 'TX-packets:') {
      if (acc && f[2] === 'TX-dropped:') {
        accTx = [num(f[1]), num(f[3])];
        acc = false;
      } else if (cur !== undefined && f[2] === 'TX-errors:') {
        cur.txPackets = num(f[1]);
        cur.txBytes = num(f[5]);
        nic = { ...cur };
        cur = undefined;
      }
    }
  }
  if (accRx === undefined || accTx === undefined) {
    throw new Error(`testpmd printed no forward statistics (killed, or never forwarded):\n${lines.slice(-20).join('\n')}`);
  }
  let a = 0;
  while (a < pps.length && pps[a] === 0) a++;
  let b = pps.length - 1;
  if (ctx.role === 'backend') {
    while (b >= a && pps[b] === 0) b--;
    if (b - a >= 2) b--;
  }
  if (b - a >= 1) a++;
  const window = pps.slice(a, b + 1);
  const windowBps = bps.slice(a, b + 1);
  const sum = window.reduce((x, y) => x + y, 0);
  const sumBits = windowBps.reduce((x, y) => x + y, 0);
  return {
    role: ctx.role,
    mode: ctx.mode,
    mpps: window.length > 0 ? sum / window.length / 1e6 : 0,
    samples: window.length,
    minMpps: window.length > 0 ? Math.min(...window) / 1e6 : 0,
    maxMpps: window.length > 0 ? Math.max(...window) / 1e6 : 0,
    gbit: window.length > 0 ? sumBits / window.length / 1e9 : 0,
    pktlen: sum > 0 ? Math.round(sumBits / sum / 8) : 0,
    intervalsPps: pps,
    rxPackets: accRx[0],
    rxDropped: accRx[1],
    txPackets: accTx[0],
    txDropped: accTx[1],
    nic,
    streams,
    cpu: ctx.cpu ?? 0,
    seconds: ctx.seconds ?? 0,
  };
}

/** One line, like dpdk-pair.sh's RESULT line. */
export function formatTestpmdResult(r: TestpmdResult): string {
  return (
    `mpps=${r.mpps.toFixed(2)} role=${r.role} mode=${r.mode} pktlen=${r.pktlen} samples=${r.samples} ` +
    `min=${r.minMpps.toFixed(2)} max=${r.maxMpps.toFixed(2)} gbit=${r.gbit.toFixed(2)} cpu=${r.cpu.toFixed(2)} ` +
    `rx_pkts=${r.rxPackets} tx_pkts=${r.txPackets} tx_dropped=${r.txDropped}` +
    (r.streams.length > 0 ? ` streams=${r.streams.map((s) => `q${s.rxQueue}:${s.rxPackets}/${s.txPackets}`).join(',')}` : '')
  );
}
