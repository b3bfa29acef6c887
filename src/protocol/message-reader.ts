/**
 * Framing of vhost-user messages on a SOCK_STREAM unix socket, with fd accounting.
 *
 * A state machine in the style of ws's `Receiver`: bytes arrive in arbitrary chunks (a header may be split across
 * reads, several messages may come in one read), and each complete message (12-byte header, then `size` payload
 * bytes; spec "Message Specification") is returned with a copy of its payload.
 *
 * File descriptors arrive beside the bytes (SCM_RIGHTS) without marking which message they belong to. Linux hands
 * a read's fds over with the first byte of the `sendmsg` that carried them, merges earlier fd-less bytes into the
 * same read, and ends the read after one fd-bearing chunk (docs/node-native.md §4). So the reader keeps the fds of
 * each read in a FIFO, and each complete message takes from it exactly the number its type implies
 * (`expectedFdCount`). What cannot happen with a well-behaved peer is an error:
 * - a message needs more fds than are queued (`VHOST_PROTOCOL_MISSING_FDS`);
 * - fds are left over after a read while no partial message could take them (`VHOST_PROTOCOL_UNEXPECTED_FDS`):
 *   they came with a message that takes none;
 * - more than `MAX_FDS` fds are queued (`VHOST_PROTOCOL_TOO_MANY_FDS`).
 *
 * The reader only frames. It checks the header (version, REPLY flag for the stream's direction, size cap) and the
 * payloads fd counts depend on (SET_MEM_TABLE, kick/call/err); everything else (unknown request types, payload
 * lengths of other messages) is left to whoever handles the message.
 *
 * After an error the reader is dead: it has closed every fd it held (queued ones and those of messages completed in
 * the failing push, which are never returned), and every later `push` closes the fds it is given and throws the same
 * error. The owner should drop the connection.
 */
import { ProtocolError, VhostError } from '../errors.js';
import { HEADER_SIZE, MAX_FDS, MAX_PAYLOAD_SIZE, ProtocolErrorCode } from './constants.js';
import {
  type MessageDirection,
  expectedFdCount,
  isReplyDirection,
  maxFdCount,
  messageName,
  optionalFdCount,
} from './fds.js';
import { validateReplyHeader, validateRequestHeader } from './header.js';
import { readU32 } from './wire.js';

/** One complete message. */
export interface Message {
  /** Message type (`FrontendRequest`, or `BackendRequest` on the back-end channel). */
  request: number;
  /** Header flags (`HeaderFlag`). */
  flags: number;
  /** The payload: a copy in its own `ArrayBuffer`, safe to keep. */
  payload: Uint8Array;
  /** The fds that came with the message, in order. The receiver owns them and must close them. */
  fds: number[];
}

/** Options of `MessageReader`. */
export interface MessageReaderOptions {
  /** Closes an fd the reader drops (errors, `close()`, a stray REM_MEM_REG fd). Exceptions it throws are ignored. */
  closeFd: (fd: number) => void;
  /** Largest accepted payload in bytes (default `MAX_PAYLOAD_SIZE`, 4096). */
  maxPayload?: number;
  /** Which stream this is (default `'requests'`): decides fd counts and whether the REPLY flag must be set. */
  direction?: MessageDirection;
}

/** Frames messages and matches fds to them; see the module comment. */
export class MessageReader {
  readonly #closeFd: (fd: number) => void;
  readonly #maxPayload: number;
  readonly #direction: MessageDirection;
  readonly #replies: boolean;

  /** The header being assembled; `#headerFill` bytes of it are valid. */
  readonly #header = new Uint8Array(HEADER_SIZE);
  #headerFill = 0;
  /** Set once the header is complete: the payload being filled (`#payloadFill` bytes so far). */
  #payload: Uint8Array | null = null;
  #payloadFill = 0;
  #request = 0;
  #flags = 0;

  /** Received fds not yet given to a message, oldest first. */
  readonly #fds: number[] = [];
  #error: unknown = undefined;
  #failed = false;
  #closed = false;

  constructor(options: MessageReaderOptions) {
    const maxPayload = options.maxPayload ?? MAX_PAYLOAD_SIZE;
    if (!Number.isInteger(maxPayload) || maxPayload < 0 || maxPayload > 0xffff_ffff) {
      throw new RangeError(`maxPayload must be an integer in [0, 2^32): ${maxPayload}`);
    }
    this.#closeFd = options.closeFd;
    this.#maxPayload = maxPayload;
    this.#direction = options.direction ?? 'requests';
    this.#replies = isReplyDirection(this.#direction);
  }

  /** The stream this reader frames. */
  get direction(): MessageDirection {
    return this.#direction;
  }

  /** Whether part of a message (some header or payload bytes) is buffered: at EOF this means a truncated message. */
  get hasPartialMessage(): boolean {
    return this.#headerFill > 0;
  }

  /** Number of fds received and not yet given to a message. */
  get queuedFdCount(): number {
    return this.#fds.length;
  }

