"""Log-probabilities of the answer's tokens (`GenerationConfig.logprobs`): the model's own values (a full forward of
transformers), the same with and without speculation, alone and batched, aligned with the tokens an answer keeps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_PROMPTS

from medusa_export.runtime.backends.base import StepOutput
from medusa_export.runtime.errors import InputError
from medusa_export.runtime.generation_config import GenerationConfig
from medusa_export.runtime.generator import Generator
from medusa_export.runtime.logprobs import FLOOR, step_logprobs
from medusa_export.runtime.tree import Tree, load_choices


def _out(ids, probs, input_probs) -> StepOutput:
    t = len(ids)
    return StepOutput(np.asarray(ids, np.int64), np.asarray(probs, np.float32), np.asarray(input_probs, np.float32),
                      np.zeros(t, np.float32), None)


def test_each_token_is_read_from_the_row_it_was_chosen_from():
    # rows: root, node 1 (token 8), node 2 (token 40, beyond node 1's top 3), node 3 (token 3)
    ids = [[7, 8, 9], [1, 2, 3], [3, 4, 5], [6, 7, 8]]
    probs = [[0.5, 0.3, 0.2], [0.6, 0.3, 0.0], [0.7, 0.2, 0.1], [0.9, 0.05, 0.05]]
    input_probs = np.zeros((4, 4))
    input_probs[1, 2] = 0.04  # what node 1 gives node 2's token
    out = _out(ids, probs, input_probs)
    entries = step_logprobs(out, accepted=[0, 1, 2], tokens=[8, 40, 3], top=2)
    assert [e.token_id for e in entries] == [8, 40, 3]
    assert [e.logprob for e in entries] == pytest.approx(np.log([0.3, 0.04, 0.7]).tolist())
    assert [i for i, _ in entries[0].top] == [7, 8]
    assert [lp for _, lp in entries[0].top] == pytest.approx(np.log([0.5, 0.3]).tolist())
    assert step_logprobs(out, [1], [3], 3)[0].logprob == FLOOR  # a probability that underflowed: no -inf in JSON
    assert step_logprobs(out, [1], [3], 0)[0].top == ()
    with pytest.raises(ValueError, match="not among"):  # the base model's own token always lies in its row's top
        step_logprobs(out, [0], [40], 1)


@pytest.mark.parametrize("value", [-1, 21, 2.0, True, "3"])
def test_a_bad_count_is_refused_by_name(value):
    with pytest.raises(InputError, match="logprobs"):
        GenerationConfig(logprobs=value)


def _reference(model, prompt: list[int], answer: list[int], temperature: float = 1.0) -> np.ndarray:
    """log_softmax(logits / temperature) at each answer position, from one full forward of transformers."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:len(prompt) + len(answer) - 1]
        return torch.log_softmax(logits.double() / temperature, -1).numpy()


def _check_against(ref: np.ndarray, result, top: int) -> None:
    assert len(result.logprobs) == len(result.token_ids) == len(ref)
    for row, token, e in zip(ref, result.token_ids, result.logprobs):
        assert e.token_id == token and e.logprob == pytest.approx(row[token], abs=2e-4)
        assert len(e.top) == top and [lp for _, lp in e.top] == sorted((lp for _, lp in e.top), reverse=True)
        for i, lp in e.top:  # each alternative's value, and none better left out
            assert lp == pytest.approx(row[i], abs=2e-4)
        assert e.top[-1][1] >= np.sort(row)[-top] - 2e-4


