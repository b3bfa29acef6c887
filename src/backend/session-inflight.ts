/**
 * A session's INFLIGHT_SHMFD state (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): the region GET_INFLIGHT_FD allocates
 * or SET_INFLIGHT_FD hands back (QEMU keeps it across a backend restart), and what each ring start gets of it.
 * Layout, validation and tracking: inflight-region.ts; the memfd: inflight-fd.ts.
 *
 * The region is a mapping the workers touch, like guest memory. It changes only while no ring runs (the session
 * stops every running ring first: a stopped ring's worker holds no view of it), and the old mapping is revoked
 * only after that; so the ring stop handshake is its grace period.
 *
 * The layout (split or packed) follows the features negotiated when the region is made or handed back: QEMU sends
 * SET_FEATURES right before GET/SET_INFLIGHT_FD (`vhost_dev_prepare_inflight`), and DPDK decides the same way.
 */
import type { Logger } from 'pino';
import * as native from '../native/index.js';
import { inflightPayload, type Inflight } from '../protocol/payloads.js';
import { createInflightFd, mapInflightFd } from './inflight-fd.js';
import { checkGetInflight, type InflightGeometry, type InflightLimits } from './inflight-region.js';

/** What a ring start gets: the whole region (the worker takes its queue's part). */
export interface InflightMapping {
  readonly buffer: SharedArrayBuffer;
  readonly geometry: InflightGeometry;
}

export class SessionInflight {
  readonly #log: Logger;
  #mapping: InflightMapping | undefined;

  constructor(log: Logger) {
    this.#log = log;
  }

  /** The region for ring `index`, if there is one and it covers that ring. */
  forQueue(index: number): InflightMapping | undefined {
    const m = this.#mapping;
    return m !== undefined && index < m.geometry.numQueues ? m : undefined;
  }

  /**
   * GET_INFLIGHT_FD: a fresh zeroed region (version 0: nothing to resubmit; a VM reset drops the old one with its
   * state, DPDK e4a01eea66) and the reply with its fd (the caller closes the fd once sent). Rings must be stopped.
   */
  get(request: Inflight, limits: InflightLimits): { payload: Uint8Array; fds: number[] } {
    const geometry = checkGetInflight(request, limits);
    const { fd, buffer } = createInflightFd(geometry);
    this.#replace({ buffer, geometry });
    this.#log.info({ numQueues: geometry.numQueues, queueSize: geometry.queueSize, packed: geometry.packed, bytes: geometry.mmapSize }, 'inflight region created');
    const payload = inflightPayload.encode({
      mmapSize: BigInt(geometry.mmapSize),
      mmapOffset: 0n,
      numQueues: geometry.numQueues,
      queueSize: geometry.queueSize,
    });
    return { payload, fds: [fd] };
  }

  /** SET_INFLIGHT_FD: maps the region the frontend hands back (validated against `fd`). Rings must be stopped. */
  set(request: Inflight, fd: number, limits: InflightLimits): void {
    const mapped = mapInflightFd(fd, request, limits);
    if (mapped.truncatable) this.#log.warn('the inflight region cannot be sealed against shrinking: a truncation by the frontend kills this process');
    this.#replace({ buffer: mapped.buffer, geometry: mapped.geometry });
    this.#log.info({ numQueues: mapped.geometry.numQueues, queueSize: mapped.geometry.queueSize, packed: mapped.geometry.packed }, 'inflight region mapped');
  }

  /** Unmaps the region (rings stopped, or the session gone). */
  close(): void {
    this.#replace(undefined);
  }

  #replace(next: InflightMapping | undefined): void {
    const old = this.#mapping;
    this.#mapping = next;
    if (old !== undefined) native.revoke(old.buffer);
  }
}
