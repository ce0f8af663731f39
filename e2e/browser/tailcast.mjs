// A real tailcast process for the browser tests: started from the binary e2e/run built, on a
// database of its own, stopped (or killed) and started again on the same port.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

/** Every wait in these tests is bounded by this. */
export const WAIT_MS = 30_000;

function required(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run the browser tests through e2e/run`);
  return v;
}

export class Tailcast {
  constructor({ port, databaseUrl, env = {} }) {
    this.port = port;
    this.base = `http://127.0.0.1:${port}`;
    this.databaseUrl = databaseUrl;
    this.env = env;
    this.proc = null;
    this.log = [];
  }

  /** Starts the server and waits until /readyz says ready. */
  async start() {
    const proc = spawn(required('TAILCAST_BIN'), ['--listen', `127.0.0.1:${this.port}`], {
      env: {
        ...process.env,
        DATABASE_URL: this.databaseUrl,
        TAILCAST_LOG_FORMAT: 'text',
        RUST_LOG: 'warn',
        ...this.env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    for (const s of [proc.stdout, proc.stderr]) s.on('data', (b) => this.log.push(b.toString()));
    this.proc = proc;
    const exited = once(proc, 'exit').then(([code, signal]) => {
      throw new Error(`tailcast exited during start-up (${code ?? signal}):\n${this.log.join('')}`);
    });
    await Promise.race([this.#ready(), exited]);
    exited.catch(() => {}); // later exits are expected (stop/kill)
    return this;
  }

  async #ready() {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      try {
        const res = await fetch(`${this.base}/readyz`);
        if (res.ok) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) throw new Error(`tailcast not ready in time:\n${this.log.join('')}`);
      await new Promise((r) => setTimeout(r, 50)); // poll interval, not a synchronisation
    }
  }

  /** Ends the process with `signal` and waits for it to exit. */
  async stop(signal = 'SIGTERM') {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = once(proc, 'exit');
    proc.kill(signal);
    const timer = setTimeout(() => proc.kill('SIGKILL'), WAIT_MS);
    await exited;
    clearTimeout(timer);
    this.proc = null;
  }

  /** POST /v1/streams/{stream}/events; returns the parsed result, throws on non-201. */
  async append(stream, body, query = '') {
    const res = await fetch(`${this.base}/v1/streams/${stream}/events${query}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    const text = await res.text();
    if (res.status !== 201) throw new Error(`append to ${stream}: ${res.status} ${text}`);
    return JSON.parse(text);
  }

  async close(stream, reason) {
    const res = await fetch(`${this.base}/v1/streams/${stream}/close`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ reason }),
    });
    if (!res.ok) throw new Error(`close ${stream}: ${res.status} ${await res.text()}`);
    return res.json();
  }

  /** Every envelope of a stream, as the NDJSON export's raw lines. */
  async exportLines(stream) {
    const res = await fetch(`${this.base}/v1/streams/${stream}/events?after=0`, {
      headers: { accept: 'application/x-ndjson' },
    });
    if (!res.ok) throw new Error(`export ${stream}: ${res.status}`);
    return (await res.text()).split('\n').filter((l) => l.length > 0);
  }
}

/** Headless Debian Chromium with a new, empty profile; never a browser of playwright's own. */
export async function launchBrowser() {
  const userDataDir = mkdtempSync(join(tmpdir(), 'tailcast-e2e-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  return {
    context,
    async close() {
      await context.close();
      rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

/**
 * A page on tailcast's own origin (its /healthz document), so the browser's EventSource and
 * WebSocket connect same-origin, exactly as a page served next to the API would.
 */
export async function pageOn(context, server) {
  const page = await context.newPage();
  const res = await page.goto(`${server.base}/healthz`);
  if (!res.ok()) throw new Error(`could not open ${server.base}/healthz`);
  return page;
}

/** A TCP port nobody listens on right now. */
export async function freePort() {
  const { createServer } = await import('node:net');
  const srv = createServer();
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const { port } = srv.address();
  srv.close();
  await once(srv, 'close');
  return port;
}

export function uniqueStream(prefix) {
  return `${prefix}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
}
