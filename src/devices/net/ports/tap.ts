/**
 * A TAP device queue (Linux tun/tap, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR): frames the driver transmits are written to
 * the host's network stack, frames the host sends out of the interface are read for the driver. The fd is
 * non-blocking and opened by the control thread (`native.tunOpen`); one fd per queue pair (IFF_MULTI_QUEUE with
 * several pairs).
 *
 * Every read and write carries a 12-byte virtio-net header (TUNSETVNETHDRSZ 12), so offloads cross unchanged:
 * - writes: the kernel takes GSO frames and partial checksums from any writer and finishes them itself if the frame
 *   leaves through a device without the offload;
 * - reads: the kernel hands over GSO frames and partial checksums only for the offloads enabled with TUNSETOFFLOAD,
 *   which `acceptOffloads` sets from what the driver accepted (its GUEST_* features, as QEMU's tap backend does);
 *   the rest it segments and checksums before the frame reaches read().
 */
import { readSync, writeSync } from 'node:fs';
import * as native from '../../../native/index.js';
import { copyBytes } from '../../../queue/descriptor-chain.js';
import { NetHdr } from '../constants.js';
import { newVnetHeader, OffloadCap, readVnetHeader, writeVnetHeader, type VnetHeader } from '../offload.js';
import type { Frame, NetPort } from './port.js';

/** Largest read from the TAP device: the header and a 64 KiB GSO frame with its Ethernet and VLAN headers. */
const TAP_READ_SIZE = NetHdr.size + 65535 + 18;

export class TapPort implements NetPort {
  readonly inputFd: number;
  readonly frame: Frame;
  /** Header + frame for a write (one write() is one frame). */
  readonly #out = new Uint8Array(TAP_READ_SIZE);
  #held = false;

  constructor(fd: number) {
    this.inputFd = fd;
    this.frame = { buf: new Uint8Array(TAP_READ_SIZE), offset: NetHdr.size, length: 0, hdr: newVnetHeader() };
  }

  /** TUNSETOFFLOAD from the driver's receive offloads (OffloadCap bits); TSO only with CSUM, as the kernel wants. */
  acceptOffloads(offloads: number): void {
    const T = native.TunOffload;
    let flags = 0;
    if ((offloads & OffloadCap.CSUM) !== 0) {
      flags = T.CSUM;
      if ((offloads & OffloadCap.TSO4) !== 0) flags |= T.TSO4;
      if ((offloads & OffloadCap.TSO6) !== 0) flags |= T.TSO6;
      if ((offloads & OffloadCap.ECN) !== 0 && (flags & (T.TSO4 | T.TSO6)) !== 0) flags |= T.TSO_ECN;
    }
    native.tunSetOffload(this.inputFd, flags);
  }

  transmit(buf: Uint8Array, offset: number, length: number, hdr: VnetHeader): boolean {
    if (length > this.#out.length - NetHdr.size) return false;
    writeVnetHeader(this.#out, 0, hdr);
    this.#out[NetHdr.numBuffers] = 0;
    this.#out[NetHdr.numBuffers + 1] = 0;
    copyBytes(this.#out, NetHdr.size, buf, offset, length);
    try {
      // One write is one frame; a short write does not happen on tap. EAGAIN (the device's queue is full), EIO (the
      // interface is down) and EINVAL (a header the kernel refuses) drop the frame, as a NIC would.
      writeSync(this.inputFd, this.#out, 0, NetHdr.size + length);
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
    let n: number;
    try {
      n = readSync(this.inputFd, this.frame.buf, 0, TAP_READ_SIZE, null);
    } catch {
      return false; // EAGAIN: nothing waiting; EIO while the interface is down: nothing to read
    }
    if (n <= NetHdr.size) return false;
    readVnetHeader(this.frame.buf, 0, this.frame.hdr);
    this.frame.length = n - NetHdr.size;
    this.#held = true;
    return true;
  }

  consume(): void {
    this.#held = false;
  }

  close(): void {
    // The fd belongs to the device (control thread): it outlives this session's workers.
  }
}
