/**
 * The host side of a virtio-vsock device (VIRTIO 1.2 §5.10): every connection between the guest (CID `guestCid`) and
 * the host (CID 2), on the main thread's event loop. The queue plumbing hands it the guest's packets (`fromGuest`,
 * from the tx queue) and takes the packets for the guest (`toGuest`, for the rx queue); this file does the rest:
 *
 * - Connections are keyed by (host port, guest port). A guest REQUEST to host port P is accepted by a `listen`er on
 *   P (a VsockStream), else by the hybrid unix socket `${udsPath}_${P}` (hybrid.ts), else refused with RST. Host
 *   programs reach the guest through `connect` (a VsockStream) or the hybrid listener at `udsPath` ("CONNECT <port>");
 *   those connections get host ports from 1024 upward.
 * - Credit (§5.10.6, "Buffer Space Management"): RW goes to the guest only while
 *   `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` (u32) is positive; peer_buf_alloc and peer_fwd_cnt come from every
 *   packet the guest sends for the connection. A host side with data and no credit stops being read (a paused unix
 *   socket, a stream write whose callback waits) and the guest gets one CREDIT_REQUEST. Our buf_alloc and fwd_cnt go
 *   in every header; fwd_cnt counts the bytes the host side consumed (written to the unix socket and handed to the
 *   kernel, taken by the stream's read buffer), so a slow host side stops the guest. A guest that sends more than its
 *   credit (more than buf_alloc waiting for the host side) gets RST: memory per connection is bounded. CREDIT_UPDATE
 *   goes out when fwd_cnt moved by buf_alloc/4 since the guest last heard it, and in answer to CREDIT_REQUEST.
 * - Shutdown, as the Linux driver expects (net/vmw_vsock/virtio_transport_common.c): the guest's SHUTDOWN(SEND) ends
 *   the host side's input after what was buffered; SHUTDOWN(RCV) makes what the host side writes go nowhere; both
 *   flags (the guest's close()) are answered with RST once the host side consumed what was buffered, and the host
 *   side is closed: the guest's close() does not wait for its 8 s timeout. The host side's end of writing is
 *   SHUTDOWN(SEND) after the data; its close is SHUTDOWN(both) then RST. The guest's RST closes the host side at once.
 * - The path to the guest: `toGuest` may refuse a packet (the rx queue is full); nothing is lost then. Control packets
 *   wait as per-connection bits (REQUEST, RESPONSE, CREDIT_UPDATE, CREDIT_REQUEST, SHUTDOWN: bounded by the number
 *   of connections) and packets of connections already gone (RST, the SHUTDOWN before it, RSTs answering packets for
 *   no connection) in a bounded queue where RSTs of real connections take priority; data waits in its connection
 *   (bounded: the host side is not read meanwhile). On `writable()` control packets go first, then data, round robin
 *   over the connections by credit. `toGuest` is never called from inside `toGuest`.
 *
 * Everything in a packet from the guest is hostile input: fromGuest validates it, drops (and counts) what is
 * malformed, answers RST where the spec says so, and never throws.
 */
import type { Socket } from 'node:net';
import { VhostError } from '../../errors.js';
import {
  VMADDR_CID_HOST,
  VSOCK_DEFAULT_BUF_ALLOC,
  VSOCK_MAX_GUEST_CID,
  VSOCK_MAX_PAYLOAD,
  VsockHdr,
  VsockOp,
  VsockShutdown,
  VsockType,
} from './constants.js';
import { HybridListener, UnixSide, connectUnix, hybridPortPath } from './hybrid.js';
import { readCid } from './packet.js';
import { createVsockStream, type VsockStream } from './stream.js';

export interface VsockHostOptions {
  /** The guest's CID (>= 3): the peer. */
  guestCid: number;
  /**
   * Our own CID (default 2, the host). Another value turns the roles around: a guest's side of the transport over a
   * driver (the benchmark and tests run a guest in this process that way), whose peer `guestCid` is then 2.
   */
  localCid?: number;
  /** Hybrid unix sockets: host programs connect to `udsPath` and write "CONNECT <port>\n" (answered "OK <host port>\n");
   *  a guest connecting to host port P reaches the unix socket `${udsPath}_${P}`. Undefined: only the Node API. */
  udsPath?: string | undefined;
  /** buf_alloc we advertise per connection: what we buffer for a connection whose host side is slow. Default 256 KiB. */
  bufAlloc?: number;
  /** Most connections at once (default 1024); a REQUEST beyond it gets RST. */
  maxConnections?: number;
  /** Largest RW payload we send in one packet (default and most: 64 KiB). A guest's rx buffers may be smaller
   *  (Linux posts 4 KiB ones): then the plumbing splits, or this is set to what one rx buffer takes. */
  maxPayload?: number;
  /** How long a hybrid "CONNECT <port>" waits for the guest's answer (default 5000 ms). */
  connectTimeoutMs?: number;
  /** Hands one packet to the guest: the 44-byte header and its payload (len bytes). Returns false when the path to the
   *  guest is full: the packet was NOT taken; call again after `writable()`. Views are only valid during the call. */
  toGuest(header: Uint8Array, payload: Uint8Array | undefined): boolean;
}

/** What a connection's host side calls on it (the host implements it per connection). */
export interface VsockEndpoint {
  /** Bytes for the guest (owned by the connection from now on); `done` once they went to the guest or were dropped. */
  send(bytes: Buffer, done?: (err?: Error | null) => void): void;
  /** The host side writes no more: SHUTDOWN(SEND) after what it wrote; `done` once that is sent (or moot). */
  sendEnd(done?: (err?: Error | null) => void): void;
  /** `n` guest bytes were consumed (fwd_cnt moves, credit goes back to the guest). */
  consumed(n: number): void;
  /** The host side is closed or destroyed. */
  gone(): void;
}

