// Framing and fd accounting on the control socket (spec "Message Specification"; docs/node-native.md §4).
// fds are small fake numbers; a spy records which ones the reader closes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  FrontendRequest,
  HeaderFlag,
  type Message,
  MessageReader,
  encodeRequest,
  memoryTablePayload,
  u64Payload,
  vringFilePayload,
} from '../../src/protocol/index.js';
import { concat, fdSpy, hex, protocolError, toHex } from './helpers.js';

// Wire bytes of the messages used below: header (request, flags, size), then the payload.
const GET_FEATURES = hex('01000000 01000000 00000000');
const SET_OWNER = hex('03000000 01000000 00000000');
const SET_FEATURES = hex('02000000 01000000 08000000  00000040 01000000'); // VERSION_1 | PROTOCOL_FEATURES
const SET_PROTOCOL_FEATURES = hex('10000000 01000000 08000000  09000000 00000000'); // MQ | REPLY_ACK
const REGION_A = '0000000000000000 0000004000000000 00000000007f0000 0000000000000000';
const REGION_B = '0000000001000000 0000008000000000 00000040007f0000 0000004000000000';
const SET_MEM_TABLE_2 = hex('05000000 01000000 48000000  02000000 00000000 ' + REGION_A + REGION_B);
const SET_VRING_KICK_0 = hex('0c000000 01000000 08000000  0000000000000000'); // index 0, with an fd
const SET_VRING_KICK_1_NOFD = hex('0c000000 01000000 08000000  0101000000000000'); // index 1, bit 8: no fd
const SET_VRING_CALL_0 = hex('0d000000 01000000 08000000  0000000000000000');
const SET_VRING_ENABLE_1 = hex('12000000 01000000 08000000  01000000 01000000');
const REM_MEM_REG = hex('26000000 01000000 28000000  0000000000000000 ' + REGION_A);

function reader(options: Partial<ConstructorParameters<typeof MessageReader>[0]> = {}) {
  const spy = fdSpy();
  return { reader: new MessageReader({ closeFd: spy.closeFd, ...options }), closed: spy.closed };
}

/** The parts of a message worth comparing, with the payload as hex. */
function summary(message: Message): { request: number; flags: number; payload: string; fds: number[] } {
  return { request: message.request, flags: message.flags, payload: toHex(message.payload), fds: message.fds };
}

test('a GET_FEATURES request in one read', () => {
  const { reader: r, closed } = reader();
  const messages = r.push(GET_FEATURES, []);
  assert.deepEqual(messages.map(summary), [{ request: 1, flags: 1, payload: '', fds: [] }]);
  assert.equal(r.hasPartialMessage, false);
  assert.deepEqual(closed, []);
});

test('a header split across 3 reads', () => {
  const { reader: r } = reader();
  assert.deepEqual(r.push(SET_FEATURES.subarray(0, 4), []), []);
  assert.equal(r.hasPartialMessage, true);
  assert.deepEqual(r.push(SET_FEATURES.subarray(4, 9), []), []);
  const messages = r.push(SET_FEATURES.subarray(9), []);
  assert.deepEqual(messages.map(summary), [{ request: 2, flags: 1, payload: '0000004001000000', fds: [] }]);
  assert.equal(r.hasPartialMessage, false);
});

test('a payload split byte by byte', () => {
  const { reader: r } = reader();
  const out: Message[] = [];
  for (let i = 0; i < SET_MEM_TABLE_2.length; i++) {
    out.push(...r.push(SET_MEM_TABLE_2.subarray(i, i + 1), i === 0 ? [10, 11] : []));
  }
  assert.equal(out.length, 1);
  assert.deepEqual(out[0]?.fds, [10, 11]);
  assert.equal(toHex(out[0]?.payload ?? new Uint8Array(0)), toHex(SET_MEM_TABLE_2.subarray(12)));
});

test('three messages in one read', () => {
  const { reader: r } = reader();
  const messages = r.push(concat(GET_FEATURES, SET_FEATURES, SET_OWNER), []);
  assert.deepEqual(
    messages.map((m) => m.request),
    [FrontendRequest.GET_FEATURES, FrontendRequest.SET_FEATURES, FrontendRequest.SET_OWNER],
  );
});

