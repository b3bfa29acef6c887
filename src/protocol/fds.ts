/**
 * How many file descriptors each message carries in its ancillary data (SCM_RIGHTS).
 *
 * A SOCK_STREAM unix socket keeps no message boundaries, so the reader matches fds to messages by type: the spec's
 * "Communication" section lists the front-end messages with fds, and each message's own section says how many
 * (one per region for SET_MEM_TABLE, none for a kick/call/err whose payload has the "invalid FD" bit 8).
 *
 * Counts depend on the stream the message arrives on (`MessageDirection`): the same number means another message on
 * the back-end channel, and replies carry different fds than requests.
 */
import {
  BackendRequest,
  FrontendRequest,
  MAX_MEM_TABLE_REGIONS,
  VRING_NOFD_BIT,
  backendRequestName,
  requestName,
} from './constants.js';
import { badPayload, memoryTableRegionCount } from './payloads.js';
import { readU32 } from './wire.js';

/**
 * Which stream a message was read from:
 * - `requests`: front-end requests on the main socket (what a back-end reads);
 * - `replies`: back-end replies on the main socket (what a front-end reads);
 * - `backend-requests`: back-end requests on the back-end channel (what a front-end reads there);
 * - `backend-replies`: front-end replies on the back-end channel (what a back-end reads there).
 */
export type MessageDirection = 'requests' | 'replies' | 'backend-requests' | 'backend-replies';

/** Whether messages on `direction` are replies (must carry the REPLY flag) rather than requests. */
export function isReplyDirection(direction: MessageDirection): boolean {
  return direction === 'replies' || direction === 'backend-replies';
}

/** The name of `request` on `direction`, for logs and error messages. */
export function messageName(request: number, direction: MessageDirection): string {
  const name =
    direction === 'requests' || direction === 'replies' ? requestName(request) : backendRequestName(request);
  return isReplyDirection(direction) ? `${name} reply` : name;
}

/** Bit 8 of a u64 payload (kick/call/err, SET_DEVICE_STATE_FD reply, vring area): no fd attached. */
function noFdFlag(payload: Uint8Array, name: string, size: number): boolean {
  if (payload.length !== size) badPayload(name, `expected ${size} bytes, got ${payload.length}`);
  return (readU32(payload, 0) & VRING_NOFD_BIT) !== 0;
}

/**
 * The number of fds message `request` must carry, given its complete `payload`. Unknown requests take none.
 *
 * For `requests`: SET_MEM_TABLE takes `nregions` (the payload is structurally checked first, see
 * `memoryTableRegionCount`); SET_VRING_KICK/CALL/ERR take 1 unless bit 8 of their u64 is set; ADD_MEM_REG,
 * SET_LOG_BASE, SET_LOG_FD, SET_BACKEND_REQ_FD, SET_INFLIGHT_FD, GPU_SET_SOCKET and SET_DEVICE_STATE_FD take 1.
 * SET_LOG_BASE is counted as 1: its fd is only absent without LOG_SHMFD, where QEMU does not migrate at all.
 *
 * For `replies`: GET_INFLIGHT_FD takes 1; SET_DEVICE_STATE_FD takes 1 unless bit 8 of its u64 is set.
 * For `backend-requests`: VRING_HOST_NOTIFIER_MSG takes 1 unless bit 8 of its first u64 is set; SHMEM_MAP takes 1.
 * For `backend-replies`: none required (see `optionalFdCount`).
 *
 * Throws `VHOST_PROTOCOL_BAD_PAYLOAD` when the count depends on a payload that is malformed: for these messages a
 * bad payload is a framing error.
 */
