"""Checks of command-line values that the library cannot make for the CLI: they name the flag, raise `InputError`
(one line, exit code 2) and run before any model or artifact is loaded."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import typer

from ..errors import InputError
from .loading import BACKENDS


def backend_list(text: str, minimum: int = 1) -> list[str]:
    """``--backends a,b``: known names, none empty, none twice (a duplicate would compare or time nothing new)."""
    names = [b.strip() for b in text.split(",")]
    example = "torch,ort" if minimum > 1 else "ort"
    if any(not n for n in names) and any(names):  # "ort," or "ort,,trt": a name is there, one is empty
        raise InputError(f"--backends {text!r} has an empty name between its commas: write the names alone, e.g. "
                         f"{example}")
    if any(not n for n in names) or len(names) < minimum:
        raise InputError(f"--backends {text!r}: give at least {minimum} comma-separated backend name"
                         f"{'s' * (minimum > 1)} from {', '.join(BACKENDS)}, e.g. {example}")
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise InputError(f"--backends: unknown backend {unknown[0]!r}: choose from {', '.join(BACKENDS)}")
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    if twice:
        raise InputError(f"--backends {text!r} names {twice[0]} twice: give each backend once")
    return names


def at_least(flag: str, value: int | None, minimum: int = 1, hint: str = "", maximum: int | None = None) -> None:
    """InputError when ``value`` was given and is below ``minimum`` or above ``maximum`` (None: not given, the
    default applies)."""
    if value is not None and value < minimum:
        raise InputError(f"{flag} {value}: use {minimum} or more{hint}")
    if value is not None and maximum is not None and value > maximum:
        raise InputError(f"{flag} {value}: use at most {maximum}{hint}")


def non_negative(flag: str, value: float | None, hint: str = "") -> None:
    """InputError when ``value`` was given and is negative or not finite (a NaN bound compares false with every
    error, so a check against it fails whatever the numbers are)."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise InputError(f"{flag} {value}: give a finite number of 0 or more{hint}")


def path_value(value) -> Path:
    """The parser of every path option and argument: an empty string is refused (as a path it reads as ".", the
    current directory, and the error named a directory the user never typed)."""
    if isinstance(value, Path):
        return value
    if not str(value).strip():
        raise typer.BadParameter("an empty path (nothing, or only spaces): give the name of a file or directory")
    return Path(value)


def path_option(default: Any, *names: str, help: str) -> Any:
    """A typer option that holds a path, read by `path_value`."""
    return typer.Option(default, *names, parser=path_value, help=help)


def file_path_value(value) -> Path:
    """`path_value` for a file the command writes (a report): a trailing slash names a directory, and ``Path`` drops
    it, so ``--json reports/`` wrote a file called "reports"."""
    if isinstance(value, str) and value.rstrip().endswith(("/", os.sep)):
        raise typer.BadParameter(f"{value!r:.200} ends in a slash, naming a directory: give the path of a file "
                                 f"(e.g. {value.rstrip().rstrip('/' + os.sep)}/report.json)")
    return path_value(value)


def file_path_option(default: Any, *names: str, help: str) -> Any:
    """A typer option that holds the path of a file the command writes, read by `file_path_value`."""
    return typer.Option(default, *names, parser=file_path_value, help=help)


def path_argument(help: str) -> Any:
    """The required ARTIFACT argument, read by `path_value`."""
    return typer.Argument(..., parser=path_value, metavar="ARTIFACT", help=help)


THREADS_PER_CPU = 4  # more intra-op threads than this per CPU only contend: 4,096 on 2 cores ran for minutes


def check_threads(threads: int | None) -> None:
    """InputError when ``--threads`` was given and is below 1 or above THREADS_PER_CPU x the CPUs this process may
    run on."""
    at_least("--threads", threads, hint=", or leave it out for all cores")
    from ..machine import usable_cpus

    cpus = usable_cpus()
    if threads is not None and threads > THREADS_PER_CPU * cpus:
        raise InputError(f"--threads {threads}: use at most {THREADS_PER_CPU * cpus} ({THREADS_PER_CPU} per CPU; this "
                         f"process may use {cpus}), or leave it out for all cores")


def prompts_read(given: Path | None) -> Path:
    """The prompts file a command reads: the one given, else the packaged set. A report path is checked against it
    (`check_out_file`'s inputs): without --prompts, a report written over the packaged set replaced it. A given
    path that is no file is named as such first: a directory was reported as a report path inside it overwriting
    a file this command reads."""
    from ..prompts import PACKAGED_PROMPTS, check_jsonl_file

    if given is not None:
        check_jsonl_file(given, "prompts file")
    return given if given is not None else PACKAGED_PROMPTS
