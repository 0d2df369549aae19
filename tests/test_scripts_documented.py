"""The measurement scripts the docs tell users to run: every `scripts/X` the docs name exists, `--help` works for
each script, and every flag a documented invocation passes is one its argument parser takes. Nothing is measured:
each script's options are read from its `--help`."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPTS = ROOT / "scripts"
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
NAMED = re.compile(r"scripts/([\w-]+\.(?:py|sh|c))")
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
INLINE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)  # a code span, also ``a `b` c``
FLAG = re.compile(r"^--?[A-Za-z][\w-]*")


def _invocations(text: str) -> list[str]:
    """The commands in ``text`` that run a Python script: from ```bash blocks (continuation lines joined, comments
    dropped, split at `&&` and `;`) and from inline code spans (which may wrap over lines)."""
    commands: list[str] = []
    for lang, body in FENCE.findall(text):
        if lang not in ("bash", "sh", "shell", ""):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)
            commands += [part for part in re.split(r"&&|;", line) if re.search(r"scripts/[\w-]+\.py", part)]
    for prose in re.split(r"\n\s*\n", FENCE.sub("", text)):  # a code span ends in its paragraph
        commands += [" ".join(m.group(2).split()) for m in INLINE.finditer(prose)
                     if re.search(r"scripts/[\w-]+\.py", m.group(2)) and not _past(prose, m.end())]
    return commands


def _past(text: str, end: int) -> bool:
    """A script of the past, named with the commit it was in: "`scripts/x.py` in (that) commit ..."."""
    return re.match(r"`?\s+in (that )?commit", text[end:]) is not None


def _flags(command: str) -> tuple[str, list[str]]:
    """The script a command runs and the flags it passes (`[--x]`, `--x=1`, `a|b` alternatives alike)."""
    script = re.search(r"scripts/([\w-]+)\.py", command).group(1)
    rest = command.split(f"scripts/{script}.py", 1)[1]
    flags = []
    for token in re.split(r"[\s|]+", rest):
        token = token.strip("[](),`")
        match = FLAG.match(token)
        if match:
            flags.append(match.group(0))
    return script, flags


def _documented() -> list[tuple[str, str, str]]:
    return [(doc.name, command, _flags(command)[0]) for doc in DOCS for command in _invocations(doc.read_text())]


@functools.lru_cache(maxsize=None)
def _help(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def _options(script: str) -> set[str]:
    """The option strings in the script's `--help` (the lines of its options section)."""
    done = _help(script)
    assert done.returncode == 0, done.stderr
    options = set()
    for line in done.stdout.splitlines():
        if re.match(r"\s+-", line):
            head = re.split(r"\s{2,}", line.strip())[0]
            options |= {word.split()[0] for word in head.split(",") if word.strip().startswith("-")}
    return options


def test_the_extraction_reads_what_the_docs_write():
    text = ("```bash\npython scripts/a.py X --b 1 \\\n   --c 2   # and --not-this\nx && python scripts/d.py --e\n```\n"
            "and ``scripts/z.py `--q` x``, `scripts/old.py` in commit abc, `python scripts/f.py ARTIFACT --g 0|32 [--h down,o]\n--i=3` and `scripts/j.py A B --k 256`.")
    assert [_flags(c) for c in _invocations(text)] == [
        ("a", ["--b", "--c"]), ("d", ["--e"]), ("z", ["--q"]), ("f", ["--g", "--h", "--i"]), ("j", ["--k"])]


def test_every_script_the_docs_name_exists():
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for match in NAMED.finditer(text):
            if _past(text, match.end()):
                continue
            if not (SCRIPTS / match.group(1)).exists():
                missing.append(f"{doc.name}: scripts/{match.group(1)}")
    assert not missing, missing


@pytest.mark.parametrize("script", sorted(p.stem for p in SCRIPTS.glob("*.py")))
def test_help_works_without_running_anything(script):
    done = _help(script)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("doc,command,script", _documented(), ids=lambda v: str(v)[:60])
def test_every_documented_flag_is_one_the_script_takes(doc, command, script):
    assert (SCRIPTS / f"{script}.py").exists(), f"{doc}: {command}"
    unknown = [f for f in _flags(command)[1] if f not in _options(script)]
    assert not unknown, f"{doc}: `{command}` passes {unknown}, which scripts/{script}.py does not take"
