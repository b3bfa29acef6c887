/**
 * Errors with stable `code`s. The code is the contract; the message is for people.
 *
 * Codes are grouped by who is at fault:
 * - `VHOST_PROTOCOL_*`: the frontend sent something malformed or out of order (NACK or disconnect).
 * - `VIRTIO_*`: the guest driver put something invalid in a virtqueue (the device needs reset).
 * - `GUEST_MEMORY_*`: an address or length does not fall inside the guest's mapped memory.
 * - `VHOST_*`: everything else (configuration, lifecycle, timeouts).
 */
export class VhostError extends Error {
  readonly code: string;

  constructor(code: string, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'VhostError';
    this.code = code;
  }
}

/** A frontend protocol violation: the message is answered with an error (REPLY_ACK) or the connection dropped. */
export class ProtocolError extends VhostError {
  constructor(code: `VHOST_PROTOCOL_${string}`, message: string, options?: ErrorOptions) {
    super(code, message, options);
    this.name = 'ProtocolError';
  }
}

/** A guest driver error inside a virtqueue: the queue stops and the device is marked as needing reset. */
export class VirtioError extends VhostError {
  constructor(code: `VIRTIO_${string}` | `GUEST_MEMORY_${string}`, message: string, options?: ErrorOptions) {
    super(code, message, options);
    this.name = 'VirtioError';
  }
}

/** Errors raised by the native addon: Node's usual shape (`code` like 'EBADF', `errno`, `syscall`). */
export interface SystemError extends Error {
  code: string;
  errno: number;
  syscall: string;
}

export function isSystemError(err: unknown): err is SystemError {
  return err instanceof Error && typeof (err as Partial<SystemError>).errno === 'number';
}
