/**
 * The frame a virtio-net backend sends for VHOST_USER_SEND_RARP after a migration, when the guest cannot announce
 * itself (VIRTIO_NET_F_GUEST_ANNOUNCE not acknowledged): a broadcast RARP "reverse request" from the guest's MAC, so
 * that switches learn the port the VM is behind now. The same frame as QEMU's `qemu_announce_self` and DPDK's
 * `make_rarp_packet`: Ethernet broadcast, type 0x8035; RARP over Ethernet/IPv4, opcode 3, sender and target
 * hardware address the MAC, protocol addresses 0; padded to the 60-byte Ethernet minimum.
 */
export const ETH_P_RARP = 0x8035;
export const RARP_FRAME_LENGTH = 60;

/** The announcement frame for `mac` (6 bytes). */
export function rarpFrame(mac: ArrayLike<number>): Uint8Array {
  if (mac.length !== 6) throw new RangeError(`a MAC address has 6 bytes, not ${mac.length}`);
  const f = new Uint8Array(RARP_FRAME_LENGTH);
  const v = new DataView(f.buffer);
  f.fill(0xff, 0, 6); // destination: broadcast
  f.set(Array.from(mac), 6); // source: the guest
  v.setUint16(12, ETH_P_RARP);
  v.setUint16(14, 1); // hardware type: Ethernet
  v.setUint16(16, 0x0800); // protocol type: IPv4
  f[18] = 6; // hardware address length
  f[19] = 4; // protocol address length
  v.setUint16(20, 3); // opcode: reverse request
  f.set(Array.from(mac), 22); // sender hardware address; sender protocol address 0.0.0.0
  f.set(Array.from(mac), 32); // target hardware address; target protocol address 0.0.0.0
  return f;
}
