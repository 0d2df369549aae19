"""What `build` is given: a model directory, heads and options that cannot make a working artifact are refused in
one line before the export (found by attacking it: missing weights were filled with random ones and the build
succeeded; a tokenizer past the vocabulary built an artifact that never loads; draft vocabularies, NaN weights and
FIFOs failed with tracebacks or hung), and an artifact a killed build left unfinished does not load."""

from __future__ import annotations

import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")

from conftest import TINY_VOCAB  # noqa: E402

from medusa_export.exporter.heads_source import resolve_heads  # noqa: E402
from medusa_export.exporter.model_loading import load_base_model  # noqa: E402
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from medusa_export.runtime.errors import ArtifactError, HeadsError, InputError, ModelError  # noqa: E402


def _model_copy(tiny_dirs, tmp_path, name="model"):
    return shutil.copytree(tiny_dirs[0], tmp_path / name)


def _edit_config(model_dir, **changes):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | changes))


def _edit_weights(model_dir, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(str(model_dir / "model.safetensors"))
    edit(state)
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("changes, words", [
    ({"num_hidden_layers": 3}, "says num_hidden_layers 3, but the weights hold 2 layers"),
    ({"num_hidden_layers": 1}, None),  # fewer layers load: the first ones
    ({"num_hidden_layers": 0}, "num_hidden_layers must be an integer in 1..1024, not 0"),
    ({"num_hidden_layers": 10 ** 8}, "num_hidden_layers must be an integer in 1..1024"),  # allocated before failing
    ({"vocab_size": 2 * 10 ** 9}, "vocab_size must be an integer in 1..4194304"),
    ({"attention_bias": True}, "lack"),  # biases the weights do not hold: they were initialised randomly
    ({"rope_parameters": {"rope_theta": 0, "rope_type": "default"}}, "rope_theta must be a positive number"),
    ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": -2.0}},
     "RoPE scaling factor must be a positive number, not -2.0"),  # built silently
    ({"max_position_embeddings": -1}, "max_position_embeddings must be a positive integer, not -1"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps must be a number in \\(0, 1\\), not -1.0"),  # ONNX Runtime's traceback
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a number in \\(0, 1\\), not nan"),
    ({"hidden_size": 60000, "intermediate_size": 900000}, "weights take about .* GiB in fp32, more than the"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),  # a traceback
    ({"head_dim": None, "hidden_size": 66}, "hidden_size 66 is not a multiple of num_attention_heads 4"),
    ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "longrope", "short_factor": [1.0] * 8,
                          "long_factor": [4.0] * 8, "original_max_position_embeddings": 32}},
     "longrope RoPE scaling is not supported"),  # failed the export's check as "the export is wrong; report it"
    ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "spiral"}}, "RoPE type 'spiral' is not supported"),
    ({"sliding_window": "wide"}, "sliding_window must be a positive integer or null, not 'wide'"),
])
def test_a_config_that_does_not_describe_the_weights_is_refused(tiny_dirs, tmp_path, changes, words):
    model_dir = _model_copy(tiny_dirs, tmp_path)
    _edit_config(model_dir, **changes)
    if words is None:
        assert load_base_model(model_dir).model.config.num_hidden_layers == changes["num_hidden_layers"]
        return
    with pytest.raises(ModelError, match=words):
        load_base_model(model_dir)


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("model.norm.weight"), "lack 1 tensor.*'model.norm.weight'"),
    (lambda s: s.__setitem__("model.norm.weight", torch.ones(3)), "'model.norm.weight' of shape \\(3,\\)"),
    (lambda s: s["model.layers.1.mlp.up_proj.weight"].view(-1).__setitem__(5, float("nan")),
     "'model.layers.1.mlp.up_proj.weight' holds NaN or infinite values"),
])
def test_weights_missing_misshapen_or_not_numbers_are_refused(tiny_dirs, tmp_path, edit, words):
    model_dir = _model_copy(tiny_dirs, tmp_path)
    _edit_weights(model_dir, edit)
    with pytest.raises(ModelError, match=words):
        load_base_model(model_dir)


