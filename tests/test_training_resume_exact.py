"""Medusa-1 stopped anywhere and resumed gives the same heads, bit for bit, as an uninterrupted run of the same
seed; a checkpoint of a run with other options is refused, naming the option; seeds control every draw."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import TINY_VOCAB, loaded_tiny  # noqa: E402

from medusa_export.exporter.heads import load_heads  # noqa: E402
from medusa_export.exporter.training import checkpoint as ckpt  # noqa: E402
from medusa_export.exporter.training import train as train_mod  # noqa: E402
from medusa_export.runtime.training_options import Medusa1Options  # noqa: E402

EOS = TINY_VOCAB - 1
OPTS = Medusa1Options(epochs=3, lr=1e-2, batch_size=16, max_new_tokens=16, gen_batch_size=8, heldout_fraction=0.25,
                      progress=False, amp="none", seed=3)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def loaded(make_tokenizer, torch_single_thread):
    return loaded_tiny(make_tokenizer, EOS)


@pytest.fixture(scope="module")
def reference(loaded, tiny_prompts_file, tmp_path_factory):
    """An uninterrupted run: (root, its heads' tensors, its record)."""
    root = tmp_path_factory.mktemp("exact")
    record = train_mod.train_heads(loaded, tiny_prompts_file, root / "ref", replace(OPTS, cache_dir=root / "cache"))
    return root, _tensors(root / "ref", loaded), record


def _tensors(out, loaded) -> dict:
    return load_heads(out, loaded.model.config).state_dict()


def _assert_same_heads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _kill_at_step(n: int, monkeypatch) -> None:
    """The n-th optimizer step raises (as a kill between steps would)."""
    real, calls = torch.optim.AdamW.step, []

    def step(self, *a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise Killed
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize("kill_step", [2, 17, 26, 35])  # 17 steps an epoch: mid, last, next mid, after a boundary
def test_a_run_killed_mid_epoch_resumes_to_the_same_heads(reference, loaded, tiny_prompts_file, monkeypatch,
                                                          kill_step):
    root, want, record = reference
    out = root / f"killed{kill_step}"
    opts = replace(OPTS, cache_dir=root / "cache", checkpoint_every_s=0)  # a checkpoint after every step
    _kill_at_step(kill_step, monkeypatch)
    with pytest.raises(Killed):
        train_mod.train_heads(loaded, tiny_prompts_file, out, opts)
    monkeypatch.undo()
    again = train_mod.train_heads(loaded, tiny_prompts_file, out, opts)
    assert again["resumed_from_epoch"] is not None
    _assert_same_heads(want, _tensors(out, loaded))
    assert again["history"] == [{**h, "elapsed_s": g["elapsed_s"]} for h, g in zip(record["history"], again["history"])]
    assert again["initial_train_loss_per_head"] == record["initial_train_loss_per_head"]


def test_a_kill_while_writing_the_checkpoint_resumes_to_the_same_heads(reference, loaded, tiny_prompts_file,
                                                                       monkeypatch):
    root, want, _ = reference
    out = root / "torn"
    opts = replace(OPTS, cache_dir=root / "cache", checkpoint_every_s=0)
    real, calls = torch.save, []

    def torn(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 4:
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 half")
            raise Killed
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(Killed):
        train_mod.train_heads(loaded, tiny_prompts_file, out, opts)
    monkeypatch.undo()
    again = train_mod.train_heads(loaded, tiny_prompts_file, out, opts)
    assert again["resumed_from_epoch"] is not None
    _assert_same_heads(want, _tensors(out, loaded))


def test_two_runs_of_one_seed_give_the_same_heads_and_another_seed_does_not(reference, loaded, tiny_prompts_file):
    root, want, record = reference
    again = train_mod.train_heads(loaded, tiny_prompts_file, root / "twice", replace(OPTS, cache_dir=root / "cache2"))
    _assert_same_heads(want, _tensors(root / "twice", loaded))
    other = train_mod.train_heads(loaded, tiny_prompts_file, root / "seed4",
                                  replace(OPTS, seed=4, cache_dir=root / "cache"))
    got = _tensors(root / "seed4", loaded)
    assert any(not torch.equal(want[k], got[k]) for k in want)
    assert again["history"][-1]["heldout"] == record["history"][-1]["heldout"]
    assert other["seed"] == 4


@pytest.mark.parametrize("change, named", [
    ({"lr": 2e-2}, "--lr 0.01 (now 0.02)"), ({"num_heads": 3}, "--num-heads 4 (now 3)"),
    ({"num_layers": 2}, "--num-layers 1 (now 2)"), ({"seed": 5}, "--seed 3 (now 5)"),
    ({"epochs": 4}, "--epochs 3 (now 4)"), ({"batch_size": 8}, "--batch-size 16 (now 8)"),
    ({"max_new_tokens": 12}, "--max-new-tokens 16 (now 12)")])
def test_a_checkpoint_of_other_options_is_refused_naming_the_option(reference, loaded, tiny_prompts_file,
                                                                     monkeypatch, change, named):
    from medusa_export.runtime.errors import CheckpointError

    root, _, _ = reference
    out = root / ("changed_" + next(iter(change)))
    opts = replace(OPTS, cache_dir=root / "cache", checkpoint_every_s=0)
    _kill_at_step(3, monkeypatch)
    with pytest.raises(Killed):
        train_mod.train_heads(loaded, tiny_prompts_file, out, opts)
    monkeypatch.undo()
    saved = (out / ckpt.FILE).read_bytes()
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint\.pt is of a run with other settings") as e:
        train_mod.train_heads(loaded, tiny_prompts_file, out, replace(opts, **change))
    assert named in str(e.value) and "\n" not in str(e.value) and "--no-resume" in str(e.value)
    assert (out / ckpt.FILE).read_bytes() == saved  # not replaced by a fresh run's


def test_other_prompts_or_another_model_are_named_too(reference, loaded, make_tokenizer, tiny_prompts_file,
                                                      tmp_path, monkeypatch):
    from conftest import LoadedTiny, make_tiny_model
    from medusa_export.runtime.errors import CheckpointError

    root, _, _ = reference
    out = tmp_path / "out"
    opts = replace(OPTS, cache_dir=root / "cache", checkpoint_every_s=0)
    _kill_at_step(3, monkeypatch)
    with pytest.raises(Killed):
        train_mod.train_heads(loaded, tiny_prompts_file, out, opts)
    monkeypatch.undo()
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(tiny_prompts_file.read_text().splitlines(keepends=True)[:-2]))
    with pytest.raises(CheckpointError, match=r"the prompts \(--data"):
        train_mod.train_heads(loaded, fewer, out, opts)
    other = LoadedTiny(make_tiny_model(4), make_tokenizer(eos_ids=(EOS,)), {"name": "tiny-llama", "sha256_16": "u"})
    with pytest.raises(CheckpointError, match=r"the base model \"t\" \(now \"u\"\)"):
        train_mod.train_heads(other, tiny_prompts_file, out, opts)
    # what only changes the speed may change: the run continues
    again = train_mod.train_heads(loaded, tiny_prompts_file, out, replace(opts, gen_batch_size=3, threads=1))
    assert again["resumed_from_epoch"] == 0


def test_seeds_drive_the_split_the_shuffles_and_the_sampled_answers(loaded, tiny_prompts_file, tmp_path):
    opts = replace(OPTS, epochs=1, extra_sampled_passes=1, sample_temperature=1.0, cache_dir=tmp_path / "cache")
    a = train_mod.train_heads(loaded, tiny_prompts_file, tmp_path / "a", opts)
    b = train_mod.train_heads(loaded, tiny_prompts_file, tmp_path / "b", replace(opts, cache_dir=tmp_path / "c2"))
    _assert_same_heads(_tensors(tmp_path / "a", loaded), _tensors(tmp_path / "b", loaded))
    assert (tmp_path / "a" / "heldout_prompts.jsonl").read_text() == (tmp_path / "b" / "heldout_prompts.jsonl").read_text()
    assert a["training_positions"] == b["training_positions"]
