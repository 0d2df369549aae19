"""Sampling cut to the best tokens (top_p, top_k): what is kept, that draws and typical acceptance stay within it,
and that a cut to one token decodes exactly the greedy answer, with the heads' tree and typical acceptance on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_PROMPTS

from medusa_export.runtime.acceptance import accept_typical, kept_ranks, next_token
from medusa_export.runtime.backends.base import StepOutput
from medusa_export.runtime.decode import GenerationConfig
from medusa_export.runtime.errors import InputError
from medusa_export.runtime.generator import Generator
from medusa_export.runtime.tree import Tree, load_choices


def test_kept_ranks_cut_by_count_and_by_mass():
    probs = np.array([[0.5, 0.3, 0.15, 0.05],
                      [0.1, 0.1, 0.1, 0.1]])  # the second row's four ranks hold 0.4 of the vocabulary
    assert kept_ranks(probs, 1.0, 0).tolist() == [4, 4]
    assert kept_ranks(probs, 1.0, 2).tolist() == [2, 2]
    assert kept_ranks(probs, 1.0, 99).tolist() == [4, 4]  # no more than the graph returns
    assert kept_ranks(probs, 0.5, 0).tolist() == [1, 4]  # 0.5 reached by the first; the second never reaches it
    assert kept_ranks(probs, 0.8, 0).tolist() == [2, 4]
    assert kept_ranks(probs, 0.81, 0).tolist() == [3, 4]
    assert kept_ranks(probs, 0.81, 2).tolist() == [2, 2]
    assert kept_ranks(probs, 1e-9, 0).tolist() == kept_ranks(probs, 0.0, 0).tolist() == [1, 1]


def _out(ids: np.ndarray, probs: np.ndarray, input_probs: np.ndarray | None = None) -> StepOutput:
    t = len(ids)
    return StepOutput(np.asarray(ids, np.int64), np.asarray(probs, np.float32),
                      np.zeros((t, t), np.float32) if input_probs is None else np.asarray(input_probs, np.float32),
                      np.zeros(t, np.float32), None)


@pytest.mark.parametrize("top_p, top_k, allowed", [(1.0, 2, {7, 8}), (0.6, 0, {7, 8}), (0.5, 0, {7}),
                                                   (1.0, 0, {7, 8, 9})])
def test_draws_stay_within_the_cut(top_p, top_k, allowed):
    out = _out([[7, 8, 9]], [[0.5, 0.3, 0.2]])
    rng = np.random.default_rng(0)
    drawn = {next_token(out, 0, 1.0, rng, top_p, top_k) for _ in range(400)}
    assert drawn == allowed  # every kept token drawn at least once in 400, none other


def test_typical_acceptance_refuses_a_token_outside_its_parents_cut():
    tree = Tree.from_choices([(0,), (0, 0)], topk=2)  # nodes: root, (0,), (0, 0)
    tokens = np.array([5, 8, 9])
    ids = np.array([[7, 8, 9], [9, 1, 2], [1, 2, 3]])  # node 1's token 8 is rank 2 at the root
    probs = np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05]])
    input_probs = np.zeros((3, 3))
    input_probs[0, 1], input_probs[1, 2] = 0.3, 0.9  # both pass the typical threshold (min(0.09, 0.3))
    out = _out(ids, probs, input_probs)
    assert accept_typical(tree, tokens, out, 0.09, 0.3).nodes.tolist() == [0, 1, 2]
    assert accept_typical(tree, tokens, out, 0.09, 0.3, top_p=1.0, top_k=2).nodes.tolist() == [0, 1, 2]
    assert accept_typical(tree, tokens, out, 0.09, 0.3, top_p=1.0, top_k=1).nodes.tolist() == [0]
    assert accept_typical(tree, tokens, out, 0.09, 0.3, top_p=0.5, top_k=0).nodes.tolist() == [0]
    assert accept_typical(tree, tokens, out, 0.09, 0.3, top_p=0.8, top_k=0).nodes.tolist() == [0, 1, 2]


@pytest.mark.parametrize("field, value", [("top_p", 1.5), ("top_p", -0.1), ("top_p", "0.9"),
                                          ("top_p", float("nan")), ("top_k", -1), ("top_k", 2.0), ("top_k", True)])
def test_bad_cuts_are_refused_by_name(field, value):
    with pytest.raises(InputError, match=field):
        GenerationConfig(**{field: value})


@pytest.mark.parametrize("cut", [{"top_k": 1}, {"top_p": 1e-9}, {"top_p": 0}])
@pytest.mark.parametrize("medusa", [True, False])
def test_a_cut_to_one_token_samples_the_greedy_answer(tiny, make_tokenizer, cut, medusa):
    """Sampling at temperature 0.9 with typical acceptance over the heads' tree, but only the best token kept: every
    accepted node and every drawn token is the argmax, so the answer is plain greedy decoding's, whatever the seed."""
    tree = Tree.from_choices(load_choices("cpu_small_10"), topk=10, num_heads=4)
    gen = Generator(tiny.backend(4, "shared"), make_tokenizer(), tree)
    for prompt in TINY_PROMPTS[:3]:
        greedy = gen.generate(list(prompt), GenerationConfig(max_new_tokens=24, medusa=False)).token_ids
        for seed in (0, 1):
            cfg = GenerationConfig(max_new_tokens=24, temperature=0.9, seed=seed, medusa=medusa, **cut)
            assert gen.generate(list(prompt), cfg).token_ids == greedy


