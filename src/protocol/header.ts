/**
 * The vhost-user message header (spec "Message Specification" / "Header"):
 *
 * | offset | field   | type | meaning                                                              |
 * |--------|---------|------|----------------------------------------------------------------------|
 * | 0      | request | u32  | message type (`FrontendRequest` or, on the back-end channel, `BackendRequest`) |
 * | 4      | flags   | u32  | bits 0-1 version (1), bit 2 reply, bit 3 need_reply                  |
 * | 8      | size    | u32  | payload size in bytes, not counting the header                        |
 */
import { ProtocolError } from '../errors.js';
import { HEADER_SIZE, HeaderFlag, MAX_PAYLOAD_SIZE, ProtocolErrorCode, requestName } from './constants.js';
import { checkU32, readU32, writeU32 } from './wire.js';

/** A decoded header (spec "Header"). */
export interface MessageHeader {
  /** Message type. */
  readonly request: number;
  /** Flag bits, see `HeaderFlag`. */
  readonly flags: number;
  /** Payload size in bytes. */
  readonly size: number;
}

/** The version field of `flags` (the lower 2 bits; only 1 is defined). */
export function headerVersion(flags: number): number {
  return flags & HeaderFlag.VERSION_MASK;
}

/** Whether `flags` has the REPLY bit (bit 2). */
export function isReply(flags: number): boolean {
  return (flags & HeaderFlag.REPLY) !== 0;
}

/** Whether `flags` has the NEED_REPLY bit (bit 3): the sender wants a u64 ack (spec "REPLY_ACK"). */
export function needsReply(flags: number): boolean {
  return (flags & HeaderFlag.NEED_REPLY) !== 0;
}

/** Writes `header` into `target` at `offset` (12 bytes) and returns the offset after it. */
export function encodeHeaderInto(header: MessageHeader, target: Uint8Array, offset = 0): number {
  checkU32(header.request, 'request');
  checkU32(header.flags, 'flags');
  checkU32(header.size, 'size');
  if (offset < 0 || target.length - offset < HEADER_SIZE) throw new RangeError('header does not fit the target');
  writeU32(target, offset, header.request);
  writeU32(target, offset + 4, header.flags);
  writeU32(target, offset + 8, header.size);
  return offset + HEADER_SIZE;
}

/** The 12 header bytes of `header`. */
export function encodeHeader(header: MessageHeader): Uint8Array {
  const bytes = new Uint8Array(HEADER_SIZE);
  encodeHeaderInto(header, bytes, 0);
  return bytes;
}

/**
 * Reads the header at `offset` of `bytes`. Only checks that 12 bytes are there (`VHOST_PROTOCOL_BAD_HEADER`); use
 * `validateRequestHeader` / `validateReplyHeader` for the flag rules.
 */
export function decodeHeader(bytes: Uint8Array, offset = 0): MessageHeader {
  if (offset < 0 || bytes.length - offset < HEADER_SIZE) {
    throw new ProtocolError(
      ProtocolErrorCode.BAD_HEADER,
      `a header is ${HEADER_SIZE} bytes, got ${Math.max(0, bytes.length - offset)}`,
    );
  }
  return {
    request: readU32(bytes, offset),
    flags: readU32(bytes, offset + 4),
    size: readU32(bytes, offset + 8),
  };
}

/** Throws `VHOST_PROTOCOL_BAD_VERSION` unless the header's version is 1. `name` only appears in the message. */
export function checkVersion(header: MessageHeader, name = requestName(header.request)): void {
  const version = headerVersion(header.flags);
  if (version !== HeaderFlag.VERSION) {
    throw new ProtocolError(
      ProtocolErrorCode.BAD_VERSION,
      `${name}: unsupported protocol version ${version} (flags 0x${header.flags.toString(16)})`,
    );
  }
}

/** Throws `VHOST_PROTOCOL_MESSAGE_TOO_LARGE` if the payload size is over `maxPayload`. */
export function checkSize(
  header: MessageHeader,
  maxPayload = MAX_PAYLOAD_SIZE,
  name = requestName(header.request),
): void {
  if (header.size > maxPayload) {
    throw new ProtocolError(
      ProtocolErrorCode.MESSAGE_TOO_LARGE,
      `${name}: payload of ${header.size} bytes is over the ${maxPayload}-byte limit`,
    );
  }
}

/**
 * Checks a header received as a request: version 1 (`VHOST_PROTOCOL_BAD_VERSION`), REPLY bit clear
 * (`VHOST_PROTOCOL_UNEXPECTED_REPLY`), size within `maxPayload` (`VHOST_PROTOCOL_MESSAGE_TOO_LARGE`).
 * Other flag bits are not checked: the spec reserves none of them explicitly. `name` only appears in error
 * messages (default: the front-end request name).
 */
export function validateRequestHeader(
  header: MessageHeader,
  maxPayload = MAX_PAYLOAD_SIZE,
  name = requestName(header.request),
): void {
  checkVersion(header, name);
  if (isReply(header.flags)) {
    throw new ProtocolError(
      ProtocolErrorCode.UNEXPECTED_REPLY,
      `${name}: a request has the REPLY flag set`,
    );
  }
  checkSize(header, maxPayload, name);
}

/**
 * Checks a header received as a reply: version 1, REPLY bit set (`VHOST_PROTOCOL_NOT_A_REPLY`), size within
 * `maxPayload`. Whether it answers the request that was sent is the caller's business.
 */
export function validateReplyHeader(
  header: MessageHeader,
  maxPayload = MAX_PAYLOAD_SIZE,
  name = requestName(header.request),
): void {
  checkVersion(header, name);
  if (!isReply(header.flags)) {
    throw new ProtocolError(
      ProtocolErrorCode.NOT_A_REPLY,
      `${name}: expected a reply, the REPLY flag is clear`,
    );
  }
  checkSize(header, maxPayload, name);
}
