"""Head-training options and the `train-heads` command: bad values refused on construction (one line, the flag
named), every dataclass field a flag whose default is the field's, flags reaching the trainers, and the library
refusing to write over another directory."""

from __future__ import annotations

from dataclasses import fields

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from medusa_export.exporter.training import train as train_mod  # noqa: E402
from medusa_export.runtime.errors import InputError  # noqa: E402
from medusa_export.runtime.training_options import Medusa1Options, Medusa2Options  # noqa: E402


@pytest.mark.parametrize("field, value, message", [
    ("heldout_fraction", 1.5, "--heldout-fraction 1.5 must be in [0, 1)"),
    ("distill_engine", "vllm", "--distill-engine 'vllm' must be one of auto, static, hf"),
    ("amp", "fp8", "--amp 'fp8' must be one of auto, bf16, none"),
    ("device", "tpu", "--device 'tpu' must be one of auto, cpu, cuda"),
    ("draft_vocab", 1, "--draft-vocab 1 must be >= 2"),
    ("epochs", 0, "--epochs 0 must be >= 1"),
    ("lr", 0.0, "--lr 0.0 must be > 0"),
    ("extra_sampled_passes", -1, "--extra-sampled-passes -1 must be >= 0"),
    # checked up front: each failed after the model loaded (numpy's or torch's seed), inside torch (terabytes of
    # cache), or after the self-distillation (heads' config)
    ("seed", -1, "--seed -1 must be >= 0"),
    ("seed", 10 ** 20, "--seed 100000000000000000000 must be <= 9223372036854775807"),
    ("max_new_tokens", 10 ** 9, "--max-new-tokens 1000000000 must be <= 32768"),
    ("threads", 100_000, "--threads 100000 must be <= 4096"),
    ("num_heads", 1000, "--num-heads 1000 must be <= 64"),
    ("num_layers", 1000, "--num-layers 1000 must be <= 16"),
    ("gen_batch_size", 10 ** 9, "--gen-batch-size 1000000000 must be <= 4096"),
])
def test_bad_options_are_refused_on_construction(field, value, message):
    with pytest.raises(InputError) as e:
        Medusa1Options(**{field: value})
    assert str(e.value) == message


@pytest.mark.parametrize("field, value", [("lr", float("inf")), ("lr", float("nan")), ("weight_decay", float("nan")),
                                          ("weight_decay", float("inf")), ("temperature", float("nan")),
                                          ("sample_temperature", float("inf")), ("checkpoint_every_s", float("nan"))])
def test_non_finite_medusa1_options_are_refused(field, value):
    """inf and nan slip past >= / > checks: --lr inf wrote NaN heads, --temperature nan failed after the model load."""
    with pytest.raises(InputError) as e:
        Medusa1Options(**{field: value})
    flag = "--" + field.replace("_", "-")
    assert str(e.value).startswith(f"{flag} {value} is not a finite number: give a number ")


@pytest.mark.parametrize("field, value", [("lm_weight", float("nan")), ("lm_weight", float("inf")),
                                          ("backbone_lr", float("inf")), ("heads_weight", float("inf")),
                                          ("head_lrs", "inf,inf"), ("head_lrs", "1e-3,nan")])
def test_non_finite_medusa2_options_are_refused(field, value):
    with pytest.raises(InputError, match="finite") as e:
        Medusa2Options(**{field: value})
    assert "\n" not in str(e.value) and ("--" + field.replace("_", "-")) in str(e.value)


# ------------------------------------------------------------------------------------------------ CLI


def _invoke(monkeypatch, *args: str) -> tuple[object, dict]:
    """Run `train-heads` in-process with the trainers replaced by spies; returns the result and what they got."""
    from typer.testing import CliRunner

    from medusa_export.exporter.training import medusa2 as m2
    from medusa_export.runtime.cli.app import _register, app

    seen: dict = {}
    monkeypatch.setattr(train_mod, "train_heads", lambda m, d, o, opts: seen.update(medusa1=opts) or {})
    monkeypatch.setattr(m2, "train_medusa2", lambda m, d, o, m1, opts: seen.update(medusa1=m1, medusa2=opts) or {})
    _register()
    return CliRunner().invoke(app, ["train-heads", "--data", "p.jsonl", "--out", "o", *args]), seen


def test_train_heads_flags_left_out_are_the_dataclass_values(monkeypatch):
    """Every option of the dataclasses is a flag, and a flag not given is the dataclass field's value: changing a
    default in one place and not the other fails here."""
    import typer.main

    from medusa_export.runtime.cli.app import _register, app

    _register()
    command = typer.main.get_command(app).commands["train-heads"]
    flags = {p.name for p in command.params}
    assert {f.name for f in fields(Medusa1Options)} | {f.name for f in fields(Medusa2Options)} <= flags
    result, seen = _invoke(monkeypatch)
    assert result.exit_code == 0, result.output
    assert seen == {"medusa1": Medusa1Options()}
    result, seen = _invoke(monkeypatch, "--mode", "medusa2")
    assert result.exit_code == 0, result.output
    assert seen == {"medusa1": Medusa1Options(), "medusa2": Medusa2Options()}