/** A connection's host side: a VsockStream or a unix socket. The host calls it; it calls its VsockEndpoint. */
export interface HostSide {
  /** Guest bytes (a copy the side owns); the side calls `consumed` as it consumes them. */
  deliver(bytes: Buffer): void;
  /** The guest sends no more: end the host side's input after what was delivered. */
  deliverEnd(): void;
  /** Whether the host side may produce more bytes now (a unix socket is paused meanwhile). */
  setReading(on: boolean): void;
  /** The connection ended cleanly: close after what was delivered. */
  finish(): void;
  /** The connection ended abruptly: close at once (a stream errors with `err`). */
  abort(err: VhostError): void;
}

/** Connection states. */
const CONNECTING_HOST = 0; // the guest's REQUEST waits for the host side (a hybrid unix connect)
const CONNECTING_GUEST = 1; // our REQUEST waits for the guest's RESPONSE
const ESTABLISHED = 2;
type ConnState = typeof CONNECTING_HOST | typeof CONNECTING_GUEST | typeof ESTABLISHED;

/** Pending control packets of a connection, as bits, in the order they are sent. */
const CTL_REQUEST = 1;
const CTL_RESPONSE = 2;
const CTL_CREDIT_UPDATE = 4;
const CTL_CREDIT_REQUEST = 8;
const CTL_SHUTDOWN = 16;
const CTL_ORDER = [
  [CTL_REQUEST, VsockOp.REQUEST],
  [CTL_RESPONSE, VsockOp.RESPONSE],
  [CTL_CREDIT_UPDATE, VsockOp.CREDIT_UPDATE],
  [CTL_CREDIT_REQUEST, VsockOp.CREDIT_REQUEST],
  [CTL_SHUTDOWN, VsockOp.SHUTDOWN],
] as const;

/** Packets of connections that are gone, by priority: what is dropped first when their queue is full. */
const PRIO_REPLY = 0; // RST answering a packet for no connection
const PRIO_SHUTDOWN = 1; // SHUTDOWN(both) before the RST of a connection the host side closed
const PRIO_RST = 2; // RST ending a connection
/** Most packets of gone connections waiting for the path to the guest. */
export const VSOCK_DETACHED_MAX = 256;

const DEFAULT_MAX_CONNECTIONS = 1024;
const DEFAULT_CONNECT_TIMEOUT_MS = 5000;
const FIRST_LOCAL_PORT = 1024;
const U32_MAX = 0xffff_ffff;

interface TxChunk {
  readonly bytes: Buffer;
  off: number;
  readonly done: ((err?: Error | null) => void) | undefined;
}

interface Connection {
  readonly key: string;
  /** Ours (CID 2), and the guest's. */
  readonly hostPort: number;
  readonly guestPort: number;
  /** The host port was allocated for it (host-initiated): freed with it. */
  readonly ownsPort: boolean;
  state: ConnState;
  closed: boolean;
  side: HostSide | undefined;
  readonly endpoint: VsockEndpoint;
  /** CONNECTING_GUEST: the guest's RESPONSE; the attempt failed (RST, timeout, reset, close). */
  onConnected: (() => void) | undefined;
  onFailed: ((err: VhostError) => void) | undefined;
  /** CONNECTING_HOST: the unix connect under way. */
  pendingSocket: Socket | undefined;
  timer: NodeJS.Timeout | undefined;

  // Guest -> host.
  /** Bytes the host side consumed (u32, wraps); what the guest last heard of it; bytes delivered and not consumed. */
  fwdCnt: number;
  lastSentFwdCnt: number;
  rxBuffered: number;

  // Host -> guest.
  peerBufAlloc: number;
  peerFwdCnt: number;
  /** Payload bytes sent (u32, wraps). */
  txCnt: number;
  /** One CREDIT_REQUEST per stall: set when sent, cleared when credit is back. */
  creditRequested: boolean;
  readonly tx: TxChunk[];
  txBytes: number;
  /** sendEnd callbacks: called once SHUTDOWN(SEND) went out. */
  readonly endCallbacks: Array<(err?: Error | null) => void>;

  /** VsockShutdown flags the guest sent; the host side wrote its last byte; flags we sent, and flags to send. */
  peerShutdown: number;
  hostEof: boolean;
  sentShutdown: number;
  shutdownToSend: number;
  /** CTL_* bits. */
  ctl: number;
}

/** A packet of a connection that is gone (or never was). */
interface Detached {
  readonly op: number;
  readonly flags: number;
  readonly type: number;
  readonly hostPort: number;
  readonly guestPort: number;
  readonly bufAlloc: number;
  readonly fwdCnt: number;
  readonly prio: number;
}

/** Runs a callback into user code (a stream's listeners, a connect's continuation): whatever it throws surfaces as an
 * uncaught exception later instead of unwinding through fromGuest and leaving a connection half updated. */
function safely(fn: () => void): void {
  try {
    fn();
  } catch (err) {
    queueMicrotask(() => {
      throw err;
    });
  }
}

function isU32(n: number): boolean {
  return Number.isInteger(n) && n >= 0 && n <= U32_MAX;
}

function keyOf(hostPort: number, guestPort: number): string {
  return `${hostPort}:${guestPort}`;
}

export class VsockHost {
  readonly #guestCid: number;
  readonly #localCid: number;
  readonly #bufAlloc: number;
  /** CREDIT_UPDATE when fwd_cnt moved this much since the guest last heard it. */
  readonly #creditThreshold: number;
  readonly #maxConnections: number;
  readonly #maxPayload: number;
  readonly #connectTimeoutMs: number;
  readonly #udsPath: string | undefined;
  readonly #toGuest: (header: Uint8Array, payload: Uint8Array | undefined) => boolean;

