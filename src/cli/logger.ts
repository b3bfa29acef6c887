/** The CLI's logger: pino, human-readable on a terminal (pino-pretty), JSON lines otherwise. */
import pino, { type Logger } from 'pino';

export function createLogger(level: string): Logger {
  if (process.stderr.isTTY) {
    return pino({ level, transport: { target: 'pino-pretty', options: { destination: 2, translateTime: 'HH:MM:ss.l' } } });
  }
  return pino({ level }, pino.destination(2));
}
