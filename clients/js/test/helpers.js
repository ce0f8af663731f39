// Test harness: real tailcast processes on free ports with scratch databases, real Chromium
// (Debian's, never a downloaded one) driven by playwright-core, a PNG reader for checking
// screenshots. Every wait is on a condition and under a timeout.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import zlib from "node:zlib";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(here, "../../..");
export const ARTIFACTS = path.join(ROOT, "e2e", "artifacts");
const BIN = process.env.TAILCAST_BIN ?? path.join(ROOT, "target", "debug", "tailcast");
const PG = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/postgres";

/** Resolves when `cond()` is truthy (returning its value); fails after `ms` with `what`. */
export async function waitFor(cond, what, ms = 15000, everyMs = 25) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await cond();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    }
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** A port nothing listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

let dbCounter = 0;

/** Every server started by this test file, so a failed test cannot leave one running. */
const running = new Set();

/** Kills whatever servers are still running and drops their databases (an `after` hook). */
export async function stopAllServers() {
  await Promise.all([...running].map((s) => s.stop()));
}

/** A database URL on the test server, unique to this process; tailcast creates it. */
export function scratchDatabase() {
  const name = `tcjs_${process.pid}_${Date.now().toString(36)}_${++dbCounter}`;
  const url = new URL(PG);
  url.pathname = `/${name}`;
  return { name, url: url.toString() };
}

export function dropDatabase(name) {
  try {
    execFileSync("psql", [PG, "-qc", `drop database if exists "${name}" with (force)`], { stdio: "ignore" });
  } catch {
    // Best effort: a scratch database left behind harms nothing but disk.
  }
}

/**
 * A tailcast process. `start()` resolves once it logged "listening" (migrations are done by
 * then); `kill()` resolves once it exited.
 */
export class Server {
  constructor({ port, database, env = {} }) {
    this.port = port;
    this.database = database;
    this.env = env;
    this.url = `http://127.0.0.1:${port}`;
    this.proc = null;
    this.log = "";
  }

  static async spawn(opts = {}) {
    const s = new Server({ port: opts.port ?? (await freePort()), database: opts.database ?? scratchDatabase(), env: opts.env });
    await s.start();
    return s;
  }

  start() {
    return new Promise((resolve, reject) => {
      const proc = spawn(BIN, [], {
        env: {
          ...process.env,
          DATABASE_URL: this.database.url,
          TAILCAST_LISTEN: `127.0.0.1:${this.port}`,
          TAILCAST_SHUTDOWN_TIMEOUT_S: "2",
          TAILCAST_LOG_FORMAT: "text",
          NO_COLOR: "1",
          RUST_LOG: "info",
          ...this.env,
        },
        stdio: ["ignore", "pipe", "pipe"],
      });
      this.proc = proc;
      running.add(this);
      proc.once("exit", () => running.delete(this));
      const timer = setTimeout(() => {
        proc.kill("SIGKILL");
        reject(new Error(`tailcast did not start in 30 s:\n${this.log.slice(-3000)}`));
      }, 30000);
      const onData = (d) => {
        this.log += d.toString();
        if (this.log.length > 200_000) this.log = this.log.slice(-100_000);
        if (/listening/.test(d.toString())) {
          clearTimeout(timer);
          resolve(this);
        }
      };
      proc.stdout.on("data", onData);
      proc.stderr.on("data", onData);
      proc.once("exit", (code, sig) => {
        clearTimeout(timer);
        reject(new Error(`tailcast exited (${code ?? sig}) before listening:\n${this.log.slice(-3000)}`));
      });
    });
  }

  /** Stops the process with `signal` and waits for it to be gone. */
  kill(signal = "SIGKILL") {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve();
    return new Promise((resolve) => {
      proc.once("exit", () => resolve());
      proc.kill(signal);
    });
  }

  async stop() {
    await this.kill("SIGTERM");
    // Kept for reading after a failure (e2e/artifacts/ is not committed).
    writeFileSync(artifact(`tailcast-${this.database.name}.log`), this.log);
    if (!this.dropped) dropDatabase(this.database.name);
    this.dropped = true;
  }

