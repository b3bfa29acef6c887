/**
 * Encoding of whole messages (spec "Message Specification"): the 12-byte header and the payload in one buffer, so
 * each message goes out in one `sendmsg` with its fds (a peer's reader relies on that, see message-reader.ts).
 *
 * Replies are read with the same `MessageReader`, created with `direction: 'replies'`.
 */
import { HEADER_SIZE, HeaderFlag } from './constants.js';
import { encodeHeaderInto } from './header.js';
import { type Codec, u64Payload } from './payloads.js';

const EMPTY = new Uint8Array(0);

/** Header plus `payload` in one new buffer; `flags` are written as given. */
export function encodeMessage(request: number, flags: number, payload: Uint8Array = EMPTY): Uint8Array {
  const bytes = new Uint8Array(HEADER_SIZE + payload.length);
  encodeHeaderInto({ request, flags, size: payload.length }, bytes, 0);
  bytes.set(payload, HEADER_SIZE);
  return bytes;
}

/** Header plus `codec.encode(value)` in one new buffer, without an intermediate payload copy. */
export function encodeMessageWith<T>(request: number, flags: number, codec: Codec<T>, value: T): Uint8Array {
  const size = codec.size(value);
  const bytes = new Uint8Array(HEADER_SIZE + size);
  encodeHeaderInto({ request, flags, size }, bytes, 0);
  codec.encodeInto(value, bytes, HEADER_SIZE);
  return bytes;
}

/** A request: flags VERSION, plus NEED_REPLY when `needReply` (a REPLY_ACK u64 is then expected back). */
export function encodeRequest(request: number, payload: Uint8Array = EMPTY, needReply = false): Uint8Array {
  return encodeMessage(request, HeaderFlag.VERSION | (needReply ? HeaderFlag.NEED_REPLY : 0), payload);
}

/** A reply to `request`: flags VERSION | REPLY. */
export function encodeReply(request: number, payload: Uint8Array = EMPTY): Uint8Array {
  return encodeMessage(request, HeaderFlag.VERSION | HeaderFlag.REPLY, payload);
}

/**
 * The REPLY_ACK answer to `request` (spec "VHOST_USER_PROTOCOL_F_REPLY_ACK"): a u64 reply, 0 for success and
 * non-zero for failure.
 */
export function encodeAck(request: number, status: bigint = 0n): Uint8Array {
  return encodeMessageWith(request, HeaderFlag.VERSION | HeaderFlag.REPLY, u64Payload, status);
}
