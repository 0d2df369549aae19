"""Medusa-2 on a tiny random Llama: joint training (the Medusa loss goes down, the backbone stays within a stated
KL of the original, the heads read the tuned backbone better), the model directory it writes (builds, decodes
losslessly on every backend), the warm-up leaving the backbone alone, and bad input in one line."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import TINY_PROMPTS, TINY_VOCAB, loaded_tiny, make_tiny_model  # noqa: E402

from medusa_export.exporter.training import medusa2 as m2  # noqa: E402
from medusa_export.exporter.training.medusa2 import train_medusa2  # noqa: E402
from medusa_export.exporter.training.medusa2_batches import Sequence, epoch_batches  # noqa: E402
from medusa_export.runtime.training_options import Medusa1Options, Medusa2Options  # noqa: E402
from medusa_export.runtime.errors import HeadsError, InputError  # noqa: E402
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402

EOS = TINY_VOCAB - 1
KL_BOUND = 0.05  # nats: the default lm_weight keeps the tuned model this close to the original on held-out answers
# The heads warm up for 3 Medusa-1 epochs at 1e-2 (also the heads' rate in the joint phase).
COMMON = Medusa1Options(num_heads=3, max_new_tokens=24, gen_batch_size=8, heldout_fraction=0.25, progress=False, seed=0,
                        epochs=3, lr=1e-2)
OPTS = Medusa2Options(joint_epochs=6, backbone_lr=2e-3, seq_batch_size=4)


@pytest.fixture(scope="module")
def prompts_file(tiny_prompts_file):
    return tiny_prompts_file


def _loaded(make_tokenizer):
    return loaded_tiny(make_tokenizer, EOS)


@pytest.fixture(scope="module")
def run(make_tokenizer, prompts_file, tmp_path_factory, torch_single_thread):
    root = tmp_path_factory.mktemp("m2run")
    original = {k: v.clone() for k, v in make_tiny_model(3).state_dict().items()}
    record = train_medusa2(_loaded(make_tokenizer), prompts_file, root / "model",
                           replace(COMMON, cache_dir=root / "cache"), OPTS)
    return root, record, original


def test_joint_training_lowers_the_medusa_loss_and_stays_close_to_the_original(run):
    _, record, _ = run
    first = np.mean([s["medusa"] for s in record["loss_first_steps"]])
    last = np.mean([s["medusa"] for s in record["loss_last_steps"]])
    assert last < 0.8 * first
    assert 0 < record["eval"]["backbone_vs_original"]["mean_kl"] < KL_BOUND


def test_the_kl_term_is_what_keeps_the_backbone_close(make_tokenizer, prompts_file, tmp_path, run):
    """Without it (lm_weight 0) the same run drifts much further from the original. (A random tiny model's
    next-token margins are too flat for top-1 agreement to mean much; the real model's is in docs/results.md.)"""
    free = train_medusa2(_loaded(make_tokenizer), prompts_file, tmp_path / "free",
                         replace(COMMON, cache_dir=run[0] / "cache"), replace(OPTS, lm_weight=0.0))
    tied, loose = run[1]["eval"]["backbone_vs_original"], free["eval"]["backbone_vs_original"]
    assert loose["mean_kl"] > 1.2 * tied["mean_kl"]


def test_model_directory_builds_and_decodes_losslessly(run, tmp_path):
    from safetensors.torch import load_file

    from medusa_export.exporter.build import build_artifact
    from medusa_export.runtime.api import MedusaRuntime

    root, record, original = run
    model_dir = root / "model"
    assert not (root / "model.partial").exists()
    assert {"model.safetensors", "config.json", "tokenizer.json", "eval.json", "training.json"} <= \
        {p.name for p in model_dir.iterdir()}
    weights = load_file(str(model_dir / "model.safetensors"))
    assert any(k.startswith("medusa_head.") for k in weights)
    changed = [k for k, v in original.items() if k in weights and not torch.equal(v, weights[k])]
    assert any("layers" in k for k in changed)  # the LoRA update was merged into the backbone
    m = build_artifact(str(model_dir), tmp_path / "art", BuildOptions(tree="chain-3", max_seq=96), log=lambda _m: None)
    assert m.heads.source == "model" and m.dims.num_heads == 3
    for backend in ("ort", "torch"):
        with MedusaRuntime.load(tmp_path / "art", backend=backend, threads=1) as rt:
            for prompt in TINY_PROMPTS:
                vanilla = rt.generate(list(prompt), max_new_tokens=20, medusa=False).token_ids
                assert rt.generate(list(prompt), max_new_tokens=20, medusa=True).token_ids == vanilla
    # The artifact's vanilla baseline is the fine-tuned backbone: greedy transformers decoding of the directory.
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with MedusaRuntime.load(tmp_path / "art", backend="ort", threads=1) as rt:
        got = rt.generate(list(TINY_PROMPTS[0]), max_new_tokens=12, medusa=False).token_ids
    ids = torch.tensor([TINY_PROMPTS[0]])
    ref = tuned.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(TINY_PROMPTS[0]):].tolist()
    expected = ref[:ref.index(EOS)] if EOS in ref else ref  # the runtime stops at EOS (not returned)
    assert len(expected) >= 4 and got == expected


