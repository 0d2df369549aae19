"""Shared by the server tests: an artifact with a ChatML tokenizer, a `medusa-export serve` process on
127.0.0.1 (started with the project's own command, bounded waits), and small raw-HTTP helpers for what the
`openai` client will not send."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest

KEY = "sk-test-key"
PROMPT = "t5 t6 t7"
LONG = 1500  # tokens of a request that must still be running while others arrive


def openai_client(base: str):
    """The `openai` client the server tests use: this server, its key, no retries."""
    import openai

    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)


def load_runtime(artifact):
    """The same artifact in-process (one thread), for the answers a request must equal."""
    from medusa_export.runtime.api import MedusaRuntime

    return MedusaRuntime.load(artifact, backend="ort", threads=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_chat_artifact(tiny_dirs, root) -> object:
    """The tiny model with the toy ChatML tokenizer and room for long answers (a few seconds of decoding)."""
    from conftest import build_tiny, make_chat_tokenizer

    model_dir = root / "model"
    shutil.copytree(tiny_dirs[0], model_dir)
    make_chat_tokenizer().save(model_dir)
    return build_tiny(tiny_dirs, root / "art", model_dir, max_seq=2048)


def wait_ready(base: str, proc: subprocess.Popen, seconds: float = 60, port_taken_ok: bool = False) -> bool:
    """True once ``/ready`` answers 200. ``port_taken_ok``: False (instead of a failure) when serve exited because its
    port was taken between `free_port` and its bind (another test process picked the same free port)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # bounded
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            if port_taken_ok and "cannot listen on" in out:
                return False
            pytest.fail(f"serve exited with {proc.returncode}: {out}")
        try:
            if get(base + "/ready")[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail("serve did not become ready")


@contextmanager
def serving(artifact, *options: str, sigint_ignored: bool = False):
    """``medusa-export serve ARTIFACT OPTIONS`` on a free port; yields (base URL, process); stops it after.
    ``sigint_ignored``: started as a script's background job is (SIGINT ignored)."""
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    # The port is free when picked, not when serve binds it: a parallel test worker may take it meanwhile
    for attempt in range(3):
        port = free_port()
        cmd = [sys.executable, "-m", "medusa_export.runtime.cli", "serve", str(artifact), "--port", str(port), *options]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ,
                                "HF_HUB_OFFLINE": "1"}, text=True, preexec_fn=ignore)
        base = f"http://127.0.0.1:{port}"
        if wait_ready(base, proc, port_taken_ok=attempt < 2):
            break
    try:
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict, object]:
    """(status, JSON body, headers: case-insensitive ``.get``)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def stream_chunks(base: str, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed request, read raw (a field left out stays left out); the stream must end with
    ``[DONE]``."""
    req = urllib.request.Request(base + path, json.dumps({**body, "stream": True}).encode(),
                                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        blocks = [b for b in r.read().decode().split("\n\n") if b.strip()]
    assert blocks and blocks[-1] == "data: [DONE]", blocks[-1:]
    return [json.loads(b[len("data: "):]) for b in blocks[:-1]]


def metric(base: str, name: str, labels: str = "") -> float:
    text = get(base + "/metrics")[1].decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"medusa_export:{name}{{") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_idle(base: str, seconds: float = 30) -> None:
    """Until no request is running or waiting (bounded)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if metric(base, "num_requests_running") == 0 and metric(base, "num_requests_waiting") == 0:
            return
        time.sleep(0.05)
    pytest.fail("the server did not become idle")


def assert_still_serving(base: str) -> None:
    """Once idle, the server at ``base`` answers a normal request (after a test that attacked it)."""
    wait_idle(base)
    code, body, _ = post(base + "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert code == 200 and body["usage"]["completion_tokens"] >= 1
