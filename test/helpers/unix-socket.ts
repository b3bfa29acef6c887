// Whether something listens on a unix socket: how tests wait for a daemon (or find a stale one).
import { connect } from 'node:net';

/** Resolves true when a connection to `path` succeeds (it is closed at once), false when it fails. */
export function tryConnect(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect(path);
    sock.once('connect', () => {
      sock.destroy();
      resolve(true);
    });
    sock.once('error', () => {
      sock.destroy();
      resolve(false);
    });
  });
}
