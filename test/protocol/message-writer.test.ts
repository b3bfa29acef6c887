// Whole-message encoding: header and payload in one buffer, and replies read back with a reply-stream reader.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  FrontendRequest,
  HeaderFlag,
  MessageReader,
  encodeAck,
  encodeMessage,
  encodeMessageWith,
  encodeReply,
  encodeRequest,
  inflightPayload,
  u64Payload,
  vringStatePayload,
} from '../../src/protocol/index.js';
import { fdSpy, hex, toHex } from './helpers.js';

test('encodeMessage: a GET_FEATURES request', () => {
  assert.equal(toHex(encodeMessage(FrontendRequest.GET_FEATURES, HeaderFlag.VERSION)), '010000000100000000000000');
});

test('encodeRequest: flags VERSION, plus NEED_REPLY on request', () => {
  assert.equal(
    toHex(encodeRequest(FrontendRequest.SET_VRING_NUM, vringStatePayload.encode({ index: 0, num: 256 }))),
    '08000000' + '01000000' + '08000000' + '00000000' + '00010000',
  );
  assert.equal(toHex(encodeRequest(FrontendRequest.SET_OWNER, undefined, true)), '03000000' + '09000000' + '00000000');
});

test('encodeReply: flags VERSION | REPLY', () => {
  assert.equal(
    toHex(encodeReply(FrontendRequest.GET_FEATURES, u64Payload.encode(0x1_4000_0000n))),
    '01000000' + '05000000' + '08000000' + '0000004001000000',
  );
  assert.equal(toHex(encodeReply(FrontendRequest.GET_CONFIG)), '18000000' + '05000000' + '00000000');
});

test('encodeAck: a REPLY_ACK u64, 0 for success', () => {
  const ok = encodeAck(FrontendRequest.SET_MEM_TABLE);
  assert.equal(toHex(ok), '05000000' + '05000000' + '08000000' + '0000000000000000');
  const failed = encodeAck(FrontendRequest.SET_VRING_ADDR, 1n);
  assert.equal(toHex(failed), '09000000' + '05000000' + '08000000' + '0100000000000000');
});

test('encodeMessageWith matches encodeMessage with codec.encode', () => {
  const value = { mmapSize: 0x2000n, mmapOffset: 0n, numQueues: 1, queueSize: 128 };
  assert.deepEqual(
    encodeMessageWith(FrontendRequest.GET_INFLIGHT_FD, HeaderFlag.VERSION, inflightPayload, value),
    encodeMessage(FrontendRequest.GET_INFLIGHT_FD, HeaderFlag.VERSION, inflightPayload.encode(value)),
  );
});

test('encoded replies parse with a reply-stream reader', () => {
  const spy = fdSpy();
  const reader = new MessageReader({ closeFd: spy.closeFd, direction: 'replies' });
  const inflight = { mmapSize: 0x2000n, mmapOffset: 0n, numQueues: 1, queueSize: 128 };
  const bytes = new Uint8Array([
    ...encodeAck(FrontendRequest.SET_FEATURES),
    ...encodeReply(FrontendRequest.GET_INFLIGHT_FD, inflightPayload.encode(inflight)),
  ]);
  const [ack, reply] = reader.push(bytes, [30]);
  assert.ok(ack && reply);
  assert.equal(u64Payload.decode(ack.payload), 0n);
  assert.deepEqual(ack.fds, []);
  assert.deepEqual(inflightPayload.decode(reply.payload), inflight);
  assert.deepEqual(reply.fds, [30]);
  assert.deepEqual(spy.closed, []);
});

test('encoded requests parse with a request-stream reader', () => {
  const reader = new MessageReader({ closeFd: () => undefined });
  const [message] = reader.push(encodeRequest(FrontendRequest.SET_VRING_NUM, hex('01000000 80000000'), true), []);
  assert.ok(message);
  assert.equal(message.flags, HeaderFlag.VERSION | HeaderFlag.NEED_REPLY);
  assert.deepEqual(vringStatePayload.decode(message.payload), { index: 1, num: 128 });
});