  readonly #conns = new Map<string, Connection>();
  /** Host ports allocated to host-initiated connections. */
  readonly #localPorts = new Set<number>();
  #nextPort = FIRST_LOCAL_PORT;
  readonly #listeners = new Map<number, (stream: VsockStream) => void>();
  readonly #hybrid: HybridListener | undefined;

  /** Connections with CTL_* bits set; connections that have data and may have credit. */
  readonly #ctlConns = new Set<Connection>();
  readonly #dataConns = new Set<Connection>();
  #detached: Detached[] = [];

  /** toGuest refused a packet: nothing more until writable(). */
  #pathFull = false;
  #pumping = false;
  #pumpAgain = false;
  #closed = false;
  readonly #header = new Uint8Array(VsockHdr.size);
  readonly #hdv = new DataView(this.#header.buffer);

  readonly #stats = {
    connectionsOpened: 0,
    connectionsClosed: 0,
    connectionsReset: 0,
    connectionsRefused: 0,
    packetsFromGuest: 0,
    bytesFromGuest: 0,
    packetsToGuest: 0,
    bytesToGuest: 0,
    malformed: 0,
    creditOverruns: 0,
    controlDropped: 0,
    bytesDiscarded: 0,
  };

  constructor(options: VsockHostOptions) {
    const { guestCid } = options;
    const localCid = options.localCid ?? VMADDR_CID_HOST;
    const lowest = options.localCid === undefined ? 3 : VMADDR_CID_HOST;
    if (!Number.isInteger(guestCid) || guestCid < lowest || guestCid > VSOCK_MAX_GUEST_CID) {
      throw new RangeError(`vsock: guest CID ${guestCid} is not in [${lowest}, ${VSOCK_MAX_GUEST_CID}]`);
    }
    if (!Number.isInteger(localCid) || localCid < VMADDR_CID_HOST || localCid > VSOCK_MAX_GUEST_CID || localCid === guestCid) {
      throw new RangeError(`vsock: local CID ${localCid} is not in [2, ${VSOCK_MAX_GUEST_CID}] or is the peer's`);
    }
    this.#localCid = localCid;
    const bufAlloc = options.bufAlloc ?? VSOCK_DEFAULT_BUF_ALLOC;
    if (!isU32(bufAlloc) || bufAlloc < 1) throw new RangeError(`vsock: bufAlloc ${bufAlloc} is not in [1, 2^32-1]`);
    const maxConnections = options.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
    if (!Number.isInteger(maxConnections) || maxConnections < 1) throw new RangeError(`vsock: maxConnections ${maxConnections} is not >= 1`);
    const maxPayload = options.maxPayload ?? VSOCK_MAX_PAYLOAD;
    if (!Number.isInteger(maxPayload) || maxPayload < 1 || maxPayload > VSOCK_MAX_PAYLOAD) {
      throw new RangeError(`vsock: maxPayload ${maxPayload} is not in [1, ${VSOCK_MAX_PAYLOAD}]`);
    }
    const connectTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    if (!(connectTimeoutMs > 0)) throw new RangeError(`vsock: connectTimeoutMs ${connectTimeoutMs} is not > 0`);
    this.#guestCid = guestCid;
    this.#bufAlloc = bufAlloc;
    this.#creditThreshold = Math.max(1, Math.floor(bufAlloc / 4));
    this.#maxConnections = maxConnections;
    this.#maxPayload = maxPayload;
    this.#connectTimeoutMs = connectTimeoutMs;
    const toGuest = options.toGuest.bind(options);
    this.#toGuest = toGuest;
    this.#udsPath = options.udsPath;
    if (options.udsPath !== undefined) {
      this.#hybrid = new HybridListener(options.udsPath, (socket, port, rest) => this.#hybridConnect(socket, port, rest));
    }
  }

  /** Resolves once the hybrid unix listener listens (at once without udsPath); rejects if it cannot. */
  ready(): Promise<void> {
    return this.#hybrid?.listening ?? Promise.resolve();
  }

  // ------------------------------------------------------------------------------------------ public API

  /** A packet from the guest's TX queue: header + payload in one view (valid only during the call). Hostile input. */
  fromGuest(packet: Uint8Array): void {
    if (this.#closed) return;
    this.#stats.packetsFromGuest++;
    this.#receive(packet);
    this.#pump();
  }

  /** The path to the guest has room again: send what waits (control packets first, then data by credit). */
  writable(): void {
    this.#pathFull = false;
    this.#pump();
  }

  /** The guest driver was reset or told TRANSPORT_RESET: every connection is gone (streams get an error
   *  code VHOST_VSOCK_RESET, unix sockets are closed), nothing is sent to the guest for them. */
  reset(): void {
    const conns = [...this.#conns.values()];
    this.#detached = [];
    for (const conn of conns) {
      this.#end(conn, new VhostError('VHOST_VSOCK_RESET', 'the vsock transport was reset'));
      this.#stats.connectionsReset++;
    }
    this.#ctlConns.clear();
    this.#dataConns.clear();
    this.#pathFull = false; // a new driver: its queue tells
  }

  /** The Node API: guest connections to host port `port` (CID 2) become streams; without a listener on a port,
   *  the hybrid unix socket `${udsPath}_${port}` is tried, else RST. */
  listen(port: number, onConnection: (stream: VsockStream) => void): { close(): void } {
    if (!isU32(port)) throw new RangeError(`vsock: port ${port} is not a u32`);
    if (this.#closed) throw new VhostError('VHOST_VSOCK_CLOSED', 'the vsock host is closed');
    if (this.#listeners.has(port)) throw new VhostError('VHOST_VSOCK_PORT_IN_USE', `vsock: host port ${port} already has a listener`);
    this.#listeners.set(port, onConnection);
    return {
      close: () => {
        if (this.#listeners.get(port) === onConnection) this.#listeners.delete(port);
      },
    };
  }

  /** Connects to the guest's `port`: resolves once the guest answered RESPONSE, rejects (VHOST_VSOCK_REFUSED) on RST,
   *  (VHOST_VSOCK_TIMEOUT) after `timeoutMs` (default 5000). Also VHOST_VSOCK_LIMIT (maxConnections, no free host
   *  port), VHOST_VSOCK_RESET (reset() meanwhile), VHOST_VSOCK_CLOSED (close()). */
  connect(port: number, options: { timeoutMs?: number } = {}): Promise<VsockStream> {
    if (!isU32(port)) return Promise.reject(new RangeError(`vsock: port ${port} is not a u32`));
    if (this.#closed) return Promise.reject(new VhostError('VHOST_VSOCK_CLOSED', 'the vsock host is closed'));
    const timeoutMs = options.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    return new Promise<VsockStream>((resolve, reject) => {
      const conn = this.#startConnect(port, timeoutMs);
      if (conn === undefined) {
        reject(new VhostError('VHOST_VSOCK_LIMIT', `vsock: no room for a connection to guest port ${port}`));
        return;
      }
      conn.onFailed = reject;
      conn.onConnected = () => {
        const { stream, side } = createVsockStream(conn.endpoint, {
          localPort: conn.hostPort,
          remoteCid: this.#guestCid,
          remotePort: conn.guestPort,
        });
        conn.side = side;
        resolve(stream);
      };
      this.#pump();
    });
  }

  /** Counters: connections open / opened / closed cleanly / reset / refused, packets and payload bytes each way,
   *  packets dropped as malformed, credit overruns, control packets dropped, host bytes the guest would not receive. */
  stats(): Record<string, number> {
    return { connections: this.#conns.size, ...this.#stats };
  }

  /** Closes everything (unix listener included; RST to the guest for open connections when the path allows). */
  close(): void {
    if (this.#closed) return;
    const err = new VhostError('VHOST_VSOCK_CLOSED', 'the vsock host was closed');
    for (const conn of [...this.#conns.values()]) {
      this.#queueDetached(conn, VsockOp.RST, 0, PRIO_RST);
      this.#end(conn, err);
      this.#stats.connectionsReset++;
    }
    this.#pump();
    this.#closed = true;
    this.#detached = [];
    this.#listeners.clear();
    this.#hybrid?.close();
  }

  // ------------------------------------------------------------------------------------------ from the guest

  #receive(packet: Uint8Array): void {
    const stats = this.#stats;
    if (packet.length < VsockHdr.size) {
      stats.malformed++;
      return;
    }
    const dv = new DataView(packet.buffer, packet.byteOffset, packet.byteLength);
    // Not from the guest's CID, or not for the host: dropped without an answer (it may not be the guest's to answer).
    if (readCid(dv, VsockHdr.srcCid) !== this.#guestCid || readCid(dv, VsockHdr.dstCid) !== this.#localCid) {
      stats.malformed++;
      return;
    }
    const guestPort = dv.getUint32(VsockHdr.srcPort, true);
    const hostPort = dv.getUint32(VsockHdr.dstPort, true);
    const len = dv.getUint32(VsockHdr.len, true);
    const type = dv.getUint16(VsockHdr.type, true);
    const op = dv.getUint16(VsockHdr.op, true);
    if (len > packet.length - VsockHdr.size || len > VSOCK_MAX_PAYLOAD) {
      stats.malformed++; // the payload is not all there: nothing in it can be trusted
      return;
    }
    if (type !== VsockType.STREAM) {
      // §5.10.6, "Receive and Transmit": "A VIRTIO_VSOCK_OP_RST reply MUST be sent if a packet is received with an
      // unknown type value."
      stats.malformed++;
      if (op !== VsockOp.RST) this.#reply(hostPort, guestPort, type);
      return;
    }
    const conn = this.#conns.get(keyOf(hostPort, guestPort));
    if (op < VsockOp.REQUEST || op > VsockOp.CREDIT_REQUEST || (op !== VsockOp.RW && len !== 0)) {
      // An unknown op, or a payload where there is none: dropped; a packet for no connection gets RST.
      stats.malformed++;
      if (conn === undefined && op !== VsockOp.RST) this.#reply(hostPort, guestPort, type);
      return;
    }
    if (op === VsockOp.RW) stats.bytesFromGuest += len;
    const bufAlloc = dv.getUint32(VsockHdr.bufAlloc, true);
    const fwdCnt = dv.getUint32(VsockHdr.fwdCnt, true);
    if (conn === undefined) {
      if (op === VsockOp.REQUEST) this.#guestRequest(hostPort, guestPort, bufAlloc, fwdCnt);
      else if (op !== VsockOp.RST) this.#reply(hostPort, guestPort, type);
      return;
    }
    conn.peerBufAlloc = bufAlloc;
    conn.peerFwdCnt = fwdCnt;

    if (conn.state === CONNECTING_HOST) {
      // The guest has no RESPONSE yet: only its RST (giving up) makes sense.
      if (op !== VsockOp.RST) {
        stats.malformed++;
        this.#queueDetached(conn, VsockOp.RST, 0, PRIO_RST);
      }
      this.#end(conn, new VhostError('VHOST_VSOCK_RESET', 'the guest abandoned its connection request'));
      stats.connectionsReset++;
      return;
    }
    if (conn.state === CONNECTING_GUEST) {
      if (op === VsockOp.RESPONSE) {
        this.#established(conn);
      } else {
        if (op !== VsockOp.RST) {
          stats.malformed++;
          this.#queueDetached(conn, VsockOp.RST, 0, PRIO_RST);
        }
        this.#end(conn, new VhostError('VHOST_VSOCK_REFUSED', `vsock: the guest refused the connection to its port ${conn.guestPort}`));
        stats.connectionsRefused++;
      }
      return;
    }

    switch (op) {
      case VsockOp.RW:
        this.#guestData(conn, packet.subarray(VsockHdr.size, VsockHdr.size + len));
        break;
      case VsockOp.CREDIT_UPDATE:
        break; // the credit was taken above
      case VsockOp.CREDIT_REQUEST:
        this.#setCtl(conn, CTL_CREDIT_UPDATE);
        break;
      case VsockOp.SHUTDOWN:
        this.#guestShutdown(conn, dv.getUint32(VsockHdr.flags, true));
        break;
      case VsockOp.RST:
        this.#guestRst(conn);
        return;
      case VsockOp.REQUEST:
        // A REQUEST for a connection that exists: the guest lost track of it. Both are reset.
        stats.malformed++;
        this.#queueDetached(conn, VsockOp.RST, 0, PRIO_RST);
        this.#end(conn, new VhostError('VHOST_VSOCK_RESET', 'the guest requested a connection that already exists'));
        stats.connectionsReset++;
        return;
      case VsockOp.RESPONSE:
        stats.malformed++; // no request of ours waits for it
        break;
    }
    if (!conn.closed) this.#creditChanged(conn);
  }

  /** The guest's REQUEST for a connection that does not exist. */
  #guestRequest(hostPort: number, guestPort: number, bufAlloc: number, fwdCnt: number): void {
    const refuse = (): void => {
      this.#stats.connectionsRefused++;
      this.#reply(hostPort, guestPort, VsockType.STREAM);
    };
    if (this.#conns.size >= this.#maxConnections) return refuse();
    const listener = this.#listeners.get(hostPort);
    if (listener === undefined && this.#udsPath === undefined) return refuse();
    const conn = this.#newConnection(hostPort, guestPort, false, listener === undefined ? CONNECTING_HOST : ESTABLISHED);
    conn.peerBufAlloc = bufAlloc;
    conn.peerFwdCnt = fwdCnt;
    if (listener !== undefined) {
      const { stream, side } = createVsockStream(conn.endpoint, { localPort: hostPort, remoteCid: this.#guestCid, remotePort: guestPort });
      conn.side = side;
      this.#stats.connectionsOpened++;
      this.#setCtl(conn, CTL_RESPONSE);
      safely(() => listener(stream));
      return;
    }
    conn.pendingSocket = connectUnix(hybridPortPath(this.#udsPath!, hostPort), (err, socket) => {
      conn.pendingSocket = undefined;
      if (conn.closed) {
        socket?.destroy();
        return;
      }
      if (err !== undefined || socket === undefined) {
        this.#end(conn, new VhostError('VHOST_VSOCK_REFUSED', `vsock: no unix socket for host port ${hostPort}`));
        this.#stats.connectionsRefused++;
        this.#reply(hostPort, guestPort, VsockType.STREAM);
        this.#pump();
        return;
      }
      conn.side = new UnixSide(socket, conn.endpoint);
      conn.state = ESTABLISHED;
      this.#stats.connectionsOpened++;
      this.#setCtl(conn, CTL_RESPONSE);
      this.#check(conn);
      this.#pump();
    });
  }

  /** RESPONSE to our REQUEST. */
  #established(conn: Connection): void {
    if (conn.timer !== undefined) clearTimeout(conn.timer);
    conn.timer = undefined;
    conn.state = ESTABLISHED;
    this.#stats.connectionsOpened++;
    const onConnected = conn.onConnected;
    conn.onConnected = undefined;
    conn.onFailed = undefined;
    if (onConnected !== undefined) safely(onConnected);
    if (conn.closed) return;
    this.#creditChanged(conn);
    this.#check(conn);
  }

  #guestData(conn: Connection, payload: Uint8Array): void {
    if (payload.length === 0) return;
    if ((conn.peerShutdown & VsockShutdown.SEND) !== 0) {
      this.#stats.malformed++; // data after the guest said it sends no more
      return;
    }
    if (conn.rxBuffered + payload.length > this.#bufAlloc) {
      // More than the credit we gave: reset rather than buffer without bound.
      this.#stats.creditOverruns++;
      this.#queueDetached(conn, VsockOp.RST, 0, PRIO_RST);
      this.#end(conn, new VhostError('VHOST_VSOCK_RESET', `vsock: the guest sent more than its credit (buf_alloc ${this.#bufAlloc})`));
      this.#stats.connectionsReset++;
      return;
    }
    const copy = Buffer.allocUnsafe(payload.length);
    copy.set(payload);
    conn.rxBuffered += copy.length;
    const side = conn.side!;
    safely(() => side.deliver(copy));
  }

  #guestShutdown(conn: Connection, flags: number): void {
    const added = flags & VsockShutdown.BOTH & ~conn.peerShutdown;
    conn.peerShutdown |= added;
    if ((added & VsockShutdown.RCV) !== 0) {
      // It reads no more: what waits for it, and what the host side writes from now on, goes nowhere.
      this.#discardTx(conn);
      this.#dataConns.delete(conn);
      conn.ctl &= ~CTL_CREDIT_REQUEST;
    }
    if ((added & VsockShutdown.SEND) !== 0) {
      const side = conn.side!;
      safely(() => side.deliverEnd());
    }
    this.#check(conn);
  }

  #guestRst(conn: Connection): void {
    if ((conn.peerShutdown & VsockShutdown.SEND) !== 0) {
      // Its data was complete: the host side reads it to the end (a unix socket is closed at once all the same).
      this.#end(conn, undefined);
      this.#stats.connectionsClosed++;
    } else {
      this.#end(conn, new VhostError('VHOST_VSOCK_RESET', 'vsock: the guest reset the connection'));
      this.#stats.connectionsReset++;
    }
  }

  // ------------------------------------------------------------------------------------------ from the host side

  #hostSend(conn: Connection, bytes: Buffer, done: ((err?: Error | null) => void) | undefined): void {
    if (conn.closed || conn.hostEof) {
      if (done !== undefined) done(new VhostError('VHOST_VSOCK_CLOSED', 'vsock: the connection is closed'));
      return;
    }
    if ((conn.peerShutdown & VsockShutdown.RCV) !== 0 || bytes.length === 0) {
      this.#stats.bytesDiscarded += bytes.length;
      if (done !== undefined) done(null);
      return;
    }
    conn.tx.push({ bytes, off: 0, done });
    conn.txBytes += bytes.length;
    if (conn.state === ESTABLISHED) this.#dataConns.add(conn);
    this.#check(conn);
    this.#pump();
  }

  #hostSendEnd(conn: Connection, done: ((err?: Error | null) => void) | undefined): void {
    if (conn.closed) {
      if (done !== undefined) done(null);
      return;
    }
    conn.hostEof = true;
    if (done !== undefined) conn.endCallbacks.push(done);
    this.#check(conn);
    this.#pump();
  }

  #hostConsumed(conn: Connection, n: number): void {
    if (conn.closed) return;
    conn.rxBuffered -= n;
    conn.fwdCnt = (conn.fwdCnt + n) >>> 0;
    if (((conn.fwdCnt - conn.lastSentFwdCnt) >>> 0) >= this.#creditThreshold && (conn.peerShutdown & VsockShutdown.SEND) === 0) {
      this.#setCtl(conn, CTL_CREDIT_UPDATE);
    }
    this.#check(conn);
    this.#pump();
  }

  /** The host side closed: SHUTDOWN(both) then RST (just RST if the guest already shut down both ways). */
  #hostGone(conn: Connection): void {
    if (conn.closed) return;
    if (conn.state === CONNECTING_GUEST) {
      // A hybrid program that left before the guest answered: abort the guest's half of it.
      this.#queueDetached(conn, VsockOp.RST, 0, PRIO_RST);
      this.#end(conn, new VhostError('VHOST_VSOCK_CLOSED', 'vsock: the host side closed before the guest answered'));
      this.#stats.connectionsReset++;
      this.#pump();
      return;
    }
    if (conn.peerShutdown !== VsockShutdown.BOTH && conn.sentShutdown !== VsockShutdown.BOTH) {
      this.#queueDetached(conn, VsockOp.SHUTDOWN, VsockShutdown.BOTH, PRIO_SHUTDOWN);
    }
    this.#queueDetached(conn, VsockOp.RST, 0, PRIO_RST);
    this.#end(conn, undefined);
    this.#stats.connectionsClosed++;
    this.#pump();
  }

  /** A hybrid program's CONNECT <guestPort>: a REQUEST to the guest, "OK <host port>" once it answers. */
  #hybridConnect(socket: Socket, guestPort: number, rest: Buffer): void {
    const conn = this.#closed ? undefined : this.#startConnect(guestPort, this.#connectTimeoutMs);
    if (conn === undefined) {
      this.#stats.connectionsRefused++;
      socket.destroy();
      return;
    }
    const side = new UnixSide(socket, conn.endpoint);
    conn.side = side;
    conn.onConnected = () => side.sendOk(conn.hostPort);
    if (rest.length > 0) this.#hostSend(conn, Buffer.from(rest), undefined);
    this.#pump();
  }

  // ------------------------------------------------------------------------------------------ connections

  #newConnection(hostPort: number, guestPort: number, ownsPort: boolean, state: ConnState): Connection {
    const conn: Connection = {
      key: keyOf(hostPort, guestPort),
      hostPort,
      guestPort,
      ownsPort,
      state,
      closed: false,
      side: undefined,
      endpoint: {
        send: (bytes, done) => this.#hostSend(conn, bytes, done),
        sendEnd: (done) => this.#hostSendEnd(conn, done),
        consumed: (n) => this.#hostConsumed(conn, n),
        gone: () => this.#hostGone(conn),
      },
      onConnected: undefined,
      onFailed: undefined,
      pendingSocket: undefined,
      timer: undefined,
      fwdCnt: 0,
      lastSentFwdCnt: 0,
      rxBuffered: 0,
      peerBufAlloc: 0,
      peerFwdCnt: 0,
      txCnt: 0,
      creditRequested: false,
      tx: [],
      txBytes: 0,
      endCallbacks: [],
      peerShutdown: 0,
      hostEof: false,
      sentShutdown: 0,
      shutdownToSend: 0,
      ctl: 0,
    };
    this.#conns.set(conn.key, conn);
    return conn;
  }

  /** A host-initiated connection to the guest's `guestPort` (REQUEST queued, timer armed), or undefined if no room. */
  #startConnect(guestPort: number, timeoutMs: number): Connection | undefined {
    if (this.#conns.size >= this.#maxConnections) return undefined;
    const hostPort = this.#allocatePort(guestPort);
    if (hostPort === undefined) return undefined;
    const conn = this.#newConnection(hostPort, guestPort, true, CONNECTING_GUEST);
    this.#setCtl(conn, CTL_REQUEST);
    conn.timer = setTimeout(() => {
      conn.timer = undefined;
      if (conn.closed) return;
      this.#queueDetached(conn, VsockOp.RST, 0, PRIO_RST);
      this.#end(conn, new VhostError('VHOST_VSOCK_TIMEOUT', `vsock: guest port ${guestPort} did not answer within ${timeoutMs} ms`));
      this.#stats.connectionsRefused++;
      this.#pump();
    }, timeoutMs);
    return conn;
  }

  /** A host port from 1024 upward that no live connection to `guestPort` (and no listener) uses. */
  #allocatePort(guestPort: number): number | undefined {
    // Each try that fails skips a port some connection or listener holds: this many tries always find one.
    const tries = this.#conns.size + this.#listeners.size + 1;
    for (let i = 0; i < tries; i++) {
      const port = this.#nextPort;
      this.#nextPort = port >= U32_MAX ? FIRST_LOCAL_PORT : port + 1;
      if (!this.#localPorts.has(port) && !this.#listeners.has(port) && !this.#conns.has(keyOf(port, guestPort))) {
        this.#localPorts.add(port);
        return port;
      }
    }
    return undefined;
  }

  /**
   * Ends a connection (nothing sent: the caller queued what goes to the guest): it leaves every table, its data is
   * dropped, pending callbacks are answered. `err` undefined: a clean end (the host side finishes after what it was
   * given), else an abrupt one (the host side is aborted, a connect rejected with it).
   */
  #end(conn: Connection, err: VhostError | undefined): void {
    if (conn.closed) return;
    conn.closed = true;
    this.#conns.delete(conn.key);
    if (conn.ownsPort) this.#localPorts.delete(conn.hostPort);
    if (conn.timer !== undefined) clearTimeout(conn.timer);
    conn.timer = undefined;
    this.#ctlConns.delete(conn);
    this.#dataConns.delete(conn);
    conn.ctl = 0;
    const closedErr = err ?? new VhostError('VHOST_VSOCK_CLOSED', 'vsock: the connection is closed');
    const tx = conn.tx.splice(0);
    conn.txBytes = 0;
    const ends = conn.endCallbacks.splice(0);
    conn.pendingSocket?.destroy();
    conn.pendingSocket = undefined;
    const onFailed = conn.onFailed;
    conn.onFailed = undefined;
    conn.onConnected = undefined;
    const side = conn.side;
    if (err !== undefined && onFailed !== undefined) safely(() => onFailed(err));
    if (side !== undefined) {
      if (err === undefined) safely(() => side.finish());
      else safely(() => side.abort(err));
    }
    for (const chunk of tx) {
      const done = chunk.done;
      if (done !== undefined) safely(() => done(closedErr));
    }
    for (const done of ends) safely(() => done(null));
  }

  /** Drops what waits to go to the guest (it reads no more): write callbacks succeed, the bytes are counted. */
  #discardTx(conn: Connection): void {
    const tx = conn.tx.splice(0);
    this.#stats.bytesDiscarded += conn.txBytes;
    conn.txBytes = 0;
    for (const chunk of tx) {
      const done = chunk.done;
      if (done !== undefined) safely(() => done(null));
    }
  }

  /**
   * Moves a connection on after something changed: the clean close once the guest shut down both ways and the host
   * side consumed everything; SHUTDOWN(SEND) once the host side ended and its data went; whether the host side is read.
   */
  #check(conn: Connection): void {
    if (conn.closed || conn.state !== ESTABLISHED) return;
    if (conn.peerShutdown === VsockShutdown.BOTH && conn.rxBuffered === 0) {
      // The guest's close(): answer RST now, as Linux does, so that its close() does not wait for its timeout.
      this.#queueDetached(conn, VsockOp.RST, 0, PRIO_RST);
      this.#end(conn, undefined);
      this.#stats.connectionsClosed++;
      return;
    }
    if (conn.hostEof && conn.txBytes === 0 && ((conn.sentShutdown | conn.shutdownToSend) & VsockShutdown.SEND) === 0) {
      conn.shutdownToSend |= VsockShutdown.SEND;
      this.#setCtl(conn, CTL_SHUTDOWN);
    }
    const side = conn.side;
    if (side !== undefined) {
      const reading = conn.txBytes === 0 && !conn.hostEof;
      safely(() => side.setReading(reading));
    }
  }

  /** After a packet from the guest for an established connection: its credit may allow sending again. */
  #creditChanged(conn: Connection): void {
    if (conn.state !== ESTABLISHED) return;
    if (this.#credit(conn) > 0) {
      conn.creditRequested = false;
      if (conn.txBytes > 0) this.#dataConns.add(conn);
    }
  }

  /** peer_buf_alloc - (tx_cnt - peer_fwd_cnt), u32; 0 when a lying guest claims more in flight than it has room. */
  #credit(conn: Connection): number {
    const inFlight = (conn.txCnt - conn.peerFwdCnt) >>> 0;
    return inFlight >= conn.peerBufAlloc ? 0 : conn.peerBufAlloc - inFlight;
  }

  #setCtl(conn: Connection, bit: number): void {
    conn.ctl |= bit;
    this.#ctlConns.add(conn);
    if (this.#pumping) this.#pumpAgain = true;
  }

  // ------------------------------------------------------------------------------------------ to the guest

  /** RST answering a packet for no connection (§5.10.6, "Stream Sockets"), with the packet's type. */
  #reply(hostPort: number, guestPort: number, type: number): void {
    this.#pushDetached({ op: VsockOp.RST, flags: 0, type, hostPort, guestPort, bufAlloc: 0, fwdCnt: 0, prio: PRIO_REPLY });
  }

  #queueDetached(conn: Connection, op: number, flags: number, prio: number): void {
    this.#pushDetached({
      op,
      flags,
      type: VsockType.STREAM,
      hostPort: conn.hostPort,
      guestPort: conn.guestPort,
      bufAlloc: this.#bufAlloc,
      fwdCnt: conn.fwdCnt,
      prio,
    });
  }

  /** Queues a packet of a gone connection; when the queue is full, the oldest of lower priority makes room, or the
   * new one is dropped. Either way the drop is counted. */
  #pushDetached(d: Detached): void {
    const q = this.#detached;
    if (q.length >= VSOCK_DETACHED_MAX) {
      let victim = -1;
      for (let i = 0; i < q.length; i++) {
        if (q[i]!.prio < d.prio && (victim < 0 || q[i]!.prio < q[victim]!.prio)) victim = i;
      }
      this.#stats.controlDropped++;
      if (victim < 0) return;
      q.splice(victim, 1);
    }
    q.push(d);
  }

  /** Sends what waits, while the path takes it: control packets first, then data. Never nested. */
  #pump(): void {
    if (this.#pumping) {
      this.#pumpAgain = true;
      return;
    }
    this.#pumping = true;
    try {
      do {
        this.#pumpAgain = false;
        if (this.#pathFull) break;
        if (!this.#sendControl()) break;
        this.#sendData();
      } while (this.#pumpAgain);
    } finally {
      this.#pumping = false;
    }
  }

  /** Sends every waiting control packet; false when the path filled first. */
  #sendControl(): boolean {
    for (;;) {
      while (this.#detached.length > 0) {
        const d = this.#detached[0]!;
        if (!this.#emit(d.hostPort, d.guestPort, d.type, d.op, d.flags, d.bufAlloc, d.fwdCnt, undefined)) return false;
        this.#detached.shift();
      }
      if (this.#ctlConns.size === 0) return true;
      for (const conn of this.#ctlConns) {
        for (const [bit, op] of CTL_ORDER) {
          if (conn.closed || this.#detached.length > 0) break;
          if ((conn.ctl & bit) === 0) continue;
          conn.ctl &= ~bit; // before the call: what it sets anew (a guest answering at once) stays set
          const flags = bit === CTL_SHUTDOWN ? conn.shutdownToSend : 0;
          if (!this.#emitConn(conn, op, flags, undefined)) {
            conn.ctl |= bit;
            return false;
          }
          if (bit === CTL_SHUTDOWN) this.#shutdownSent(conn, flags);
        }
        if (conn.closed || conn.ctl === 0) this.#ctlConns.delete(conn);
        if (this.#detached.length > 0) break;
      }
    }
  }

  #shutdownSent(conn: Connection, flags: number): void {
    conn.sentShutdown |= flags;
    conn.shutdownToSend &= ~flags;
    if ((flags & VsockShutdown.SEND) !== 0) {
      for (const done of conn.endCallbacks.splice(0)) safely(() => done(null));
    }
  }

  /** Sends data, round robin over the connections by credit, until the path fills, data runs out or control waits. */
  #sendData(): void {
    while (this.#dataConns.size > 0) {
      let sent = false;
      for (const conn of [...this.#dataConns]) {
        if (this.#detached.length > 0 || this.#ctlConns.size > 0) {
          this.#pumpAgain = true; // control first
          return;
        }
        if (conn.closed || conn.txBytes === 0 || conn.state !== ESTABLISHED) {
          this.#dataConns.delete(conn);
          continue;
        }
        const credit = this.#credit(conn);
        if (credit === 0) {
          this.#dataConns.delete(conn); // back when a packet from the guest gives credit
          if (!conn.creditRequested) {
            conn.creditRequested = true;
            this.#setCtl(conn, CTL_CREDIT_REQUEST);
          }
          continue;
        }
        const chunk = conn.tx[0]!;
        const n = Math.min(credit, this.#maxPayload, chunk.bytes.length - chunk.off);
        if (!this.#emitConn(conn, VsockOp.RW, 0, chunk.bytes.subarray(chunk.off, chunk.off + n))) return;
        sent = true;
        this.#stats.bytesToGuest += n;
        conn.txCnt = (conn.txCnt + n) >>> 0;
        conn.ctl &= ~CTL_CREDIT_UPDATE; // the RW carried fwd_cnt
        if (conn.closed || conn.tx[0] !== chunk) continue; // the guest answered at once and changed everything
        chunk.off += n;
        conn.txBytes -= n;
        if (chunk.off === chunk.bytes.length) {
          conn.tx.shift();
          const done = chunk.done;
          if (done !== undefined) safely(() => done(null));
        }
        this.#dataConns.delete(conn);
        if (conn.txBytes > 0) this.#dataConns.add(conn); // to the end of the round
        else this.#check(conn);
      }
      if (!sent) return;
    }
  }

  #emitConn(conn: Connection, op: number, flags: number, payload: Uint8Array | undefined): boolean {
    if (!this.#emit(conn.hostPort, conn.guestPort, VsockType.STREAM, op, flags, this.#bufAlloc, conn.fwdCnt, payload)) return false;
    conn.lastSentFwdCnt = conn.fwdCnt;
    return true;
  }

  /** One packet to the guest; false (and the path is full) if it was not taken. */
  #emit(
    hostPort: number,
    guestPort: number,
    type: number,
    op: number,
    flags: number,
    bufAlloc: number,
    fwdCnt: number,
    payload: Uint8Array | undefined,
  ): boolean {
    if (this.#pathFull) return false;
    const dv = this.#hdv;
    dv.setUint32(VsockHdr.srcCid, this.#localCid, true);
    dv.setUint32(VsockHdr.srcCid + 4, 0, true);
    dv.setUint32(VsockHdr.dstCid, this.#guestCid, true);
    dv.setUint32(VsockHdr.dstCid + 4, 0, true);
    dv.setUint32(VsockHdr.srcPort, hostPort, true);
    dv.setUint32(VsockHdr.dstPort, guestPort, true);
    dv.setUint32(VsockHdr.len, payload?.length ?? 0, true);
    dv.setUint16(VsockHdr.type, type, true);
    dv.setUint16(VsockHdr.op, op, true);
    dv.setUint32(VsockHdr.flags, flags, true);
    dv.setUint32(VsockHdr.bufAlloc, bufAlloc, true);
    dv.setUint32(VsockHdr.fwdCnt, fwdCnt, true);
    if (!this.#toGuest(this.#header, payload)) {
      this.#pathFull = true;
      return false;
    }
    this.#stats.packetsToGuest++;
    return true;
  }
}
