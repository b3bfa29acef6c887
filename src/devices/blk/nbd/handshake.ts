/**
 * The NBD handshake, client side (spec "Handshake": fixed newstyle; "TLS support"; "Option types"; "Block size
 * constraints"):
 *
 *     S: NBDMAGIC, IHAVEOPT, u16 handshake flags        (FIXED_NEWSTYLE required; NO_ZEROES echoed if offered)
 *     C: u32 client flags
 *     C: NBD_OPT_STARTTLS            S: NBD_REP_ACK     (only for nbds URIs; then TLS on the same socket)
 *     C: NBD_OPT_STRUCTURED_REPLY    S: NBD_REP_ACK or an error (then simple replies only)
 *     C: NBD_OPT_GO name [EXPORT, BLOCK_SIZE]
 *                                    S: NBD_REP_INFO ... NBD_REP_ACK   -> transmission phase
 *
 * A server without NBD_OPT_GO (NBD_REP_ERR_UNSUP) gets NBD_OPT_EXPORT_NAME instead, as the spec asks of clients
 * ("For backwards compatibility, clients SHOULD be prepared to also handle NBD_REP_ERR_UNSUP by falling back").
 *
 * All reads go through one small buffered reader over the socket's 'data' events; when the handshake is done the
 * socket is paused, every listener this module added is removed, and the bytes read past the handshake (none from a
 * well-behaved server: it waits for a request) are handed over as `leftover`.
 */