def test_an_artifact_honours_the_cut(artifact):
    """The same on ONNX Runtime, through the library's keyword options; a wide cut still samples."""
    from medusa_export.runtime.api import MedusaRuntime

    rt = MedusaRuntime.load(artifact)
    try:
        greedy = rt.generate("t1 t2 t3", max_new_tokens=16, temperature=0).token_ids
        for seed in (0, 1, 2):
            assert rt.generate("t1 t2 t3", max_new_tokens=16, temperature=1.5, top_k=1, seed=seed).token_ids == greedy
        sampled = {tuple(rt.generate("t1 t2 t3", max_new_tokens=16, temperature=1.5, top_p=0.99, seed=s).token_ids)
                   for s in (0, 1, 2)}
        assert len(sampled) > 1
    finally:
        rt.close()


def test_generate_takes_the_cuts_and_refuses_a_bad_one_before_loading(artifact, tmp_path):
    from test_cli import assert_one_line_error, cli

    greedy = cli("generate", str(artifact), "--prompt", "t1 t2", "--max-new-tokens", "8", "--json")
    cut = cli("generate", str(artifact), "--prompt", "t1 t2", "--max-new-tokens", "8", "--json", "--temperature",
              "0.8", "--top-k", "1", "--seed", "3")
    assert greedy.returncode == cut.returncode == 0, (greedy.stderr, cut.stderr)
    assert json.loads(cut.stdout)["token_ids"] == json.loads(greedy.stdout)["token_ids"]
    # usage errors naming the flag and the command's --help (they named the library's field)
    assert_one_line_error(cli("generate", str(tmp_path / "missing"), "--prompt", "x", "--top-p", "1.5"), "'--top-p'",
                          "less than or equal to 1", "generate --help")
    assert_one_line_error(cli("generate", str(tmp_path / "missing"), "--prompt", "x", "--top-k", "-2"), "'--top-k'",
                          "generate --help")


# vLLM's order (vllm/v1/sample/ops/topk_topp_sampler.py `apply_top_k_top_p`, as HF's TopK then TopP warpers):
# temperature, top-k, then top-p measured on what top-k left, renormalised.
def vllm_kept(logits: np.ndarray, k: int, p: float) -> int:
    """vLLM's apply_top_k_top_p on one row of full-vocabulary logits: how many tokens stay."""
    srt = np.sort(logits)  # ascending, as vLLM
    if k:
        thr = srt[len(srt) - k]
        srt = np.where(srt < thr, -np.inf, srt)
    probs = np.exp(srt - srt.max())
    probs /= probs.sum()
    cum = np.cumsum(probs)
    mask = cum <= 1 - p
    mask[-1] = False
    return int((~mask & np.isfinite(srt)).sum())


def test_top_p_after_top_k_is_measured_on_the_renormalised_top_k():
    probs = np.array([[0.4, 0.2, 0.1, 0.05]])  # whole-vocabulary shares of the best four ranks
    # vLLM: top-k 3 leaves [0.4, 0.2, 0.1] -> renormalised [0.571, 0.286, 0.143]; 0.571 < 0.7 <= 0.857: 2 kept
    assert kept_ranks(probs, 0.7, 3).tolist() == [2]


@pytest.mark.parametrize("seed", range(5))
def test_kept_ranks_match_vllm_when_the_graph_returns_the_whole_vocabulary(seed):
    """S = V (nothing beyond the artifact's ranks): every (k, p) must keep exactly what vLLM keeps."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, 64)
    order = np.argsort(-logits)
    probs = np.exp(logits - logits.max())
    probs = (probs / probs.sum())[order][None]
    for k in (1, 2, 3, 5, 10, 0):
        for p in (0.1, 0.3, 0.5, 0.7, 0.9, 0.95):
            assert int(kept_ranks(probs, p, k)[0]) == vllm_kept(logits, k, p), (k, p)


def test_draws_never_reach_a_rank_vllm_cuts():
    out = StepOutput(np.array([[7, 8, 9, 10]]), np.array([[0.4, 0.2, 0.1, 0.05]], np.float32),
                     np.zeros((1, 1), np.float32), np.zeros(1, np.float32), None)
    rng = np.random.default_rng(0)
    drawn = {next_token(out, 0, 1.0, rng, top_p=0.7, top_k=3) for _ in range(400)}
    assert drawn == {7, 8}


def test_positional_fields_keep_their_meaning():
    cfg = GenerationConfig(64, 0.7, 0.05)  # max_new_tokens, temperature, typical_epsilon (their order before the cuts came)
    assert (cfg.typical_epsilon, cfg.top_p) == (0.05, 1.0)
    cfg = GenerationConfig(64, 0.7, 0.05, 0.3)
    assert (cfg.typical_epsilon, cfg.typical_alpha, cfg.top_p, cfg.top_k) == (0.05, 0.3, 1.0, 0)
