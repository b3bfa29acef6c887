// The 12-byte header (spec "Header"): request u32, flags u32, size u32, little endian.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  FrontendRequest,
  HeaderFlag,
  decodeHeader,
  encodeHeader,
  encodeHeaderInto,
  headerVersion,
  isReply,
  needsReply,
  validateReplyHeader,
  validateRequestHeader,
} from '../../src/protocol/index.js';
import { hex, protocolError, toHex } from './helpers.js';

test('a GET_FEATURES request header: request 1, flags version 1, no payload', () => {
  const header = decodeHeader(hex('01000000 01000000 00000000'));
  assert.deepEqual(header, { request: FrontendRequest.GET_FEATURES, flags: HeaderFlag.VERSION, size: 0 });
  validateRequestHeader(header);
});

test('a GET_FEATURES reply header: flags version | reply, 8-byte payload', () => {
  const header = decodeHeader(hex('01000000 05000000 08000000'));
  assert.deepEqual(header, { request: 1, flags: 5, size: 8 });
  assert.ok(isReply(header.flags));
  validateReplyHeader(header);
});

test('encodeHeader writes the same bytes decodeHeader reads', () => {
  const flags = HeaderFlag.VERSION | HeaderFlag.NEED_REPLY;
  const header = { request: FrontendRequest.SET_MEM_TABLE, flags, size: 72 };
  const bytes = encodeHeader(header);
  assert.equal(toHex(bytes), '05000000' + '09000000' + '48000000');
  assert.deepEqual(decodeHeader(bytes), header);
});

test('encodeHeaderInto writes at an offset and returns the end', () => {
  const target = new Uint8Array(16).fill(0xee);
  assert.equal(encodeHeaderInto({ request: 2, flags: 1, size: 8 }, target, 2), 14);
  assert.equal(toHex(target), 'eeee' + '02000000' + '01000000' + '08000000' + 'eeee');
  assert.throws(() => encodeHeaderInto({ request: 2, flags: 1, size: 8 }, target, 5), RangeError);
});

test('encodeHeader rejects fields that are not u32', () => {
  assert.throws(() => encodeHeader({ request: -1, flags: 1, size: 0 }), RangeError);
  assert.throws(() => encodeHeader({ request: 1, flags: 1, size: 2 ** 32 }), RangeError);
  assert.throws(() => encodeHeader({ request: 1.5, flags: 1, size: 0 }), RangeError);
});

test('decodeHeader reads the top bit of a u32 as unsigned', () => {
  assert.deepEqual(decodeHeader(hex('ffffffff 01000080 00000000')), {
    request: 0xffff_ffff,
    flags: 0x8000_0001,
    size: 0,
  });
});

test('decodeHeader needs 12 bytes', () => {
  assert.throws(() => decodeHeader(hex('01000000 01000000 000000')), protocolError('VHOST_PROTOCOL_BAD_HEADER'));
  assert.throws(() => decodeHeader(hex('01000000 01000000 00000000'), 1), protocolError('VHOST_PROTOCOL_BAD_HEADER'));
});

test('flag helpers', () => {
  assert.equal(headerVersion(0x0d), 1);
  assert.equal(headerVersion(0x02), 2);
  assert.ok(needsReply(0x09));
  assert.ok(!needsReply(0x05));
  assert.ok(isReply(0x05));
  assert.ok(!isReply(0x09));
});

test('the version must be 1', () => {
  for (const flags of [0x0, 0x2, 0x3, 0x8]) {
    assert.throws(
      () => validateRequestHeader({ request: 1, flags, size: 0 }),
      protocolError('VHOST_PROTOCOL_BAD_VERSION'),
    );
    assert.throws(
      () => validateReplyHeader({ request: 1, flags: flags | HeaderFlag.REPLY, size: 0 }),
      protocolError('VHOST_PROTOCOL_BAD_VERSION'),
    );
  }
});

test('the reply bit must be clear on requests and set on replies', () => {
  assert.throws(
    () => validateRequestHeader({ request: 1, flags: 0x5, size: 0 }),
    protocolError('VHOST_PROTOCOL_UNEXPECTED_REPLY'),
  );
  assert.throws(
    () => validateReplyHeader({ request: 1, flags: 0x1, size: 8 }),
    protocolError('VHOST_PROTOCOL_NOT_A_REPLY'),
  );
  validateRequestHeader({ request: 2, flags: 0x9, size: 8 });
});

test('the payload size is capped (4096 by default)', () => {
  validateRequestHeader({ request: 24, flags: 1, size: 4096 });
  assert.throws(
    () => validateRequestHeader({ request: 24, flags: 1, size: 4097 }),
    protocolError('VHOST_PROTOCOL_MESSAGE_TOO_LARGE'),
  );
  assert.throws(
    () => validateRequestHeader({ request: 24, flags: 1, size: 0xffff_ffff }),
    protocolError('VHOST_PROTOCOL_MESSAGE_TOO_LARGE'),
  );
  assert.throws(
    () => validateReplyHeader({ request: 24, flags: 5, size: 65 }, 64),
    protocolError('VHOST_PROTOCOL_MESSAGE_TOO_LARGE'),
  );
});

test('error messages name the request', () => {
  assert.throws(() => validateRequestHeader({ request: 12, flags: 0, size: 8 }), /SET_VRING_KICK/);
  assert.throws(() => validateRequestHeader({ request: 12, flags: 0, size: 8 }, 4096, 'custom name'), /custom name/);
});