// docs/node-native.md §4: one read held fd-less messages plus a SET_MEM_TABLE with its 2 fds, the next a kick and
// its fd, the next fd-less messages.
test('node-native §4: messages then SET_MEM_TABLE + 2 fds; a kick + 1 fd; a NOFD kick and no fd', () => {
  const { reader: r, closed } = reader();
  const first = r.push(concat(GET_FEATURES, SET_FEATURES, SET_MEM_TABLE_2), [10, 11]);
  assert.deepEqual(
    first.map((m) => [m.request, m.fds]),
    [
      [FrontendRequest.GET_FEATURES, []],
      [FrontendRequest.SET_FEATURES, []],
      [FrontendRequest.SET_MEM_TABLE, [10, 11]],
    ],
  );
  const memTable = memoryTablePayload.decode(first[2]?.payload ?? new Uint8Array(0));
  assert.equal(memTable.regions.length, 2);

  const second = r.push(SET_VRING_KICK_0, [12]);
  assert.deepEqual(second.map(summary), [{ request: 12, flags: 1, payload: '0000000000000000', fds: [12] }]);

  const third = r.push(concat(SET_VRING_KICK_1_NOFD, SET_VRING_ENABLE_1), []);
  assert.deepEqual(
    third.map((m) => [m.request, m.fds]),
    [
      [FrontendRequest.SET_VRING_KICK, []],
      [FrontendRequest.SET_VRING_ENABLE, []],
    ],
  );
  assert.deepEqual(vringFilePayload.decode(third[0]?.payload ?? new Uint8Array(0)), { index: 1, noFd: true });
  assert.deepEqual(closed, []);
  assert.equal(r.queuedFdCount, 0);
});

test('fds that arrive with the first bytes of a message wait for the rest of it', () => {
  // 52 bytes: two 20-byte messages and the 12-byte header of a SET_MEM_TABLE, with the table's 2 fds.
  const { reader: r, closed } = reader();
  const head = concat(SET_FEATURES, SET_PROTOCOL_FEATURES, SET_MEM_TABLE_2.subarray(0, 12));
  assert.equal(head.length, 52);
  const first = r.push(head, [10, 11]);
  assert.deepEqual(first.map((m) => [m.request, m.fds]), [
    [FrontendRequest.SET_FEATURES, []],
    [FrontendRequest.SET_PROTOCOL_FEATURES, []],
  ]);
  assert.equal(r.queuedFdCount, 2);
  const rest = r.push(SET_MEM_TABLE_2.subarray(12), []);
  assert.deepEqual(rest.map((m) => [m.request, m.fds]), [[FrontendRequest.SET_MEM_TABLE, [10, 11]]]);
  assert.deepEqual(closed, []);
});

test('fds that arrive with part of a header wait for the message', () => {
  const { reader: r } = reader();
  assert.deepEqual(r.push(SET_VRING_CALL_0.subarray(0, 5), [7]), []);
  const messages = r.push(SET_VRING_CALL_0.subarray(5), []);
  assert.deepEqual(messages.map((m) => m.fds), [[7]]);
});

test('fds on a message that takes none are closed and rejected', () => {
  const { reader: r, closed } = reader();
  assert.throws(() => r.push(GET_FEATURES, [7]), protocolError('VHOST_PROTOCOL_UNEXPECTED_FDS'));
  assert.deepEqual(closed, [7]);
});

test('after an error the reader is dead: every push throws the same error and closes its fds', () => {
  const { reader: r, closed } = reader();
  let first: unknown;
  try {
    r.push(GET_FEATURES, [7]);
  } catch (err) {
    first = err;
  }
  assert.ok(first instanceof Error);
  assert.throws(
    () => r.push(SET_VRING_KICK_0, [8]),
    (err) => err === first,
  );
  assert.deepEqual(closed, [7, 8]);
});

test('an fd too many for a pending message is rejected as soon as its header is known', () => {
  const { reader: r, closed } = reader();
  assert.throws(() => r.push(SET_VRING_KICK_0.subarray(0, 14), [7, 8]), protocolError('VHOST_PROTOCOL_UNEXPECTED_FDS'));
  assert.deepEqual(closed, [7, 8]);
});

test('fds with no bytes at all are rejected', () => {
  const { reader: r, closed } = reader();
  assert.throws(() => r.push(new Uint8Array(0), [3]), protocolError('VHOST_PROTOCOL_UNEXPECTED_FDS'));
  assert.deepEqual(closed, [3]);
});

test('an empty read changes nothing', () => {
  const { reader: r } = reader();
  assert.deepEqual(r.push(new Uint8Array(0), []), []);
  assert.deepEqual(r.push(new Uint8Array(0)), []);
  assert.equal(r.hasPartialMessage, false);
});

