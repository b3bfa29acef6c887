// The NBD client (src/devices/blk/nbd/client.ts over connection.ts) against a hostile server written here: after a
// correct handshake it answers each request with the next action of a sequence fast-check draws: a correct reply,
// or bad magic, an unknown cookie, a chunk outside the read, a read covered short, an oversized chunk, an error chunk
// with errno 0, garbage, a dropped connection, silence. Whatever it does: every request completes exactly once (its
// data is the export's when it succeeds), within a bound (the timeout, 300 ms, plus retries), nothing is written
// outside the requests' buffers (sentinel bytes around and between every piece of a scatter list), write sources
// are not modified, and the process's fds are back to where they were.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import type { Socket } from 'node:net';
import { NbdClient } from '../../src/devices/blk/nbd/client.js';
import type { NbdCommand } from '../../src/devices/blk/nbd/connection.js';
import { NbdCmd, NbdErrno, NbdReplyType } from '../../src/devices/blk/nbd/constants.js';
import { parseNbdUri } from '../../src/devices/blk/nbd/uri.js';
import { assertBaseline, settledBaseline } from '../helpers/fds.js';
import { chunk, errorPayload, offsetData, simpleReply, startFakeNbdServer, type FakeRequest } from '../helpers/nbd-fake-server.js';
import { withTempDir } from '../helpers/tmp.js';

const SIZE = 1 << 20;
const TIMEOUT_MS = 300;
const SENTINEL = 0xee;
const GAP = 32;

const ACTIONS = ['ok', 'ok-split', 'error-chunk', 'bad-magic', 'unknown-cookie', 'outside', 'short', 'oversized', 'zero-error', 'garbage', 'close', 'hang'] as const;
type Action = (typeof ACTIONS)[number];

/** The export's byte at `offset`. */
const exportByte = (offset: number): number => (offset * 7 + 3) & 0xff;
function exportData(offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = exportByte(offset + i);
  return b;
}

function respond(action: Action, req: FakeRequest, socket: Socket, structured: boolean): void {
  const isRead = req.type === NbdCmd.READ;
  const ok = (): Buffer => {
    if (!isRead) return simpleReply(req.cookie, 0);
    const data = exportData(req.offset, req.length);
    return structured ? chunk(req.cookie, NbdReplyType.OFFSET_DATA, true, offsetData(req.offset, data)) : simpleReply(req.cookie, 0, data);
  };
  switch (action) {
    case 'ok':
      socket.write(ok());
      return;
    case 'ok-split': {
      if (!isRead || !structured || req.length < 2) return void socket.write(ok());
      const half = req.length >> 1;
      // The second half first, the first half, then a NONE chunk with DONE.
      socket.write(chunk(req.cookie, NbdReplyType.OFFSET_DATA, false, offsetData(req.offset + half, exportData(req.offset + half, req.length - half))));
      socket.write(chunk(req.cookie, NbdReplyType.OFFSET_DATA, false, offsetData(req.offset, exportData(req.offset, half))));
      socket.write(chunk(req.cookie, NbdReplyType.NONE, true, Buffer.alloc(0)));
      return;
    }
    case 'error-chunk':
      if (!structured) return void socket.write(simpleReply(req.cookie, NbdErrno.EIO));
      socket.write(chunk(req.cookie, NbdReplyType.ERROR, false, errorPayload(NbdErrno.EIO, 'disk on fire')));
      socket.write(chunk(req.cookie, NbdReplyType.NONE, true, Buffer.alloc(0)));
      return;
    case 'bad-magic':
      socket.write(Buffer.alloc(16, 0x5a));
      return;
    case 'unknown-cookie':
      socket.write(simpleReply(Buffer.from('ffeeddccbbaa9988', 'hex'), 0));
      return;
    case 'outside':
      // A simple reply carries no length: data of the wrong size there is indistinguishable from wrong data, so this
      // is a chunk outside the read (a violation, structured or not) for reads, and 64 stray bytes after the reply
      // (the next header's bad magic) for the rest.
      if (!isRead) return void socket.write(simpleReply(req.cookie, 0, Buffer.alloc(64, 0x77)));
      socket.write(chunk(req.cookie, NbdReplyType.OFFSET_DATA, true, offsetData(req.offset + req.length, Buffer.alloc(64, 0x77))));
      return;
    case 'short':
      if (!isRead || !structured) return void socket.write(chunk(req.cookie, NbdReplyType.OFFSET_DATA, true, offsetData(req.offset, Buffer.alloc(8))));
      socket.write(chunk(req.cookie, NbdReplyType.OFFSET_DATA, true, offsetData(req.offset, exportData(req.offset, req.length >> 1))));
      return;
    case 'oversized': {
      const h = chunk(req.cookie, NbdReplyType.OFFSET_DATA, true, Buffer.alloc(0));
      h.writeUInt32BE(0xfffffff0, 16);
      socket.write(h);
      return;
    }
    case 'zero-error':
      socket.write(chunk(req.cookie, NbdReplyType.ERROR, true, errorPayload(0)));
      return;
    case 'garbage':
      socket.write(Buffer.alloc(41, 0xab));
      return;
    case 'close':
      socket.destroy();
      return;
    case 'hang':
      return;
  }
}