@pytest.mark.parametrize("medusa", [False, True])
def test_greedy_logprobs_are_the_models_own(tiny, make_tokenizer, medusa, clock_free_steps):
    """Greedy, with or without the heads' tree (4 heads, 10 nodes) and context drafts: each token's value and its
    best alternatives are transformers' log_softmax at that position; speculation changes none of them."""
    tree = Tree.from_choices(load_choices("cpu_small_10"), topk=10, num_heads=4)
    gen = Generator(tiny.backend(4, "shared"), make_tokenizer(), tree)
    for prompt in TINY_PROMPTS:
        result = gen.generate(list(prompt), GenerationConfig(max_new_tokens=20, medusa=medusa, logprobs=3), heads=True
                              if medusa else None)
        assert result.token_ids == tiny.reference(prompt, 20)
        if medusa:
            assert result.steps < 19  # drafts were accepted: tokens came from tree rows
        _check_against(_reference(tiny.model, list(prompt), result.token_ids), result, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_logprobs_are_at_the_requests_temperature(tiny, make_tokenizer, seed):
    """Typical acceptance over the heads' tree: every kept token's value is log_softmax(logits / 0.8) at its
    position, whether it was a draft the tree accepted or the base model's own draw."""
    tree = Tree.from_choices(load_choices("cpu_small_10"), topk=10, num_heads=4)
    gen = Generator(tiny.backend(4, "shared"), make_tokenizer(), tree)
    prompt = list(TINY_PROMPTS[2])
    result = gen.generate(prompt, GenerationConfig(max_new_tokens=24, temperature=0.8, seed=seed, logprobs=2))
    assert sum(result.step_accepted) > 0  # some tokens were drafts
    _check_against(_reference(tiny.model, prompt, result.token_ids, 0.8), result, 2)


def test_more_alternatives_than_the_graph_returns_are_refused(tiny, make_tokenizer):
    gen = Generator(tiny.backend(None, sample_topk=4), make_tokenizer(), None)
    assert len(gen.generate([5, 6], GenerationConfig(max_new_tokens=3, medusa=False, logprobs=4)).logprobs) == 3
    with pytest.raises(InputError, match="returns its best 4"):
        gen.generate([5, 6], GenerationConfig(max_new_tokens=3, medusa=False, logprobs=5))


def test_an_artifact_gives_the_same_values_with_speculation_batched_and_streamed(artifact, tiny_model, clock_free_steps):
    """ONNX Runtime: Medusa and vanilla, alone and in a batch, give the same tokens and values; a stream's events
    carry the entries of their own tokens; a stop string keeps the entry of the token that completed it."""
    from medusa_export.runtime.api import MedusaRuntime

    rt = MedusaRuntime.load(artifact)
    try:
        prompts = ["t1 t2 t3", "t40 t41", "t9 t9 t9 t9"]
        plain = [rt.generate(p, max_new_tokens=16, logprobs=2, medusa=False, ignore_eos=True) for p in prompts]
        fast = [rt.generate(p, max_new_tokens=16, logprobs=2, ignore_eos=True) for p in prompts]
        many = rt.generate_many(prompts, max_new_tokens=16, logprobs=2, ignore_eos=True)
        for a, b, c, p in zip(plain, fast, many, prompts):
            assert a.token_ids == b.token_ids == c.token_ids
            for x, y, z in zip(a.logprobs, b.logprobs, c.logprobs):
                assert x.token_id == y.token_id == z.token_id
                assert x.logprob == pytest.approx(y.logprob, abs=1e-5) and x.logprob == pytest.approx(z.logprob, abs=1e-5)
                assert [i for i, _ in x.top] == [i for i, _ in y.top] == [i for i, _ in z.top]
            ids = rt.generator.tokenizer.encode(p)
            _check_against(_reference(tiny_model, ids, a.token_ids), a, 2)
        assert sum(sum(r.step_accepted) for r in fast) > 0
        stream = rt.stream(prompts[0], max_new_tokens=16, logprobs=1, ignore_eos=True)
        events = list(stream)
        assert all(len(e.logprobs) == len(e.token_ids) for e in events)
        assert [x for e in events for x in e.logprobs] == stream.result.logprobs
        full = plain[0].text
        stop = " " + full.split(" ")[3]  # a word a token in the toy tokenizer
        kept = full[:full.find(stop) + len(stop)].count(" ") + 1  # the tokens up to the one that completed it
        cut = rt.generate(prompts[0], max_new_tokens=16, logprobs=0, ignore_eos=True, stop_strings=[stop])
        assert cut.finish_reason == "stop" and len(cut.logprobs) == len(cut.token_ids) == kept < 16
        assert [e.logprob for e in cut.logprobs] == [e.logprob for e in plain[0].logprobs[:kept]]
        assert rt.generate(prompts[0], max_new_tokens=4).logprobs is None  # not asked for
    finally:
        rt.close()


def test_generate_prints_them_in_its_json_and_refuses_them_without(artifact, tmp_path):
    from test_cli import assert_one_line_error, cli

    plain = cli("generate", str(artifact), "--prompt", "t1 t2", "--max-new-tokens", "6", "--json", "--no-medusa")
    run = cli("generate", str(artifact), "--prompt", "t1 t2", "--max-new-tokens", "6", "--json", "--logprobs", "2")
    assert plain.returncode == run.returncode == 0, (plain.stderr, run.stderr)
    got, want = json.loads(run.stdout), json.loads(plain.stdout)
    assert "logprobs" not in want and got["token_ids"] == want["token_ids"]
    assert [e["token_id"] for e in got["logprobs"]] == got["token_ids"]
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in got["logprobs"])
    assert_one_line_error(cli("generate", str(artifact), "--prompt", "x", "--logprobs", "2"), "--logprobs", "--json")
    assert_one_line_error(cli("generate", str(tmp_path / "missing"), "--prompt", "x", "--json", "--logprobs", "21"),
                          "logprobs", "20")


