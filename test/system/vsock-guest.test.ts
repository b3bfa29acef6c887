// A Linux guest with a vhost-user-vsock-pci device served by our vsock device in this process (the Node API needs
// it here): socat in the guest talks to the host both ways, through the hybrid unix sockets (a guest connection to
// port P reaches UDS_P; a host program writes "CONNECT <port>\n" to UDS) and through the Node API (`listen`,
// `connect`): 4 MiB each way checked by md5, 32 connections at once, a reader that stalls on either side (credit holds
// the sender back, nothing is lost), a connection the host resets.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { connect, createServer, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Duplex } from 'node:stream';
import { VhostUserServer } from '../../src/backend/server.js';
import { VsockDevice } from '../../src/devices/vsock/vsock-device.js';
import { GUEST_TOOLS, guestScript, startGuest } from '../helpers/guest.js';
import { result } from '../helpers/patterns.js';
import { requireTools, type ToolRequirement } from '../helpers/require-tool.js';
import { testTempDir } from '../helpers/tmp.js';

const BYTES = 4 * 1024 * 1024;
const GUEST_CID = 42;
const SOCAT: ToolRequirement = { bin: 'socat', pkg: 'socat' };

const md5 = (b: Uint8Array): string => createHash('md5').update(b).digest('hex');

/** Reads a stream to its end, then answers with the md5 of what came and ends. */
function answerMd5(stream: Duplex, stallMs = 0): void {
  const chunks: Buffer[] = [];
  const read = (): void => {
    stream.on('data', (c: Buffer) => chunks.push(c));
  };
  stream.on('end', () => stream.end(md5(Buffer.concat(chunks))));
  stream.on('error', () => undefined);
  if (stallMs > 0) {
    stream.pause();
    setTimeout(() => {
      read();
      stream.resume();
    }, stallMs);
  } else {
    read();
  }
}

test('a guest and this process over vsock: hybrid unix sockets and the Node API both ways, 32 at once, a stalled reader, a reset', { timeout: 5 * 60_000 }, async (t) => {
  if (!requireTools(t, [...GUEST_TOOLS, SOCAT])) return;
  const dir = await testTempDir(t, 'vu-vsock-');
  const uds = dir.join('v.vsock');
  const device = new VsockDevice({ guestCid: GUEST_CID, udsPath: uds });
  const server = new VhostUserServer({ socketPath: dir.join('vsock.sock'), device });
  server.listen();
  t.after(async () => {
    await server.close();
    device.close();
  });

  // Port 5000: a host program behind the hybrid convention's UDS_5000.
  const hybrid = createServer((s) => answerMd5(s));
  await new Promise<void>((resolve) => hybrid.listen(`${uds}_5000`, resolve));
  t.after(() => hybrid.close());
  // 5001 and 5002: the Node API; 5003: a reader that stalls 2 s; 5004: reset after the first bytes.
  device.listen(5001, (s) => answerMd5(s));
  device.listen(5002, (s) => answerMd5(s));
  device.listen(5003, (s) => answerMd5(s, 2000));
  device.listen(5004, (s) => s.once('data', () => s.destroy()));

  const guest = await startGuest({
    vsock: [dir.join('vsock.sock')],
    script: { file: guestScript('vsock.sh') },
    env: { VSOCK_BYTES: String(BYTES) },
    serialLog: dir.join('serial.log'),
    timeoutMs: 4 * 60_000,
    signal: t.signal,
  });
  await guest.waitForMarker('GUEST-MARK: listening', 180_000);
  // Host -> guest: 6000 through the unix socket, 6001 through connect().
  const down0 = randomBytes(BYTES);
  const down1 = randomBytes(BYTES);
  const viaUds = await new Promise<Socket>((resolve, reject) => {
    const s = connect(uds, () => resolve(s));
    s.once('error', reject);
  });
  viaUds.write('CONNECT 6000\n');
  const ok = await new Promise<string>((resolve) => {
    let line = '';
    const onData = (c: Buffer): void => {
      line += c.toString('latin1');
      if (line.includes('\n')) {
        viaUds.off('data', onData);
        resolve(line);
      }
    };
    viaUds.on('data', onData);
  });
  assert.match(ok, /^OK \d+\n$/);
  viaUds.end(down0);
  const stream = await device.connect(6001);
  stream.end(down1);
  // The guest's reader on 6002 sleeps 4 s: its credit (its socket buffer) stops us long before 4 MiB are sent.
  const down2 = randomBytes(BYTES);
  const slow = await device.connect(6002);
  slow.on('error', () => undefined);
  // In 64 KiB writes, so that writableLength counts what is not sent yet (each write is done once sent).
  for (let off = 0; off < BYTES; off += 64 * 1024) slow.write(down2.subarray(off, off + 64 * 1024));
  slow.end();
  await sleep(2000);
  const held = slow.writableLength;
  t.diagnostic(`guest reader asleep: ${held} of ${BYTES} bytes still held on the host side`);
  assert.ok(held >= BYTES - 1024 * 1024, `credit held the host back (only ${held} bytes not sent after 2 s)`);

  const r = await guest.done;
  t.diagnostic(`guest ${r.durationMs} ms; ${JSON.stringify(device.stats())}`);
  assert.equal(r.exitCode, 0, r.serial.slice(-3000));
  const up = result(r.results, 'up', 'md5');
  for (const port of ['5000', '5001', '5003']) {
    assert.equal(result(r.results, `upload port=${port}`, 'reply'), up, `port ${port}: the host got what the guest sent`);
  }
  assert.equal(result(r.results, 'concurrent', 'ok'), '32', r.serial.slice(-3000));
  assert.equal(result(r.results, 'reset', 'failed'), '1', 'the guest saw the reset');
  assert.equal(result(r.results, 'download port=6000', 'md5'), md5(down0));
  assert.equal(result(r.results, 'download port=6001', 'md5'), md5(down1));
  assert.equal(result(r.results, 'download port=6002', 'md5'), md5(down2), 'the slow reader got every byte');
  assert.ok(r.results.includes('PASS'));
});