def _gguf(path, tensors: dict, **settings) -> None:
    """A small Llama GGUF with the toy tokenizer's words and ``tensors``."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    for name, value in {"context_length": 128, "embedding_length": 64, "block_count": 2,
                        "feed_forward_length": 128, "head_count": 4, "head_count_kv": 2,
                        "layer_norm_rms_eps": 1e-5, "rope_freq_base": 10000.0, **settings}.items():
        getattr(w, f"add_{name}")(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}".encode() for i in range(TINY_VOCAB)])
    w.add_token_types([1] * TINY_VOCAB)
    w.add_token_merges([])
    w.add_token_scores([0.0] * TINY_VOCAB)
    w.add_bos_token_id(0)
    w.add_eos_token_id(TINY_VOCAB - 1)
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_is_checked_before_it_is_converted_and_nothing_unfit_is_cached(tmp_path, monkeypatch):
    """A GGUF lacking its layers' tensors was converted with random weights in their place and cached as complete,
    so a later build would have used them; one naming only its architecture got transformers' default config (6.7 B
    parameters) and the out-of-memory killer."""
    import numpy as np

    monkeypatch.setenv("MEDUSA_EXPORT_CACHE", str(tmp_path / "cache"))
    partial = tmp_path / "partial.gguf"
    _gguf(partial, {"token_embd.weight": np.zeros((TINY_VOCAB, 64), np.float32),
                    "output_norm.weight": np.ones(64, np.float32)})
    with pytest.raises(ModelError, match="partial.gguf lack .* tensor.*its GGUF header describes"):
        load_base_model(partial)
    huge = tmp_path / "huge.gguf"
    _gguf(huge, {}, embedding_length=32768, feed_forward_length=131072, block_count=64, head_count=256,
          head_count_kv=2)
    with pytest.raises(ModelError, match="huge.gguf: the model's weights take about .* GiB in fp32"):
        load_base_model(huge)
    assert not list((tmp_path / "cache").rglob("complete"))


def test_a_tokenizer_past_the_models_vocabulary_is_refused_when_the_model_loads(tiny_dirs, tmp_path):
    from tokenizers import Tokenizer

    model_dir = _model_copy(tiny_dirs, tmp_path)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.add_tokens(["beyond-the-vocabulary"])  # id TINY_VOCAB
    tok.save(str(model_dir / "tokenizer.json"))
    with pytest.raises(ModelError, match=f"tokens with ids up to {TINY_VOCAB}, but the model's vocabulary is "
                       f"{TINY_VOCAB}: it belongs to another model, fix or restore the model's tokenizer files"):
        load_base_model(model_dir)


def test_a_broken_tokenizer_file_is_named_as_the_models_not_an_artifacts(tiny_dirs, tmp_path):
    model_dir = _model_copy(tiny_dirs, tmp_path)
    (model_dir / "tokenizer.json").write_text("not a tokenizer")
    with pytest.raises(ModelError) as e:
        load_base_model(model_dir)
    assert "fix or restore the model's tokenizer files" in str(e.value) and "artifact" not in str(e.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "notes.json"])
def test_a_fifo_among_the_models_files_is_refused_not_waited_on(tiny_dirs, tmp_path, name):
    model_dir = _model_copy(tiny_dirs, tmp_path)
    (model_dir / name).unlink(missing_ok=True)
    os.mkfifo(model_dir / name)
    with pytest.raises(ModelError, match="not a regular file|cannot be read"):
        load_base_model(model_dir)


@pytest.mark.parametrize("ids, words", [
    (list(range(-15, 0)), "draft token id -15 is outside the model's vocabulary"),
    ([3, 4, TINY_VOCAB + 1], f"draft token id {TINY_VOCAB + 1} is outside"),
    ([3, 4, 4, 5], "draft token id 4 appears twice"),
    ([], "must be a non-empty list of token ids"),
    (["a"], "must be a non-empty list of token ids"),
    ([10 ** 30], "an integer of 31 digits"),
])
def test_a_draft_vocabulary_that_is_not_the_models_tokens_is_refused(tiny_dirs, tmp_path, ids, words):
    heads_dir = shutil.copytree(tiny_dirs[1], tmp_path / "heads")
    (heads_dir / "draft_vocab.json").write_text(json.dumps({"ids": ids}))
    loaded = load_base_model(tiny_dirs[0])
    with pytest.raises(HeadsError, match=words):
        resolve_heads(str(heads_dir), loaded)


def test_draft_vocab_json_that_is_not_an_object_is_refused(tiny_dirs, tmp_path):
    heads_dir = shutil.copytree(tiny_dirs[1], tmp_path / "heads")
    (heads_dir / "draft_vocab.json").write_text("[1, 2, 3]")
    with pytest.raises(HeadsError, match="must hold a JSON object"):
        resolve_heads(str(heads_dir), load_base_model(tiny_dirs[0]))


class NotATensor:
    pass


def test_a_pickled_heads_checkpoint_is_refused_without_advice_to_unpickle_it(tiny_dirs, tmp_path):
    heads_dir = tmp_path / "heads"
    heads_dir.mkdir()
    torch.save({"0.0.linear.weight": NotATensor()}, heads_dir / "medusa_lm_head.pt")
    with pytest.raises(HeadsError) as e:
        resolve_heads(str(heads_dir), load_base_model(tiny_dirs[0]))
    assert "pickled objects other than tensors" in str(e.value) and "weights_only" not in str(e.value)


class CallsOut:
    def __reduce__(self):  # what a hostile pickle does: call something when unpickled
        return (os.system, ("echo unpickled > /dev/null",))


def test_a_hostile_pickle_is_named_as_one_for_heads_and_model_without_advice_to_unpickle_it(tiny_dirs, tmp_path):
    """A pickle that would call a function when unpickled (torch names the GLOBAL it refused, in capitals) was
    called corrupt for heads, and for a model's pytorch_model.bin torch's advice to pass weights_only=False was
    quoted."""
    heads_dir = tmp_path / "heads"
    heads_dir.mkdir()
    torch.save({"0.0.linear.weight": CallsOut()}, heads_dir / "medusa_lm_head.pt")
    with pytest.raises(HeadsError, match="pickled objects other than tensors"):
        resolve_heads(str(heads_dir), load_base_model(tiny_dirs[0]))
    model_dir = _model_copy(tiny_dirs, tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    torch.save({**state, "extra": CallsOut()}, model_dir / "pytorch_model.bin")
    with pytest.raises(ModelError) as e:
        load_base_model(model_dir)
    assert "never unpickled" in str(e.value) and "weights_only" not in str(e.value)
    import pickle

    with open(model_dir / "pytorch_model.bin", "wb") as f:  # a plain pickle torch's safe loader cannot read: no
        pickle.dump({"x": 1}, f, protocol=4)  # hostile object in it, so not called one
    with pytest.raises(ModelError, match="cannot load model") as e:
        load_base_model(model_dir)
    assert "never unpickled" not in str(e.value)


def test_heads_weights_that_are_not_numbers_are_refused(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    heads_dir = shutil.copytree(tiny_dirs[1], tmp_path / "heads")
    state = load_file(str(heads_dir / "heads.safetensors"))
    key = sorted(k for k in state if state[k].is_floating_point())[0]
    state[key].view(-1)[0] = float("inf")
    save_file(state, str(heads_dir / "heads.safetensors"))
    with pytest.raises(HeadsError, match=f"heads tensor '{key}' .* holds NaN or infinite values"):
        resolve_heads(str(heads_dir), load_base_model(tiny_dirs[0]))


@pytest.mark.parametrize("options, words", [
    ({"max_seq": 64.5}, "max_seq \\(--max-seq\\) must be an integer, not float"),  # built, then never loaded
    ({"head_topk": "10"}, "head_topk \\(--head-topk\\) must be an integer, not str"),
    ({"dtype": None}, "dtype \\(--dtype\\) must be a string"),
    ({"heads": 5}, "heads must be a path or None"),
    ({"heads": ""}, "heads \\(--heads\\) is empty"),  # read as the current directory
    ({"tree": " "}, "tree \\(--tree\\) is empty"),  # silently the default tree
])
def test_build_options_of_the_wrong_kind_are_input_errors(options, words):
    with pytest.raises(InputError, match=words):
        BuildOptions(**options)


def test_build_options_take_paths_and_numpy_integers(tmp_path):
    import numpy as np

    (tmp_path / "tree.json").write_text("[[0]]")
    options = BuildOptions(tree=tmp_path / "tree.json", max_seq=np.int64(64))
    assert options.tree == str(tmp_path / "tree.json") and type(options.max_seq) is int


@pytest.mark.parametrize("tree, words", [("bogus", "unknown tree 'bogus'"), ("chain-0", "bad chain preset"),
                                         ("missing.json", "tree file 'missing.json' does not exist")])
def test_a_bad_tree_is_named_before_the_model_loads(tree, words):
    """--tree was read only after the model loaded (seconds for the built-in one, minutes for a large one)."""
    from medusa_export.runtime.errors import TreeError

    with pytest.raises(TreeError, match=words):
        BuildOptions(tree=tree)


def test_a_failed_build_leaves_no_folders_it_made(tiny_dirs, tmp_path, monkeypatch):
    from medusa_export.exporter import build as build_mod

    def failing(*_a, **_k):
        raise ModelError("stopped for the test")

    monkeypatch.setattr(build_mod, "validate_graph", failing)
    options = BuildOptions(heads=str(tiny_dirs[1]), tree="chain-1", max_seq=64, max_num_seqs=1)
    with pytest.raises(ModelError, match="stopped for the test"):
        build_mod.build_artifact(str(tiny_dirs[0]), tmp_path / "a" / "b" / "art", options, log=lambda _m: None)
    assert list(tmp_path.iterdir()) == []


def test_a_quantized_build_whose_quality_check_cannot_fit_is_refused_before_the_export(tiny_dirs, tmp_path):
    from medusa_export.exporter.build import build_artifact

    options = BuildOptions(heads=str(tiny_dirs[1]), tree="chain-1", dtype="int8", max_seq=16)
    with pytest.raises(InputError, match="--max-seq 16 cannot hold the quality check"):
        build_artifact(str(tiny_dirs[0]), tmp_path / "out", options, quality_prompts=["t5 t6 t7"],
                       log=lambda _m: None)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- unfinished builds
def test_an_unfinished_build_does_not_load_and_the_next_build_removes_it(artifact, tmp_path):
    """SIGKILL cannot be caught: a build killed after writing its manifest left OUT.partial-* that loaded."""
    import subprocess
    import sys

    from medusa_export.exporter.output_dir import new_work_dir, release_work_dir
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.manifest import UNFINISHED

    killed = shutil.copytree(artifact, tmp_path / "art.partial-killed")
    (killed / UNFINISHED).touch()  # its mark, which no process holds any more
    running = shutil.copytree(artifact, tmp_path / "art.partial-running")
    (running / UNFINISHED).touch()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(running / UNFINISHED)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for unfinished in (killed, running):
            with pytest.raises(ArtifactError, match="is an unfinished build"):
                MedusaRuntime.load(unfinished)
        work = new_work_dir(tmp_path / "art")
        try:
            assert not killed.exists() and running.exists()  # a build in progress is left alone
            with MedusaRuntime.load(shutil.copytree(artifact, work, dirs_exist_ok=True)):
                pass  # this process's own build loads it to check its graphs
        finally:
            release_work_dir(work)
        with pytest.raises(ArtifactError, match="is an unfinished build"):
            MedusaRuntime.load(work)
    finally:
        holder.kill()
        holder.wait()


def test_a_signal_between_the_renames_puts_the_earlier_artifact_back(artifact, tmp_path, monkeypatch):
    from pathlib import Path

    from medusa_export.exporter import output_dir

    out = shutil.copytree(artifact, tmp_path / "art")
    work = output_dir.new_work_dir(out)
    rename = Path.rename

    def interrupted_after_the_first(self, target):
        result = rename(self, target)
        if self == out:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(Path, "rename", interrupted_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        output_dir.replace_dir(work, out)
    assert (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", work.name]


def test_names_recorded_from_paths_are_one_printable_line():
    """A model directory named with a newline and terminal escapes put them into the manifest, and from there into
    messages, reports and the server's model list."""
    from medusa_export.exporter.provenance import record_name

    assert record_name("evil\n\x1b[31mname") == "evil??[31mname"
    assert record_name("SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct" and record_name(None) is None
    assert len(record_name("x" * 1000)) == 255


def test_a_capacity_past_the_models_trained_positions_is_noted(tiny_dirs, tmp_path, monkeypatch):
    from medusa_export.exporter import build as build_mod

    def stop(*_a, **_k):
        raise KeyboardInterrupt  # the note comes before the export: no need to wait for it

    monkeypatch.setattr(build_mod, "_export_graph", stop)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        build_mod.build_artifact(str(tiny_dirs[0]), tmp_path / "art", BuildOptions(heads=str(tiny_dirs[1]),
                                 tree="chain-1", max_seq=1024), log=lines.append)
    assert any("past the model's max_position_embeddings 512" in line for line in lines), lines
