"""A FastAPI app whose agent runs stream through tailcast.

    TAILCAST_URL=http://127.0.0.1:8080 uvicorn examples.fastapi_agent:app --port 8000

- ``POST /runs`` ``{"prompt": "..."}`` starts a run and answers ``{"stream", "sse"}``. The
  run streams fake tokens (no model, no API keys) through the writer, asks for approval
  (``input.requested``; answer it with ``POST /v1/streams/{stream}/inputs/{id}`` or the
  console), streams the rest, and closes the stream with its outcome. ``POST
  /v1/streams/{stream}/stop`` on tailcast (``control.stop``) cancels it at once.
- ``GET /`` is a page that starts a run and follows it with the browser's own EventSource,
  with Approve and Stop buttons that talk to tailcast directly.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Dict

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from tailcast import AsyncTailcast

TAILCAST_URL = os.environ.get("TAILCAST_URL", "http://127.0.0.1:8080").rstrip("/")
TAILCAST_TOKEN = os.environ.get("TAILCAST_TOKEN") or None
#: Seconds between fake tokens (a model's pace).
TOKEN_DELAY = float(os.environ.get("AGENT_TOKEN_DELAY", "0.02"))
APPROVAL = {
    "type": "object",
    "required": ["approve"],
    "properties": {"approve": {"type": "boolean"}},
}

app = FastAPI(title="tailcast agent example")
runs: Dict[str, "asyncio.Task[None]"] = {}


class RunRequest(BaseModel):
    prompt: str = "Plan a deployment"


def fake_tokens(text: str):
    """Stands in for a model: words of a canned answer, a few characters at a time."""
    for word in text.split(" "):
        yield word + " "


async def agent(tc: AsyncTailcast, stream: str, prompt: str) -> str:
    """The agent's work: plan, ask, act. Cancelled from outside when a stop arrives."""
    async with tc.writer(stream) as w:
        w.write("run.started", {"prompt": prompt})
        for tok in fake_tokens(f"Here is a plan for: {prompt}. Step one, build. Step two, test. Step three, deploy."):
            w.write("token", {"text": tok})
            await asyncio.sleep(TOKEN_DELAY)
        await w.flush()  # the plan is on the stream before the question
        answer = await tc.ask(stream, "Deploy now?", schema=APPROVAL, timeout=600)
        if not answer.get("approve"):
            w.write("token", {"text": "Not deploying."})
            return "rejected"
        for tok in fake_tokens("Deploying... done. All services are healthy."):
            w.write("token", {"text": tok})
            await asyncio.sleep(TOKEN_DELAY)
        return "deployed"


async def run(stream: str, prompt: str) -> None:
    async with AsyncTailcast(TAILCAST_URL, TAILCAST_TOKEN) as tc:
        work = asyncio.create_task(agent(tc, stream, prompt))
        # A stop on the stream cancels the agent's task wherever it is (mid-token, mid-ask).
        async with tc.watch_stop(stream, cancel=work):
            try:
                outcome = await work
            except asyncio.CancelledError:
                outcome = "stopped"
            except Exception as e:  # noqa: BLE001 - the run's outcome goes on the stream
                outcome = f"failed: {e}"
        await tc.close(stream, reason=outcome)


@app.post("/runs")
async def start_run(req: RunRequest) -> Dict[str, str]:
    stream = f"run:{uuid.uuid4().hex[:12]}"
    task = asyncio.create_task(run(stream, req.prompt))
    runs[stream] = task
    task.add_done_callback(lambda _t: runs.pop(stream, None))
    return {"stream": stream, "sse": f"{TAILCAST_URL}/v1/streams/{stream}/sse"}


@app.get("/healthz")
async def healthz() -> Dict[str, int]:
    return {"runs": len(runs)}


PAGE = """<!doctype html><meta charset=utf-8><title>agent</title>
<button id=go>Start a run</button> <button id=yes disabled>Approve</button>
<button id=stop disabled>Stop</button><pre id=out></pre>
<script>
const TC = %r;
let stream, request;
const out = document.getElementById("out");
go.onclick = async () => {
  const r = await (await fetch("/runs", {method: "POST", headers: {"content-type": "application/json"}, body: "{}"})).json();
  stream = r.stream; out.textContent = ""; stop.disabled = false;
  const es = new EventSource(r.sse);            // resumes by Last-Event-ID on its own
  es.onmessage = (m) => {
    const ev = JSON.parse(m.data);
    if (ev.type === "token") out.textContent += ev.data.text;
    if (ev.type === "input.requested") { request = ev.data.request_id; yes.disabled = false; }
    if (ev.type === "stream.closed") { out.textContent += "\\n[" + ev.data.reason + "]"; es.close(); stop.disabled = true; }
  };
};
yes.onclick = () => { yes.disabled = true; fetch(`${TC}/v1/streams/${stream}/inputs/${request}`, {method: "POST", body: JSON.stringify({data: {approve: true}})}); };
stop.onclick = () => fetch(`${TC}/v1/streams/${stream}/stop`, {method: "POST", body: JSON.stringify({reason: "user pressed stop"})});
</script>"""


@app.get("/", response_class=HTMLResponse)
async def page() -> str:
    return PAGE % TAILCAST_URL
