"""Medusa heads: the module, save/load round trips, the reference checkpoint formats, and every way a
checkpoint can be wrong (each a one-line `HeadsError` that names the problem)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from medusa_export.exporter.heads import (  # noqa: E402
    WEIGHTS_FILE,
    HeadsConfig,
    MedusaHeads,
    load_heads,
    new_heads,
    save_heads,
)
from medusa_export.runtime.errors import HeadsError  # noqa: E402

H, V = 64, 320
BASE = SimpleNamespace(hidden_size=H, vocab_size=V)  # all load_heads reads from a base config


@pytest.fixture(scope="module")
def lm_head():
    torch.manual_seed(0)
    return torch.nn.Linear(H, V, bias=False)


def random_heads(layout, k=3, layers=1, lm_head=None, seed=0):
    heads = new_heads(BASE, num_heads=k, num_layers=layers, layout=layout, lm_head=lm_head)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return heads.eval()


def logits(heads, lm_head, seed=1):
    h = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return heads(h, lm_head)


def reference_state(heads: MedusaHeads) -> dict[str, torch.Tensor]:
    """Our module's weights under the reference (Medusa-1) key names."""
    n_layers = heads.config.num_layers
    state = {}
    for k, v in heads.state_dict().items():
        parts = k.split(".")
        if parts[0] == "blocks":  # blocks.{h}.{l}.linear.{w|b}
            state[".".join(parts[1:])] = v.clone()
        else:  # proj.{h}.weight
            state[f"{parts[1]}.{n_layers}.weight"] = v.clone()
    return state


