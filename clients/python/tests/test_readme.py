"""The README's Python section runs as written (its producer and consumer, together, against
a live server), so the snippets cannot drift from the package."""

from __future__ import annotations

import re
import threading
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def python_blocks(readme: Path, heading: str):
    text = readme.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_producer_and_consumer_run(server, tc):
    producer, consumer = python_blocks(ROOT / "README.md", "## Python")
    for block in (producer, consumer):
        assert len(block.strip().splitlines()) <= 12, block
    stream = f"readme:{uuid.uuid4().hex[:8]}"

    def adapt(code: str) -> str:
        return code.replace("http://localhost:8080", server.url).replace('"run:42"', repr(stream))

    printed = []
    errors = []

    def run(code, env):
        try:
            exec(compile(adapt(code), "README.md", "exec"), env)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    c = threading.Thread(target=run, args=(consumer, {"print": lambda *a, **k: printed.append(a[0])}))
    p = threading.Thread(target=run, args=(producer, {}))
    c.start()
    p.start()
    p.join(60)
    c.join(60)
    assert not errors, errors
    assert "".join(printed) == "Hello from the agent "
    events = list(tc.read(stream))
    assert [e.type for e in events] == [
        "progress", "token", "token", "token", "token",
        "input.requested", "input.answered", "result", "stream.closed",
    ]
    assert events[-2].data == {"approved": {"approve": True}}


def test_the_package_readme_examples_use_real_names():
    import tailcast

    text = (ROOT / "clients" / "python" / "README.md").read_text()
    for name in re.findall(r"`(\w+)\(", text):
        if name[0].isupper():
            assert hasattr(tailcast, name), name
        else:
            assert any(hasattr(cls, name) for cls in (tailcast.Tailcast, tailcast.Writer, tailcast.AsyncTailcast)), name