test('missing fds: a kick without its fd', () => {
  const { reader: r, closed } = reader();
  assert.throws(() => r.push(SET_VRING_KICK_0, []), protocolError('VHOST_PROTOCOL_MISSING_FDS'));
  assert.deepEqual(closed, []);
});

test('missing fds: the fds of messages completed in the failing read are closed too', () => {
  const { reader: r, closed } = reader();
  // The kick takes fd 5; the 2-region table finds only fd 6.
  assert.throws(
    () => r.push(concat(SET_VRING_KICK_0, SET_MEM_TABLE_2), [5, 6]),
    /SET_MEM_TABLE needs 2 fd\(s\), 1 arrived/,
  );
  assert.deepEqual(closed.sort(), [5, 6]);
});

test('a payload over the cap is rejected as soon as the header arrives', () => {
  const { reader: r } = reader();
  assert.throws(() => r.push(hex('18000000 01000000 01100000'), []), protocolError('VHOST_PROTOCOL_MESSAGE_TOO_LARGE'));
  const small = reader({ maxPayload: 8 });
  assert.equal(small.reader.push(SET_FEATURES, []).length, 1);
  assert.throws(() => small.reader.push(SET_MEM_TABLE_2, [1, 2]), protocolError('VHOST_PROTOCOL_MESSAGE_TOO_LARGE'));
  assert.deepEqual(small.closed, [1, 2]);
  assert.throws(() => new MessageReader({ closeFd: () => undefined, maxPayload: -1 }), RangeError);
});

test('a bad version is rejected', () => {
  for (const flags of ['00000000', '02000000', '03000000']) {
    const { reader: r } = reader();
    assert.throws(() => r.push(hex(`01000000 ${flags} 00000000`), []), protocolError('VHOST_PROTOCOL_BAD_VERSION'));
  }
});

test('a request with the REPLY flag is rejected', () => {
  const { reader: r } = reader();
  assert.throws(() => r.push(hex('01000000 05000000 00000000'), []), protocolError('VHOST_PROTOCOL_UNEXPECTED_REPLY'));
});

test('NEED_REPLY passes through in the flags', () => {
  const { reader: r } = reader();
  const [message] = r.push(hex('03000000 09000000 00000000'), []);
  assert.equal(message?.flags, HeaderFlag.VERSION | HeaderFlag.NEED_REPLY);
});

test('a malformed SET_MEM_TABLE is a framing error: wrong nregions or length', () => {
  const tooMany = reader();
  const nine = concat(hex('05000000 01000000 28010000  09000000 00000000'), new Uint8Array(9 * 32));
  assert.throws(() => tooMany.reader.push(nine, [1]), protocolError('VHOST_PROTOCOL_BAD_PAYLOAD'));
  assert.deepEqual(tooMany.closed, [1]);
  const short = reader();
  assert.throws(
    () => short.reader.push(hex('05000000 01000000 28000000  02000000 00000000 ' + REGION_A), [1, 2]),
    protocolError('VHOST_PROTOCOL_BAD_PAYLOAD'),
  );
  assert.deepEqual(short.closed, [1, 2]);
});

test('a SET_MEM_TABLE with 0 regions (postcopy acknowledgement form) passes framing without fds', () => {
  const { reader: r } = reader();
  const [message] = r.push(hex('05000000 01000000 08000000  0000000000000000'), []);
  assert.equal(message?.fds.length, 0);
  assert.throws(
    () => memoryTablePayload.decode(message?.payload ?? new Uint8Array(0)),
    protocolError('VHOST_PROTOCOL_BAD_PAYLOAD'),
  );
});

test('a kick whose payload is not a u64 is a framing error', () => {
  const { reader: r } = reader();
  assert.throws(
    () => r.push(hex('0c000000 01000000 04000000  00000000'), [1]),
    protocolError('VHOST_PROTOCOL_BAD_PAYLOAD'),
  );
});

test('other payloads are not checked here: unknown requests and odd lengths pass through', () => {
  const { reader: r } = reader();
  const messages = r.push(concat(hex('63000000 01000000 03000000 aabbcc'), hex('02000000 01000000 02000000 0102')), []);
  assert.deepEqual(messages.map(summary), [
    { request: 99, flags: 1, payload: 'aabbcc', fds: [] },
    { request: 2, flags: 1, payload: '0102', fds: [] },
  ]);
});

