"""The loader reads only what the manifest lists, inside the artifact, and every way a file can fail to read is an
ArtifactError: tokenizer-side files dropped in or symlinked out, a manifest.json symlinked out, names with a NUL
byte, symlink loops, names too long, unreadable JSON, a path that is a file. Found by attacking the loader."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from test_cli import assert_one_line_error, cli  # noqa: E402

from medusa_export.runtime.api import MedusaRuntime  # noqa: E402
from medusa_export.runtime.errors import ArtifactError, InputError  # noqa: E402
from medusa_export.runtime.artifact_files import artifact_file  # noqa: E402
from medusa_export.runtime.manifest import Manifest, file_record  # noqa: E402


@pytest.fixture
def art(artifact, tmp_path) -> Path:
    """A copy of the tiny artifact to break."""
    return shutil.copytree(artifact, tmp_path / "art")


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _write_manifest(art: Path, data: dict) -> None:
    (art / "manifest.json").write_text(json.dumps(data))


def _list(art: Path, name: str) -> None:
    """Record ``name`` in the manifest's files with its current size and sha256, as build would."""
    data = _manifest(art)
    rec = file_record(art / name)
    data["files"][name] = {"sha256": rec.sha256, "bytes": rec.bytes}
    _write_manifest(art, data)


def _unlist(art: Path, name: str) -> None:
    data = _manifest(art)
    del data["files"][name]
    _write_manifest(art, data)


def _generate(art: Path, *extra: str):
    return cli("generate", str(art), "-p", "t1 t2", "--max-new-tokens", "2", *extra)


# ------------------------------------------------------------------ only listed tokenizer-side files are read
def test_a_chat_template_dropped_into_the_artifact_is_refused(art):
    (art / "chat_template.jinja").write_text("{{ 'HIJACK' }}")
    with pytest.raises(ArtifactError, match="chat_template.jinja is in the artifact but manifest.json does not list"):
        Manifest.read(art, check_hashes=True)  # what verify checks first
    with pytest.raises(ArtifactError, match="does not list it"):
        MedusaRuntime.load(art)
    assert_one_line_error(_generate(art), "chat_template.jinja", "does not list it", "remove it")


def test_a_listed_chat_template_is_used(art):
    (art / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}t9")
    _list(art, "chat_template.jinja")
    rt = MedusaRuntime.load(art)
    assert rt.generator.tokenizer.encode_chat([{"role": "user", "content": "t5 t6"}]) == [5, 6, 9]


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer_config.json", "tokenizer.json"])
def test_an_unlisted_tokenizer_file_symlinked_out_of_the_artifact_is_never_opened(art, tmp_path, name):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    if (art / name).exists():
        (art / name).unlink()
        _unlist(art, name)
    (art / name).symlink_to(secret)
    with pytest.raises(ArtifactError, match=f"{name} is in the artifact but manifest.json does not list it"):
        MedusaRuntime.load(art)


def test_a_listed_tokenizer_file_symlinked_out_of_the_artifact_is_refused(art, tmp_path):
    outside = tmp_path / "tokenizer.json"
    (art / "tokenizer.json").rename(outside)
    (art / "tokenizer.json").symlink_to(outside)  # same bytes: size and sha256 still match
    with pytest.raises(ArtifactError, match="leads outside"):
        MedusaRuntime.load(art)


def test_an_unlisted_tokenizer_json_is_missing_not_read(art):
    (art / "tokenizer.json").unlink()
    _unlist(art, "tokenizer.json")
    with pytest.raises(ArtifactError, match="tokenizer.json is missing"):
        MedusaRuntime.load(art)


def test_a_manifest_symlinked_out_of_the_artifact_is_refused(art, tmp_path):
    outside = tmp_path / "manifest.json"
    (art / "manifest.json").rename(outside)
    (art / "manifest.json").symlink_to(outside)
    with pytest.raises(ArtifactError, match="manifest.json leads outside"):
        MedusaRuntime.load(art)


def test_a_dangling_manifest_link_is_read_as_an_artifact_s_error(art, tmp_path):
    """generate's backend choice took a dangling manifest.json for no artifact, and OSError's bare message came
    out with exit 1."""
    (art / "manifest.json").unlink()
    (art / "manifest.json").symlink_to(tmp_path / "missing.json")
    assert_one_line_error(_generate(art), "manifest.json")
    (art / "manifest.json").unlink()  # no manifest at all: neither an artifact nor a model directory, said so
    assert_one_line_error(_generate(art), "config.json is missing", "manifest.json")


