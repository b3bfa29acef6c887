/**
 * A small QMP client for tests: one connection (greeting + qmp_capabilities), commands sent in turn, and the
 * asynchronous events QEMU emits on that connection kept so a test can wait for one (e.g. DEVICE_DELETED after
 * device_del). QEMU only sends an event to the connections open when it happens, so open the client before the
 * command that triggers it.
 *
 *     const q = await QmpClient.connect(guest.qmpSocket);
 *     try {
 *       await q.execute('device_del', { id: 'dimm1' });
 *       await q.waitForEvent('DEVICE_DELETED', { timeoutMs: 30_000, match: (d) => d.device === 'dimm1' });
 *     } finally {
 *       q.close();
 *     }
 *
 * Or a single command on a fresh connection: `await qmp(socketPath, 'query-status')`.
 */
import { connect, type Socket } from 'node:net';

export interface QmpEvent {
  readonly event: string;
  readonly data: Record<string, unknown>;
  readonly timestamp?: { readonly seconds: number; readonly microseconds: number };
}

/** A command that QEMU answered with {"error": ...}. */
export class QmpError extends Error {
  readonly command: string;
  readonly errorClass: string;

  constructor(command: string, errorClass: string, desc: string) {
    super(`QMP ${command}: ${errorClass}: ${desc}`);
    this.name = 'QmpError';
    this.command = command;
    this.errorClass = errorClass;
  }
}

export interface QmpConnectOptions {
  /** For the greeting, for each command, and the default of waitForEvent (default 10 s). */
  readonly timeoutMs?: number;
}

export interface WaitForEventOptions {
  /** Default: the client's timeoutMs. */
  readonly timeoutMs?: number;
  /** Only an event whose data this accepts counts. */
  readonly match?: (data: Record<string, unknown>) => boolean;
}

interface Pending {
  readonly command: string;
  readonly resolve: (value: unknown) => void;
  readonly reject: (err: Error) => void;
}

interface EventWaiter {
  readonly name: string;
  readonly match: ((data: Record<string, unknown>) => boolean) | undefined;
  readonly resolve: (ev: QmpEvent) => void;
  readonly reject: (err: Error) => void;
}

type QmpMessage = {
  QMP?: unknown;
  return?: unknown;
  error?: { class?: string; desc?: string };
  event?: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
};

export class QmpClient {
  readonly #sock: Socket;
  readonly #timeoutMs: number;
  readonly #events: QmpEvent[] = [];
  /** Commands are answered in order; at most one is on the wire at a time (execute queues the rest). */
  readonly #pending: Pending[] = [];
  readonly #waiters = new Set<EventWaiter>();
  #chain: Promise<unknown> = Promise.resolve();
  #closed: Error | undefined;
  #buf = '';

  private constructor(sock: Socket, timeoutMs: number) {
    this.#sock = sock;
    this.#timeoutMs = timeoutMs;
  }