def _check_prompt(ref: np.ndarray, prompt: list[int], entries, top: int) -> None:
    """``entries`` (one per prompt token, None for the first) against log_softmax rows of the tokens before each."""
    assert entries[0] is None and len(entries) == len(prompt)
    for j in range(1, len(prompt)):
        e, row = entries[j], ref[j - 1]
        assert e.token_id == prompt[j] and e.logprob == pytest.approx(row[prompt[j]], abs=2e-4)
        assert len(e.top) == top and all(lp == pytest.approx(row[i], abs=2e-4) for i, lp in e.top)


def _prompt_reference(model, prompt: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), -1).numpy()


def test_prompt_logprobs_are_the_models_own(tiny, make_tokenizer):
    gen = Generator(tiny.backend(None), make_tokenizer(), None)
    prompt = [5, 6, 7, 8, 9, 100, 200, 300, 17, 17, 17, 42]
    result = gen.generate(prompt, GenerationConfig(max_new_tokens=3, medusa=False, prompt_logprobs=2))
    _check_prompt(_prompt_reference(tiny.model, prompt), prompt, result.prompt_logprobs, 2)
    assert result.logprobs is None  # asked for the prompt's only
    backend = tiny.backend(None)
    backend.scores_prompts = False  # a backend that cannot (TensorRT) refuses rather than guesses
    with pytest.raises(InputError, match="prompt_logprobs is not available"):
        Generator(backend, make_tokenizer(), None).generate(prompt, GenerationConfig(prompt_logprobs=0))