def test_train_heads_flags_reach_the_options(monkeypatch, tmp_path):
    result, seen = _invoke(monkeypatch, "--num-heads", "3", "--epochs", "2", "--lr", "3e-3", "--draft-vocab", "64",
                           "--amp", "bf16", "--no-progress", "--no-resume", "--later-turns", "--cache-dir",
                           str(tmp_path), "--warmup-fraction", "0.1", "--checkpoint-every-s", "5", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert seen["medusa1"] == Medusa1Options(num_heads=3, epochs=2, lr=3e-3, draft_vocab=64, amp="bf16",
                                             progress=False, resume=False, later_turns=True, cache_dir=tmp_path,
                                             warmup_fraction=0.1, checkpoint_every_s=5.0, device="cpu")


def test_train_heads_bad_value_is_one_line_exit_2(monkeypatch):
    for args, words in ((["--heldout-fraction", "1.5"], "--heldout-fraction 1.5 must be in [0, 1)"),
                        (["--mode", "medusa3"], "--mode 'medusa3' must be one of medusa1, medusa2")):
        result, seen = _invoke(monkeypatch, *args)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.exit_code == 2 and lines == [f"error: {words}"] and seen == {}


@pytest.mark.parametrize("mode", ["medusa1", "medusa2"])
def test_library_training_refuses_to_write_over_another_directory(tmp_path, mode):
    """As `train-heads --out` does: before any model loads or distillation runs (the library used to replace a
    model directory's config.json with the heads')."""
    from medusa_export.exporter.training.medusa2 import train_medusa2
    from medusa_export.exporter.training.train import train_heads
    from medusa_export.runtime.errors import InputError

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    train = train_heads if mode == "medusa1" else train_medusa2
    with pytest.raises(InputError, match="not empty"):
        train("never-loaded", "never-read.jsonl", model_dir)
    assert (model_dir / "config.json").read_text() == '{"model_type": "llama"}'


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "2", "RANK": "2"}, r"^RANK=2: it must be 0 or more and below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "7"}, r"^RANK=7: it must be 0 or more and below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, r"^LOCAL_RANK=-1: it must be 0 or more"),
])
def test_a_rank_outside_the_world_is_refused_not_waited_on(monkeypatch, env, needle):
    """`WORLD_SIZE=2 RANK=2 medusa-export train-heads ...` (a rank typed by hand) waited in torch's rendezvous for
    the group's timeout, 2 hours by default, before failing."""
    pytest.importorskip("torch")
    from medusa_export.exporter.training.distributed import setup_distributed

    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT", "MEDUSA_DIST_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29531")
    monkeypatch.setenv("MEDUSA_DIST_TIMEOUT_S", "5")  # were the check missing: a 5 s wait, not 2 h
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match=needle):
        setup_distributed("cpu")


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_init_heads_is_refused_not_read_as_unset(value):
    """`train-heads --mode medusa2 --init-heads ""` ran the Medusa-1 warm-up instead, without a word."""
    with pytest.raises(InputError, match=r"^--init-heads is empty: give a heads directory"):
        Medusa2Options(init_heads=value)


def test_numbers_are_one_spelling_in_the_resume_key():
    """A library run given 0 (or numpy numbers) resumed by the CLI's 0.0: the same checkpoint key (json wrote "0"
    and "0.0", so the checkpoint was refused as one of other settings)."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("torch")
    from medusa_export.exporter.training import checkpoint as ckpt
    from medusa_export.exporter.training.train import run_arguments

    a = Medusa1Options(temperature=0, warmup_fraction=0, weight_decay=0, lr=np.float32(0.5), epochs=np.int64(2))
    b = Medusa1Options(temperature=0.0, warmup_fraction=0.0, weight_decay=0.0, lr=0.5, epochs=2)
    assert ckpt.fingerprint(run_arguments("p.jsonl", "o", a)) == ckpt.fingerprint(run_arguments("p.jsonl", "o", b))
    assert type(a.temperature) is float and type(a.epochs) is int


def test_the_library_trainers_name_an_argument_of_the_wrong_type(tmp_path):
    """train_heads / train_medusa2 with a dict for the options, None for a path or a number for the model failed
    inside, as an AttributeError or a TypeError; nothing is written."""
    from medusa_export.exporter.training.medusa2 import train_medusa2

    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    out = tmp_path / "out"
    for call, words in [
        (lambda: train_mod.train_heads(None, data, out, {"epochs": 1}), "options must be a Medusa1Options, got dict"),
        (lambda: train_mod.train_heads(None, data, None), "out_dir must be a non-empty path, got None"),
        (lambda: train_mod.train_heads(None, "", out), "data_file must be a non-empty path"),
        (lambda: train_mod.train_heads(5, data, out), "model_source must be a model directory .*got int"),
        (lambda: train_medusa2(None, data, out, Medusa1Options(), None), "opts must be a Medusa2Options, got NoneType"),
        (lambda: train_medusa2(None, data, out, {}, Medusa2Options()), "medusa1 must be a Medusa1Options, got dict"),
    ]:
        with pytest.raises(InputError, match=words):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]
