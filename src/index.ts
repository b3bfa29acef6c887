/**
 * vhost-user: virtio device backends for Node.js, and a vhost-user frontend, in TypeScript.
 *
 * - `VhostUserServer` + a device (`BlkDevice`, `NetDevice`, `RngDevice`, `VsockDevice`) serve a VMM such as QEMU over
 *   a unix socket; `VsockDevice.listen` / `connect` give streams to and from the guest's vsock ports.
 * - `VhostUserFrontend` + `BlkDriver` drive any vhost-user-blk backend (ours, qemu-storage-daemon) from Node.
 * - `VirtioDevice`, `QueueHandler`, `DescriptorChain`, `GuestMemory`: devices of your own (docs/writing-a-device.md;
 *   `RngDevice` is the worked example); `SplitQueue`, `PackedQueue`, `MemoryTable` are the building blocks below.
 */
export { VhostError, ProtocolError, VirtioError, type SystemError } from './errors.js';
export { VhostUserServer, type ServerOptions } from './backend/server.js';
export { BackendSession, MAX_MEM_SLOTS, OFFERED_PROTOCOL_FEATURES } from './backend/session.js';
export type { VirtioDevice, QueueHandler, QueueContext, QueueProducer, DeviceWorkerModule } from './devices/device.js';
export { PENDING, ProduceResult } from './devices/device.js';
export { QueueStat, countStat, readQueueStats, type QueueCounters } from './devices/queue-stats.js';
export { BlkDevice, type BlkDeviceOptions } from './devices/blk/blk-device.js';
export { RngDevice, VIRTIO_ID_RNG, type RngDeviceOptions } from './devices/rng/rng-device.js';
export { VsockDevice, type VsockDeviceOptions } from './devices/vsock/vsock-device.js';
export { VsockHost, type VsockHostOptions } from './devices/vsock/host.js';
export { VsockStream } from './devices/vsock/stream.js';
export { VIRTIO_ID_VSOCK } from './devices/vsock/constants.js';
export { NetDevice, type NetDeviceOptions, type NetPortOption } from './devices/net/net-device.js';
export { SwitchFabric } from './devices/net/ports/switch.js';
export type { NetStatsSnapshot } from './devices/net/stats.js';
export type { GuestMemory } from './memory/guest-memory.js';
export { MemoryTable } from './memory/memory-table.js';
export type { MappedRegion } from './memory/region.js';
export { SplitQueue } from './queue/split-queue.js';
export { PackedQueue } from './queue/packed-queue.js';
export type { DeviceQueue } from './queue/device-queue.js';
export { DescriptorChain, ChainReader, ChainWriter } from './queue/descriptor-chain.js';
