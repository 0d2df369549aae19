"""Dependencies run one way, and a torch-free install works to the end or refuses in one line.

Allowed directions, for every import — at module level or inside a function:

* `runtime` (the library services embed) imports nothing of `exporter` or `engines`, with one named exception:
  `runtime.api` loads the PyTorch reference backend (`exporter.artifact_reference`) when ``backend="torch"``.
* `runtime.cli` (the command-line front door) may import `exporter` and `engines`, inside the command that
  needs them (the options of build and train-heads live in `runtime.build_options` / `runtime.training_options`).
* `exporter` and `engines` may import `runtime`; `exporter` never imports `engines` and `engines` never `exporter`.
* No module-level import cycle anywhere.
* With torch and transformers unimportable, `generate` and `bench --backends ort` run from the CLI to the
  end, and `verify` (whose reference is PyTorch) and `build` refuse in one line naming the extra.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_cli import GENERATE_KEYS, assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"runtime": "medusa_export.runtime", "exporter": "medusa_export.exporter", "engines": "medusa_export.engines"}
RUNTIME_EXCEPTIONS = {("medusa_export.runtime.api", "medusa_export.exporter.artifact_reference")}


def _module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> dict[str, bool]:
    """Every module ``path`` imports -> whether some import of it runs at import time (not inside a function)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: dict[str, bool] = {}

    def add(module: str, top: bool) -> None:
        found[module] = found.get(module, False) or top

    def visit(nodes, top: bool):
        for node in nodes:
            inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
                continue
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name, top)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                add(base, top)
                for a in node.names:  # `from . import x` imports module x
                    add(f"{base}.{a.name}", top)
            visit(ast.iter_child_nodes(node), inner)

    visit(ast.parse(path.read_text()).body, True)
    return found


def _all_imports() -> dict[str, dict[str, bool]]:
    """module -> {project module it imports -> at module level?}"""
    files = [p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    return {name: {m: top for m, top in _imports(path, name).items() if m in modules} for name, path in modules.items()}


def _graph() -> dict[str, set[str]]:
    """Module-level imports only (what runs when a module is imported)."""
    return {a: {b for b, top in deps.items() if top} for a, deps in _all_imports().items()}


def test_import_graph_is_read_correctly():
    every = _all_imports()
    assert every["medusa_export.runtime.backends.base"]["medusa_export.runtime.io_table"] is True
    assert every["medusa_export.runtime.backends.trt"]["medusa_export.runtime.backends.trt_compat"] is True
    # an import inside a function is seen, and known not to run at import time
    assert every["medusa_export.runtime.cli.build_cmd"]["medusa_export.exporter.build"] is False
    assert every["medusa_export.runtime.api"]["medusa_export.exporter.artifact_reference"] is False


def test_runtime_imports_nothing_of_exporter_or_engines():
    upward = {(a, b) for a, deps in _all_imports().items()
              if a.startswith("medusa_export.runtime") and not a.startswith("medusa_export.runtime.cli")
              for b in deps if b.startswith(("medusa_export.exporter", "medusa_export.engines"))}
    assert upward == RUNTIME_EXCEPTIONS


def test_cli_imports_heavy_parts_only_inside_commands():
    eager = {b for a, deps in _all_imports().items() if a.startswith("medusa_export.runtime.cli")
             for b, top in deps.items() if top and b.startswith(("medusa_export.exporter", "medusa_export.engines"))}
    assert eager == set()


def test_exporter_and_engines_never_import_each_other():
    cross = {(a, b) for a, deps in _all_imports().items() for b in deps
             if (a.startswith("medusa_export.exporter") and b.startswith("medusa_export.engines"))
             or (a.startswith("medusa_export.engines") and b.startswith("medusa_export.exporter"))}
    assert cross == set()


def test_no_module_level_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def dfs(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                dfs(nxt)
        path.pop()
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)


# ------------------------------------------------------------------------------- torch-free CLI
BLOCK = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('torch', 'transformers'):
                raise ImportError('blocked: ' + name)
    sys.meta_path.insert(0, Block())
    from medusa_export.runtime.cli.app import main
    sys.argv[0] = 'medusa-export'
    main()
""")


def torch_free_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True, timeout=600)


def test_torch_free_generate_and_bench_run_to_the_end(artifact, tmp_path):
    pytest.importorskip("onnxruntime")
    proc = torch_free_cli("generate", str(artifact), "--prompt", "t5 t6 t7", "--no-chat", "--max-new-tokens", "6",
                          "--json")
    assert proc.returncode == 0, proc.stderr
    assert GENERATE_KEYS <= set(json.loads(proc.stdout))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "t5 t6 t7"}\n{"prompt": "t9 t8"}\n')
    out = tmp_path / "b.json"
    proc = torch_free_cli("bench", str(artifact), "--backends", "ort", "--prompts", str(prompts),
                          "--max-new-tokens", "5", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "skipping the transformers baseline" in proc.stderr and "medusa-export[torch]" in proc.stderr
    report = json.loads(out.read_text())
    assert [(r["backend"], r["mode"]) for r in report["results"]] == [("ort", "vanilla"), ("ort", "medusa"),
                                                                         ("ort", "medusa+context")]


def test_torch_free_commands_that_need_torch_refuse_in_one_line(artifact, tmp_path):
    assert_one_line_error(torch_free_cli("verify", str(artifact)), "needs torch", "medusa-export[torch]", "ort,trt")
    assert_one_line_error(torch_free_cli("bench", str(artifact), "--hf"), "needs torch", "medusa-export[torch]")
    assert_one_line_error(torch_free_cli("generate", "--prompt", "hi"), "needs torch", "medusa-export[torch]")
    out = tmp_path / "new"
    assert_one_line_error(torch_free_cli("build", "--out", str(out)), "build needs torch", "medusa-export[export]")
    assert not out.exists()
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    assert_one_line_error(torch_free_cli("train-heads", "--data", str(data), "--out", str(tmp_path / "h")),
                          "train-heads needs torch", "medusa-export[train]")


def test_packages_depend_one_way():
    """Package level, module-level imports: runtime <- exporter, runtime <- engines, never both ways."""
    def package(module: str) -> str:
        return module.split(".")[1]

    edges = {(package(a), package(b)) for a, deps in _graph().items() for b in deps if package(a) != package(b)}
    assert not {e for e in edges if e[0] == "runtime"}
    assert not {(a, b) for a, b in edges if (b, a) in edges}
