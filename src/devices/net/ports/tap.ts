/**
 * A TAP device queue (Linux tun/tap, IFF_TAP | IFF_NO_PI): frames the driver transmits are written to the host's
 * network stack, frames the host sends out of the interface are read for the driver. The fd is non-blocking and
 * opened by the control thread (`native.tunOpen`); one fd per queue pair (IFF_MULTI_QUEUE with several pairs).
 *
 * No offloads are negotiated with the driver, so the fd carries plain frames (no IFF_VNET_HDR).
 */
import { readSync, writeSync } from 'node:fs';
import type { Frame, NetPort } from './port.js';

/** Largest frame read from the TAP device (64 KiB: Linux's limit for a tun frame without GSO). */
const TAP_READ_SIZE = 65536;

function isWouldBlock(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'EAGAIN' || code === 'EWOULDBLOCK';
}

export class TapPort implements NetPort {
  readonly inputFd: number;
  readonly frame: Frame;
  #held = false;

  constructor(fd: number) {
    this.inputFd = fd;
    this.frame = { buf: new Uint8Array(TAP_READ_SIZE), offset: 0, length: 0 };
  }

  transmit(buf: Uint8Array, offset: number, length: number): boolean {
    try {
      // One write is one frame; a short write does not happen on tap. EAGAIN (the device's queue is full) and EIO
      // (the interface is down) drop the frame, as a NIC whose link is down would.
      writeSync(this.inputFd, buf, offset, length);
      return true;
    } catch {
      return false;
    }
  }

  hasInput(): boolean {
    return this.#held;
  }

  next(): boolean {
    if (this.#held) return true;
    try {
      const n = readSync(this.inputFd, this.frame.buf, 0, TAP_READ_SIZE, null);
      if (n <= 0) return false;
      this.frame.length = n;
      this.#held = true;
      return true;
    } catch (err) {
      if (isWouldBlock(err)) return false;
      return false; // EIO while the interface is down: nothing to read
    }
  }

  consume(): void {
    this.#held = false;
  }

  close(): void {
    // The fd belongs to the device (control thread): it outlives this session's workers.
  }
}
