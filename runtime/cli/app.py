"""`medusa-export`: build, generate, verify, bench, serve, train-heads, calibrate-tree.

Every command imports its heavy dependencies (torch, transformers, onnxruntime) only when it runs,
so `medusa-export --help` stays fast. Library errors (`MedusaExportError`) and usage errors (an unknown
option, a value out of its range, a missing argument) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import codecs
import errno
import functools
import os
import signal
import sys
from typing import Callable, NoReturn

import typer

from ..cache_dir import cache_root
from ..errors import MedusaExportError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Export Medusa-accelerated LLMs to ONNX / TensorRT and run them.")


def _version() -> str:
    """The installed package's version (pyproject.toml's), else the library's own."""
    from importlib import metadata

    try:
        return metadata.version("medusa-export")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from .. import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"medusa-export {_version()}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Export Medusa-accelerated LLMs to ONNX / TensorRT and run them."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup runs (a build removes its OUT.partial-* directory)."""


def _on_sigterm(signum: int, frame: object) -> None:
    """The first SIGTERM unwinds the command; a second one ends the process at once (the default action)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


# OS errors with no file named that mean the machine ran out of a resource (a full disk while a library writes
# through its own file object, a memory limit), rather than a bug
RESOURCE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EFBIG)


def error_line(message: str) -> None:
    """``error: MESSAGE`` on stderr, on one line whatever the message holds: a path or a value with a newline or
    another control character in it (an argument, a file name) is escaped, and cannot forge lines of its own."""
    typer.echo("error: " + "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in message), err=True)


def cli_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and exit code 2 (no traceback); Ctrl-C exits 130, SIGTERM 143."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            cache_root()  # read late (after a model loads, after a distillation): a misplaced one is named before work
            return fn(*args, **kwargs)
        except MedusaExportError as e:
            error_line(f"{e}")
            raise typer.Exit(2) from None
        except Terminated:
            typer.echo("terminated", err=True)
            raise typer.Exit(143) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except MemoryError:
            typer.echo("error: out of memory: raise the memory limit, or ask for less (a smaller --max-seq, fewer "
                       "sequences, a smaller batch)", err=True)
            raise typer.Exit(1) from None
        except OSError as e:
            if e.errno == errno.EPIPE and e.filename is None:
                _reader_gone()
            if e.filename is None:
                if e.errno in RESOURCE_ERRNOS:  # the machine ran out of something, not a bug: one line
                    error_line(f"{e.strerror or e}: free some (disk space, memory) and run it again")
                    raise typer.Exit(1) from None
                raise
            # A path the user gave that the system cannot even look up (every existence check raises these), or a
            # file the system refused to read or write: one line naming it, not a traceback.
            bad_name = e.errno in (errno.ENAMETOOLONG, errno.ELOOP)
            hint = (": give a shorter path" if e.errno == errno.ENAMETOOLONG else
                    ": free some (disk space, memory) and run it again" if e.errno in RESOURCE_ERRNOS else "")
            error_line(f"{e.strerror or e}: {str(e.filename)[:120]}{hint}")
            raise typer.Exit(2 if bad_name else 1) from None

    return wrapper


def _reader_gone() -> NoReturn:
    """Standard output's reader closed it (``generate ... | head``): end quietly, with the status a program that
    SIGPIPE stops has (141), and nothing left for Python's own flush at exit to fail on."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no stdout file descriptor to replace
        pass
    raise typer.Exit(128 + signal.SIGPIPE)


def _register() -> None:
    # Command modules import only typer at module level.
    from . import bench_cmd, build_cmd, generate_cmd, serve_cmd, train_cmd  # noqa: F401


def app_commands() -> set[str]:
    return {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}


def _click_errors():
    """The click exception classes typer raises (typer >= 0.20 carries its own copy of click)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main() -> None:
    _tolerant_stdout()
    try:
        _main()
    except KeyboardInterrupt:  # Ctrl-C before a command runs (while the commands' modules import)
        sys.stderr.write("interrupted\n")
        sys.exit(130)


def _tolerant_stdout() -> None:
    """An answer in any script may meet a standard output whose encoding cannot hold it (a latin-1 locale): such
    characters show as '?' there instead of ending the command with a traceback. An error handler the user chose
    (PYTHONIOENCODING=latin-1:backslashreplace) is kept; standard error escapes them already (Python's default)."""
    out = sys.stdout
    if (out is not None and hasattr(out, "reconfigure") and out.errors == "strict"
            and codecs.lookup(out.encoding or "ascii").name != "utf-8"):
        out.reconfigure(errors="replace")


def _main() -> None:
    errors = _click_errors()
    _register()
    signal.signal(signal.SIGTERM, _on_sigterm)  # `serve` puts its own in place while it drains (serve/server.py)
    # MEDUSA_EXPORT_CACHE is checked as each command starts (`cli_errors`), so that `--help` and `--version` work
    # whatever it holds
    try:
        code = app(standalone_mode=False)
    except errors.NoArgsIsHelpError as e:  # a bare command: its help, as click would show it
        typer.echo(e.ctx.get_help(), err=True)
        sys.exit(2)
    except errors.UsageError as e:  # an unknown option, a value out of range, a missing argument
        named = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in app_commands() else None
        command = e.ctx.command_path if e.ctx else "medusa-export" + (f" {named}" if named else "")
        error_line(f"{e.format_message()} (see `{command} --help`)")
        sys.exit(2)
    except errors.ClickException as e:
        error_line(f"{e.format_message()}")
        sys.exit(e.exit_code)
    except typer.Abort as e:
        if isinstance(e.__cause__, EOFError):  # click turns any EOFError into an Abort: a truncated file, not Ctrl-D
            error_line(f"a file ended early ({str(e.__cause__)[:120] or 'EOFError'})")
            sys.exit(1)
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit as e:
        sys.exit(e.code)
    sys.exit(code if isinstance(code, int) else 0)