def write_reference_config(directory, k, layers, **extra):
    cfg = {"medusa_num_heads": k, "medusa_num_layers": layers, "base_model_name_or_path": "tiny-llama", **extra}
    (directory / "config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------------------------- module


def test_fresh_heads_zero_weight_and_layers_are_distinct(lm_head):
    heads = new_heads(BASE, num_heads=3, num_layers=2, layout="shared")
    h = torch.randn(4, H)
    with torch.no_grad():
        out = heads(h, lm_head)
        for k, blk in enumerate(heads.blocks):
            # W is zero (as in the reference); the bias keeps nn.Linear's default init, so a fresh
            # head is h + SiLU(b) per layer: close to, but not exactly, the identity.
            assert all(torch.count_nonzero(b.linear.weight) == 0 for b in blk)
            x = h
            for b in blk:
                x = x + torch.nn.functional.silu(b.linear.bias)
            torch.testing.assert_close(out[:, k], lm_head(x))
    assert out.shape == (4, 3, V)
    ptrs = [p.data_ptr() for p in heads.parameters()]
    assert len(ptrs) == len(set(ptrs)) == 3 * 2 * 2  # no module repeated ([ResBlock] * n pitfall)


def test_own_layout_copies_lm_head_and_shapes(lm_head):
    heads = new_heads(BASE, num_heads=2, layout="own", lm_head=lm_head)
    assert len(heads.proj) == 2
    for p in heads.proj:
        torch.testing.assert_close(p.weight, lm_head.weight)
        assert p.weight.data_ptr() != lm_head.weight.data_ptr()
    assert logits(heads, lm_head).shape == (2, 5, 2, V)
    assert len(new_heads(BASE, num_heads=2, layout="shared").proj) == 0


def test_bad_config():
    with pytest.raises(HeadsError, match="'tied'"):
        HeadsConfig(H, V, layout="tied")
    with pytest.raises(HeadsError, match="num_heads"):
        HeadsConfig(H, V, num_heads=0)


# ---------------------------------------------------------------------------------------------- round trip


def test_saved_heads_are_readable_as_the_config_beside_them(tmp_path):
    """safetensors writes 0600: an artifact built by one user was unreadable to another serving or verifying it."""
    import os

    old = os.umask(0o022)
    try:
        out = save_heads(random_heads("own"), tmp_path / "heads")
    finally:
        os.umask(old)
    assert (out / WEIGHTS_FILE).stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("layout, layers", [("shared", 1), ("own", 1), ("shared", 2), ("own", 3)])
def test_save_load_round_trip(tmp_path, lm_head, layout, layers):
    heads = random_heads(layout, k=3, layers=layers, lm_head=lm_head)
    out = save_heads(heads, tmp_path / "heads", extra={"note": "test"})
    assert (out / WEIGHTS_FILE).exists() and not (out / (WEIGHTS_FILE + ".tmp")).exists()
    meta = json.loads((out / "config.json").read_text())
    assert meta["layout"] == layout and meta["num_heads"] == 3 and meta["num_layers"] == layers
    assert meta["note"] == "test"
    loaded = load_heads(out, BASE)
    assert loaded.config == heads.config
    a, b = heads.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    torch.testing.assert_close(logits(loaded, lm_head), logits(heads, lm_head), atol=0, rtol=0)
    # A file path inside the directory works too.
    assert load_heads(out / WEIGHTS_FILE, BASE).config == heads.config


# ---------------------------------------------------------------------------------------------- reference formats


@pytest.mark.parametrize("layers", [1, 2])
def test_reference_pt_own_projection(tmp_path, lm_head, layers):
    heads = random_heads("own", k=4, layers=layers, lm_head=lm_head)
    state = reference_state(heads)
    assert f"0.{layers}.weight" in state and "3.0.linear.bias" in state
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    write_reference_config(tmp_path, 4, layers)
    loaded = load_heads(tmp_path, BASE)
    assert loaded.config.layout == "own" and loaded.config.num_heads == 4 and loaded.config.num_layers == layers
    assert loaded.config.base_model == "tiny-llama"
    torch.testing.assert_close(logits(loaded, lm_head), logits(heads, lm_head), atol=0, rtol=0)
    # Pointing at the file itself is the same.
    torch.testing.assert_close(logits(load_heads(tmp_path / "medusa_lm_head.pt", BASE), lm_head),
                               logits(heads, lm_head), atol=0, rtol=0)


@pytest.mark.parametrize("with_config", [True, False])
def test_reference_safetensors_shared_layout(tmp_path, lm_head, with_config):
    heads = random_heads("shared", k=3, layers=1)
    state = reference_state(heads)
    assert not any(k.endswith(".1.weight") for k in state)  # no projection keys
    save_file(state, str(tmp_path / "medusa_lm_head.safetensors"))
    if with_config:
        write_reference_config(tmp_path, 3, 1)
    loaded = load_heads(tmp_path, BASE)  # without config.json the counts come from the keys
    assert loaded.config.layout == "shared" and loaded.config.num_heads == 3
    torch.testing.assert_close(logits(loaded, lm_head), logits(heads, lm_head), atol=0, rtol=0)


def test_reference_prefixed_keys(tmp_path, lm_head):
    heads = random_heads("shared", k=2)
    save_file({"medusa_head." + k: v for k, v in reference_state(heads).items()},
              str(tmp_path / "medusa_lm_head.safetensors"))
    torch.testing.assert_close(logits(load_heads(tmp_path, BASE), lm_head), logits(heads, lm_head), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- errors


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    return msg


@pytest.mark.parametrize("field, base", [("hidden_size", SimpleNamespace(hidden_size=32, vocab_size=V)),
                                          ("vocab_size", SimpleNamespace(hidden_size=H, vocab_size=300))])
def test_base_mismatch_our_format(tmp_path, field, base):
    out = save_heads(random_heads("own"), tmp_path)
    with pytest.raises(HeadsError) as e:
        load_heads(out, base)
    msg = one_line(e)
    assert f"{field}={getattr(BASE, field)}" in msg and f"{field}={getattr(base, field)}" in msg


@pytest.mark.parametrize("base, tensor, got, need", [
    (SimpleNamespace(hidden_size=32, vocab_size=V), "blocks.0.0.linear.weight", "(64, 64)", "(32, 32)"),
    (SimpleNamespace(hidden_size=H, vocab_size=300), "proj.0.weight", "(320, 64)", "(300, 64)"),
])
def test_base_mismatch_reference_format(tmp_path, lm_head, base, tensor, got, need):
    torch.save(reference_state(random_heads("own", k=2, lm_head=lm_head)), tmp_path / "medusa_lm_head.pt")
    write_reference_config(tmp_path, 2, 1)
    with pytest.raises(HeadsError) as e:
        load_heads(tmp_path, base)
    msg = one_line(e)
    assert "shape" in msg and tensor in msg and got in msg and need in msg


def edit_weights(directory, fn):
    state = load_file(str(directory / WEIGHTS_FILE))
    fn(state)
    save_file(state, str(directory / WEIGHTS_FILE))


def test_missing_tensor(tmp_path):
    out = save_heads(random_heads("own"), tmp_path)
    edit_weights(out, lambda s: s.pop("blocks.1.0.linear.weight"))
    with pytest.raises(HeadsError) as e:
        load_heads(out, BASE)
    assert "blocks.1.0.linear.weight" in one_line(e) and "(64, 64)" in str(e.value)


def test_extra_tensor(tmp_path):
    out = save_heads(random_heads("shared"), tmp_path)
    edit_weights(out, lambda s: s.__setitem__("proj.0.weight", torch.zeros(V, H)))
    with pytest.raises(HeadsError) as e:
        load_heads(out, BASE)
    assert "proj.0.weight" in one_line(e) and "unexpected" in str(e.value)


def test_extra_head_in_reference_checkpoint(tmp_path):
    heads = random_heads("shared", k=3)
    save_file(reference_state(heads), str(tmp_path / "medusa_lm_head.safetensors"))
    write_reference_config(tmp_path, 2, 1)  # config claims fewer heads than the file holds
    with pytest.raises(HeadsError, match="2.0.linear"):
        load_heads(tmp_path, BASE)


@pytest.mark.parametrize("bad", ["0.x.linear.weight", "\u00b2.0.linear.weight", "x.y", "0"])
def test_a_reference_key_that_is_no_head_and_layer_number_is_refused(tmp_path, bad):
    """Sizes inferred from the keys read int() of their first parts: "x" and "²" (which isdigit() takes) raised a
    bare ValueError."""
    state = reference_state(random_heads("shared", k=2))
    state[bad] = torch.zeros(H)
    save_file(state, str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(HeadsError, match="unexpected key .* not a Medusa heads checkpoint"):
        load_heads(tmp_path, BASE)


def test_wrong_shape(tmp_path):
    out = save_heads(random_heads("shared"), tmp_path)
    edit_weights(out, lambda s: s.__setitem__("blocks.2.0.linear.weight", torch.zeros(H, H + 1)))
    with pytest.raises(HeadsError) as e:
        load_heads(out, BASE)
    msg = one_line(e)
    assert "blocks.2.0.linear.weight" in msg and "(64, 65)" in msg and "(64, 64)" in msg


@pytest.mark.parametrize("name", [WEIGHTS_FILE, "medusa_lm_head.safetensors", "medusa_lm_head.pt"])
def test_corrupt_file(tmp_path, name):
    if name == WEIGHTS_FILE:
        save_heads(random_heads("shared"), tmp_path)
    else:
        write_reference_config(tmp_path, 3, 1)
    (tmp_path / name).write_bytes(b"\x00\x01not a tensor file at all" * 10)
    with pytest.raises(HeadsError) as e:
        load_heads(tmp_path, BASE)
    assert name in one_line(e) and "cannot read" in str(e.value)


def test_truncated_safetensors(tmp_path):
    out = save_heads(random_heads("own"), tmp_path)
    data = (out / WEIGHTS_FILE).read_bytes()
    (out / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(HeadsError, match=WEIGHTS_FILE):
        load_heads(out, BASE)


class Evil:
    """Unpickling this would create a marker file; weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = reference_state(random_heads("shared", k=1))
    state["0.0.linear.weight"] = Evil(marker)
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    write_reference_config(tmp_path, 1, 1)
    with pytest.raises(HeadsError) as e:
        load_heads(tmp_path, BASE)
    assert "medusa_lm_head.pt" in one_line(e) and "objects other than tensors" in one_line(e)
    assert "weights_only" not in one_line(e)  # torch's own text advises unpickling it
    assert not marker.exists()


@pytest.mark.parametrize("data", [b"\x80\x04 torn write", b"PK\x03\x04 not really a zip", b""])
def test_a_corrupt_pt_file_is_named_as_such(tmp_path, data):
    (tmp_path / "medusa_lm_head.pt").write_bytes(data)
    write_reference_config(tmp_path, 1, 1)
    with pytest.raises(HeadsError, match=r"medusa_lm_head\.pt: not a PyTorch checkpoint of tensors .*re-save"):
        load_heads(tmp_path, BASE)


def test_pickle_with_plain_non_tensor_value(tmp_path):
    state = reference_state(random_heads("shared", k=1))
    state["0.0.linear.bias"] = [0.0] * H  # allowed by weights_only, still not a tensor
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    with pytest.raises(HeadsError, match="not a state dict of tensors"):
        load_heads(tmp_path, BASE)


def test_missing_paths_and_files(tmp_path):
    with pytest.raises(HeadsError, match="does not exist"):
        load_heads(tmp_path / "nope", BASE)
    with pytest.raises(HeadsError, match="no heads weights"):
        load_heads(tmp_path, BASE)  # empty directory
    out = save_heads(random_heads("shared"), tmp_path / "h")
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(HeadsError, match="missing"):
        load_heads(out, BASE)
    (save_heads(random_heads("shared"), tmp_path / "h2") / "config.json").unlink()  # was "no heads weights ..."
    with pytest.raises(HeadsError, match=f"holds {WEIGHTS_FILE} but no config.json.*restore config.json"):
        load_heads(tmp_path / "h2", BASE)


def test_bad_config_json(tmp_path):
    save_file(reference_state(random_heads("shared")), str(tmp_path / "medusa_lm_head.safetensors"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(HeadsError, match="config.json.*JSON"):
        load_heads(tmp_path, BASE)


def test_not_a_medusa_checkpoint(tmp_path):
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(HeadsError, match="not a Medusa heads checkpoint"):
        load_heads(tmp_path, BASE)


def test_an_unreadable_safetensors_beside_a_medusa2_model_is_named(tmp_path):
    """transformers ignores a stray file; reading the embedded heads raised safetensors' own error."""
    from medusa_export.exporter.heads_source import load_embedded_heads

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "medusa_num_heads": 2,
                                                      "medusa_num_layers": 1}))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(HeadsError, match="junk.safetensors is not a readable safetensors file"):
        load_embedded_heads(tmp_path, BASE)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("name", [WEIGHTS_FILE, "medusa_lm_head.safetensors", "medusa_lm_head.pt"])
def test_heads_weights_that_are_not_a_regular_file_are_refused_not_waited_on(tmp_path, name):
    """The heads' config.json was read bounded, but their weights were opened by name: a FIFO blocked the load (and
    the build) for ever, ignoring SIGTERM."""
    import os

    if name == WEIGHTS_FILE:
        save_heads(random_heads("shared"), tmp_path)
        (tmp_path / name).unlink()
    else:
        write_reference_config(tmp_path, 3, 1)
    os.mkfifo(tmp_path / name)
    with pytest.raises(HeadsError, match=f"{name} are not a regular file"):
        load_heads(tmp_path, BASE)
    (tmp_path / name).unlink()
    (tmp_path / name).mkdir()
    with pytest.raises(HeadsError, match=f"{name} are not a regular file"):
        load_heads(tmp_path, BASE)


def test_heads_weights_through_a_symlink_load_and_a_broken_one_is_missing(tmp_path, lm_head):
    """Symlinks are followed, as for the heads' config.json: only what they lead to must be a regular file."""
    heads = random_heads("own", lm_head=lm_head)
    out = save_heads(heads, tmp_path / "h")
    (out / WEIGHTS_FILE).rename(tmp_path / "elsewhere.safetensors")
    (out / WEIGHTS_FILE).symlink_to(tmp_path / "elsewhere.safetensors")
    assert torch.equal(logits(load_heads(out, BASE), lm_head), logits(heads, lm_head))
    (tmp_path / "elsewhere.safetensors").unlink()
    with pytest.raises(HeadsError, match="missing"):
        load_heads(out, BASE)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_heads_weights_that_are_not_floating_point_are_refused(tmp_path, dtype):
    """bool and int8 tensors were cast to float silently: heads of zeros and ones built and exported."""
    out = save_heads(random_heads("shared"), tmp_path)
    edit_weights(out, lambda s: s.__setitem__("blocks.1.0.linear.bias", s["blocks.1.0.linear.bias"].to(dtype)))
    with pytest.raises(HeadsError) as e:
        load_heads(out, BASE)
    assert "'blocks.1.0.linear.bias'" in one_line(e) and str(dtype).removeprefix("torch.") in str(e.value)
