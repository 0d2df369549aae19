"""Medusa-2's joint phase stopped and resumed: the model written equals an uninterrupted run's, and a checkpoint
whose contents do not fit the run is a one-line CheckpointError."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from medusa_export.exporter.training import medusa2 as m2  # noqa: E402
from medusa_export.exporter.training.medusa2 import train_medusa2  # noqa: E402
from test_medusa2 import COMMON, OPTS, _loaded, prompts_file, run  # noqa: E402,F401 - fixtures, used by name


def _stop_joint_phase_at(step: int, monkeypatch, make_tokenizer, prompts_file, out, common, opts) -> None:
    """Run train_medusa2 into ``out`` with a checkpoint after every step, and stop it as its joint phase's
    ``step``-th step starts (as a kill would; the checkpoint stays in OUT.partial)."""
    class Killed(Exception):
        pass

    real, calls = m2.joint_loss, []

    def dies(*a, **kw):
        calls.append(1)
        if len(calls) == step:
            raise Killed
        return real(*a, **kw)

    monkeypatch.setattr(m2, "joint_loss", dies)
    with pytest.raises(Killed):
        train_medusa2(_loaded(make_tokenizer), prompts_file, out, replace(common, checkpoint_every_s=0), opts)
    monkeypatch.setattr(m2, "joint_loss", real)


def test_interrupted_joint_phase_resumes_to_the_same_model(make_tokenizer, prompts_file, tmp_path, monkeypatch, run):
    """Stop the joint phase mid-epoch (checkpoint on disk), rerun the same command: the warm-up is not repeated
    and the model written equals an uninterrupted run's. Also: the heads' draft vocabulary goes with the model
    directory (decoding scores what they trained on), and the sequence caps draw seeded subsets."""
    from safetensors.torch import load_file

    from medusa_export.exporter.heads_source import resolve_heads
    from medusa_export.exporter.model_loading import load_base_model

    opts = replace(OPTS, joint_epochs=2, max_train_sequences=6, max_heldout_sequences=2)
    common = replace(COMMON, draft_vocab=64, cache_dir=run[0] / "cache")
    whole = train_medusa2(_loaded(make_tokenizer), prompts_file, tmp_path / "whole", common, opts)
    assert whole["train_sequences"] == 6 and whole["eval"]["heldout_sequences"] == 2

    _stop_joint_phase_at(3, monkeypatch, make_tokenizer, prompts_file, tmp_path / "cut", common, opts)
    assert (tmp_path / "cut.partial" / "checkpoint.pt").exists() and not (tmp_path / "cut").exists()
    warmups = []
    monkeypatch.setattr(m2, "train_heads", lambda *a, **kw: warmups.append(1))
    again = train_medusa2(_loaded(make_tokenizer), prompts_file, tmp_path / "cut", common, opts)
    assert warmups == [] and again["resumed_at"] == [1, 0]  # 6 sequences / 4 per step: 2 steps an epoch
    assert again["loss_last_steps"] == whole["loss_last_steps"]
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / "checkpoint.pt").exists() and not (tmp_path / "cut.partial").exists()
    vocab = json.loads((tmp_path / "cut" / "draft_vocab.json").read_text())
    assert vocab["size"] == 64 and again["draft_vocab"]["size"] == 64
    chosen = resolve_heads(None, load_base_model(tmp_path / "cut"))
    assert chosen.source_name == "model" and chosen.heads.draft_ids.tolist() == vocab["ids"]
    held = (tmp_path / "cut" / "heldout_prompts.jsonl").read_text().splitlines()
    assert len(held) == again["eval"]["heldout_prompts"] >= again["eval"]["heldout_sequences"] == 2


@pytest.mark.parametrize("damage, words", [
    (lambda s: s["backbone"].popitem(), "backbone weights are not this run's trainable ones"),
    (lambda s: next(iter(s["backbone"].values())).fill_(float("nan")), "non-finite values"),
    (lambda s: s.update(epoch=99), "epoch '99' is not a whole number"),
    (lambda s: s.update(history='{"history": 5}'), "history is not the joint phase's"),
])
def test_a_damaged_joint_checkpoint_is_one_line(make_tokenizer, prompts_file, tmp_path, monkeypatch, run, damage,
                                                words):
    """A joint-phase checkpoint of this run whose contents do not fit: a CheckpointError naming it (it was a
    KeyError, a RuntimeError deep in a step, or NaN weights trained on silently)."""
    from medusa_export.runtime.errors import CheckpointError

    opts = replace(OPTS, joint_epochs=2, max_train_sequences=6, max_heldout_sequences=2)
    common = replace(COMMON, cache_dir=run[0] / "cache")

    _stop_joint_phase_at(2, monkeypatch, make_tokenizer, prompts_file, tmp_path / "cut", common, opts)
    path = tmp_path / "cut.partial" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=words):
        train_medusa2(_loaded(make_tokenizer), prompts_file, tmp_path / "cut", common, opts)


def test_init_heads_spelled_another_way_keeps_the_resume_key(make_tokenizer, prompts_file, tmp_path, monkeypatch, run):
    """--init-heads heads/start or heads/start/ (or ./...): one directory, one checkpoint key (the path as typed
    was in it, so a resume under another spelling was refused as a run of other settings)."""
    from conftest import make_heads
    from medusa_export.exporter.heads import save_heads

    class Stop(Exception):
        pass

    loaded = _loaded(make_tokenizer)
    save_heads(make_heads(loaded.model, 3, seed=5), tmp_path / "start")
    keys = []

    real = m2.ckpt.fingerprint
    monkeypatch.setattr(m2.ckpt, "fingerprint", lambda key: (keys.append(real(key)), (_ for _ in ()).throw(Stop()))[1])
    monkeypatch.chdir(tmp_path)
    common = replace(COMMON, cache_dir=run[0] / "cache")
    for spelling in ("start", "./start/", str(tmp_path / "start")):
        with pytest.raises(Stop):
            train_medusa2(_loaded(make_tokenizer), prompts_file, tmp_path / "m", common,  # LoRA: a fresh model
                          replace(OPTS, init_heads=spelling, max_train_sequences=6, max_heldout_sequences=2))
    assert len(keys) == 3 and len(set(keys)) == 1
