/**
 * `npm run bench -- net-guests`: guest-to-guest TCP throughput through `vhost-user switch`, with the NICs' checksum
 * and segmentation offloads on (QEMU's default with a backend that offers them) and off (`csum=off,guest_tso4=off,...`
 * on both NICs). Two QEMU guests (TCG: absolute figures say little, the ratio is the result) boot on one switch; one
 * sends NET_BYTES random bytes to the other with busybox nc (test/guest/net-ping-tcp.sh), which times the transfer.
 * The modes alternate within each round, each with a fresh switch and fresh guests.
 *
 * Options: --rounds N (3) --mib M (16: the stream's size).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { startBackend } from '../test/helpers/backend.js';
import { guestScript, startGuest } from '../test/helpers/guest.js';
import { result } from '../test/helpers/patterns.js';
import { machine, markdownTable, median, writeResults } from './report.js';

const MODES = ['offloads on', 'offloads off'] as const;
type Mode = (typeof MODES)[number];

interface Sample {
  mode: Mode;
  round: number;
  ms: number;
  mbPerS: number;
  md5Match: boolean;
  /** The receiver's switch port: GSO frames delivered whole, and segmented in software. */
  rxGso: number;
  rxSegmented: number;
}

async function runOnce(dir: string, mode: Mode, round: number, bytes: number): Promise<Sample> {
  const [sockA, sockB] = [join(dir, `a${round}.sock`), join(dir, `b${round}.sock`)];
  const sw = await startBackend({ command: 'switch', socketPath: sockA, args: ['--socket', sockB], logLevel: 'info' });
  try {
    const offloads = mode === 'offloads on';
    const script = { file: guestScript('net-ping-tcp.sh') };
    const receiver = await startGuest({
      net: [{ socketPath: sockA, mac: '52:54:00:00:00:01', offloads }],
      script,
      env: { NET_ADDR: '10.0.0.1/24', NET_PEER: '10.0.0.2', NET_RECV_PORT: '5001', NET_WAIT_S: '300' },
      timeoutMs: 600_000,
    });
    const sender = await startGuest({
      net: [{ socketPath: sockB, mac: '52:54:00:00:00:02', offloads }],
      script,
      env: { NET_ADDR: '10.0.0.2/24', NET_PEER: '10.0.0.1', NET_SEND_PORT: '5001', NET_BYTES: String(bytes), NET_WAIT_S: '300' },
      timeoutMs: 600_000,
    });
    try {
      const [r, s] = await Promise.all([receiver.done, sender.done]);
      if (r.exitCode !== 0 || s.exitCode !== 0) throw new Error(`a guest failed:\n${r.serial.slice(-2000)}\n${s.serial.slice(-2000)}`);
      const ms = Number(result(s.results, 'tcp sent', 'ms'));
      await sw.stop();
      const stats = sw.logs().find((l) => l.msg === 'switch stats');
      const port = ((stats?.ports as Record<string, number>[] | undefined) ?? [])[0] ?? {};
      return {
        mode,
        round,
        ms,
        mbPerS: bytes / 2 ** 20 / (ms / 1000),
        md5Match: result(r.results, 'tcp recv', 'md5') === result(s.results, 'tcp sent', 'md5'),
        rxGso: port.rxGso ?? NaN,
        rxSegmented: port.rxSegmented ?? NaN,
      };
    } finally {
      await Promise.all([receiver.kill(), sender.kill()]);
    }
  } finally {
    await sw.stop();
  }
}

export async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { rounds: { type: 'string', default: '3' }, mib: { type: 'string', default: '16' } } });
  const rounds = Number(values.rounds);
  const bytes = Number(values.mib) * 2 ** 20;
  const dir = mkdtempSync(join(tmpdir(), 'vu-net-guests-'));
  const samples: Sample[] = [];
  try {
    for (let round = 0; round < rounds; round++) {
      for (const mode of round % 2 === 0 ? MODES : [...MODES].reverse()) {
        const s = await runOnce(dir, mode, round, bytes);
        process.stderr.write(`round ${round + 1} ${mode}: ${s.mbPerS.toFixed(2)} MiB/s (${s.ms} ms), md5 ${s.md5Match ? 'ok' : 'MISMATCH'}\n`);
        samples.push(s);
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const of = (m: Mode): Sample[] => samples.filter((s) => s.mode === m && s.md5Match);
  const ratios = [...Array(rounds).keys()].flatMap((r) => {
    const on = samples.find((s) => s.round === r && s.mode === 'offloads on');
    const off = samples.find((s) => s.round === r && s.mode === 'offloads off');
    return on !== undefined && off !== undefined ? [on.mbPerS / off.mbPerS] : [];
  });
  const command = `npm run bench -- net-guests ${argv.join(' ')}`.trim();
  const md = [
    '# Guest-to-guest TCP through `vhost-user switch`: offloads on vs off',
    '',
    `Command: \`${command}\`. Two QEMU guests (TCG, 1 vCPU each) on one switch; the sender's busybox nc sends ` +
      `${values.mib} MiB to the receiver's; the time is the sender's nc, from connect to exit. "offloads off": both NICs ` +
      'with csum=off,guest_csum=off,host_tso4=off,... (no offload negotiated). Per round the two modes run back to back; ' +
      'the ratio is per round. Under TCG the guests\' CPU is the bottleneck: the ratio shows what offloads save the guests.',
    '',
    markdownTable({
      columns: ['round', 'mode', 'MiB/s', 'ms', 'md5', 'receiver rxGso', 'receiver rxSegmented'],
      rows: samples.map((s) => [String(s.round + 1), s.mode, s.mbPerS.toFixed(2), String(s.ms), s.md5Match ? 'ok' : 'MISMATCH', String(s.rxGso), String(s.rxSegmented)]),
    }),
    '',
    `Median MiB/s: offloads on ${median(of('offloads on').map((s) => s.mbPerS)).toFixed(2)}, off ${median(of('offloads off').map((s) => s.mbPerS)).toFixed(2)}; ` +
      `on/off per round ${ratios.map((r) => r.toFixed(2)).join(', ')}, median **${median(ratios).toFixed(2)}**.`,
    '',
    `Machine: ${JSON.stringify(machine())}`,
  ].join('\n');
  process.stdout.write(`${md}\n`);
  const paths = writeResults('net-guests', { machine: machine(), command, samples, ratios }, md, {
    title: 'Guest-to-guest TCP through the switch (MiB/s, medians)',
    yLabel: 'MiB/s',
    categories: ['TCP stream'],
    series: MODES.map((m) => ({ name: m, values: [median(of(m).map((s) => s.mbPerS))] })),
  });
  process.stderr.write(`wrote ${paths.join(', ')}\n`);
}
