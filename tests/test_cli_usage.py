"""The command line as a first-time user reads it: `--version`, every option's help, the docs naming the options."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from test_cli import cli

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    import typer.main

    from medusa_export.runtime.cli import app as cli_app

    cli_app._register()
    return typer.main.get_command(cli_app.app).commands


def test_version_prints_the_version_of_pyproject():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    proc = cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"medusa-export {version}", proc.stdout
    assert "--version" in cli("--help").stdout


def test_the_library_version_is_the_package_version():
    from medusa_export.runtime import __version__

    assert __version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_option_says_what_it_does(name):
    bare = [p.opts for p in _commands()[name].params
            if p.param_type_name == "option" and not (getattr(p, "help", None) or "").strip()]
    assert not bare, f"{name}: options without help: {bare}"


@pytest.mark.parametrize("flag", ["--stop", "--sample-topk"])
def test_the_usage_page_names_the_options_of_generate_and_build(flag):
    assert re.search(re.escape(flag) + r"(?![\w-])", (ROOT / "docs" / "usage.md").read_text())


def test_the_usage_page_documents_version_and_exit_codes():
    text = (ROOT / "docs" / "usage.md").read_text()
    assert "medusa-export --version" in text
    for code in ("130", "143", "141", "exit code 2"):
        assert code in text


def test_help_and_version_work_with_a_misplaced_cache_variable(tmp_path):
    """A bad MEDUSA_EXPORT_CACHE is refused by every command, but it must not hide the help that says what to do."""
    (tmp_path / "afile").write_text("x")
    env = {"MEDUSA_EXPORT_CACHE": str(tmp_path / "afile")}
    for args in (["--help"], ["--version"], ["generate", "--help"]):
        proc = cli(*args, env=env)
        assert proc.returncode == 0 and proc.stdout.strip(), (args, proc.stderr)
    proc = cli("generate", "-p", "hi", env=env)
    assert proc.returncode == 2 and "MEDUSA_EXPORT_CACHE" in proc.stderr and "Traceback" not in proc.stderr