import { connect as netConnect, isIP, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import { VhostError } from '../../../errors.js';
import {
  NBD_REP_ERR_BIT,
  NbdClientFlag,
  NbdFlag,
  NbdHandshakeFlag,
  NbdInfo,
  NbdMagic,
  NbdOpt,
  NbdRep,
  NbdSize,
  optName,
  repName,
} from './constants.js';
import type { NbdTarget } from './uri.js';

/** PEM texts (not paths). */
export interface NbdTlsOptions {
  /** Trusted CA certificate(s); default: Node's bundled roots. */
  ca?: string;
  /** Client certificate, for servers that verify their clients (qemu-nbd's tls-creds-x509 verify-peer=on). */
  cert?: string;
  key?: string;
  /** Name the server certificate must carry; default: the URI's tls-hostname, else the TCP host, else localhost. */
  servername?: string;
}

export interface NbdExportInfo {
  /** Bytes (at most Number.MAX_SAFE_INTEGER). */
  size: number;
  /** Transmission flags (NBD_FLAG_*), as sent. */
  flags: number;
  readOnly: boolean;
  canFlush: boolean;
  canFua: boolean;
  canTrim: boolean;
  canWriteZeroes: boolean;
  canMultiConn: boolean;
  /** From NBD_INFO_BLOCK_SIZE, else 1. Offsets and lengths of requests are multiples of it. */
  minBlock: number;
  /** From NBD_INFO_BLOCK_SIZE, else 4096. */
  preferredBlock: number;
  /** The largest request length: the server's maximum (NBD_INFO_BLOCK_SIZE), capped at 32 MiB, else 32 MiB. */
  maxBlock: number;
  /** Whether NBD_OPT_STRUCTURED_REPLY was acknowledged. */
  structuredReplies: boolean;
}

export interface NbdConnectOptions {
  tls?: NbdTlsOptions;
  /** The whole handshake (connect, TLS, options), default 10000. */
  timeoutMs?: number;
  /** Ask for structured replies, default true. */
  structuredReplies?: boolean;
}

export interface NbdConnected {
  /** In transmission phase, paused, with no listener of ours. A TLSSocket when TLS was negotiated. */
  socket: Socket;
  info: NbdExportInfo;
  /** Bytes the server sent after the handshake (normally empty): the start of the transmission stream. */
  leftover: Buffer;
}

/** Default handshake timeout. */
export const NBD_DEFAULT_TIMEOUT_MS = 10_000;
/** Largest option reply payload accepted (a reply longer than this is a handshake error). */
export const NBD_MAX_OPTION_REPLY = 64 * 1024;
/** Requests never exceed this many bytes, whatever the server allows (spec "Block size constraints": 2^25). */
export const NBD_MAX_REQUEST = 32 * 1024 * 1024;

const DEFAULT_MIN_BLOCK = 1;
const DEFAULT_PREFERRED_BLOCK = 4096;
const NO_LIMIT = 0xffff_ffff;

/** Reads exact byte counts from a socket's 'data' events; reports the socket's end, close and errors. */
class HandshakeReader {
  #socket: Socket | undefined;
  #chunks: Buffer[] = [];
  #buffered = 0;
  #want = 0;
  #resolve: ((bytes: Buffer) => void) | undefined;
  readonly #onEvent: (event: 'error' | 'end', err?: Error) => void;

  constructor(onEvent: (event: 'error' | 'end', err?: Error) => void) {
    this.#onEvent = onEvent;
  }

  readonly #onData = (chunk: Buffer): void => {
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
    this.#deliver();
  };
  readonly #onError = (err: Error): void => this.#onEvent('error', err);
  readonly #onEnd = (): void => this.#onEvent('end');

  attach(socket: Socket): void {
    this.#socket = socket;
    socket.on('data', this.#onData);
    socket.on('error', this.#onError);
    socket.on('end', this.#onEnd);
    socket.on('close', this.#onEnd);
  }

  /** Pauses the socket, removes the listeners and returns what was read but not consumed. */
  detach(): Buffer {
    const socket = this.#socket;
    if (socket !== undefined) {
      socket.pause();
      socket.off('data', this.#onData);
      socket.off('error', this.#onError);
      socket.off('end', this.#onEnd);
      socket.off('close', this.#onEnd);
      this.#socket = undefined;
    }
    const rest = this.#chunks.length === 1 ? this.#chunks[0]! : Buffer.concat(this.#chunks, this.#buffered);
    this.#chunks = [];
    this.#buffered = 0;
    return rest;
  }

  /** The next n bytes. Settles only with data: failures reach the caller through the handshake's guard. */
  read(n: number): Promise<Buffer> {
    return new Promise((resolve) => {
      this.#want = n;
      this.#resolve = resolve;
      this.#deliver();
    });
  }

  #deliver(): void {
    const resolve = this.#resolve;
    if (resolve === undefined || this.#buffered < this.#want) return;
    const n = this.#want;
    let bytes: Buffer;
    const first = this.#chunks[0]!;
    if (first.length >= n) {
      bytes = first.subarray(0, n);
      if (first.length === n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(n);
    } else {
      const all = Buffer.concat(this.#chunks, this.#buffered);
      bytes = all.subarray(0, n);
      this.#chunks = all.length > n ? [all.subarray(n)] : [];
    }
    this.#buffered -= n;
    this.#resolve = undefined;
    this.#want = 0;
    resolve(bytes);
  }
}

type Phase = 'connect' | 'greeting' | 'tls' | 'options' | 'export-name';

function handshakeError(message: string): VhostError {
  return new VhostError('VHOST_NBD_HANDSHAKE', message);
}

/** Server text for a message: hostile, so cut to 512 bytes, control characters replaced. */
function printable(bytes: Buffer): string {
  // eslint-disable-next-line no-control-regex
  return bytes.subarray(0, 512).toString('utf8').replace(/[\u0000-\u001f\u007f]/g, '?');
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/** What the reply to one option said. */
interface OptionReply {
  type: number;
  payload: Buffer;
}

class Handshake {
  readonly #target: NbdTarget;
  readonly #options: NbdConnectOptions;
  readonly #reader: HandshakeReader;
  #raw: Socket | undefined;
  #tls: TLSSocket | undefined;
  #phase: Phase = 'connect';
  #failure: VhostError | undefined;
  readonly #failed: Promise<never>;
  #rejectFailed!: (err: VhostError) => void;

  constructor(target: NbdTarget, options: NbdConnectOptions) {
    this.#target = target;
    this.#options = options;
    this.#reader = new HandshakeReader((event, err) => this.#onSocketEvent(event, err));
    this.#failed = new Promise<never>((_, reject) => (this.#rejectFailed = reject));
    this.#failed.catch(() => {}); // observed through #guard
  }

  /** Runs the handshake; on failure every socket is destroyed before the promise rejects. */
  async run(): Promise<NbdConnected> {
    const timeoutMs = this.#options.timeoutMs ?? NBD_DEFAULT_TIMEOUT_MS;
    const timer = setTimeout(() => {
      this.#fail(new VhostError('VHOST_NBD_TIMEOUT', `NBD handshake with ${this.#where()} took over ${timeoutMs} ms (${this.#phase})`));
    }, timeoutMs);
    try {
      return await this.#guard(this.#negotiate());
    } catch (err) {
      const error =
        err instanceof VhostError ? err : new VhostError('VHOST_NBD_HANDSHAKE', `NBD handshake failed: ${String(err)}`, { cause: err });
      this.#fail(error);
      this.#tls?.destroy();
      this.#raw?.destroy();
      throw this.#failure ?? error;
    } finally {
      clearTimeout(timer);
    }
  }

  #where(): string {
    const a = this.#target.address;
    return a.kind === 'unix' ? `unix socket ${a.path}` : `${a.host}:${a.port}`;
  }

  /** The first failure wins; it rejects whatever the negotiation awaits. */
  #fail(err: VhostError): void {
    if (this.#failure !== undefined) return;
    this.#failure = err;
    this.#rejectFailed(err);
  }

  #guard<T>(p: Promise<T>): Promise<T> {
    return Promise.race([p, this.#failed]);
  }

  #onSocketEvent(event: 'error' | 'end', err?: Error): void {
    if (event === 'error') {
      const detail = err?.message ?? 'socket error';
      if (this.#phase === 'tls') {
        const hint = this.#tls !== undefined && this.#tls.authorized ? ' (after the TLS handshake: does it want a client certificate?)' : '';
        this.#fail(new VhostError('VHOST_NBD_TLS', `TLS with ${this.#where()} failed: ${detail}${hint}`, { cause: err }));
      } else {
        this.#fail(new VhostError('VHOST_NBD_CONNECT', `NBD connection to ${this.#where()} failed: ${detail}`, { cause: err }));
      }
      return;
    }
    switch (this.#phase) {
      case 'tls':
        this.#fail(
          new VhostError(
            'VHOST_NBD_TLS',
            `${this.#where()} closed the connection during the TLS handshake or right after it (does it want a client certificate?)`,
          ),
        );
        break;
      case 'export-name':
        this.#fail(
          new VhostError(
            'VHOST_NBD_EXPORT',
            `${this.#where()} closed the connection after NBD_OPT_EXPORT_NAME: no export "${this.#target.exportName}" (or it needs TLS)`,
          ),
        );
        break;
      case 'connect':
      case 'greeting':
      case 'options':
        this.#fail(new VhostError('VHOST_NBD_CONNECT', `${this.#where()} closed the connection during the NBD handshake (${this.#phase})`));
        break;
    }
  }

  #read(n: number): Promise<Buffer> {
    return this.#guard(this.#reader.read(n));
  }

  #socket(): Socket {
    const s = this.#tls ?? this.#raw;
    if (s === undefined) throw new Error('no socket');
    return s;
  }

  #sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    const header = Buffer.allocUnsafe(NbdSize.OPTION_HEADER);
    header.writeBigUInt64BE(NbdMagic.IHAVEOPT, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(data.length, 12);
    this.#socket().write(data.length === 0 ? header : Buffer.concat([header, data]));
  }

  /** Reads one option reply to `option` (spec "Fixed newstyle negotiation"). */
  async #readReply(option: number): Promise<OptionReply> {
    const header = await this.#read(NbdSize.OPTION_REPLY_HEADER);
    const magic = header.readBigUInt64BE(0);
    if (magic !== NbdMagic.OPTION_REPLY) {
      throw handshakeError(`bad option reply magic 0x${magic.toString(16)} (expected 0x${NbdMagic.OPTION_REPLY.toString(16)})`);
    }
    if (this.#phase === 'tls') this.#phase = 'options';
    const replyOption = header.readUInt32BE(8);
    const type = header.readUInt32BE(12);
    const length = header.readUInt32BE(16);
    if (replyOption !== option) {
      throw handshakeError(`got a reply for ${optName(replyOption)} while waiting for ${optName(option)}`);
    }
    if (length > NBD_MAX_OPTION_REPLY) {
      throw handshakeError(`${optName(option)}: ${repName(type)} reply of ${length} bytes (limit ${NBD_MAX_OPTION_REPLY})`);
    }
    const payload = length === 0 ? Buffer.alloc(0) : Buffer.from(await this.#read(length));
    return { type, payload };
  }

  #replyError(option: number, reply: OptionReply): string {
    const text = reply.payload.length > 0 ? `: ${printable(reply.payload)}` : '';
    return `${optName(option)} failed with ${repName(reply.type)}${text}`;
  }

  #tlsRequired(option: number, reply: OptionReply): VhostError {
    return new VhostError(
      'VHOST_NBD_TLS',
      `${this.#where()} requires TLS (use an nbds:// or nbds+unix:// URI): ${this.#replyError(option, reply)}`,
    );
  }

  async #negotiate(): Promise<NbdConnected> {
    const target = this.#target;
    const nameBytes = Buffer.from(target.exportName, 'utf8');
    if (nameBytes.length > NbdSize.MAX_STRING || target.exportName.includes('\0')) {
      throw new VhostError('VHOST_NBD_EXPORT', `bad export name (NUL, or longer than ${NbdSize.MAX_STRING} bytes)`);
    }

    // Connect.
    const address = target.address;
    const raw = address.kind === 'unix' ? netConnect({ path: address.path }) : netConnect({ host: address.host, port: address.port });
    this.#raw = raw;
    this.#reader.attach(raw);
    await this.#guard(new Promise<void>((resolve) => raw.once('connect', () => resolve())));
    if (address.kind === 'tcp') raw.setNoDelay(true); // spec "Protocol phases": disable Nagle

    // Greeting (spec "Newstyle negotiation").
    this.#phase = 'greeting';
    const greeting = await this.#read(NbdSize.GREETING);
    const passwd = greeting.readBigUInt64BE(0);
    if (passwd !== NbdMagic.INIT_PASSWD) throw handshakeError(`not an NBD server: bad magic 0x${passwd.toString(16)}`);
    const second = greeting.readBigUInt64BE(8);
    if (second === NbdMagic.CLISERV_OLDSTYLE) throw handshakeError('the server speaks oldstyle negotiation (not supported)');
    if (second !== NbdMagic.IHAVEOPT) throw handshakeError(`bad newstyle magic 0x${second.toString(16)}`);
    const handshakeFlags = greeting.readUInt16BE(16);
    if ((handshakeFlags & NbdHandshakeFlag.FIXED_NEWSTYLE) === 0) {
      throw handshakeError('the server does not offer fixed newstyle negotiation');
    }
    // Unknown handshake flags are ignored ("The client SHOULD ignore any handshake flags it does not recognize").
    const noZeroes = (handshakeFlags & NbdHandshakeFlag.NO_ZEROES) !== 0;
    const clientFlags = Buffer.allocUnsafe(4);
    clientFlags.writeUInt32BE(NbdClientFlag.FIXED_NEWSTYLE | (noZeroes ? NbdClientFlag.NO_ZEROES : 0));
    raw.write(clientFlags);
    this.#phase = 'options';

    // STARTTLS first, so that every later option is encrypted ("Client-side requirements").
    if (target.tls) {
      this.#sendOption(NbdOpt.STARTTLS);
      const reply = await this.#readReply(NbdOpt.STARTTLS);
      if (reply.type !== NbdRep.ACK) {
        if ((reply.type & NBD_REP_ERR_BIT) === 0) throw handshakeError(`NBD_OPT_STARTTLS: unexpected ${repName(reply.type)}`);
        throw new VhostError('VHOST_NBD_TLS', `${this.#where()} refused TLS: ${this.#replyError(NbdOpt.STARTTLS, reply)}`);
      }
      if (reply.payload.length !== 0) throw handshakeError('NBD_OPT_STARTTLS: NBD_REP_ACK with data');
      await this.#startTls(raw);
    }

    // Structured replies (spec "NBD_OPT_STRUCTURED_REPLY").
    let structuredReplies = false;
    if (this.#options.structuredReplies ?? true) {
      this.#sendOption(NbdOpt.STRUCTURED_REPLY);
      const reply = await this.#readReply(NbdOpt.STRUCTURED_REPLY);
      if (reply.type === NbdRep.ACK) {
        if (reply.payload.length !== 0) throw handshakeError('NBD_OPT_STRUCTURED_REPLY: NBD_REP_ACK with data');
        structuredReplies = true;
      } else if (reply.type === NbdRep.ERR_TLS_REQD) {
        throw this.#tlsRequired(NbdOpt.STRUCTURED_REPLY, reply);
      } else if ((reply.type & NBD_REP_ERR_BIT) === 0) {
        throw handshakeError(`NBD_OPT_STRUCTURED_REPLY: unexpected ${repName(reply.type)}`);
      }
      // Any other error: simple replies only.
    }

    return this.#go(nameBytes, structuredReplies, noZeroes);
  }

  async #startTls(raw: Socket): Promise<void> {
    this.#phase = 'tls';
    const early = this.#reader.detach();
    if (early.length > 0) throw handshakeError(`the server sent ${early.length} bytes after accepting NBD_OPT_STARTTLS`);
    const tlsOptions = this.#options.tls ?? {};
    const address = this.#target.address;
    const name = tlsOptions.servername ?? this.#target.tlsHostname ?? (address.kind === 'tcp' ? address.host : 'localhost');
    const options: ConnectionOptions = { socket: raw, host: name, minVersion: 'TLSv1.2' }; // spec "TLS versions"
    if (isIP(name) === 0) options.servername = name; // SNI must not be an IP address (RFC 6066)
    if (tlsOptions.ca !== undefined) options.ca = tlsOptions.ca;
    if (tlsOptions.cert !== undefined) options.cert = tlsOptions.cert;
    if (tlsOptions.key !== undefined) options.key = tlsOptions.key;
    // The TLS socket reports the connection's errors from now on; this keeps a stray one from being unhandled.
    raw.on('error', () => {});
    raw.resume();
    let sock: TLSSocket;
    try {
      sock = tlsConnect(options);
    } catch (err) {
      // Bad PEM texts throw synchronously.
      throw new VhostError('VHOST_NBD_TLS', `TLS options: ${(err as Error).message}`, { cause: err });
    }
    this.#tls = sock;
    this.#reader.attach(sock);
    await this.#guard(new Promise<void>((resolve) => sock.once('secureConnect', () => resolve())));
    // The phase stays 'tls' until the first option reply over TLS: with TLS 1.3 the client is done before the
    // server has checked the client's certificate, and a server that rejects it just hangs up.
  }

  async #go(nameBytes: Buffer, structuredReplies: boolean, noZeroes: boolean): Promise<NbdConnected> {
    // Data: u32 name length, name, u16 number of info requests, u16 each (spec "NBD_OPT_INFO and NBD_OPT_GO").
    const data = Buffer.allocUnsafe(4 + nameBytes.length + 2 + 4);
    data.writeUInt32BE(nameBytes.length, 0);
    nameBytes.copy(data, 4);
    let at = 4 + nameBytes.length;
    at = data.writeUInt16BE(2, at);
    at = data.writeUInt16BE(NbdInfo.EXPORT, at);
    data.writeUInt16BE(NbdInfo.BLOCK_SIZE, at);
    this.#sendOption(NbdOpt.GO, data);

    let size: bigint | undefined;
    let flags = 0;
    let block: { min: number; preferred: number; max: number } | undefined;
    for (;;) {
      const reply = await this.#readReply(NbdOpt.GO);
      if (reply.type === NbdRep.INFO) {
        const p = reply.payload;
        if (p.length < 2) throw handshakeError(`NBD_REP_INFO of ${p.length} bytes`);
        const infoType = p.readUInt16BE(0);
        if (infoType === NbdInfo.EXPORT) {
          if (p.length !== 12) throw handshakeError(`NBD_INFO_EXPORT of ${p.length} bytes (expected 12)`);
          size = p.readBigUInt64BE(2);
          flags = p.readUInt16BE(10);
        } else if (infoType === NbdInfo.BLOCK_SIZE) {
          if (p.length !== 14) throw handshakeError(`NBD_INFO_BLOCK_SIZE of ${p.length} bytes (expected 14)`);
          block = { min: p.readUInt32BE(2), preferred: p.readUInt32BE(6), max: p.readUInt32BE(10) };
        }
        // Other information types are ignored ("The client MUST ignore information replies it does not understand").
        continue;
      }
      if (reply.type === NbdRep.ACK) {
        if (reply.payload.length !== 0) throw handshakeError('NBD_OPT_GO: NBD_REP_ACK with data');
        if (size === undefined) throw handshakeError('NBD_OPT_GO: NBD_REP_ACK without NBD_INFO_EXPORT');
        break;
      }
      if (reply.type === NbdRep.ERR_UNSUP) return this.#exportName(nameBytes, structuredReplies, noZeroes);
      if (reply.type === NbdRep.ERR_TLS_REQD && !this.#target.tls) throw this.#tlsRequired(NbdOpt.GO, reply);
      if ((reply.type & NBD_REP_ERR_BIT) !== 0) {
        throw new VhostError(
          'VHOST_NBD_EXPORT',
          `export "${this.#target.exportName}" on ${this.#where()}: ${this.#replyError(NbdOpt.GO, reply)}`,
        );
      }
      throw handshakeError(`NBD_OPT_GO: unexpected ${repName(reply.type)}`);
    }
    const info = this.#exportInfo(size, flags, block, structuredReplies);
    return { socket: this.#socket(), info, leftover: this.#reader.detach() };
  }

  /** The fallback for servers without NBD_OPT_GO (spec "NBD_OPT_EXPORT_NAME"); the server hangs up on failure. */
  async #exportName(nameBytes: Buffer, structuredReplies: boolean, noZeroes: boolean): Promise<NbdConnected> {
    this.#phase = 'export-name';
    this.#sendOption(NbdOpt.EXPORT_NAME, nameBytes);
    const reply = await this.#read(NbdSize.EXPORT_NAME_REPLY + (noZeroes ? 0 : NbdSize.EXPORT_NAME_PADDING));
    const info = this.#exportInfo(reply.readBigUInt64BE(0), reply.readUInt16BE(8), undefined, structuredReplies);
    return { socket: this.#socket(), info, leftover: this.#reader.detach() };
  }

  #exportInfo(
    size: bigint,
    flags: number,
    block: { min: number; preferred: number; max: number } | undefined,
    structuredReplies: boolean,
  ): NbdExportInfo {
    if (size > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new VhostError('VHOST_NBD_EXPORT', `export size ${size} is over ${Number.MAX_SAFE_INTEGER} bytes`);
    }
    if ((flags & NbdFlag.HAS_FLAGS) === 0) throw handshakeError(`transmission flags 0x${flags.toString(16)} lack NBD_FLAG_HAS_FLAGS`);
    let minBlock = DEFAULT_MIN_BLOCK;
    let preferredBlock = DEFAULT_PREFERRED_BLOCK;
    let maxBlock = NBD_MAX_REQUEST;
    if (block !== undefined) {
      // Spec "Block size constraints": minimum a power of 2 up to 64 KiB; preferred a power of 2 at least the
      // minimum; maximum a multiple of the minimum (or 0xffffffff: no limit) and at least the minimum.
      const { min, preferred, max } = block;
      const bad = (why: string): VhostError =>
        handshakeError(`NBD_INFO_BLOCK_SIZE min ${min} preferred ${preferred} max ${max}: ${why}`);
      if (!isPowerOfTwo(min) || min > 65536) throw bad('the minimum must be a power of 2 up to 65536');
      if (!isPowerOfTwo(preferred) || preferred < min) throw bad('the preferred size must be a power of 2, at least the minimum');
      if (max < min || (max !== NO_LIMIT && max % min !== 0)) throw bad('the maximum must be a multiple of the minimum');
      minBlock = min;
      preferredBlock = preferred;
      maxBlock = Math.min(max, NBD_MAX_REQUEST);
    }
    return {
      size: Number(size),
      flags,
      readOnly: (flags & NbdFlag.READ_ONLY) !== 0,
      canFlush: (flags & NbdFlag.SEND_FLUSH) !== 0,
      canFua: (flags & NbdFlag.SEND_FUA) !== 0,
      canTrim: (flags & NbdFlag.SEND_TRIM) !== 0,
      canWriteZeroes: (flags & NbdFlag.SEND_WRITE_ZEROES) !== 0,
      canMultiConn: (flags & NbdFlag.CAN_MULTI_CONN) !== 0,
      minBlock,
      preferredBlock,
      maxBlock,
      structuredReplies,
    };
  }
}

/**
 * Connects, negotiates (fixed newstyle, NO_ZEROES when offered; STARTTLS first when target.tls, then
 * tls.connect({socket, ...}); NBD_OPT_STRUCTURED_REPLY; NBD_OPT_GO with NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE),
 * and resolves with the socket in transmission phase (paused, no listener left on it; bytes read past the
 * handshake are `leftover`, normally empty) and the export's info.
 *
 * Rejects with VhostError codes: VHOST_NBD_CONNECT (socket errors, ECONNREFUSED etc., cause attached; the server
 * hanging up mid-handshake), VHOST_NBD_HANDSHAKE (bad magic, oldstyle server, no FIXED_NEWSTYLE, malformed option
 * replies, an option reply for another option, a reply over 64 KiB), VHOST_NBD_EXPORT (NBD_REP_ERR_* for GO, naming
 * the error and the server's text; an export over 2^53 - 1 bytes), VHOST_NBD_TLS (the server requires TLS and we
 * have none, STARTTLS refused, certificate errors; a server hanging up right after the TLS handshake, as one that
 * wants a client certificate does), VHOST_NBD_TIMEOUT. On rejection the socket is destroyed.
 * `options.tls` is only used for nbds URIs (`target.tls`). The resolved socket has no 'error' listener: construct
 * the NbdConnection (or attach one) before yielding to the event loop.
 */
export function connectNbd(target: NbdTarget, options: NbdConnectOptions = {}): Promise<NbdConnected> {
  return new Handshake(target, options).run();
}