def test_unlisted_external_data_beside_a_graph_is_refused(art):
    (art / "vanilla.onnx.data").write_bytes(b"\0" * 64)
    with pytest.raises(ArtifactError, match="vanilla.onnx.data is in the artifact but manifest.json does not list"):
        MedusaRuntime.load(art)


# ------------------------------------------------------------------------------ paths that do not resolve
def test_a_file_name_with_a_nul_byte_is_refused(art):
    data = _manifest(art)
    data["files"]["a\u0000b"] = data["files"]["tokenizer.json"]
    _write_manifest(art, data)
    with pytest.raises(ArtifactError, match="not a path inside the artifact"):
        Manifest.read(art)
    assert_one_line_error(_generate(art), "not a path inside the artifact")


def test_a_symlink_loop_is_refused(art):
    (art / "vanilla.onnx").unlink()
    (art / "vanilla.onnx").symlink_to("vanilla.onnx")
    with pytest.raises(ArtifactError, match="vanilla.onnx cannot be resolved"):
        Manifest.read(art)
    assert_one_line_error(_generate(art), "vanilla.onnx cannot be resolved")


def test_a_file_name_too_long_for_the_file_system_is_refused(art):
    """Refused by its length before the file system is asked (which raised ENAMETOOLONG at every existence check)."""
    data = _manifest(art)
    data["files"]["a" * 5000] = data["files"]["tokenizer.json"]
    _write_manifest(art, data)
    with pytest.raises(ArtifactError, match="over 255 characters"):
        Manifest.read(art)


def test_an_os_error_reading_the_manifest_is_an_artifact_error(art, monkeypatch):
    from medusa_export.runtime import typed_json

    real = typed_json.read_bounded

    def failing(path, limit):
        if Path(path).name == "manifest.json":
            raise OSError(errno.EIO, "Input/output error")
        return real(path, limit)

    monkeypatch.setattr(typed_json, "read_bounded", failing)
    with pytest.raises(ArtifactError, match=r"manifest.json cannot be read \(Input/output error\)"):
        Manifest.read(art)


