"""Shared by the benchmark scripts: argument checks, one-line errors instead of tracebacks, whole strict JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path, PurePath
from typing import Callable


def _whole(text: str, low: int, why: str) -> int:
    """``text`` as an integer of at least ``low``; argparse's error (``why`` saying what it must be) otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value}: {why}")
    return value


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _whole(text, 1, "must be at least 1")


def non_negative(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _whole(text, 0, "must not be negative")


def span(text: str) -> tuple[int, int]:
    """argparse type: rows ``lo:hi`` of a file, 0 <= lo < hi."""
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range lo:hi of whole numbers (e.g. 200:280)") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"{text}: needs 0 <= lo < hi")
    return lo, hi


def prompt_rows(path, first: int, count: int) -> list[str]:
    """Prompts ``first`` to ``first + count`` of the prompts file ``path``; an `InputError` (one line) where the file
    has none there, rather than a run over no prompts."""
    from medusa_export.runtime.errors import InputError
    from medusa_export.runtime.prompts import read_prompts

    prompts = read_prompts(path, limit=first + count)[first:]
    if not prompts:
        raise InputError(f"prompts file {path} has no prompt from row {first} on: give a smaller --first")
    return prompts


def writable(text: str) -> Path:
    """argparse type: a file path a report can be written to, by the CLI's own check of report paths
    (`check_out_file`: not a folder, its folder there and writable), before any measurement runs rather than found out
    when the report is written."""
    from medusa_export.exporter.output_dir import check_out_file
    from medusa_export.runtime.errors import InputError

    path = Path(text)
    try:
        check_out_file(path, "report")
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def with_machine(report: dict) -> dict:
    """``report`` with the machine it was measured on (CPU model, the cores this process may use, the CPU flags),
    which every result the project records carries, unless it already has one."""
    from medusa_export.runtime.machine import machine_info

    return report if "machine" in report else {**report, "machine": machine_info()}


def finite(value):
    """``value`` with every NaN or infinity replaced by None (strict JSON has neither), a path as its text."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    """``obj`` as strict JSON, written whole: to a temporary file beside ``path``, then renamed over it."""
    path = Path(path)
    text = json.dumps(finite(obj), indent=indent, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_main(main: Callable[[], int | None]) -> None:
    """``main()``, with the project's input errors (a missing artifact, a bad prompts file, a report path that
    cannot be written) as one line and exit 2; ``main``'s own exit status, where it returns one."""
    try:
        from medusa_export.runtime.errors import MedusaExportError
    except ImportError:  # a script that checks for the package itself (torch_cuda_check) says what is missing
        MedusaExportError = FileNotFoundError  # noqa: N806
    try:
        status = main()
    except (MedusaExportError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if status:
        sys.exit(status)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server a script starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_served(cmd: list[str], port: int, what: str, env: dict | None = None) -> subprocess.Popen:
    """``cmd`` (a `medusa-export serve` listening on ``port``) started and answering /ready, within 120 s (bounded);
    where it exits first or never gets ready, one line and exit (its own error is on stderr above)."""
    proc = subprocess.Popen(cmd, env=env if env is not None else {**os.environ, "HF_HUB_OFFLINE": "1"})
    for _ in range(1200):  # bounded: 120 s
        if proc.poll() is not None:
            raise SystemExit(f"error: the server for {what} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"error: the server for {what} did not become ready within 120 s")
