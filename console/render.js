// Renders one stream's events readably: token deltas joined into text, progress as bars,
// everything else as a row with collapsible JSON. All event data goes in through
// textContent, never innerHTML: it comes from producers and must not become markup.

/** Rows kept in the event list; older ones are dropped (the log keeps them all). */
const MAX_ROWS = 1000;

/** Text of a token event, or null if the event is not a token delta. */
export function tokenText(ev) {
  if (ev.type !== "token" || ev.data === null || typeof ev.data !== "object") return null;
  const t = ev.data.text ?? ev.data.delta;
  return typeof t === "string" ? t : null;
}

/** Progress of an event as {label, pct (0..100), caption}, or null. */
export function progressOf(ev) {
  if (ev.type !== "progress" || ev.data === null || typeof ev.data !== "object") return null;
  const d = ev.data;
  let pct = null;
  let caption = "";
  if (typeof d.current === "number" && typeof d.total === "number" && d.total > 0) {
    pct = (d.current / d.total) * 100;
    caption = `${d.current} / ${d.total}`;
  } else if (typeof d.pct === "number" || typeof d.percent === "number") {
    pct = d.pct ?? d.percent;
    // Fractions (0..1) and percentages (0..100) both occur in the wild.
    if (pct > 0 && pct <= 1 && !Number.isInteger(pct)) pct *= 100;
  }
  if (pct === null || !Number.isFinite(pct)) return null;
  pct = Math.max(0, Math.min(100, pct));
  const label = String(d.label ?? d.name ?? d.step ?? ev.key ?? "progress");
  if (!caption) caption = `${Math.round(pct)}%`;
  if (typeof d.message === "string") caption += ` · ${d.message}`;
  return { label, pct, caption };
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function timeOf(ev) {
  const t = typeof ev.time === "string" ? ev.time : "";
  const m = t.match(/T(\d\d:\d\d:\d\d(?:\.\d+)?)/);
  return m ? m[1] : t;
}

function brief(value, max = 120) {
  let s;
  try {
    s = typeof value === "string" ? value : JSON.stringify(value);
  } catch {
    s = String(value);
  }
  if (s === undefined) return "";
  return s.length > max ? s.slice(0, max - 1) + "…" : s;
}

/** A one-line description of events the console knows. */
function describe(ev) {
  const d = ev.data && typeof ev.data === "object" ? ev.data : {};
  switch (ev.type) {
    case "stream.closed":
      return { cls: "closed", text: `stream closed${d.reason !== undefined ? ": " + brief(d.reason) : ""}` };
    case "input.requested":
      return { cls: "input", text: `input requested (${d.request_id ?? "?"}): ${brief(d.prompt ?? "")}` };
    case "input.answered":
      return { cls: "input", text: `input answered (${d.request_id ?? "?"}): ${brief(d.data)}` };
    case "input.expired":
      return { cls: "input", text: `input expired (${d.request_id ?? "?"})` };
    case "control.stop":
      return { cls: "stop", text: `stop requested${d.reason !== undefined ? ": " + brief(d.reason) : ""}` };
    case "control.stopped":
      return { cls: "stop", text: `stopped (answering stop #${d.stop_seq ?? "?"})` };
    case "control.stop_refused":
      return { cls: "stop", text: `stop refused (stop #${d.stop_seq ?? "?"})${d.reason !== undefined ? ": " + brief(d.reason) : ""}` };
    default: {
      const t = tokenText(ev);
      if (t !== null) return { cls: "token", text: brief(JSON.stringify(t), 400) };
      const p = progressOf(ev);
      if (p) return { cls: "progress", text: `${p.label}: ${p.caption}` };
      return { cls: "", text: brief(ev.data) };
    }
  }
}

/**
 * The answer a `control.stopped` / `control.stop_refused` event gives, or null:
 * `{stopSeq, outcome: "stopped"|"refused", reason}` (the stop-acknowledgement convention).
 */
export function stopAnswer(ev) {
  if (ev.type !== "control.stopped" && ev.type !== "control.stop_refused") return null;
  const d = ev.data && typeof ev.data === "object" ? ev.data : {};
  if (!Number.isInteger(d.stop_seq)) return null;
  return { stopSeq: d.stop_seq, outcome: ev.type === "control.stopped" ? "stopped" : "refused", reason: d.reason };
}

/** The rendered view of one stream. */
export class StreamView {
  /** @param {{text: HTMLElement, progress: HTMLElement, events: HTMLElement, count: HTMLElement}} parts */
  constructor(parts) {
    this.parts = parts;
    this.reset();
  }

  reset() {
    this.parts.text.textContent = "";
    this.textNode = document.createTextNode("");
    this.parts.text.append(this.textNode);
    this.parts.text.classList.add("is-empty");
    this.parts.progress.replaceChildren();
    this.parts.progress.hidden = true;
    this.parts.events.replaceChildren();
    this.bars = new Map();
    /** control.stop seq -> its row's status badge, and answers that came before their stop's row. */
    this.stops = new Map();
    this.answers = new Map();
    this.count = 0;
    this.parts.count.textContent = "";
  }

  /** @param {import("./tailcast.js").Envelope} ev */
  add(ev) {
    this.count++;
    const t = tokenText(ev);
    if (t !== null) {
      this.textNode.appendData(t);
      this.parts.text.classList.remove("is-empty");
      this.parts.text.scrollTop = this.parts.text.scrollHeight;
    }
    const p = progressOf(ev);
    if (p) this.setBar(p);
    this.addRow(ev);
    const answer = stopAnswer(ev);
    if (answer) {
      this.answers.set(answer.stopSeq, { ...answer, seq: ev.seq });
      this.showStop(answer.stopSeq);
    }
    if (ev.type === "stream.closed") {
      for (const seq of this.stops.keys()) this.showStop(seq, true);
    }
    this.parts.count.textContent = `(${this.count})`;
  }

  /** Marks a stop's row: acknowledged, refused, waiting, or (closed) never answered. */
  showStop(stopSeq, closed = false) {
    const badge = this.stops.get(stopSeq);
    if (!badge) return;
    const a = this.answers.get(stopSeq);
    if (a) {
      badge.className = `stop-status pill ${a.outcome === "stopped" ? "live" : "closed"}`;
      badge.textContent = a.outcome === "stopped" ? "stopped" : "refused";
      badge.title = a.outcome === "stopped"
        ? `the agent stopped (seq ${a.seq})`
        : `the agent refused (seq ${a.seq})${a.reason !== undefined ? ": " + brief(a.reason) : ""}`;
    } else if (closed) {
      badge.className = "stop-status pill idle";
      badge.textContent = "no answer";
      badge.title = "the stream closed without the agent answering this stop";
    }
  }

  setBar({ label, pct, caption }) {
    let bar = this.bars.get(label);
    if (!bar) {
      const row = el("div", "bar");
      row.dataset.label = label;
      const name = el("span", "bar-label", label);
      const track = el("div", "bar-track");
      track.setAttribute("role", "progressbar");
      track.setAttribute("aria-valuemin", "0");
      track.setAttribute("aria-valuemax", "100");
      track.setAttribute("aria-label", label);
      const fill = el("div", "bar-fill");
      track.append(fill);
      const cap = el("span", "bar-caption");
      row.append(name, track, cap);
      this.parts.progress.append(row);
      this.parts.progress.hidden = false;
      bar = { track, fill, cap };
      this.bars.set(label, bar);
    }
    bar.fill.style.width = `${pct}%`;
    bar.track.setAttribute("aria-valuenow", String(Math.round(pct)));
    bar.fill.classList.toggle("done", pct >= 100);
    bar.cap.textContent = caption;
  }

  addRow(ev) {
    const { cls, text } = describe(ev);
    const li = el("li", `ev ${cls}`);
    li.dataset.seq = String(ev.seq);
    li.dataset.type = ev.type;
    const head = el("details");
    const sum = el("summary");
    sum.append(
      el("span", "seq", `#${ev.seq}`),
      el("span", "time", timeOf(ev)),
      el("span", "type", ev.type),
      el("span", "desc", text),
    );
    if (ev.type === "control.stop") {
      // The agent answers with control.stopped / control.stop_refused naming this seq.
      const badge = el("span", "stop-status pill", "waiting");
      badge.title = "no answer from the agent yet";
      sum.append(badge);
      this.stops.set(ev.seq, badge);
      this.showStop(ev.seq);
    }
    if (typeof ev.folded === "number") {
      // A compacted catch-up: this row stands for a run of appends to one message.
      const f = el("span", "folded", `×${ev.folded}`);
      f.title = `${ev.folded} events, seq ${ev.seq - ev.folded + 1}–${ev.seq}, folded into one message`;
      sum.append(f);
      li.classList.add("is-folded");
    }
    head.append(sum);
    // The JSON is built when first opened: thousands of token rows stay cheap.
    head.addEventListener(
      "toggle",
      () => {
        if (head.open && head.childElementCount === 1) {
          head.append(el("pre", "json", JSON.stringify(ev, null, 2)));
        }
      },
    );
    li.append(head);
    const list = this.parts.events;
    const stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
    list.append(li);
    while (list.childElementCount > MAX_ROWS) list.firstElementChild.remove();
    if (stick) list.scrollTop = list.scrollHeight;
  }
}
