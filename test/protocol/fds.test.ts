// fd counts per message (spec "Communication": the messages that carry fds in their ancillary data).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  BackendRequest,
  FrontendRequest,
  expectedFdCount,
  maxFdCount,
  messageName,
  optionalFdCount,
} from '../../src/protocol/index.js';
import { concat, hex, protocolError } from './helpers.js';

const NONE = new Uint8Array(0);
const U64_ZERO = hex('0000000000000000');

test('requests that carry exactly one fd', () => {
  for (const request of [
    FrontendRequest.ADD_MEM_REG,
    FrontendRequest.SET_LOG_BASE,
    FrontendRequest.SET_LOG_FD,
    FrontendRequest.SET_BACKEND_REQ_FD,
    FrontendRequest.SET_INFLIGHT_FD,
    FrontendRequest.GPU_SET_SOCKET,
    FrontendRequest.SET_DEVICE_STATE_FD,
  ]) {
    assert.equal(expectedFdCount(request, NONE), 1, messageName(request, 'requests'));
  }
});

test('requests that carry no fd, and unknown requests', () => {
  for (const request of [
    FrontendRequest.GET_FEATURES,
    FrontendRequest.SET_FEATURES,
    FrontendRequest.SET_OWNER,
    FrontendRequest.SET_VRING_NUM,
    FrontendRequest.SET_VRING_ADDR,
    FrontendRequest.GET_VRING_BASE,
    FrontendRequest.GET_INFLIGHT_FD,
    FrontendRequest.REM_MEM_REG,
    FrontendRequest.SET_CONFIG,
    999,
  ]) {
    assert.equal(expectedFdCount(request, NONE), 0, messageName(request, 'requests'));
  }
});

test('SET_MEM_TABLE carries one fd per region', () => {
  const region = new Uint8Array(32);
  assert.equal(expectedFdCount(FrontendRequest.SET_MEM_TABLE, concat(hex('01000000 00000000'), region)), 1);
  assert.equal(
    expectedFdCount(FrontendRequest.SET_MEM_TABLE, concat(hex('03000000 00000000'), region, region, region)),
    3,
  );
  assert.equal(
    expectedFdCount(FrontendRequest.SET_MEM_TABLE, concat(hex('08000000 00000000'), new Uint8Array(8 * 32))),
    8,
  );
});

test('SET_MEM_TABLE with a malformed payload is a framing error', () => {
  const bad = protocolError('VHOST_PROTOCOL_BAD_PAYLOAD');
  assert.throws(() => expectedFdCount(FrontendRequest.SET_MEM_TABLE, hex('01000000')), bad);
  assert.throws(() => expectedFdCount(FrontendRequest.SET_MEM_TABLE, hex('02000000 00000000')), bad);
  assert.throws(
    () => expectedFdCount(FrontendRequest.SET_MEM_TABLE, concat(hex('09000000 00000000'), new Uint8Array(9 * 32))),
    bad,
  );
});

test('SET_VRING_KICK/CALL/ERR carry one fd unless bit 8 is set', () => {
  const { SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR } = FrontendRequest;
  for (const request of [SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR]) {
    assert.equal(expectedFdCount(request, hex('0100000000000000')), 1);
    assert.equal(expectedFdCount(request, hex('0101000000000000')), 0);
    assert.throws(() => expectedFdCount(request, hex('01000000')), protocolError('VHOST_PROTOCOL_BAD_PAYLOAD'));
  }
});

test('replies: GET_INFLIGHT_FD carries one fd, SET_DEVICE_STATE_FD one unless bit 8', () => {
  assert.equal(expectedFdCount(FrontendRequest.GET_INFLIGHT_FD, new Uint8Array(24), 'replies'), 1);
  assert.equal(expectedFdCount(FrontendRequest.GET_FEATURES, U64_ZERO, 'replies'), 0);
  assert.equal(expectedFdCount(FrontendRequest.SET_MEM_TABLE, hex('01000000'), 'replies'), 0);
  assert.equal(expectedFdCount(FrontendRequest.SET_VRING_KICK, NONE, 'replies'), 0);
  assert.equal(expectedFdCount(FrontendRequest.SET_DEVICE_STATE_FD, U64_ZERO, 'replies'), 1);
  assert.equal(expectedFdCount(FrontendRequest.SET_DEVICE_STATE_FD, hex('0001000000000000'), 'replies'), 0);
});

test('back-end channel: VRING_HOST_NOTIFIER_MSG carries one fd unless bit 8, SHMEM_MAP one', () => {
  const area = new Uint8Array(24);
  assert.equal(expectedFdCount(BackendRequest.VRING_HOST_NOTIFIER_MSG, area, 'backend-requests'), 1);
  area[1] = 0x01;
  assert.equal(expectedFdCount(BackendRequest.VRING_HOST_NOTIFIER_MSG, area, 'backend-requests'), 0);
  assert.equal(expectedFdCount(BackendRequest.SHMEM_MAP, NONE, 'backend-requests'), 1);
  assert.equal(expectedFdCount(BackendRequest.CONFIG_CHANGE_MSG, NONE, 'backend-requests'), 0);
  assert.equal(expectedFdCount(BackendRequest.SHARED_OBJECT_LOOKUP, U64_ZERO, 'backend-replies'), 0);
});

test('optional fds', () => {
  assert.equal(optionalFdCount(FrontendRequest.REM_MEM_REG), 1);
  assert.equal(optionalFdCount(FrontendRequest.GET_FEATURES), 0);
  assert.equal(optionalFdCount(FrontendRequest.GET_SHARED_OBJECT, 'replies'), 1);
  assert.equal(optionalFdCount(FrontendRequest.POSTCOPY_ADVISE, 'replies'), 1);
  assert.equal(optionalFdCount(FrontendRequest.REM_MEM_REG, 'replies'), 0);
  assert.equal(optionalFdCount(BackendRequest.SHARED_OBJECT_LOOKUP, 'backend-replies'), 1);
  assert.equal(optionalFdCount(BackendRequest.SHARED_OBJECT_LOOKUP, 'backend-requests'), 0);
});

test('maxFdCount bounds a message from its header alone', () => {
  assert.equal(maxFdCount(FrontendRequest.SET_MEM_TABLE), 8);
  assert.equal(maxFdCount(FrontendRequest.SET_VRING_KICK), 1);
  assert.equal(maxFdCount(FrontendRequest.ADD_MEM_REG), 1);
  assert.equal(maxFdCount(FrontendRequest.REM_MEM_REG), 1);
  assert.equal(maxFdCount(FrontendRequest.GET_FEATURES), 0);
  assert.equal(maxFdCount(FrontendRequest.GET_INFLIGHT_FD, 'replies'), 1);
  assert.equal(maxFdCount(FrontendRequest.SET_DEVICE_STATE_FD, 'replies'), 1);
  assert.equal(maxFdCount(BackendRequest.VRING_HOST_NOTIFIER_MSG, 'backend-requests'), 1);
});

test('messageName tells the channels apart', () => {
  assert.equal(messageName(2, 'requests'), 'SET_FEATURES');
  assert.equal(messageName(2, 'replies'), 'SET_FEATURES reply');
  assert.equal(messageName(2, 'backend-requests'), 'CONFIG_CHANGE_MSG');
  assert.equal(messageName(8, 'backend-replies'), 'SHARED_OBJECT_LOOKUP reply');
});
