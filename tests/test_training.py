"""Head training on a tiny random Llama: data reading errors, batched self-distillation == unbatched,
target alignment, loss going down, resumable data and checkpoints, and trained heads that load and decode
losslessly (greedy Medusa output == vanilla output)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import TINY_VOCAB, loaded_tiny, make_tiny_model  # noqa: E402

from medusa_export.exporter.heads import load_heads  # noqa: E402
from medusa_export.exporter.training import train as train_mod  # noqa: E402
from medusa_export.exporter.training.continuous_batching import answer_all  # noqa: E402
from medusa_export.exporter.training.data import (  # noqa: E402
    DistillConfig, DistilledData, distill, generate_batch)
from medusa_export.exporter.training.static_decoder import StaticDecoder  # noqa: E402
from medusa_export.exporter.training.examples import IGNORE, DraftVocab, build_examples, split_by_prompt  # noqa: E402
from medusa_export.runtime.training_options import Medusa1Options  # noqa: E402
from medusa_export.runtime.errors import HeadsError, InputError  # noqa: E402

EOS = TINY_VOCAB - 1


@pytest.fixture(scope="module")
def loaded(make_tokenizer, torch_single_thread):
    return loaded_tiny(make_tokenizer, EOS)


@pytest.fixture(scope="module")
def prompts_file(tiny_prompts_file):
    return tiny_prompts_file


OPTS = Medusa1Options(epochs=4, lr=1e-2, batch_size=32, max_new_tokens=24, gen_batch_size=8, heldout_fraction=0.25,
                      progress=False, amp="none", seed=0)


@pytest.fixture(scope="module")
def trained(loaded, prompts_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    report = train_mod.train_heads(loaded, prompts_file, root / "heads", replace(OPTS, cache_dir=root / "cache"))
    return root, report


# ------------------------------------------------------------------------------------------------ data


def test_train_heads_names_the_bad_prompts_line(loaded, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(InputError, match="line 2"):
        train_mod.train_heads(loaded, bad, tmp_path / "h", replace(OPTS, cache_dir=tmp_path / "c"))
    assert not (tmp_path / "h").exists()


def test_every_prompt_filtered_out_is_refused_before_distillation(loaded, prompts_file, tmp_path):
    opts = replace(OPTS, cache_dir=tmp_path / "c", exclude_eval=prompts_file)
    with pytest.raises(InputError, match="no prompts left after filtering"):
        train_mod.train_heads(loaded, prompts_file, tmp_path / "h", opts)
    assert not (tmp_path / "h").exists() and not (tmp_path / "c").exists()


def test_every_prompt_too_long_is_an_input_error_not_a_numpy_one(loaded, tmp_path):
    with pytest.raises(InputError, match="none of the 2 prompts has 1 to 2 tokens"):
        distill(loaded.model, loaded.tokenizer, ["t1 t2 t3", "t4 t5 t6"], tmp_path / "c",
                DistillConfig(max_new_tokens=2, max_prompt_tokens=2), "sha", "m")
    assert not (tmp_path / "c").exists()


def test_batched_generation_equals_unbatched(loaded):
    """Left padding and rows leaving the batch must not change any row's tokens or hidden states."""
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3], [100, 200, 300, 17, 17, 17, 42], [250, 11]]
    cfg = DistillConfig(max_new_tokens=12)
    eos = {int(generate_batch(loaded.model, [prompts[1]], set(), cfg)["tokens"][4])}  # row 1 stops early
    batched = generate_batch(loaded.model, prompts, eos, cfg)
    off = np.concatenate([[0], np.cumsum(batched["seq_lens"])])
    assert batched["seq_lens"][1] <= 5 and batched["seq_lens"].max() == 12
    for r, p in enumerate(prompts):
        single = generate_batch(loaded.model, [p], eos, cfg)
        np.testing.assert_array_equal(batched["tokens"][off[r]:off[r + 1]], single["tokens"])
        np.testing.assert_allclose(batched["hidden"][off[r]:off[r + 1]].astype(np.float32),
                                   single["hidden"].astype(np.float32), atol=2e-3)


def _answers(model, prompts, eos, max_new, slots, temperature=0.0, seeds=None):
    dec = StaticDecoder(model, slots=slots, capacity=max(map(len, prompts)) + max_new)
    return {i: (h, t) for i, h, t in answer_all(dec, model.get_output_embeddings().weight, prompts, eos, max_new,
                                                 temperature, seeds)}