test('more than 32 fds queued are rejected and closed', () => {
  const { reader: r, closed } = reader();
  const fds = Array.from({ length: 33 }, (_, i) => 100 + i);
  assert.throws(() => r.push(SET_MEM_TABLE_2.subarray(0, 3), fds), protocolError('VHOST_PROTOCOL_TOO_MANY_FDS'));
  assert.deepEqual(closed, fds);
});

test('REM_MEM_REG: one stray fd is accepted and closed (spec: MAY accept, MUST close)', () => {
  const { reader: r, closed } = reader();
  const messages = r.push(concat(GET_FEATURES, REM_MEM_REG), [9]);
  assert.deepEqual(messages.map((m) => [m.request, m.fds]), [
    [FrontendRequest.GET_FEATURES, []],
    [FrontendRequest.REM_MEM_REG, []],
  ]);
  assert.deepEqual(closed, [9]);
  assert.deepEqual(r.push(REM_MEM_REG, []).map((m) => m.fds), [[]]);
});

test('REM_MEM_REG: two fds are rejected', () => {
  const { reader: r, closed } = reader();
  assert.throws(() => r.push(REM_MEM_REG, [9, 10]), protocolError('VHOST_PROTOCOL_UNEXPECTED_FDS'));
  assert.deepEqual(closed, [9, 10]);
});

test('payloads are copies in their own buffer', () => {
  const { reader: r } = reader();
  const wire = concat(SET_FEATURES, SET_OWNER);
  const [message] = r.push(wire, []);
  wire.fill(0);
  assert.ok(message);
  assert.equal(toHex(message.payload), '0000004001000000');
  assert.equal(message.payload.byteOffset, 0);
  assert.equal(message.payload.buffer.byteLength, 8);
});

test('close() closes queued fds; later pushes fail with VHOST_READER_CLOSED', () => {
  const { reader: r, closed } = reader();
  r.push(SET_MEM_TABLE_2.subarray(0, 20), [4, 5]);
  r.close();
  assert.deepEqual(closed, [4, 5]);
  assert.equal(r.queuedFdCount, 0);
  assert.equal(r.hasPartialMessage, false);
  assert.throws(() => r.push(GET_FEATURES, [6]), { name: 'VhostError', code: 'VHOST_READER_CLOSED' });
  assert.deepEqual(closed, [4, 5, 6]);
  r.close();
});

test('closeFd errors do not stop the reader from closing the rest', () => {
  const closed: number[] = [];
  const r = new MessageReader({
    closeFd: (fd) => {
      closed.push(fd);
      throw new Error('EBADF');
    },
  });
  assert.throws(() => r.push(GET_FEATURES, [1, 2]), protocolError('VHOST_PROTOCOL_UNEXPECTED_FDS'));
  assert.deepEqual(closed, [1, 2]);
});

// --- reply streams (front-end side) ---------------------------------------------------------------------------

test('replies: GET_FEATURES reply with a u64', () => {
  const { reader: r } = reader({ direction: 'replies' });
  const messages = r.push(hex('01000000 05000000 08000000  00000040 01000000'), []);
  assert.deepEqual(messages.map(summary), [{ request: 1, flags: 5, payload: '0000004001000000', fds: [] }]);
  assert.equal(r.direction, 'replies');
});

test('replies: the REPLY flag must be set', () => {
  const { reader: r } = reader({ direction: 'replies' });
  assert.throws(() => r.push(GET_FEATURES, []), protocolError('VHOST_PROTOCOL_NOT_A_REPLY'));
});

test('replies: GET_INFLIGHT_FD carries one fd', () => {
  const reply = hex('1f000000 05000000 18000000  0020000000000000 0000000000000000 0200 0001 00000000');
  const ok = reader({ direction: 'replies' });
  assert.deepEqual(ok.reader.push(reply, [40]).map((m) => m.fds), [[40]]);
  const missing = reader({ direction: 'replies' });
  assert.throws(() => missing.reader.push(reply, []), protocolError('VHOST_PROTOCOL_MISSING_FDS'));
});

test('replies: a SET_MEM_TABLE reply (postcopy) carries no fds', () => {
  const { reader: r, closed } = reader({ direction: 'replies' });
  assert.throws(
    () => r.push(hex('05000000 05000000 28000000  01000000 00000000 ' + REGION_A), [1]),
    protocolError('VHOST_PROTOCOL_UNEXPECTED_FDS'),
  );
  assert.deepEqual(closed, [1]);
});