interface Planned {
  command: NbdCommand;
  offset: number;
  length: number;
  /** Piece lengths of the scatter list (add up to `length`). */
  pieces: number[];
}

const plannedArb: fc.Arbitrary<Planned> = fc
  .record({
    command: fc.constantFrom<NbdCommand>('read', 'read', 'read', 'write', 'flush', 'trim', 'write-zeroes'),
    sector: fc.integer({ min: 0, max: SIZE / 512 - 130 }),
    sectors: fc.integer({ min: 1, max: 128 }),
    cuts: fc.array(fc.integer({ min: 1, max: 65535 }), { maxLength: 2 }),
  })
  .map(({ command, sector, sectors, cuts }) => {
    const length = command === 'flush' ? 0 : sectors * 512;
    const points = [...new Set(cuts.map((c) => c % length).filter((c) => c > 0))].sort((a, b) => a - b);
    const pieces = command === 'read' || command === 'write' ? [...points, length].map((p, i, all) => p - (i === 0 ? 0 : (all[i - 1] as number))) : [];
    return { command, offset: command === 'flush' ? 0 : sector * 512, length, pieces };
  });

test('a hostile NBD server: every request completes once, within bounds, nothing written outside its buffers, no fd leaked', { timeout: 180_000 }, async () => {
  const baseline = await settledBaseline();
  await withTempDir(async (dir) => {
    let run = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(fc.constantFrom(...ACTIONS), { minLength: 1, maxLength: 10 }), fc.boolean(), fc.array(plannedArb, { minLength: 1, maxLength: 8 }), async (actions, structured, planned) => {
        const path = dir.join(`nbd-${run++}.sock`);
        let next = 0;
        // The handshake of the first connection (the probe) is followed by requests only on the client's own ones.
        const server = await startFakeNbdServer({
          path,
          size: SIZE,
          structuredReplies: structured,
          respond: (req, socket, sr) => respond(actions[next++ % actions.length] as Action, req, socket, sr),
        });
        const target = parseNbdUri(`nbd+unix:///?socket=${path}`);
        const client = new NbdClient(await NbdClient.probe(target), { target, timeoutMs: TIMEOUT_MS });
        try {
          // Guest memory: every piece of every request with GAP sentinel bytes before and after it.
          const total = planned.reduce((n, p) => n + p.length + GAP * (p.pieces.length + 1), GAP);
          const memory = new Uint8Array(new SharedArrayBuffer(total)).fill(SENTINEL);
          const owned = new Uint8Array(total); // 1 where a piece is
          let at = GAP;
          const results = await Promise.all(
            planned.map((p) => {
              const buffers = p.pieces.map((len) => {
                const view = memory.subarray(at, at + len);
                owned.fill(1, at, at + len);
                at += len + GAP;
                return view;
              });
              if (p.command === 'write') buffers.forEach((b, i) => b.fill(0x30 + i));
              else buffers.forEach((b) => b.fill(0x11));
              return new Promise<{ p: Planned; buffers: Uint8Array[]; error: number; calls: number }>((resolve) => {
                const result = { p, buffers, error: -1, calls: 0 };
                const started = performance.now();
                client.submit({
                  command: p.command,
                  offset: p.offset,
                  length: p.length,
                  buffers,
                  done: (error) => {
                    result.calls++;
                    result.error = error;
                    assert.ok(performance.now() - started < 15_000, 'completed within bounds');
                    setTimeout(() => resolve(result), 20); // a second call, if any, would land meanwhile
                  },
                });
              });
            }),
          );
          for (const { p, buffers, error, calls } of results) {
            assert.equal(calls, 1, `${p.command} completed ${calls} times`);
            if (p.command === 'read' && error === 0) {
              assert.ok(Buffer.concat(buffers).equals(exportData(p.offset, p.length)), 'a successful read holds the export data');
            }
            if (p.command === 'write') buffers.forEach((b, i) => assert.ok(b.every((x) => x === 0x30 + i), 'a write source is not modified'));
          }
          for (let i = 0; i < total; i++) {
            if (owned[i] === 0 && memory[i] !== SENTINEL) assert.fail(`byte ${i} outside every request's buffers was written`);
          }
        } finally {
          client.close();
          await server.close();
        }
      }),
      { numRuns: 24 },
    );
  });
  await assertBaseline(baseline);
});
