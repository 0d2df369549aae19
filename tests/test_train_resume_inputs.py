"""Medusa-1 resume and input attacks: a checkpoint of another base model, a damaged checkpoint of this run, the
data path typed another way, an earlier run's draft vocabulary left beside full-vocabulary heads, values that
passed validation and then failed inside torch, and option objects of the wrong types."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import TINY_VOCAB, LoadedTiny, loaded_tiny, make_tiny_model  # noqa: E402

from medusa_export.exporter.training import train as train_mod  # noqa: E402
from medusa_export.runtime.errors import CheckpointError, InputError  # noqa: E402
from medusa_export.runtime.training_options import Medusa1Options, Medusa2Options  # noqa: E402

EOS = TINY_VOCAB - 1
OPTS = Medusa1Options(epochs=2, lr=1e-2, batch_size=32, max_new_tokens=16, gen_batch_size=8, heldout_fraction=0.25,
                      progress=False, amp="none", seed=0)


@pytest.fixture(scope="module")
def loaded(make_tokenizer, torch_single_thread):
    return loaded_tiny(make_tokenizer, EOS)


@pytest.fixture(scope="module")
def interrupted(loaded, tiny_prompts_file, tmp_path_factory):
    """A run killed after epoch 1 (its checkpoint on disk): (root, checkpoint file, options)."""
    root = tmp_path_factory.mktemp("resume")
    opts = replace(OPTS, cache_dir=root / "cache")
    real_eval, calls = train_mod.evaluate_heads, {"n": 0}

    def failing_eval(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # 1: before training, 2: after epoch 1, 3: after epoch 2
            raise KeyboardInterrupt
        return real_eval(*a, **kw)

    train_mod.evaluate_heads = failing_eval
    try:
        with pytest.raises(KeyboardInterrupt):
            train_mod.train_heads(loaded, str(tiny_prompts_file.resolve()), root / "first", opts)
    finally:
        train_mod.evaluate_heads = real_eval
    assert (root / "first" / "checkpoint.pt").exists()
    return root, root / "first" / "checkpoint.pt", opts


def _out_with(checkpoint, tmp_path, state: dict | None = None):
    """A fresh OUT holding the interrupted run's checkpoint (or ``state`` saved in its place)."""
    out = tmp_path / "out"
    out.mkdir()
    if state is None:
        shutil.copy(checkpoint, out / "checkpoint.pt")
    else:
        torch.save(state, out / "checkpoint.pt")
    return out


# ------------------------------------------------------------------------------------------------ 1: other model


def test_a_checkpoint_of_another_model_is_not_continued(interrupted, make_tokenizer, tiny_prompts_file, tmp_path):
    _, checkpoint, opts = interrupted
    """Refused in one line naming what changed (it was replaced by a fresh run, silently but for a log line); with
    --no-resume the run starts afresh."""
    other = LoadedTiny(make_tiny_model(4), make_tokenizer(eos_ids=(EOS,)), {"name": "tiny-llama", "sha256_16": "u"})
    out = _out_with(checkpoint, tmp_path)
    with pytest.raises(CheckpointError, match=r"is of a run with other settings \(.*the base model \"t\" \(now \"u\"\)"):
        train_mod.train_heads(other, tiny_prompts_file, out, opts)
    report = train_mod.train_heads(other, tiny_prompts_file, out, replace(opts, resume=False))
    assert report["resumed_from_epoch"] is None and len(report["history"]) == opts.epochs


# ------------------------------------------------------------------------------------------------ 4: path spelling


def test_the_data_path_typed_another_way_still_resumes(interrupted, loaded, tiny_prompts_file, tmp_path, monkeypatch):
    _, checkpoint, opts = interrupted
    out = _out_with(checkpoint, tmp_path)
    monkeypatch.chdir(tiny_prompts_file.parent)
    report = train_mod.train_heads(loaded, f"./{tiny_prompts_file.name}", out, opts)  # the first run: absolute
    assert report["resumed_from_epoch"] == 1