def test_weights_restore_from_the_delta_alone(run, make_tokenizer, tmp_path):
    """A GPU run brings back the directory without model.safetensors: the LoRA adapters and heads in
    medusa2_delta.safetensors rebuild it, tensor for tensor, from the base model; another base model is refused."""
    import shutil

    from safetensors.torch import load_file

    from medusa_export.exporter.training.medusa2_delta import DELTA_FILE, restore_weights
    from medusa_export.runtime.errors import ModelError

    model_dir = run[0] / "model"
    back = tmp_path / "back"
    shutil.copytree(model_dir, back, ignore=shutil.ignore_patterns("model.safetensors"))
    assert (back / DELTA_FILE).stat().st_size < 0.5 * (model_dir / "model.safetensors").stat().st_size
    restore_weights(back, _loaded(make_tokenizer))
    a, b = load_file(str(model_dir / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = _loaded(make_tokenizer)
    other.identity["sha256_16"] = "another"
    with pytest.raises(ModelError, match="pass that model with --model"):
        restore_weights(back, other)
    (back / DELTA_FILE).unlink()
    with pytest.raises(InputError, match=f"no {DELTA_FILE}"):
        restore_weights(back, _loaded(make_tokenizer))


def test_head_lrs_give_each_head_its_own_rate(make_tokenizer, prompts_file, tmp_path, run, monkeypatch):
    """--head-lrs: head 0 at a negligible rate barely moves while heads 1 and 2 train (one shared rate would move
    all three alike); a list that does not fit the heads is refused before any training."""
    from safetensors.torch import load_file

    from conftest import make_heads
    from medusa_export.exporter.heads import save_heads

    loaded = _loaded(make_tokenizer)
    start = make_heads(loaded.model, 3, seed=5)
    save_heads(start, tmp_path / "start")
    opts = replace(OPTS, init_heads=str(tmp_path / "start"), joint_epochs=2, head_lrs="1e-9,1e-2,1e-2",
                   max_train_sequences=6, max_heldout_sequences=2)
    common = replace(COMMON, cache_dir=run[0] / "cache")
    train_medusa2(loaded, prompts_file, tmp_path / "m", common, opts)
    after = load_file(str(tmp_path / "m" / "model.safetensors"))
    moved = [max(float((after["medusa_head." + k.removeprefix("blocks.")] - v).abs().max())
                 for k, v in start.state_dict().items() if k.startswith(f"blocks.{h}.")) for h in range(3)]
    assert moved[0] < 1e-6 < 1e-3 < min(moved[1:])
    with pytest.raises(InputError, match="--head-lrs '1e-3,1e-3': give 3 positive rates"):  # init_heads has 3
        train_medusa2(_loaded(make_tokenizer), prompts_file, tmp_path / "bad", common,
                      replace(opts, head_lrs="1e-3,1e-3"))
    for bad in ("1e-3,0,1e-3", "fast,1e-3,1e-3", ""):  # refused as they are given, before any model
        with pytest.raises(InputError, match=f"--head-lrs '{bad}': give positive rates"):
            replace(opts, head_lrs=bad)
    monkeypatch.setattr(m2, "train_heads", lambda *a, **kw: pytest.fail("warm-up started before --head-lrs was checked"))
    with pytest.raises(InputError, match="--head-lrs .*3 positive rates"):  # no init_heads: checked before the warm-up
        train_medusa2(_loaded(make_tokenizer), prompts_file, tmp_path / "bad", common,
                      replace(opts, init_heads=None, head_lrs="1e-3"))


def test_torchrun_two_ranks_share_the_batches_and_end_in_step(tiny_dirs, prompts_file, tmp_path):
    """The documented launch, `torchrun ... -m medusa_export.runtime.cli train-heads --mode medusa2`, on 2 CPU ranks
    (gloo): the Medusa-1 warm-up and the joint phase run data-parallel (each rank half of every epoch's batches,
    gradients averaged: the ranks must end with equal weights, else TrainingError), and rank 0 alone writes the
    model directory and reports it."""
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "m2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "medusa_export.runtime.cli", "train-heads", "--mode", "medusa2",
           str(tiny_dirs[0]), "--data", str(prompts_file), "--out", str(out), "--num-heads", "3",
           "--max-new-tokens", "24", "--gen-batch-size", "8", "--heldout-fraction", "0.25", "--epochs", "3",
           "--lr", "1e-2", "--joint-epochs", "6", "--backbone-lr", "2e-3", "--seq-batch-size", "4",
           "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Medusa-2 model written to") == 1, done.stdout  # rank 1 reports nothing
    record = json.loads((out / "training.json").read_text())
    assert record["world_size"] == 2 and record["warmup"]["medusa1_epochs"] == 3
    batches = -(-record["train_sequences"] // 4)  # short sequences: one length pool, 4 to a batch
    assert record["joint_steps"] == 6 * -(-batches // 2)
    first = np.mean([s["medusa"] for s in record["loss_first_steps"]])
    assert np.mean([s["medusa"] for s in record["loss_last_steps"]]) < 0.8 * first
    assert 0 < record["eval"]["backbone_vs_original"]["mean_kl"] < KL_BOUND
    assert not (tmp_path / "m2.partial").exists() and (out / "model.safetensors").exists()


def test_rank_share_splits_the_batches_between_ranks():
    from medusa_export.exporter.training.distributed import rank_share

    batches = [[i] for i in range(7)]
    shares = [rank_share(batches, r, 2) for r in range(2)]
    assert shares == [[[0], [2], [4], [6]], [[1], [3], [5], [0]]]  # equal step counts: the short rank wraps
    assert rank_share(batches, 0, 1) == batches
    even = [rank_share(batches[:6], r, 3) for r in range(3)]
    assert sorted(i for s in even for b in s for i in b) == list(range(6))  # disjoint and complete


def test_train_heads_command_runs_either_mode(monkeypatch, tmp_path):
    """Medusa-1 gets its options and nothing of Medusa-2's; --mode medusa2 reads the Medusa-2 flags with their
    types, --epochs and --lr being the warm-up's and the heads' rate; a Medusa-2 flag with --mode medusa1 is refused
    in one line before any training."""
    from typer.testing import CliRunner

    from medusa_export.exporter.training import train as train_mod
    from medusa_export.runtime.cli.app import _register, app

    seen = {}
    monkeypatch.setattr(train_mod, "train_heads", lambda m, d, o, opts: seen.update(medusa1=opts) or {})
    monkeypatch.setattr(m2, "train_medusa2", lambda m, d, o, m1, opts: seen.update(warmup=m1, medusa2=opts) or {})
    _register()
    base = ["train-heads", "--data", "p.jsonl", "--out", str(tmp_path / "o")]
    assert CliRunner().invoke(app, base + ["--epochs", "2"]).exit_code == 0
    assert seen == {"medusa1": Medusa1Options(epochs=2)}
    seen.clear()
    result = CliRunner().invoke(app, base + ["--mode", "medusa2", "--lm-weight", "2.5", "--lora-rank", "8",
                                             "--head-lrs", "1e-3,2e-3", "--max-train-sequences", "10", "--lr", "3e-3"])
    assert result.exit_code == 0, result.output
    assert seen == {"warmup": Medusa1Options(lr=3e-3),
                    "medusa2": Medusa2Options(lm_weight=2.5, lora_rank=8, head_lrs="1e-3,2e-3", max_train_sequences=10)}
    seen.clear()
    result = CliRunner().invoke(app, base + ["--lm-weight", "2", "--joint-epochs", "3"])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and lines == ["error: --joint-epochs, --lm-weight: only for --mode medusa2"]
    assert seen == {}


def test_epoch_batches_cover_every_sequence_once_and_group_similar_lengths():
    rng = np.random.default_rng(3)
    seqs = [Sequence(np.zeros(n, np.int64), 0, np.zeros((1, 1), np.int64), i)
            for i, n in enumerate(rng.integers(5, 700, 1003))]
    batches = epoch_batches(seqs, 8, 10**9, seed=7)
    assert len(batches) == -(-1003 // 8) and sorted(i for b in batches for i in b) == list(range(1003))
    assert batches == epoch_batches(seqs, 8, 10**9, seed=7) and batches != epoch_batches(seqs, 8, 10**9, seed=8)
    capped = epoch_batches(seqs, 8, 1500, seed=7)  # a token budget: fewer long sequences per batch
    assert sorted(i for b in capped for i in b) == list(range(1003))
    assert all(len(b) <= 8 and len(b) * max(len(seqs[i].ids) for i in b) <= 1500 for b in capped)
    assert len(capped) > len(batches)

    def padding(bs):  # padded positions / real positions, what a CPU step pays for
        lens = [[len(seqs[i].ids) for i in b] for b in bs]
        return sum(len(x) * max(x) - sum(x) for x in lens) / sum(map(sum, lens))

    shuffled = np.random.default_rng(7).permutation(1003).tolist()
    assert padding(batches) < 0.2 * padding([shuffled[i:i + 8] for i in range(0, 1003, 8)])


def test_loading_the_model_directory_does_not_report_its_heads_as_unexpected(run):
    import logging

    from transformers import LlamaForCausalLM

    from medusa_export.exporter.model_loading import load_base_model

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    seen, handler, hf = [], Keep(), logging.getLogger("transformers")
    before = LlamaForCausalLM.__dict__.get("_keys_to_ignore_on_load_unexpected")
    hf.addHandler(handler)
    try:
        load_base_model(run[0] / "model")
    finally:
        hf.removeHandler(handler)
    assert not [m for m in seen if "medusa_head" in m]
    assert LlamaForCausalLM.__dict__.get("_keys_to_ignore_on_load_unexpected") == before  # restored


def test_heads_warm_up_leaves_the_backbone_unchanged(make_tokenizer, prompts_file, tmp_path, monkeypatch):
    loaded = _loaded(make_tokenizer)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}

    class Stop(Exception):
        pass

    def stop(model, opts, lora):
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        raise Stop

    monkeypatch.setattr(m2, "_trainable_backbone", stop)
    with pytest.raises(Stop):
        train_medusa2(loaded, prompts_file, tmp_path / "m", replace(COMMON, epochs=2, cache_dir=tmp_path / "c"),
                      Medusa2Options())
    assert not (tmp_path / "m").exists()


def test_bad_input_is_one_line(make_tokenizer, prompts_file, tmp_path, monkeypatch):
    common = replace(COMMON, cache_dir=tmp_path / "c")
    with pytest.raises(InputError, match="LoRA target.*attn_proj.*choose from .*q_proj") as e:
        train_medusa2(_loaded(make_tokenizer), prompts_file, tmp_path / "m", common,
                      Medusa2Options(lora_targets="attn_proj"))
    assert "\n" not in str(e.value)
    from medusa_export.exporter.heads import new_heads, save_heads

    loaded = _loaded(make_tokenizer)
    save_heads(new_heads(loaded.model.config, num_heads=3, base_model="another-model"), tmp_path / "other")
    with pytest.raises(HeadsError, match="trained for 'another-model'"):
        train_medusa2(loaded, prompts_file, tmp_path / "m", common, Medusa2Options(init_heads=str(tmp_path / "other")))
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(InputError, match=r"peft.*medusa-export\[train\]"):
        train_medusa2(loaded, prompts_file, tmp_path / "m", common, Medusa2Options())
    assert not (tmp_path / "m").exists()


def test_cli_mode_medusa2_refuses_bad_lora_settings(tmp_path):
    from typer.testing import CliRunner

    from medusa_export.runtime.cli.app import _register, app

    _register()
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hello"}\n')
    result = CliRunner().invoke(app, ["train-heads", "--data", str(data), "--out", str(tmp_path / "m"),
                                      "--mode", "medusa2", "--lora-rank", "-1"])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "LoRA rank" in lines[0]
    result = CliRunner().invoke(app, ["train-heads", "--data", str(data), "--out", str(tmp_path / "m"),
                                      "--lora-rank", "8"])
    assert result.exit_code == 2 and "only for --mode medusa2" in result.stderr


def test_runs_table_reports_each_run_from_its_record(run, tmp_path, capsys):
    """scripts/medusa2_runs.py (the sweep table of docs/results.md): one row per run, its figures read from training.json."""
    from conftest import load_script

    runs = load_script("medusa2_runs")
    runs.main([str(run[0] / "model")])
    table = capsys.readouterr().out.splitlines()
    b = run[1]["eval"]["backbone_vs_original"]
    assert len(table) == 3 and table[2].startswith(f"| model | {OPTS.lm_weight:g} | 0.01 | ")
    assert f"{b['top1_agreement']:.3f}".lstrip("0") in table[2]
    (tmp_path / "training.json").write_text(json.dumps({"mode": "medusa1"}))
    with pytest.raises(SystemExit, match="not a Medusa-2 training record"):
        runs.main([str(tmp_path)])
