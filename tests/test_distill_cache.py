"""The distillation cache: a rerun resumes without repeating finished shards; a torn, foreign or misplaced
shard is a one-line CheckpointError naming it, and ``resume=False`` (`train-heads --no-resume`) makes this run's
cache again, leaving other runs' caches alone."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_training import OPTS, loaded, prompts_file  # noqa: E402,F401 - the fixtures, one instance per module

from medusa_export.exporter.training import data as data_mod  # noqa: E402
from medusa_export.exporter.training import train as train_mod  # noqa: E402
from medusa_export.exporter.training.data import DistillConfig, distill  # noqa: E402


def test_distillation_resumes_without_repeating_finished_shards(loaded, tmp_path, monkeypatch):
    """Interrupt after the first shards are on disk; the rerun generates only the prompts of the others and
    ends with the same data as an uninterrupted run."""
    prompts = [" ".join(f"t{(7 * i + j) % 500 + 1}" for j in range(2 + i % 5)) for i in range(10)]
    cfg = DistillConfig(max_new_tokens=6, batch_size=3, shard_size=3)
    full = distill(loaded.model, loaded.tokenizer, prompts, tmp_path / "full", cfg, "sha", "m")
    real_answers = data_mod._answers
    seen: list[int] = []

    def interrupted(model, encoded, order, eos, cfg):
        for n, item in enumerate(real_answers(model, encoded, order, eos, cfg)):
            if n == 7:
                raise KeyboardInterrupt
            seen.append(item[0])
            yield item

    monkeypatch.setattr(data_mod, "_answers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(loaded.model, loaded.tokenizer, prompts, tmp_path / "run", cfg, "sha", "m")
    root = next((tmp_path / "run").iterdir())
    written = sorted(p.name for p in root.glob("shard_*.npz"))
    assert 0 < len(written) < 4 and not list(root.glob("*.tmp.npz"))
    stamps = {name: (root / name).stat().st_mtime_ns for name in written}
    index = json.loads((root / "index.json").read_text())
    assert index["shards"] == 4

    def spying(model, encoded, order, eos, cfg):
        seen.clear()
        seen.extend(order)
        yield from real_answers(model, encoded, order, eos, cfg)

    monkeypatch.setattr(data_mod, "_answers", spying)
    again = distill(loaded.model, loaded.tokenizer, prompts, tmp_path / "run", cfg, "sha", "m")
    done_before = {int(i) for name in written for i in np.load(root / name)["prompt_index"]}
    assert seen and done_before.isdisjoint(seen) and len(done_before) + len(seen) == 10
    assert {name: (root / name).stat().st_mtime_ns for name in written} == stamps  # not rewritten
    assert again.stats["generated_now_shards"] == 4 - len(written)
    assert again.stats["all_shards_tokens_per_s"] > 0  # each shard kept its generation time
    for field in ("tokens", "seq_lens", "prompt_index"):
        np.testing.assert_array_equal(getattr(again, field), getattr(full, field))


def _damage_truncated(p):
    p.write_bytes(p.read_bytes()[:100])


def _damage_keys(p):
    np.savez(p.with_name("x.npz"), x=np.zeros(2))
    p.with_name("x.npz").replace(p)


def _damage_object_array(p):
    np.savez(p.with_name("x.npz"), **{**dict(np.load(p)), "tokens": np.array([[1], "a"], dtype=object)})
    p.with_name("x.npz").replace(p)


def _damage_directory(p):
    p.unlink()
    p.mkdir()


@pytest.mark.parametrize("damage, why", [
    (_damage_truncated, "File is not a zip file"),
    (lambda p: p.write_text("not numpy at all\n"), "pickled"),
    (lambda p: p.write_bytes(b""), "No data left in file"),
    (_damage_object_array, "Object arrays cannot be loaded"),
    (_damage_keys, "no hidden, tokens, seq_lens, prompt_index array"),
    (_damage_directory, "Is a directory"),
    (lambda p: p.write_bytes(p.with_name("shard_00001.npz").read_bytes()), "other prompts"),  # another shard's
])
def test_a_damaged_shard_is_a_checkpoint_error_and_no_resume_regenerates_it(loaded, tmp_path, damage, why):
    """np.load of a torn or foreign shard raised BadZipFile, EOFError, KeyError... and --no-resume never reached
    the cache. Now: one line naming the shard and the way out, and resume=False makes the cache again."""
    from medusa_export.runtime.errors import CheckpointError

    prompts = ["t1 t2 t3", "t4 t5", "t6 t7 t8 t9"]
    cfg = DistillConfig(max_new_tokens=3, shard_size=2)
    run = dict(tokenizer=loaded.tokenizer, prompts=prompts, cache_dir=tmp_path, cfg=cfg, data_sha256="s", model_id="m")
    good = train_mod.distill_on_ranks(loaded.model, 0, 1, **run)
    shard = next(tmp_path.iterdir()) / "shard_00000.npz"
    damage(shard)
    with pytest.raises(CheckpointError) as e:
        train_mod.distill_on_ranks(loaded.model, 0, 1, **run)
    message = str(e.value)
    assert message.startswith(f"distillation shard {shard} cannot be read (") and why in message
    assert "--no-resume" in message and "\n" not in message
    again = train_mod.distill_on_ranks(loaded.model, 0, 1, resume=False, **run)
    assert again.stats["generated_now_shards"] == 2
    for field in ("tokens", "seq_lens", "prompt_index"):
        np.testing.assert_array_equal(getattr(again, field), getattr(good, field))


def test_a_file_where_the_cache_directory_should_be_is_a_checkpoint_error(loaded, tmp_path):
    from medusa_export.runtime.errors import CheckpointError

    cfg = DistillConfig(max_new_tokens=2)
    run = dict(tokenizer=loaded.tokenizer, prompts=["t1 t2"], cache_dir=tmp_path, cfg=cfg, data_sha256="s", model_id="m")
    key = tmp_path / data_mod.cache_key("s", "m", cfg)
    key.write_text("x")
    (tmp_path / "other-run").mkdir()  # --no-resume removes this run's shards only
    with pytest.raises(CheckpointError, match=f"distillation cache {key} is a file, not a directory: .*--no-resume"):
        train_mod.distill_on_ranks(loaded.model, 0, 1, **run)
    assert train_mod.distill_on_ranks(loaded.model, 0, 1, resume=False, **run).stats["answers"] == 1
    assert key.is_dir() and (tmp_path / "other-run").is_dir()


def test_no_resume_regenerates_the_distillation_cache_of_a_training_run(loaded, prompts_file, tmp_path):
    opts = replace(OPTS, epochs=1, cache_dir=tmp_path / "c")
    first = train_mod.train_heads(loaded, prompts_file, tmp_path / "h", opts)
    assert first["distillation"][0]["generated_now_tokens"] > 0
    for shard in (tmp_path / "c").glob("*/shard_*.npz"):
        shard.write_bytes(b"")
    again = train_mod.train_heads(loaded, prompts_file, tmp_path / "h", replace(opts, resume=False))
    assert again["distillation"][0]["generated_now_tokens"] == first["distillation"][0]["generated_now_tokens"]