@pytest.mark.parametrize("text, words", [
    ("9" * 5000, "Exceeds the limit (4300 digits)"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ("{nope", "is not valid JSON"),
])
def test_read_json_names_the_file_for_every_json_failure(tmp_path, text, words):
    from medusa_export.runtime.typed_json import read_json

    path = tmp_path / "generation_config.json"
    path.write_text(text)
    with pytest.raises(ArtifactError) as e:
        read_json(path)
    assert str(e.value).startswith(str(path)) and words in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ the directory
def test_a_file_given_as_the_artifact_is_not_a_directory(tmp_path):
    f = tmp_path / "passwd"
    f.write_text("x")
    with pytest.raises(ArtifactError, match="passwd is not a directory"):
        MedusaRuntime.load(f)
    with pytest.raises(ArtifactError, match="does not exist"):
        MedusaRuntime.load(tmp_path / "absent")
    with pytest.raises(InputError, match="must be a path"):
        MedusaRuntime.load(None)


def test_artifact_file_refuses_a_nul_byte_before_touching_the_file_system(tmp_path):
    with pytest.raises(ArtifactError, match="not a path inside the artifact"):
        artifact_file(tmp_path, "x\u0000.onnx")


# ------------------------------------------------------------------ what a listed tokenizer.json can hold
def _edit_tokenizer(art: Path, edit) -> None:
    data = json.loads((art / "tokenizer.json").read_text())
    edit(data)
    (art / "tokenizer.json").write_text(json.dumps(data))
    _list(art, "tokenizer.json")


def test_a_token_id_beyond_the_model_vocabulary_is_refused_at_load(art):
    """Ids need not be dense: one id past the model's vocabulary, with the token count unchanged, would fail in
    the graph's Gather mid-request (or, as the end-of-sequence token, never be produced)."""
    def far_id(data: dict) -> None:
        vocab = data["model"]["vocab"]
        vocab["t5"] = 5_000_000

    _edit_tokenizer(art, far_id)
    with pytest.raises(ArtifactError, match="ids up to 5000000, but the model's vocabulary is"):
        MedusaRuntime.load(art)
    assert_one_line_error(_generate(art), "tokenizer.json", "ids up to 5000000", "rebuild the artifact")


def test_tokens_past_the_vocabulary_are_refused_before_the_special_tokens_are_compiled(art, monkeypatch):
    """Tens of thousands of added special tokens past the model's vocabulary took 18 s compiling their pattern (and
    rendering the template) before the vocabulary check refused them: it now comes first."""
    from medusa_export.runtime.tokenizer import ChatTokenizer

    def many_specials(data: dict) -> None:
        first = max(data["model"]["vocab"].values()) + 1
        data["added_tokens"] += [{"id": first + i, "content": f"<x{i}>", "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True} for i in range(2000)]

    _edit_tokenizer(art, many_specials)
    monkeypatch.setattr(ChatTokenizer, "__post_init__", lambda self: pytest.fail("built before the check"))
    with pytest.raises(ArtifactError, match="but the model's vocabulary is .*belongs to another model"):
        MedusaRuntime.load(art)


def test_a_tokenizer_that_panics_on_a_text_is_an_input_error(art):
    """A pre-tokenizer regex with catastrophic backtracking: the `tokenizers` library gives up with a Rust panic
    (a BaseException); the runtime turns it into an InputError, the CLI into one line."""
    def backtracking(data: dict) -> None:
        data["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated",
                                 "invert": False}

    _edit_tokenizer(art, backtracking)
    rt = MedusaRuntime.load(art)
    text = "a" * 40 + "!"
    with pytest.raises(InputError, match="the artifact's tokenizer failed on this text"):
        rt.generate(text, max_new_tokens=2, chat=False)
    with pytest.raises(InputError, match="tokenizer failed"):
        rt.generator.tokenizer.encode(text)
    # The library's own panic note (Rust's, written to the process's stderr) comes before the CLI's error line.
    result = cli("generate", str(art), "-p", text, "--max-new-tokens", "2", "--no-chat", env={"RUST_BACKTRACE": "0"})
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(lines) <= 4, result.stderr
    assert lines[-1].startswith("error: the artifact's tokenizer failed on this text"), result.stderr
    assert "shorten or change the text" in lines[-1]


def test_a_tokenizer_that_panics_while_decoding_is_an_artifact_error(art):
    """A decoder whose regular expression gives up (a Rust panic, a BaseException): an ArtifactError, an
    Exception, so the batched engine's thread ends the request instead of dying with it."""
    def backtracking_decoder(data: dict) -> None:
        vocab = data["model"]["vocab"]
        vocab["a" * 40 + "!"] = vocab.pop("t7")
        data["decoder"] = {"type": "Replace", "pattern": {"Regex": "(a+)+$"}, "content": ""}

    _edit_tokenizer(art, backtracking_decoder)
    rt = MedusaRuntime.load(art)
    with pytest.raises(ArtifactError, match="failed to decode tokens"):
        rt.generator.tokenizer.decode([7])


# ------------------------------------------------- files their manifest records as huge (sparse: they cost no disk)
def _sparse(art: Path, name: str, size: int) -> None:
    """``name`` replaced by a sparse file of ``size`` bytes that the manifest lists with that size."""
    path = art / name
    path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)
    data = _manifest(art)
    data["files"][name]["bytes"] = size
    _write_manifest(art, data)


@pytest.mark.parametrize("name, size, words", [
    ("tokenizer.json", (128 << 20) + 1, "tokenizer.json cannot be read (larger than 134217728 bytes)"),
    ("vanilla.onnx", 2 << 30, "vanilla.onnx cannot be read (larger than 2147483647 bytes)"),
])
def test_a_file_recorded_as_huge_is_refused_before_it_is_read_whole(art, name, size, words):
    """Both were read whole into memory (the tokenizer library reads its file at once; the graph was read to list
    its external data): a manifest recording a huge sparse file took that much memory."""
    _sparse(art, name, size)
    with pytest.raises(ArtifactError, match=re.escape(words)):
        MedusaRuntime.load(art, plain=True)


def test_a_token_longer_than_any_model_s_is_refused_at_load(art):
    """The graph chooses which tokens come out and each is decoded into text: a vocabulary token of millions of
    characters made every generated token cost that much memory."""
    from medusa_export.runtime.tokenizer import MAX_TOKEN_CHARS

    def long_token(data: dict) -> None:
        vocab = data["model"]["vocab"]
        vocab["y" * (MAX_TOKEN_CHARS + 1)] = vocab.pop("t7")

    _edit_tokenizer(art, long_token)
    with pytest.raises(ArtifactError, match=f"has a token of {MAX_TOKEN_CHARS + 1} characters"):
        MedusaRuntime.load(art)
    assert_one_line_error(_generate(art), "tokenizer.json", f"at most {MAX_TOKEN_CHARS}", "rebuild the artifact")


def test_a_bpe_tokenizer_s_dropout_is_turned_off(tmp_path):
    """A BPE model saved with dropout (a training setting) skipped merges at random on every encoding: one prompt
    became other token ids on each request."""
    from tokenizers import Tokenizer, models

    from medusa_export.runtime.tokenizer import ChatTokenizer

    letters = "abcdefgh"
    vocab = {c: i for i, c in enumerate(letters)}
    merges = [(a, b) for a, b in zip(letters, letters[1:])][::2]  # ab, cd, ef, gh
    vocab |= {a + b: len(letters) + i for i, (a, b) in enumerate(merges)}
    Tokenizer(models.BPE(vocab, merges, dropout=0.5)).save(str(tmp_path / "tokenizer.json"))
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["dropout"] == 0.5
    tok = ChatTokenizer.from_directory(tmp_path)
    text = "abcdefgh" * 40
    assert {tuple(tok.encode(text)) for _ in range(20)} == {tuple([8, 9, 10, 11] * 40)}
    assert {tuple(tok.encode_text(text)) for _ in range(20)} == {tuple([8, 9, 10, 11] * 40)}


@pytest.mark.parametrize("content", ["", " \n\t"])
def test_an_empty_listed_chat_template_file_is_refused(art, content):
    """A listed chat_template.jinja replaces tokenizer_config.json's template: an empty one silently dropped the chat
    format (prompts went to the model as plain text)."""
    (art / "chat_template.jinja").write_text(content)
    _list(art, "chat_template.jinja")
    with pytest.raises(ArtifactError, match="chat_template.jinja is empty: write the chat template into it"):
        MedusaRuntime.load(art)
    assert_one_line_error(_generate(art), "chat_template.jinja is empty")


# ------------------------------------------------------------------------------ a listed file that cannot be opened
def test_an_unreadable_weights_file_is_named_not_the_graph_that_reads_it(art, monkeypatch):
    """weights.bin is read by ONNX Runtime itself (external data): unreadable, it failed as "ONNX Runtime cannot
    load .../medusa.onnx (SystemError : 13)". The loader opens each listed file, so the error names weights.bin."""
    real = Path.open

    def refusing(self, *args, **kwargs):
        if self.name == "weights.bin":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing)
    with pytest.raises(ArtifactError, match=r"weights.bin cannot be read \(Permission denied\)"):
        MedusaRuntime.load(art)



def test_a_bounded_read_holds_a_file_once(tmp_path):
    """Read in 1 MB chunks and joined, a file took twice its size in memory (a 1.5 GB graph file: 3.1 GB)."""
    import tracemalloc

    from medusa_export.runtime.bounded_read import read_bounded

    path = tmp_path / "big.bin"
    size = 64 << 20
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: no disk
    tracemalloc.start()
    try:
        data = read_bounded(path, 1 << 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data) == size
    assert peak < 1.5 * size, f"peak {peak >> 20} MiB reading a {size >> 20} MiB file"


def test_a_tokenizer_that_lacks_most_of_the_models_ids_is_refused():
    """A tokenizer.json cut to its first 1,000 tokens loaded against a 49,152-token model, and every id it lacks
    decoded to nothing, silently. A model may pad its vocabulary past its tokenizer's by up to 4,096 ids (or 5 %)."""
    from types import SimpleNamespace

    from medusa_export.runtime.tokenizer_limits import MAX_PADDED_IDS, check_vocabulary

    def tokenizer(n: int):
        vocab = {str(i): i for i in range(n)}
        return SimpleNamespace(get_vocab_size=lambda: n, get_vocab=lambda with_added_tokens: vocab)

    check_vocabulary(tokenizer(151_665), "tokenizer.json", 151_936)  # Qwen2's padding
    check_vocabulary(tokenizer(100_015), "tokenizer.json", 102_400)  # DeepSeek-LLM's
    check_vocabulary(tokenizer(1_000), "tokenizer.json", 1_000 + MAX_PADDED_IDS)
    for n, vocab in ((1_000, 49_152), (1_000, 1_001 + MAX_PADDED_IDS), (64, 63)):
        with pytest.raises(ArtifactError, match=f"has {n} tokens .* the model's vocabulary is {vocab}: it belongs"):
            check_vocabulary(tokenizer(n), "tokenizer.json", vocab)
