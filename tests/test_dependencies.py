"""Dependencies run one way, and a torch-free install works to the end or refuses in one line.

* `runtime` (the library services embed) imports nothing of `exporter` or `engines` at module level;
  `exporter` and `engines` may import `runtime`; no module-level import cycle anywhere.
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


def _module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path, name: str) -> set[str]:
    """Modules imported by statements that run at import time (not inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)  # `from . import x` imports module x
            elif isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
                continue
            visit(ast.iter_child_nodes(node))

    visit(ast.parse(path.read_text()).body)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _module_level_imports(path, name) if m in modules}
    return graph


def test_import_graph_is_read_correctly():
    graph = _graph()
    assert "medusa_export.runtime.io_table" in graph["medusa_export.runtime.backends.base"]
    assert "medusa_export.runtime.backends.trt_compat" in graph["medusa_export.runtime.backends.trt"]
    # imports inside functions do not count (the CLI reaches the heavy parts lazily)
    assert not any(m.startswith("medusa_export.exporter") for m in graph["medusa_export.runtime.cli.build_cmd"])


def test_runtime_imports_nothing_of_exporter_or_engines():
    upward = {(a, b) for a, deps in _graph().items() if a.startswith("medusa_export.runtime")
              for b in deps if b.startswith(("medusa_export.exporter", "medusa_export.engines"))}
    assert upward == set()


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
    assert [(r["backend"], r["mode"]) for r in report["results"]] == [("ort", "vanilla"), ("ort", "medusa")]


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
    """Package level: runtime <- exporter, runtime <- engines, and never both ways between any two."""
    def package(module: str) -> str:
        return module.split(".")[1]

    edges = {(package(a), package(b)) for a, deps in _graph().items() for b in deps if package(a) != package(b)}
    assert not {e for e in edges if e[0] == "runtime"}
    assert not {(a, b) for a, b in edges if (b, a) in edges}
