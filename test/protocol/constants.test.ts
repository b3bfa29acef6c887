// Message numbers and feature bits, checked against the spec's lists (docs/interop/vhost-user.rst).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  BackendRequest,
  FrontendRequest,
  ProtocolFeature,
  VirtioFeature,
  backendRequestName,
  featureBit,
  hasFeature,
  requestName,
} from '../../src/protocol/index.js';

test('front-end message types are numbered 1..44 without gaps or duplicates', () => {
  const codes = Object.values(FrontendRequest).sort((a, b) => a - b);
  assert.deepEqual(
    codes,
    Array.from({ length: 44 }, (_, i) => i + 1),
  );
});

test('front-end message numbers match the spec', () => {
  assert.equal(FrontendRequest.GET_FEATURES, 1);
  assert.equal(FrontendRequest.SET_MEM_TABLE, 5);
  assert.equal(FrontendRequest.SET_VRING_KICK, 12);
  assert.equal(FrontendRequest.GET_PROTOCOL_FEATURES, 15);
  assert.equal(FrontendRequest.SET_BACKEND_REQ_FD, 21);
  assert.equal(FrontendRequest.GET_CONFIG, 24);
  assert.equal(FrontendRequest.GET_INFLIGHT_FD, 31);
  assert.equal(FrontendRequest.SET_INFLIGHT_FD, 32);
  assert.equal(FrontendRequest.ADD_MEM_REG, 37);
  assert.equal(FrontendRequest.REM_MEM_REG, 38);
  assert.equal(FrontendRequest.SET_STATUS, 39);
  assert.equal(FrontendRequest.SET_DEVICE_STATE_FD, 42);
  assert.equal(FrontendRequest.CHECK_DEVICE_STATE, 43);
});

test('back-end message types are numbered 1..10', () => {
  assert.deepEqual(
    Object.values(BackendRequest).sort((a, b) => a - b),
    Array.from({ length: 10 }, (_, i) => i + 1),
  );
  assert.equal(BackendRequest.CONFIG_CHANGE_MSG, 2);
  assert.equal(BackendRequest.SHARED_OBJECT_LOOKUP, 8);
});

test('protocol feature bits match the spec: MQ 0 ... DEVICE_STATE 19', () => {
  assert.equal(ProtocolFeature.MQ, 0);
  assert.equal(ProtocolFeature.LOG_SHMFD, 1);
  assert.equal(ProtocolFeature.REPLY_ACK, 3);
  assert.equal(ProtocolFeature.BACKEND_REQ, 5);
  assert.equal(ProtocolFeature.CONFIG, 9);
  assert.equal(ProtocolFeature.INFLIGHT_SHMFD, 12);
  assert.equal(ProtocolFeature.CONFIGURE_MEM_SLOTS, 15);
  assert.equal(ProtocolFeature.STATUS, 16);
  assert.equal(ProtocolFeature.DEVICE_STATE, 19);
  const bits = Object.values(ProtocolFeature).sort((a, b) => a - b);
  assert.deepEqual(
    bits,
    Array.from({ length: 21 }, (_, i) => i),
  );
});

test('virtio feature bits', () => {
  assert.equal(VirtioFeature.RING_INDIRECT_DESC, 28);
  assert.equal(VirtioFeature.RING_EVENT_IDX, 29);
  assert.equal(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES, 30);
  assert.equal(VirtioFeature.VERSION_1, 32);
  assert.equal(VirtioFeature.ACCESS_PLATFORM, 33);
  assert.equal(VirtioFeature.RING_PACKED, 34);
});

test('featureBit and hasFeature work on 64-bit sets', () => {
  assert.equal(featureBit(VirtioFeature.VERSION_1), 0x1_0000_0000n);
  assert.equal(featureBit(63), 0x8000_0000_0000_0000n);
  const features = featureBit(VirtioFeature.VERSION_1) | featureBit(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES);
  assert.equal(features, 0x1_4000_0000n);
  assert.ok(hasFeature(features, 32));
  assert.ok(hasFeature(features, 30));
  assert.ok(!hasFeature(features, 29));
  assert.throws(() => featureBit(64), RangeError);
  assert.throws(() => featureBit(-1), RangeError);
  assert.throws(() => featureBit(1.5), RangeError);
});

test('requestName names messages for logs', () => {
  assert.equal(requestName(1), 'GET_FEATURES');
  assert.equal(requestName(FrontendRequest.SET_VRING_CALL), 'SET_VRING_CALL');
  assert.equal(requestName(999), 'UNKNOWN(999)');
  assert.equal(backendRequestName(2), 'CONFIG_CHANGE_MSG');
  assert.equal(backendRequestName(0), 'UNKNOWN(0)');
});