  /**
   * Feeds the bytes and fds of one read and returns the messages it completed, oldest first. `bytes` is not kept
   * (it may be a reused receive buffer); the reader owns `fds` from now on. Throws a `ProtocolError` on a framing
   * error (see the module comment), after which the reader is dead.
   */
  push(bytes: Uint8Array, fds: readonly number[] = []): Message[] {
    if (this.#failed || this.#closed) {
      this.#closeAll(fds);
      if (this.#failed) throw this.#error;
      throw new VhostError('VHOST_READER_CLOSED', 'the message reader is closed');
    }
    const out: Message[] = [];
    try {
      for (const fd of fds) this.#fds.push(fd);
      if (this.#fds.length > MAX_FDS) {
        throw new ProtocolError(
          ProtocolErrorCode.TOO_MANY_FDS,
          `${this.#fds.length} fds queued, at most ${MAX_FDS} are allowed`,
        );
      }
      let pos = 0;
      const end = bytes.length;
      while (pos < end) {
        const payload = this.#payload;
        if (payload === null) {
          const header = this.#header;
          let fill = this.#headerFill;
          while (fill < HEADER_SIZE && pos < end) header[fill++] = bytes[pos++] ?? 0;
          this.#headerFill = fill;
          if (fill === HEADER_SIZE) this.#startPayload(out);
        } else {
          const n = Math.min(payload.length - this.#payloadFill, end - pos);
          payload.set(bytes.subarray(pos, pos + n), this.#payloadFill);
          this.#payloadFill += n;
          pos += n;
          if (this.#payloadFill === payload.length) this.#finishMessage(out);
        }
      }
      if (this.#fds.length > 0) this.#settleLeftoverFds(out);
      return out;
    } catch (err) {
      this.#fail(err, out);
      throw err;
    }
  }

  /** Closes the queued fds and drops any partial message. Later pushes throw `VHOST_READER_CLOSED`. Idempotent. */
  close(): void {
    this.#closed = true;
    this.#dropState();
  }

  /** The header is complete: validate it and set up the payload buffer. */
  #startPayload(out: Message[]): void {
    const header = this.#header;
    const request = readU32(header, 0);
    const flags = readU32(header, 4);
    const size = readU32(header, 8);
    const decoded = { request, flags, size };
    const name = messageName(request, this.#direction);
    if (this.#replies) validateReplyHeader(decoded, this.#maxPayload, name);
    else validateRequestHeader(decoded, this.#maxPayload, name);
    this.#request = request;
    this.#flags = flags;
    this.#payload = new Uint8Array(size);
    this.#payloadFill = 0;
    if (size === 0) this.#finishMessage(out);
  }

  /** The payload is complete: take the message's fds and emit it. */
  #finishMessage(out: Message[]): void {
    const payload = this.#payload ?? new Uint8Array(0);
    const request = this.#request;
    const flags = this.#flags;
    this.#payload = null;
    this.#payloadFill = 0;
    this.#headerFill = 0;
    const count = expectedFdCount(request, payload, this.#direction);
    if (this.#fds.length < count) {
      throw new ProtocolError(
        ProtocolErrorCode.MISSING_FDS,
        `${messageName(request, this.#direction)} needs ${count} fd(s), ${this.#fds.length} arrived`,
      );
    }
    out.push({ request, flags, payload, fds: count === 0 ? [] : this.#fds.splice(0, count) });
  }

  /** The read is consumed and fds are still queued: they belong to the partial message, or to nobody. */
  #settleLeftoverFds(out: Message[]): void {
    const queued = this.#fds.length;
    if (this.#headerFill > 0) {
      // A partial message follows: the fds came with its first bytes. Reject a surplus as soon as its header says
      // how many it can take; with only part of the header, wait (MAX_FDS bounds the queue meanwhile).
      if (this.#payload !== null && queued > maxFdCount(this.#request, this.#direction)) {
        throw new ProtocolError(
          ProtocolErrorCode.UNEXPECTED_FDS,
          `${queued} fd(s) arrived with ${messageName(this.#request, this.#direction)}, ` +
            `which takes at most ${maxFdCount(this.#request, this.#direction)}`,
        );
      }
      return;
    }
    const last = out.at(-1);
    if (last !== undefined && queued <= optionalFdCount(last.request, this.#direction)) {
      const extra = this.#fds.splice(0, queued);
      // On the request stream the only optional fd is REM_MEM_REG's, which the spec says to close unused.
      if (this.#direction === 'requests') this.#closeAll(extra);
      else last.fds.push(...extra);
      return;
    }
    const after = last === undefined ? '' : ` (after ${messageName(last.request, this.#direction)})`;
    throw new ProtocolError(
      ProtocolErrorCode.UNEXPECTED_FDS,
      `${queued} fd(s) arrived with no message to take them${after}`,
    );
  }

  #fail(err: unknown, out: readonly Message[]): void {
    this.#failed = true;
    this.#error = err;
    for (const message of out) {
      this.#closeAll(message.fds);
      message.fds.length = 0;
    }
    this.#dropState();
  }

  #dropState(): void {
    this.#payload = null;
    this.#payloadFill = 0;
    this.#headerFill = 0;
    const fds = this.#fds.splice(0, this.#fds.length);
    this.#closeAll(fds);
  }

  #closeAll(fds: readonly number[]): void {
    for (const fd of fds) {
      try {
        this.#closeFd(fd);
      } catch {
        // Nothing useful to do: the fd is gone from our books either way.
      }
    }
  }
}