# ------------------------------------------------------------------------------------------------ 3: damaged contents


def _damage(state: dict, what: str) -> dict:
    state = {**state, "heads": dict(state["heads"]), "scheduler": dict(state["scheduler"])}
    heads, first = state["heads"], next(iter(state["heads"]))
    if what == "epoch_str":
        state["epoch"] = "1"
    elif what == "epoch_negative":
        state["epoch"] = -1
    elif what == "epoch_past":
        state["epoch"] = 99
    elif what == "step_past":
        state["step_in_epoch"] = 10 ** 6
    elif what == "history_text":
        state["history"] = "not json"
    elif what == "history_list":
        state["history"] = json.dumps({"history": 5, "initial": None})
    elif what == "heads_missing":
        del heads[first]
    elif what == "heads_shape":
        heads[first] = torch.zeros(3)
    elif what == "heads_nan":
        heads[first] = torch.full_like(heads[first], float("nan"))
    elif what == "optimizer_shape":
        opt = {"state": {k: dict(v) for k, v in state["optimizer"]["state"].items()},
               "param_groups": state["optimizer"]["param_groups"]}
        opt["state"][0]["exp_avg"] = torch.zeros(2, 2, 2)
        state["optimizer"] = opt
    elif what == "optimizer_groups":
        state["optimizer"] = {"state": {}, "param_groups": []}
    elif what == "scheduler":
        state["scheduler"]["base_lrs"] = [1e-2, 1e-2, 1e-2]
    return state


@pytest.mark.parametrize("what", ["epoch_str", "epoch_negative", "epoch_past", "step_past", "history_text",
                                  "history_list", "heads_missing", "heads_shape", "heads_nan", "optimizer_shape",
                                  "optimizer_groups", "scheduler"])
def test_a_damaged_checkpoint_of_this_run_is_one_line(interrupted, loaded, tiny_prompts_file, tmp_path, what):
    _, checkpoint, opts = interrupted
    state = torch.load(checkpoint, weights_only=True)
    out = _out_with(checkpoint, tmp_path, _damage(state, what))
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint\.pt is damaged \(.*\): delete it") as e:
        train_mod.train_heads(loaded, str(tiny_prompts_file.resolve()), out, opts)
    assert "\n" not in str(e.value) and not (out / "config.json").exists()


# ------------------------------------------------------------------------------------------------ 2: draft vocab


def test_a_rerun_without_draft_vocab_removes_the_old_one(interrupted, loaded, tiny_prompts_file, tmp_path):
    root, _, opts = interrupted
    out = tmp_path / "h"
    train_mod.train_heads(loaded, tiny_prompts_file, out, replace(opts, epochs=1, draft_vocab=64))
    assert (out / "draft_vocab.json").exists()
    train_mod.train_heads(loaded, tiny_prompts_file, out, replace(opts, epochs=1))
    assert not (out / "draft_vocab.json").exists()


# ------------------------------------------------------------------------------------------------ 3: values


def test_a_temperature_below_the_minimum_distils_greedily(loaded, tiny_prompts_file, tmp_path):
    opts = replace(OPTS, epochs=1, temperature=1e-300, cache_dir=tmp_path / "c")
    report = train_mod.train_heads(loaded, tiny_prompts_file, tmp_path / "h", opts)
    assert report["distillation"][0]["config"]["temperature"] == 0
    assert (tmp_path / "h" / "answers.npz").exists()  # greedy answers: kept for the corpus table


def test_a_huge_learning_rate_is_refused_naming_the_flag():
    with pytest.raises(InputError, match=r"^--lr 1e\+38 must be <= 10$"):
        Medusa1Options(lr=1e38)
    with pytest.raises(InputError, match=r"^--backbone-lr"):
        Medusa2Options(backbone_lr=1e38)