def test_static_cache_engine_equals_the_transformers_forward(loaded):
    """Continuous batching (3 slots for 9 prompts: slots are refilled mid-run) gives every prompt exactly the
    tokens, and the hidden states, of decoding it alone with the transformers forward."""
    rng = np.random.default_rng(1)
    prompts = [[int(x) for x in rng.integers(1, TINY_VOCAB - 1, n)] for n in rng.integers(2, 12, 9)]
    cfg = DistillConfig(max_new_tokens=16)
    eos = {int(generate_batch(loaded.model, [prompts[0]], set(), cfg)["tokens"][3])}  # some answers end early
    got = _answers(loaded.model, prompts, eos, 16, slots=3)
    lengths = set()
    for i, p in enumerate(prompts):
        ref = generate_batch(loaded.model, [p], eos, cfg)
        hidden, tokens = got[i]
        np.testing.assert_array_equal(tokens, ref["tokens"])
        np.testing.assert_allclose(hidden.astype(np.float32), ref["hidden"].astype(np.float32), atol=2e-3)
        lengths.add(len(tokens))
    assert len(lengths) > 1 and max(lengths) == 16  # early ends and full-length answers both happened


def test_sampled_answers_do_not_depend_on_the_batch(loaded):
    prompts = [[5, 6, 7], [9, 10], [100, 200, 300, 17], [250, 11, 12, 13, 14]]
    seeds = [11, 12, 13, 14]
    two = _answers(loaded.model, prompts, set(), 10, slots=2, temperature=1.0, seeds=seeds)
    four = _answers(loaded.model, prompts, set(), 10, slots=4, temperature=1.0, seeds=seeds)
    greedy = _answers(loaded.model, prompts, set(), 10, slots=4)
    for i in range(4):
        np.testing.assert_array_equal(two[i][1], four[i][1])
    assert any(not np.array_equal(two[i][1], greedy[i][1]) for i in range(4))  # it did sample


def test_hidden_state_predicts_its_token(loaded):
    """Stored H_j gives the stored g_j through lm_head: the pairs the head targets are built from."""
    out = generate_batch(loaded.model, [[5, 6, 7]], set(), DistillConfig(max_new_tokens=8))
    logits = loaded.model.get_output_embeddings()(torch.as_tensor(out["hidden"]).float())
    np.testing.assert_array_equal(logits.argmax(-1).numpy(), out["tokens"])


def test_targets_are_t_plus_2_plus_k():
    data = DistilledData(np.zeros((7, 2), np.float16), np.array([10, 11, 12, 13, 20, 21, 22]),
                         np.array([4, 3]), np.array([0, 1]))
    ex = build_examples(data, num_heads=2)
    # answer 0: H0..H3 -> g0..g3; head k at H_j predicts g_{j+1+k}; H3 (last) has no head target.
    np.testing.assert_array_equal(ex.targets, [[11, 12], [12, 13], [13, IGNORE], [21, 22], [22, IGNORE]])
    np.testing.assert_array_equal(ex.prompt_index, [0, 0, 0, 1, 1])
    train, held = split_by_prompt(ex, 0.5, seed=0)
    assert set(train.prompt_index).isdisjoint(held.prompt_index) and len(train) + len(held) == len(ex)


def test_draft_vocab_remaps_and_drops_the_rest():
    targets = np.array([[5, 5], [5, 7], [9, IGNORE]])
    v = DraftVocab.from_targets(targets, size=2, vocab_size=16)
    np.testing.assert_array_equal(v.ids, [5, 7])
    assert v.coverage == pytest.approx(4 / 5)
    np.testing.assert_array_equal(v.remap(targets, 16), [[0, 0], [0, 1], [IGNORE, IGNORE]])


# -------------------------------------------------------------------------------------------- training