def test_a_prompt_scored_in_chunks_beside_other_requests_gets_the_values_of_one_run(artifact, tiny_model):
    """The batched engine feeds a scored prompt in chunks on the one-sequence graph, each with the next chunk's first
    token as an extra row it does not keep: the values are those of the prompt in one run, and of transformers."""
    from medusa_export.runtime.api import MedusaRuntime

    rt = MedusaRuntime.load(artifact)
    try:
        text = " ".join(f"t{(7 * i) % 300 + 1}" for i in range(40))
        ids = rt.generator.tokenizer.encode(text)
        whole = rt.generate(text, max_new_tokens=6, prompt_logprobs=1, logprobs=1, ignore_eos=True)
        many = rt.generate_many([text, "t3 t4", text], max_new_tokens=6, prompt_logprobs=1, logprobs=1,
                                ignore_eos=True, max_num_batched_tokens=8)
        _check_prompt(_prompt_reference(tiny_model, ids), ids, whole.prompt_logprobs, 1)
        for r in (many[0], many[2]):
            assert r.token_ids == whole.token_ids
            assert [e and e.logprob for e in r.prompt_logprobs] == pytest.approx(
                [e and e.logprob for e in whole.prompt_logprobs], abs=1e-5)
        plain = rt.generate_many([text], max_new_tokens=6, ignore_eos=True, max_num_batched_tokens=8)[0]
        assert plain.token_ids == whole.token_ids and plain.prompt_logprobs is None
    finally:
        rt.close()


def test_a_step_without_its_entries_is_an_error_not_a_shifted_answer():
    """Tokens handed over without their log-probabilities would shift every later event's entries: refused."""
    from medusa_export.runtime.logprobs import FinalTokens
    from medusa_export.runtime.text_output import TextOutput

    class Words:
        eos_token_ids = ()

        def decode(self, ids):
            return " ".join(f"t{i}" for i in ids)

    out = TextOutput(Words(), GenerationConfig(logprobs=0, ignore_eos=True))
    first = FinalTokens([5, 6])
    first.logprobs = step_logprobs(_out([[5, 1], [6, 1]], [[0.5, 0.1], [0.5, 0.1]], np.zeros((2, 2))), [0, 1], [5, 6], 0)
    assert len(out.push(first).logprobs) == 2
    with pytest.raises(ValueError, match="without"):
        out.push([7])


def test_a_prompt_being_scored_lets_running_sequences_step_between_its_chunks(artifact):
    """A scored prompt runs its chunks alone (the lanes graph lacks the input tokens' probabilities), every other step
    while another sequence decodes: that one waits at most one chunk for each next token."""
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.engine import Engine

    rt = MedusaRuntime.load(artifact)
    try:
        engine = Engine(rt.generator, max_num_seqs=2, max_num_batched_tokens=8)
        events: list = []
        decoding = engine.add([5, 6, 7], GenerationConfig(max_new_tokens=40, ignore_eos=True), events.append)
        while decoding.cursor is None:
            engine.step()
        scored = engine.add(list(range(1, 81)), GenerationConfig(max_new_tokens=2, prompt_logprobs=0), lambda _e: None)
        waited, longest = 0, 0
        for _ in range(200):  # bounded
            before = len(events)
            engine.step()
            if decoding.out.finish:
                break
            waited = waited + 1 if len(events) == before else 0
            longest = max(longest, waited)
        assert scored.fed == 80 and longest <= 1  # the prompt went in, ten chunks, while the other kept decoding
    finally:
        rt.close()


def test_a_second_prompt_to_score_waits_in_the_queue_not_in_a_slot(artifact):
    """One prompt is scored at a time; a second admitted meanwhile would hold a KV slot idle while a request behind
    it could not start. It keeps its place at the head of the queue, and the request behind it starts."""
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.engine import Engine

    rt = MedusaRuntime.load(artifact)
    try:
        engine = Engine(rt.generator, max_num_seqs=2, max_num_batched_tokens=8)
        scored = [engine.add(list(range(1, 41)), GenerationConfig(max_new_tokens=2, prompt_logprobs=0), lambda _e: None)
                  for _ in range(2)]
        chat = engine.add([5, 6, 7], GenerationConfig(max_new_tokens=4), lambda _e: None)
        engine.step()
        assert engine.running == [scored[0], chat] and engine.waiting == [scored[1]]
        for _ in range(100):  # bounded
            if not engine.step():
                break
        assert all(s.out.finish for s in (*scored, chat))  # the second was scored once the first's prompt was in
    finally:
        rt.close()