  async fetch(method, p, body, headers = {}) {
    const res = await fetch(this.url + p, {
      method,
      headers: { "content-type": "application/json", ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch {
      json = text;
    }
    return { status: res.status, body: json, headers: res.headers };
  }

  /**
   * Appends and insists on success; returns the append result. A 503 ("retry shortly": the
   * database was busy) is retried as a producer would, a few times; callers that must not
   * duplicate on a retry give their events ids.
   */
  async append(stream, events, headers) {
    for (let attempt = 0; ; attempt++) {
      const r = await this.fetch("POST", `/v1/streams/${encodeURIComponent(stream)}/events`, events, headers);
      if (r.status === 201) return r.body;
      if (r.status !== 503 || attempt === 4) {
        throw new Error(`append to ${stream}: ${r.status} ${JSON.stringify(r.body)}`);
      }
      await new Promise((res) => setTimeout(res, 100 * 2 ** attempt));
    }
  }

  /** Every event of a stream, via REST replay. */
  async readAll(stream, headers) {
    const out = [];
    let after = 0;
    for (;;) {
      const r = await this.fetch("GET", `/v1/streams/${encodeURIComponent(stream)}/events?after=${after}&limit=1000`, undefined, headers);
      if (r.status === 404 && r.body?.code === "stream_not_found") return out;
      if (r.status !== 200) throw new Error(`read ${stream}: ${r.status} ${JSON.stringify(r.body)}`);
      out.push(...r.body.events);
      if (r.body.next_after >= r.body.head || r.body.events.length === 0) return out;
      after = r.body.next_after;
    }
  }
}

export const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

function chromiumPath() {
  if (process.env.CHROMIUM) return process.env.CHROMIUM;
  return execFileSync(path.join(ROOT, "scripts", "setup-browser"), { encoding: "utf8" }).trim();
}

/** A fresh Chromium with an empty profile; `close()` removes the profile. */
export async function launchBrowser() {
  const profile = mkdtempSync(path.join(os.tmpdir(), "tailcast-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath(),
    headless: true,
    args: CHROMIUM_FLAGS,
    viewport: { width: 1280, height: 800 },
    deviceScaleFactor: 1,
  });
  const close = async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  };
  return { context, close };
}

/** Where screenshots go (e2e/artifacts/, not committed). */
export function artifact(name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  return path.join(ARTIFACTS, name);
}

/**
 * Reads an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes) into
 * {width, height, pixel(x, y) -> [r, g, b]}.
 */
export function decodePng(buf) {
  const sig = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  if (!buf.subarray(0, 8).equals(sig)) throw new Error("not a PNG");
  let off = 8;
  let width = 0;
  let height = 0;
  let channels = 0;
  const idat = [];
  while (off < buf.length) {
    const len = buf.readUInt32BE(off);
    const type = buf.toString("ascii", off + 4, off + 8);
    const data = buf.subarray(off + 8, off + 8 + len);
    if (type === "IHDR") {
      width = data.readUInt32BE(0);
      height = data.readUInt32BE(4);
      const depth = data[8];
      const color = data[9];
      if (depth !== 8 || (color !== 2 && color !== 6) || data[12] !== 0) {
        throw new Error(`unsupported PNG (depth ${depth}, color type ${color}, interlace ${data[12]})`);
      }
      channels = color === 6 ? 4 : 3;
    } else if (type === "IDAT") {
      idat.push(data);
    } else if (type === "IEND") {
      break;
    }
    off += 12 + len;
  }
  const raw = zlib.inflateSync(Buffer.concat(idat));
  const stride = width * channels;
  const px = Buffer.alloc(height * stride);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    for (let x = 0; x < stride; x++) {
      const a = x >= channels ? px[y * stride + x - channels] : 0;
      const b = y > 0 ? px[(y - 1) * stride + x] : 0;
      const c = x >= channels && y > 0 ? px[(y - 1) * stride + x - channels] : 0;
      let v = line[x];
      if (filter === 1) v += a;
      else if (filter === 2) v += b;
      else if (filter === 3) v += (a + b) >> 1;
      else if (filter === 4) {
        const p = a + b - c;
        const pa = Math.abs(p - a);
        const pb = Math.abs(p - b);
        const pc = Math.abs(p - c);
        v += pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      }
      px[y * stride + x] = v & 0xff;
    }
  }
  return {
    width,
    height,
    pixel(x, y) {
      const i = y * stride + x * channels;
      return [px[i], px[i + 1], px[i + 2]];
    },
  };
}

/** How many distinct colours (quantised to 4 bits a channel) an image uses. */
export function colourCount(img) {
  const seen = new Set();
  for (let y = 0; y < img.height; y += 2) {
    for (let x = 0; x < img.width; x += 2) {
      const [r, g, b] = img.pixel(x, y);
      seen.add(((r >> 4) << 8) | ((g >> 4) << 4) | (b >> 4));
    }
  }
  return seen.size;
}