test('replies: the optional fd of GET_SHARED_OBJECT is delivered', () => {
  const { reader: r, closed } = reader({ direction: 'replies' });
  assert.deepEqual(r.push(hex('29000000 05000000 00000000'), [41]).map((m) => m.fds), [[41]]);
  assert.deepEqual(r.push(hex('29000000 05000000 00000000'), []).map((m) => m.fds), [[]]);
  assert.deepEqual(closed, []);
});

test('back-end channel: requests from the back-end and replies to it', () => {
  const requests = reader({ direction: 'backend-requests' });
  const notifier = hex('03000000 01000000 18000000  0100000000000000 0010000000000000 0000000000000000');
  assert.deepEqual(
    requests.reader.push(concat(hex('02000000 01000000 00000000'), notifier), [50]).map((m) => [m.request, m.fds]),
    [
      [2, []],
      [3, [50]],
    ],
  );
  const replies = reader({ direction: 'backend-replies' });
  const lookupReply = hex('08000000 05000000 08000000  0000000000000000');
  assert.deepEqual(replies.reader.push(lookupReply, [51]).map((m) => m.fds), [[51]]);
});

// --- property ---------------------------------------------------------------------------------------------------

interface Planned {
  bytes: Uint8Array;
  fdCount: number;
}

const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const region = fc.record({ guestPhysAddr: u64, memorySize: u64, userspaceAddr: u64, mmapOffset: u64 });
const planned: fc.Arbitrary<Planned> = fc.oneof(
  fc.constant({ bytes: GET_FEATURES, fdCount: 0 }),
  u64.map((v) => ({ bytes: encodeRequest(FrontendRequest.SET_FEATURES, u64Payload.encode(v)), fdCount: 0 })),
  fc.array(region, { minLength: 1, maxLength: 8 }).map((regions) => ({
    bytes: encodeRequest(FrontendRequest.SET_MEM_TABLE, memoryTablePayload.encode({ regions }), true),
    fdCount: regions.length,
  })),
  fc.record({ index: fc.integer({ min: 0, max: 255 }), noFd: fc.boolean() }).map((file) => ({
    bytes: encodeRequest(FrontendRequest.SET_VRING_CALL, vringFilePayload.encode(file)),
    fdCount: file.noFd ? 0 : 1,
  })),
  fc.uint8Array({ maxLength: 40 }).map((payload) => ({ bytes: encodeRequest(99, payload), fdCount: 0 })),
);

test('property: any split of a valid stream yields the same messages and fds', () => {
  const scenario = fc
    .array(planned, { minLength: 1, maxLength: 8 })
    .chain((plan) => {
      const total = plan.reduce((n, p) => n + p.bytes.length, 0);
      return fc.tuple(fc.constant(plan), fc.array(fc.integer({ min: 0, max: total }), { maxLength: 12 }));
    });
  fc.assert(
    fc.property(scenario, ([plan, cuts]) => {
      const stream = concat(...plan.map((p) => p.bytes));
      const bounds = [0, ...cuts.sort((a, b) => a - b), stream.length];
      // Fake fds, numbered in order; each message's fds ride with the chunk holding its first byte (as on Linux).
      let nextFd = 100;
      const expected: { request: number; flags: number; payload: string; fds: number[] }[] = [];
      const fdsAt = new Map<number, number[]>();
      let start = 0;
      for (const p of plan) {
        const fds = Array.from({ length: p.fdCount }, () => nextFd++);
        const chunk = bounds.findIndex((b, i) => i + 1 < bounds.length && start >= b && start < (bounds[i + 1] ?? 0));
        fdsAt.set(chunk, [...(fdsAt.get(chunk) ?? []), ...fds]);
        expected.push({
          request: p.bytes[0] ?? 0,
          flags: p.bytes[4] ?? 0,
          payload: toHex(p.bytes.subarray(12)),
          fds,
        });
        start += p.bytes.length;
      }
      const { reader: r, closed } = reader();
      const got: Message[] = [];
      for (let i = 0; i + 1 < bounds.length; i++) {
        got.push(...r.push(stream.subarray(bounds[i], bounds[i + 1]), fdsAt.get(i) ?? []));
      }
      assert.deepEqual(got.map(summary), expected);
      assert.deepEqual(closed, []);
      assert.equal(r.hasPartialMessage, false);
      assert.equal(r.queuedFdCount, 0);
    }),
  );
});