def test_training_reduces_loss_and_writes_outputs(trained):
    root, report = trained
    out = root / "heads"
    assert {"heads.safetensors", "config.json", "training.json", "eval.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "checkpoint.pt").exists()
    first, last = report["initial_train_loss_per_head"], report["history"][-1]["train_loss_per_head"]
    assert sum(last) < 0.7 * sum(first)
    assert report["heldout_before_training"]["positions"] == report["heldout"]["positions"]
    assert report["training_positions"] > 200 and report["heldout_positions"] > 0
    saved = json.loads((out / "eval.json").read_text())
    assert len(saved["top1"]) == 4 and len(saved["top5"]) == 4
    rec = json.loads((out / "training.json").read_text())
    assert rec["data_sha256"] and rec["seed"] == 0 and rec["wall_time_s"] > 0


def test_trained_heads_decode_losslessly(trained, loaded):
    from medusa_export.exporter.torch_backend import TorchBackend
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.generator import Generator
    from medusa_export.runtime.tree import Tree

    heads = load_heads(trained[0] / "heads", loaded.model.config)
    tree = Tree.from_choices([(0,), (1,), (0, 0), (0, 1), (0, 0, 0), (0, 0, 0, 0)], topk=10, num_heads=4)
    gen = Generator(TorchBackend(loaded.model, heads, max_seq=128), loaded.tokenizer, tree)
    for prompt in ("t5 t6 t7 t8", "t100 t3", "t250 t11 t250 t11"):
        medusa = gen.generate(prompt, GenerationConfig(max_new_tokens=30, medusa=True))
        vanilla = gen.generate(prompt, GenerationConfig(max_new_tokens=30, medusa=False))
        assert medusa.token_ids == vanilla.token_ids
        assert medusa.steps <= vanilla.steps


def test_heads_for_another_model_are_refused(trained):
    other = make_tiny_model(0)
    other.config.vocab_size = TINY_VOCAB + 64
    with pytest.raises(HeadsError, match="vocab_size"):
        load_heads(trained[0] / "heads", other.config)
    other.config.vocab_size, other.config.hidden_size = TINY_VOCAB, 96
    with pytest.raises(HeadsError, match="hidden_size"):
        load_heads(trained[0] / "heads", other.config)


def test_rerun_reuses_data_and_resumes_after_interruption(trained, loaded, prompts_file, monkeypatch):
    """Kill the run after epoch 1 (its checkpoint is on disk), rerun: same heads as the uninterrupted run."""
    root, report = trained
    out = root / "interrupted"
    real_eval = train_mod.evaluate_heads
    calls = {"n": 0}

    def failing_eval(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # 1: before training, 2: after epoch 1, 3: after epoch 2
            raise KeyboardInterrupt
        return real_eval(*a, **kw)

    monkeypatch.setattr(train_mod, "evaluate_heads", failing_eval)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train_heads(loaded, prompts_file, out, replace(OPTS, cache_dir=root / "cache"))
    assert (out / "checkpoint.pt").exists()
    monkeypatch.setattr(train_mod, "evaluate_heads", real_eval)
    again = train_mod.train_heads(loaded, prompts_file, out, replace(OPTS, cache_dir=root / "cache"))
    assert again["distillation"][0]["generated_now_tokens"] == 0  # every shard came from the cache
    assert again["resumed_from_epoch"] == 1 and len(again["history"]) == OPTS.epochs
    a = load_heads(root / "heads", loaded.model.config).state_dict()
    b = load_heads(out, loaded.model.config).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


class Evil:
    """Unpickling this would create a marker file: loading a checkpoint must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_corrupt_checkpoint_is_an_error_not_a_silent_restart(trained, loaded, prompts_file, tmp_path, capsys):
    from medusa_export.runtime.errors import CheckpointError

    root, _ = trained
    out = tmp_path / "h"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x80\x04 torn write")
    opts = replace(OPTS, epochs=1, cache_dir=root / "cache")
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint\.pt cannot be read .*--no-resume"):
        train_mod.train_heads(loaded, prompts_file, out, opts)
    assert not (out / "config.json").exists()
    report = train_mod.train_heads(loaded, prompts_file, out, replace(opts, resume=False))
    assert report["resumed_from_epoch"] is None and (out / "config.json").exists()
    # A checkpoint holding an object other than tensors is refused, never unpickled
    marker = tmp_path / "pwned"
    torch.save({"fingerprint": Evil(marker), "heads": {}, "optimizer": {}, "scheduler": {}}, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"cannot be read \(it holds objects other than tensors\)"):
        train_mod.train_heads(loaded, prompts_file, out, opts)
    assert not marker.exists()
    # A readable checkpoint of another run (other arguments) is refused, not silently replaced by a fresh run
    torch.save({"fingerprint": "other", "heads": {}, "optimizer": {}, "scheduler": {}}, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"is of a run with other settings \(other arguments, data or base "
                                              r"model\): .*--no-resume"):
        train_mod.train_heads(loaded, prompts_file, out, opts)
    assert train_mod.train_heads(loaded, prompts_file, out, replace(opts, resume=False))["resumed_from_epoch"] is None


def test_training_record_holds_no_machine_paths(trained):
    root, report = trained
    text = (root / "heads" / "training.json").read_text()
    assert str(root) not in text and "/tmp" not in text
    record = json.loads(text)
    assert record["data_file"] == "prompts.jsonl" and len(record["data_sha256"]) == 64
    data = record["data"]  # provenance: the source file's hash, the filters and what each removed
    assert data["source"] == "jsonl" and len(data["sha256"]) == 64 and data["excluded_eval_set"] == "mt_bench"
    assert data["counts"]["input"] == 24 and data["counts"]["kept"] == data["prompts"]


def test_the_training_prompts_greedy_answers_are_kept_for_the_corpus_table(trained, loaded):
    """answers.npz holds the distilled greedy answers of the training prompts only (held-out ones measure the heads),
    each ending where the model ended it."""
    from medusa_export.exporter.own_answers import FILE, load_answers

    root, report = trained
    answers = load_answers(root / "heads" / FILE, loaded.model.config.vocab_size)
    distilled = report["distillation"][0]
    assert len(answers) == distilled["answers"] - report["heldout_prompts"] > 0
    assert sum(len(a) for a in answers) < distilled["positions"] and all(len(a) for a in answers)
    eos = set(loaded.tokenizer.eos_token_ids)
    assert all(int(a[-1]) in eos or len(a) == OPTS.max_new_tokens for a in answers)


def test_draft_vocab_and_sampled_passes(trained, loaded, prompts_file, tmp_path, capsys):
    """Draft-vocab training still evaluates over the full vocabulary; sampled extra answers add training
    positions but never held-out ones (the held-out set stays the greedy answers of the same prompts)."""
    opts = replace(OPTS, cache_dir=tmp_path / "c", draft_vocab=64, extra_sampled_passes=1, epochs=1, progress=True)
    report = train_mod.train_heads(loaded, prompts_file, tmp_path / "h", opts)
    assert "epoch 1/1" in capsys.readouterr().err  # tqdm bars on stderr
    assert report["distillation"][1]["config"]["temperature"] == 0.7
    assert len(json.loads((tmp_path / "h" / "draft_vocab.json").read_text())["ids"]) == 64
    heldout = [json.loads(line)["prompt"] for line in (tmp_path / "h" / "heldout_prompts.jsonl").read_text().splitlines()]
    assert len(heldout) == report["heldout_prompts"] > 0
    assert set(heldout) <= {json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()}
    assert report["heldout_positions"] == trained[1]["heldout_positions"]
    assert report["training_positions"] > trained[1]["training_positions"]
    assert report["draft_vocab"]["size"] == 64 and 0 < report["draft_vocab"]["coverage"] <= 1
    assert len(report["heldout"]["top1"]) == 4
    load_heads(tmp_path / "h", loaded.model.config)


def test_train_record_keeps_the_runs_arguments(trained):
    """training.json's args: the data and output paths plus every option, as the run had them."""
    root, report = trained
    assert report["args"] == {"data_file": "prompts.jsonl", "out_dir": "heads",
                              **asdict(replace(OPTS, cache_dir="cache"))}


def test_no_cuda_is_one_line_before_any_output(loaded, prompts_file, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError, match="--device cuda: this PyTorch sees no CUDA device"):
        train_mod.train_heads(loaded, prompts_file, tmp_path / "h", Medusa1Options(device="cuda", progress=False))
    assert not (tmp_path / "h").exists()


def test_what_a_run_cannot_learn_or_measure_is_said(loaded, prompts_file, tmp_path, capsys):
    """A head whose targets all lie past the answers' ends printed a loss of 0.0 (read as perfect); a run without
    held-out prompts, or with a draft vocabulary past the model's, said nothing."""
    opts = replace(OPTS, cache_dir=tmp_path / "c", epochs=1, heldout_fraction=0.0, max_new_tokens=4,
                   draft_vocab=TINY_VOCAB + 100)
    train_mod.train_heads(loaded, prompts_file, tmp_path / "h", opts)
    err = capsys.readouterr().err
    assert "warning: head 4 has no training positions" in err and "head 3 has no" not in err
    assert "warning: no held-out positions" in err
    assert f"--draft-vocab {TINY_VOCAB + 100} is past the model's vocabulary: {TINY_VOCAB} tokens" in err


def test_prompts_longer_than_the_models_context_leaves_room_for_are_left_out(loaded, tmp_path, capsys):
    """The cap was a fixed 1,024 tokens: on a model of 512 positions a 600-token prompt was distilled past them."""
    prompts = tmp_path / "p.jsonl"
    long_prompt = " ".join(f"t{5 + i % 300}" for i in range(500))  # 500 words, over 512 - 24 with the template
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["t5 t6 t7", "t8 t9", "t10 t11 t12", long_prompt]))
    report = train_mod.train_heads(loaded, prompts, tmp_path / "h", replace(OPTS, cache_dir=tmp_path / "c", epochs=1))
    assert report["distillation"][0]["skipped_long_prompts"] == 1
    assert report["distillation"][0]["config"]["max_prompt_tokens"] == 512 - OPTS.max_new_tokens
    assert "note: 1 prompt(s) over 488 tokens" in capsys.readouterr().err