  /** Connects, reads the greeting and negotiates capabilities. */
  static async connect(socketPath: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const sock = connect(socketPath);
    const client = new QmpClient(sock, timeoutMs);
    const greeting = new Promise<void>((resolve, reject) => {
      client.#pending.push({ command: '(greeting)', resolve: () => resolve(), reject });
    });
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => client.#onData(chunk));
    sock.on('error', (err) => client.#fail(err));
    sock.on('close', () => client.#fail(new Error(`QMP connection to ${socketPath} closed`)));
    try {
      await client.#withTimeout(greeting, `the greeting on ${socketPath}`);
      await client.execute('qmp_capabilities');
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  /** Sends one command; resolves with its "return" value, rejects with a QmpError on "error". */
  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    const run = async (): Promise<unknown> => {
      if (this.#closed !== undefined) throw this.#closed;
      const reply = new Promise<unknown>((resolve, reject) => this.#pending.push({ command, resolve, reject }));
      this.#sock.write(`${JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args })}\n`);
      // A late reply would be taken for the next command's: a command that times out ends the connection.
      return this.#withTimeout(reply, `the reply to ${command}`, this.#timeoutMs, () => this.close());
    };
    const result = this.#chain.then(run, run);
    this.#chain = result.catch(() => undefined);
    return result;
  }

  /** Every event received on this connection so far, oldest first. */
  events(): readonly QmpEvent[] {
    return this.#events;
  }

  /**
   * Resolves with the first event called `name` (and accepted by match) received on this connection, also if it
   * arrived already; rejects after the timeout or when the connection closes first.
   */
  waitForEvent(name: string, opts: WaitForEventOptions = {}): Promise<QmpEvent> {
    const accepts = (ev: QmpEvent): boolean => ev.event === name && (opts.match === undefined || opts.match(ev.data));
    const seen = this.#events.find(accepts);
    if (seen !== undefined) return Promise.resolve(seen);
    if (this.#closed !== undefined) return Promise.reject(this.#closed);
    let waiter: EventWaiter | undefined;
    const wait = new Promise<QmpEvent>((resolve, reject) => {
      waiter = { name, match: opts.match, resolve, reject };
      this.#waiters.add(waiter);
    });
    return this.#withTimeout(wait, `the event ${name}`, opts.timeoutMs, () => {
      if (waiter !== undefined) this.#waiters.delete(waiter);
    });
  }

  close(): void {
    this.#fail(new Error('QMP client closed'));
    this.#sock.destroy();
  }

  #withTimeout<T>(p: Promise<T>, what: string, timeoutMs = this.#timeoutMs, onTimeout?: () => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        onTimeout?.();
        reject(new Error(`QMP: ${what} did not arrive within ${timeoutMs} ms`));
      }, timeoutMs);
      p.then(
        (v) => {
          clearTimeout(timer);
          resolve(v);
        },
        (err: unknown) => {
          clearTimeout(timer);
          reject(err instanceof Error ? err : new Error(String(err)));
        },
      );
    });
  }

  #onData(chunk: string): void {
    this.#buf += chunk;
    let nl: number;
    while ((nl = this.#buf.indexOf('\n')) >= 0) {
      const line = this.#buf.slice(0, nl).trim();
      this.#buf = this.#buf.slice(nl + 1);
      if (line === '') continue;
      let msg: QmpMessage;
      try {
        msg = JSON.parse(line) as QmpMessage;
      } catch {
        this.#fail(new Error(`QMP: not JSON: ${line}`));
        this.#sock.destroy();
        return;
      }
      if (msg.event !== undefined) {
        const ev: QmpEvent = {
          event: msg.event,
          data: msg.data ?? {},
          ...(msg.timestamp !== undefined ? { timestamp: msg.timestamp } : {}),
        };
        this.#events.push(ev);
        for (const w of this.#waiters) {
          if (w.name === ev.event && (w.match === undefined || w.match(ev.data))) {
            this.#waiters.delete(w);
            w.resolve(ev);
          }
        }
        continue;
      }
      const p = this.#pending.shift();
      if (p === undefined) continue; // not expected: QEMU only answers commands
      if (msg.error !== undefined) p.reject(new QmpError(p.command, msg.error.class ?? '?', msg.error.desc ?? ''));
      else p.resolve(msg.QMP !== undefined ? msg.QMP : msg.return);
    }
  }

  #fail(err: Error): void {
    if (this.#closed !== undefined) return;
    this.#closed = err;
    for (const p of this.#pending.splice(0)) p.reject(err);
    for (const w of this.#waiters) w.reject(err);
    this.#waiters.clear();
  }
}

/** One command on a fresh connection; resolves with its "return" value. */
export async function qmp(
  socketPath: string,
  command: string,
  args?: Record<string, unknown>,
  opts?: QmpConnectOptions,
): Promise<unknown> {
  const client = await QmpClient.connect(socketPath, opts);
  try {
    return await client.execute(command, args);
  } finally {
    client.close();
  }
}
