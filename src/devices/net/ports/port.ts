/**
 * Ports: where a virtio-net queue pair's frames go and where the frames for its driver come from. A port object
 * lives in the worker thread that runs the pair (both queues of a pair share one worker), and is created there from a
 * structured-cloneable `PortSpec` (fds and SharedArrayBuffers travel; objects do not).
 *
 * Frames are Ethernet frames without FCS. The virtio-net header's offload fields travel next to a frame as a
 * `VnetHeader` (offload.ts): a frame may be a GSO frame or carry a partial checksum (VIRTIO 1.2 §5.1.6.2), which a
 * port passes on unchanged; only the receive queue of a driver that did not negotiate the offload completes it.
 */
import type { VnetHeader } from '../offload.js';
import type { SwitchShared } from './switch.js';

export type PortSpec =
  /** Frames the driver transmits on pair p come back on pair p's receive queue. */
  | { kind: 'loopback' }
  /** Transmitted frames are counted and dropped; nothing is received. */
  | { kind: 'sink' }
  /** Frames of `frameLen` bytes are received as fast as the driver gives buffers; transmitted frames are checked. */
  | { kind: 'source'; frameLen: number; mac: readonly number[] }
  /** A TAP device: `fds[p]` is the queue of pair p (IFF_MULTI_QUEUE when there are several). */
  | { kind: 'tap'; name: string; fds: readonly number[] }
  /** Port `index` of a learning switch shared with other devices of this process. */
  | { kind: 'switch'; shared: SwitchShared; index: number };

export type PortKind = PortSpec['kind'];

/**
 * The frame a port has for the driver: bytes [offset, offset + length) of `buf`, with its offload fields (all zero
 * for a complete frame). The receive queue may complete a partial checksum in place: the bytes are the port's until
 * `consume`.
 */
export interface Frame {
  buf: Uint8Array;
  offset: number;
  length: number;
  readonly hdr: VnetHeader;
}

export interface NetPort {
  /** Readable when the port may have new frames for the driver (the worker polls it while the ring has buffers). */
  readonly inputFd: number | undefined;
  /**
   * Takes a frame the driver transmitted: bytes [offset, offset + length) of `buf`, which may be guest memory that
   * the guest changes at any time, so a port copies what it keeps. `hdr` says which offloads it asks for (validated
   * against what the driver negotiated). Returns false when the port had to drop it.
   */
  transmit(buf: Uint8Array, offset: number, length: number, hdr: VnetHeader): boolean;
  /**
   * The offloads the driver takes on receive (OffloadCap bits), told once its features are known: a port that can
   * have frames completed before they reach it (a TAP: the kernel does it) asks for exactly these. Others need not
   * implement it: the receive queue completes what the driver does not take.
   */
  acceptOffloads?(offloads: number): void;
  /** Whether a frame for the driver is known to wait (no syscall). */
  hasInput(): boolean;
  /** Makes the next frame for the driver current in `frame` (it stays current until `consume`); false if none. */
  next(): boolean;
  readonly frame: Frame;
  /** Done with the current frame: delivered, or dropped by the caller. */
  consume(): void;
  close(): void;
}
