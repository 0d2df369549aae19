"""train-heads writes Medusa-1's files into --out as one set: staged, marked complete, then moved in (config.json
last); a run killed while moving them is finished by the next run on the same --out (`train_out_dir.commit_stage`,
`finish_stage`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medusa_export.exporter.train_out_dir import TRAIN_LOCK, check_train_out_dir, train_out_lock


def _heads_set(out: Path, tag: str, vocab: bool) -> dict[str, str]:
    """What a Medusa-1 run writes (contents tagged by run), as name -> text."""
    files = {"config.json": json.dumps({"format": "medusa-export-heads", "run": tag}),
             "heads.safetensors": f"heads {tag}", "eval.json": f"eval {tag}", "training.json": f"record {tag}",
             "heldout_prompts.jsonl": f"held {tag}"}
    if vocab:
        files["draft_vocab.json"] = f"vocab {tag}"
    return files


def _stage_new_run(out: Path) -> dict[str, str]:
    """An earlier run's set in ``out`` and a new one (without a draft vocabulary) written to its stage."""
    from medusa_export.exporter.train_out_dir import TRAIN_STAGE

    out.mkdir()
    for name, text in _heads_set(out, "old", vocab=True).items():
        (out / name).write_text(text)
    (out / TRAIN_STAGE).mkdir()
    new = _heads_set(out, "new", vocab=False)
    for name, text in new.items():
        (out / TRAIN_STAGE / name).write_text(text)
    return new


def _contents(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() if p.is_file() else "<dir>" for p in out.iterdir() if p.name != TRAIN_LOCK}


@pytest.mark.parametrize("moves_before_kill", [0, 1, 3, 4])  # 4: all but config.json
def test_a_run_killed_while_moving_its_files_in_is_finished_by_the_next(tmp_path, monkeypatch, moves_before_kill):
    from medusa_export.exporter import train_out_dir

    out = tmp_path / "heads"
    new = _stage_new_run(out)
    real_replace, moved = Path.replace, []

    def killed_after_some(self, target):
        if self.parent.name == train_out_dir.TRAIN_STAGE and Path(target).parent == out:
            if len(moved) == moves_before_kill:
                raise KeyboardInterrupt  # Ctrl-C (or a kill) between two renames
            moved.append(self.name)
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", killed_after_some)
    with pytest.raises(KeyboardInterrupt):
        train_out_dir.commit_stage(out, ["draft_vocab.json"])
    monkeypatch.undo()
    assert not (out / "config.json").exists()  # half moved: not a heads directory anyone would load
    from medusa_export.exporter.heads import load_heads
    from medusa_export.runtime.errors import HeadsError

    with pytest.raises(HeadsError, match="half moved into place .* run train-heads again with the same --out"):
        load_heads(out, None)
    check_train_out_dir(out, "medusa1")  # but train-heads' own: the next run takes it
    with train_out_lock(out):  # the next run on --out finishes the move before anything else
        assert _contents(out) == new
    assert _contents(out) == new


def test_a_run_killed_before_its_stage_is_complete_leaves_the_old_set(tmp_path):
    from medusa_export.exporter.train_out_dir import TRAIN_STAGE

    out = tmp_path / "heads"
    _stage_new_run(out)
    old = {n: t for n, t in _contents(out).items() if n != TRAIN_STAGE}
    assert old["config.json"] == json.dumps({"format": "medusa-export-heads", "run": "old"})
    check_train_out_dir(out, "medusa1")
    with train_out_lock(out):
        assert _contents(out) == old  # no done mark: the stage is dropped, the earlier files untouched


def test_a_complete_commit_leaves_only_the_new_set(tmp_path):
    from medusa_export.exporter.train_out_dir import commit_stage

    out = tmp_path / "heads"
    new = _stage_new_run(out)
    commit_stage(out, ["draft_vocab.json"])
    assert _contents(out) == new


def test_a_commit_that_fails_before_its_mark_leaves_the_old_set_and_no_stage(tmp_path, monkeypatch):
    from medusa_export.exporter import train_out_dir

    out = tmp_path / "heads"
    _stage_new_run(out)
    old = {n: t for n, t in _contents(out).items() if n != train_out_dir.TRAIN_STAGE}

    def disk_full(*_a, **_kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)  # the done mark cannot be written
    with pytest.raises(OSError):
        train_out_dir.commit_stage(out, [])
    monkeypatch.undo()
    assert _contents(out) == old


def test_a_stage_that_is_a_symbolic_link_is_replaced_not_written_through(tiny_model, tmp_path):
    """OUT/.train-heads.staging as a link: rmtree refused it silently, the new files went where it pointed, and
    nothing was moved in."""
    from conftest import make_heads

    from medusa_export.exporter.train_out_dir import TRAIN_STAGE
    from medusa_export.exporter.training.heads_outputs import write_outputs

    out, elsewhere = tmp_path / "heads", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / TRAIN_STAGE).symlink_to(elsewhere)
    write_outputs(out, make_heads(tiny_model, 2), {}, {"training.json": "{}"}, None, None)
    assert list(elsewhere.iterdir()) == [] and (out / "config.json").is_file() and (out / "training.json").is_file()
    assert not (out / TRAIN_STAGE).exists()