export function expectedFdCount(
  request: number,
  payload: Uint8Array,
  direction: MessageDirection = 'requests',
): number {
  switch (direction) {
    case 'requests':
      switch (request) {
        case FrontendRequest.SET_MEM_TABLE:
          return memoryTableRegionCount(payload);
        case FrontendRequest.SET_VRING_KICK:
        case FrontendRequest.SET_VRING_CALL:
        case FrontendRequest.SET_VRING_ERR:
          return noFdFlag(payload, requestName(request), 8) ? 0 : 1;
        case FrontendRequest.ADD_MEM_REG:
        case FrontendRequest.SET_LOG_BASE:
        case FrontendRequest.SET_LOG_FD:
        case FrontendRequest.SET_BACKEND_REQ_FD:
        case FrontendRequest.SET_INFLIGHT_FD:
        case FrontendRequest.GPU_SET_SOCKET:
        case FrontendRequest.SET_DEVICE_STATE_FD:
          return 1;
        default:
          return 0;
      }
    case 'replies':
      switch (request) {
        case FrontendRequest.GET_INFLIGHT_FD:
          return 1;
        case FrontendRequest.SET_DEVICE_STATE_FD:
          return noFdFlag(payload, messageName(request, direction), 8) ? 0 : 1;
        default:
          return 0;
      }
    case 'backend-requests':
      switch (request) {
        case BackendRequest.VRING_HOST_NOTIFIER_MSG:
          return noFdFlag(payload, messageName(request, direction), 24) ? 0 : 1;
        case BackendRequest.SHMEM_MAP:
          return 1;
        default:
          return 0;
      }
    case 'backend-replies':
      return 0;
  }
}

/**
 * Fds a message may carry on top of `expectedFdCount` (0 or 1):
 * - `requests`: REM_MEM_REG. The spec: "No file descriptors SHOULD be passed ... the back-end MAY accept messages
 *   with one file descriptor. If a file descriptor is passed, the back-end MUST close it without using it." The
 *   reader accepts it and closes it; it never reaches the message.
 * - `replies`: GET_SHARED_OBJECT and POSTCOPY_ADVISE (an fd on success, none on failure); delivered.
 * - `backend-replies`: SHARED_OBJECT_LOOKUP (a dma-buf fd on success); delivered.
 *
 * Stream sockets do not mark which message an optional fd belongs to, so the reader only grants one to a message
 * that is the last one completed in a read with nothing after it (where the kernel puts an fd-bearing message).
 */
export function optionalFdCount(request: number, direction: MessageDirection = 'requests'): number {
  switch (direction) {
    case 'requests':
      return request === FrontendRequest.REM_MEM_REG ? 1 : 0;
    case 'replies':
      return request === FrontendRequest.GET_SHARED_OBJECT || request === FrontendRequest.POSTCOPY_ADVISE ? 1 : 0;
    case 'backend-requests':
      return 0;
    case 'backend-replies':
      return request === BackendRequest.SHARED_OBJECT_LOOKUP ? 1 : 0;
  }
}

/**
 * The most fds message `request` can take, known from its header alone (before the payload is complete): used to
 * reject surplus fds early. SET_MEM_TABLE may take up to `MAX_MEM_TABLE_REGIONS`; payload-dependent counts take
 * their maximum.
 */
export function maxFdCount(request: number, direction: MessageDirection = 'requests'): number {
  switch (direction) {
    case 'requests':
      switch (request) {
        case FrontendRequest.SET_MEM_TABLE:
          return MAX_MEM_TABLE_REGIONS;
        case FrontendRequest.SET_VRING_KICK:
        case FrontendRequest.SET_VRING_CALL:
        case FrontendRequest.SET_VRING_ERR:
          return 1;
      }
      break;
    case 'replies':
      if (request === FrontendRequest.SET_DEVICE_STATE_FD) return 1;
      break;
    case 'backend-requests':
      if (request === BackendRequest.VRING_HOST_NOTIFIER_MSG) return 1;
      break;
    case 'backend-replies':
      break;
  }
  // The remaining counts do not look at the payload.
  return expectedFdCount(request, EMPTY, direction) + optionalFdCount(request, direction);
}

const EMPTY = new Uint8Array(0);