# ------------------------------------------------------------------------------------------------ 5: option types


@pytest.mark.parametrize("cls, field, value", [
    (Medusa1Options, "num_heads", "4"), (Medusa1Options, "lr", "0.1"), (Medusa1Options, "epochs", 1.5),
    (Medusa1Options, "num_heads", True), (Medusa1Options, "resume", "no"), (Medusa1Options, "amp", 3),
    (Medusa1Options, "draft_vocab", 8.0), (Medusa2Options, "lora_targets", 5), (Medusa2Options, "joint_epochs", 1.0),
    (Medusa2Options, "backbone_lr", "2e-4"), (Medusa2Options, "head_lrs", 0.1)])
def test_options_of_the_wrong_type_are_an_input_error_naming_the_flag(cls, field, value):
    with pytest.raises(InputError) as e:
        cls(**{field: value})
    assert str(e.value).startswith("--" + field.replace("_", "-")) and "\n" not in str(e.value)


def test_options_of_the_right_types_pass():
    import numpy as np

    Medusa1Options(lr=1, seed=np.int64(3), cache_dir="c", temperature=0)
    Medusa2Options(lora_alpha=16, lm_weight=2, head_lrs="1e-3,2e-3")


# ------------------------------------------------------------------------------------------------ 6: whole outputs


def test_a_rerun_failing_while_writing_leaves_the_old_set(interrupted, loaded, tiny_prompts_file, tmp_path,
                                                          monkeypatch):
    _, _, opts = interrupted
    out = tmp_path / "h"
    train_mod.train_heads(loaded, tiny_prompts_file, out, replace(opts, epochs=1, draft_vocab=64))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*_a, **_kw):
        raise OSError(28, "No space left on device")

    from medusa_export.exporter.training import heads_outputs

    monkeypatch.setattr(heads_outputs, "save_answers", disk_full)  # after the heads, eval.json, ... are written
    with pytest.raises(OSError):
        train_mod.train_heads(loaded, tiny_prompts_file, out, replace(opts, epochs=1, seed=1))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "checkpoint.pt"} == before
    monkeypatch.undo()
    report = train_mod.train_heads(loaded, tiny_prompts_file, out, replace(opts, epochs=1, seed=1))
    assert report["seed"] == 1 and json.loads((out / "training.json").read_text())["seed"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(set(before) - {"draft_vocab.json"})


def test_a_rerun_killed_while_moving_its_files_in_ends_all_new(interrupted, loaded, tiny_prompts_file, tmp_path,
                                                               monkeypatch):
    """The new files were renamed over the old ones one by one: Ctrl-C between two renames left new heads beside
    the old config.json, eval.json or draft vocabulary, which loaded as one (mismatched) set."""
    from pathlib import Path

    from medusa_export.exporter.train_out_dir import TRAIN_STAGE, train_out_lock

    _, _, opts = interrupted
    out = tmp_path / "h"
    train_mod.train_heads(loaded, tiny_prompts_file, out, replace(opts, epochs=1, draft_vocab=64))
    real_replace, moved = Path.replace, []

    def killed_midway(self, target):
        if self.parent.name == TRAIN_STAGE and Path(target).parent == out:
            if len(moved) == 2:
                raise KeyboardInterrupt
            moved.append(self.name)
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train_heads(loaded, tiny_prompts_file, out, replace(opts, epochs=1, seed=1))
    monkeypatch.undo()
    assert not (out / "config.json").exists()  # never the old config.json over new heads
    with train_out_lock(out):  # what the next train-heads on this --out does first
        pass
    assert json.loads((out / "training.json").read_text())["seed"] == 1
    assert not (out / "draft_vocab.json").exists() and not (out / TRAIN_STAGE).exists()
    assert json.loads((out / "config.json").read_text())["format"] == "medusa-export-heads"
    from medusa_export.exporter.heads import load_heads

    load_heads(out, loaded.model.config)
