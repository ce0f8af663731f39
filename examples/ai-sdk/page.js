// The page: the AI SDK's own chat core (AbstractChat, what useChat wraps) with tailcast's
// ChatTransport. The chat id lives in the URL, so a reload finds the answer it was showing
// and resumes it from tailcast (the AI SDK's `resume`).

import { AbstractChat } from "ai";
import { TailcastChatTransport } from "@tailcast/client/ai-sdk";

/** The chat state AbstractChat needs, re-rendering the page on every change. */
class PageState {
  constructor(render) {
    this.render = render;
    this.messages = [];
    this._status = "ready";
    this._error = undefined;
  }
  get error() {
    return this._error;
  }
  set error(e) {
    this._error = e;
    this.render();
  }
  get status() {
    return this._status;
  }
  set status(s) {
    this._status = s;
    this.render();
  }
  pushMessage(m) {
    this.messages = [...this.messages, m];
    this.render();
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1);
    this.render();
  }
  replaceMessage(i, m) {
    this.messages = this.messages.map((old, j) => (j === i ? m : old));
    this.render();
  }
  snapshot(thing) {
    return structuredClone(thing);
  }
}

class Chat extends AbstractChat {
  constructor({ render, ...init }) {
    const state = new PageState(render);
    super({ ...init, state });
    this.pageState = state;
  }
}

const list = document.querySelector("#messages");
const statusEl = document.querySelector("#status");
function render() {
  const state = window.chat?.pageState;
  if (!state) return;
  statusEl.textContent = state.error ? `error: ${state.error.message}` : state.status;
  statusEl.dataset.status = state.status;
  list.replaceChildren(
    ...state.messages.map((m) => {
      const li = document.createElement("li");
      li.dataset.role = m.role;
      li.dataset.id = m.id;
      li.textContent = m.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
      return li;
    }),
  );
}

const config = await (await fetch("/config.json")).json();
const url = new URL(location.href);
let chatId = url.searchParams.get("chat");
if (!chatId) {
  chatId = crypto.randomUUID();
  url.searchParams.set("chat", chatId);
  history.replaceState(null, "", url);
}
window.chat = new Chat({
  id: chatId,
  transport: new TailcastChatTransport({ url: config.tailcast, api: "/api/chat" }),
  render,
  onError: (e) => console.error("chat error:", e),
});
render();

document.querySelector("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = document.querySelector("input");
  window.chat.sendMessage({ text: input.value });
  input.value = "";
});

// After a reload: pick up the answer this chat was receiving (null from the transport when
// there is none, and nothing happens).
window.chat.resumeStream();
