"""A tokenizer.json whose components multiply text (found by an attack: a normalizer of eight Replace steps, each
turning "H" into 16 of them, grew `generate` to 23 GB on "Hi"; the same as a decoder took down every request) is
refused when it loads, with one line naming the file and the component; real tokenizers still load."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from medusa_export.runtime.errors import ArtifactError
from medusa_export.runtime.tokenizer import ChatTokenizer
from medusa_export.runtime.tokenizer_limits import MAX_GROWTH, check_growth, growth_factors, regex_min_bytes

FIX = "rebuild the artifact with the model's own tokenizer"
H16 = {"type": "Replace", "pattern": {"String": "H"}, "content": "H" * 16}  # 16 ** 8 = 4 G characters per "H"


def charsmap(rules: dict[str, str]) -> bytes:
    """A SentencePiece ``precompiled_charsmap``: little-endian u32 trie size, a darts-clone double array (each node's
    children in a block of 256 units of its own, its leaf at the block's label-0 unit), then NUL-ended replacements."""
    pool, values, units, blocks = b"", {}, {}, [1]
    for key, replacement in rules.items():
        values[key.encode()] = len(pool)
        pool += replacement.encode() + b"\0"

    def node(index: int, prefix: bytes) -> None:
        base = 256 * blocks[0]
        blocks[0] += 1
        units[index] = units.get(index, 0) | ((index ^ base) << 10) | (1 << 8 if prefix in values else 0)
        if prefix in values:
            units[base] = (1 << 31) | values[prefix]
        for label in sorted({k[len(prefix)] for k in values if len(k) > len(prefix) and k.startswith(prefix)}):
            units[base ^ label] = label
            node(base ^ label, prefix + bytes([label]))

    node(0, b"")
    trie = b"".join(units.get(i, 0).to_bytes(4, "little") for i in range(max(units) + 1))
    return len(trie).to_bytes(4, "little") + trie + pool


# SentencePiece's NFKC map at its worst: U+FDFA (3 bytes) becomes 33 bytes
NFKC_LIKE = charsmap({"\ufdfa": "صلى الله عليه وسلم", "½": "1⁄2", "\t": " ", "ﬁ": "fi"})


def _toy_json(make_tokenizer) -> dict:
    return json.loads(make_tokenizer().tokenizer.to_str())


def _load(tmp_path: Path, data: dict) -> ChatTokenizer:
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    return ChatTokenizer.from_directory(tmp_path)


def _refused(tmp_path: Path, data: dict, *words: str) -> str:
    """Loading ``data`` as tokenizer.json is refused, fast, with one line naming the file, ``words`` and the fix."""
    start = time.perf_counter()
    with pytest.raises(ArtifactError) as caught:
        _load(tmp_path, data)
    message = str(caught.value)
    assert time.perf_counter() - start < 5, "refused only after running it"
    assert "\n" not in message and message.startswith(str(tmp_path / "tokenizer.json")), message
    for word in (*words, FIX):
        assert word in message, message
    return message


# ------------------------------------------------------------------ the attack and its variants are refused
def test_a_normalizer_of_eight_exploding_replace_steps_is_refused_at_load(tmp_path, make_tokenizer, monkeypatch):
    data = _toy_json(make_tokenizer)
    data["normalizer"] = {"type": "Sequence", "normalizers": [H16] * 8}
    # Before anything encodes with it (the chat template's check would tokenize "Hello": 4 G characters per H)
    monkeypatch.setattr(ChatTokenizer, "__post_init__", lambda self: pytest.fail("built before the check"))
    message = _refused(tmp_path, data, "its normalizer (Sequence with Replace", "when encoding",
                       f"at most {MAX_GROWTH}")
    assert "4.29e+09 times longer" in message


def test_a_decoder_that_explodes_on_every_decode_is_refused_at_load(tmp_path, make_tokenizer):
    """It passed loading and multiplied the text of every answer (the server's every request)."""
    data = _toy_json(make_tokenizer)
    data["decoder"] = {"type": "Sequence", "decoders": [{"type": "Fuse"}] + [H16] * 8}
    _refused(tmp_path, data, "its decoder (Sequence with Replace", "when decoding")


@pytest.mark.parametrize("slot, component, words", [
    ("normalizer", {"type": "Prepend", "prepend": "x" * 100}, ["normalizer (Prepend, x101)"]),
    # A pattern that can match nothing matches before every character
    ("normalizer", {"type": "Replace", "pattern": {"Regex": "x*"}, "content": "H" * 40}, ["normalizer (Replace, x81)"]),
    ("decoder", {"type": "Replace", "pattern": {"Regex": "(?i)H"}, "content": "H" * 65}, ["decoder (Replace"]),
    ("normalizer", {"type": "Sequence", "normalizers": [
        {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap({"H": "H" * 9})).decode()},
        {"type": "NFKC"}]}, ["Sequence with Precompiled, NFKC", "x99"]),
    ("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": False}] * 4},
     ["pre_tokenizer (Sequence with ByteLevel, x256)"]),
    ("post_processor", {"type": "TemplateProcessing", "special_tokens": {},
                        "single": [{"Sequence": {"id": "A", "type_id": 0}}] * 100,
                        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]},
     ["post_processor (TemplateProcessing, x100)"]),
])
def test_every_slot_that_can_lengthen_text_is_bounded(tmp_path, make_tokenizer, slot, component, words):
    data = _toy_json(make_tokenizer)
    data[slot] = component
    _refused(tmp_path, data, *words)


def test_components_that_each_pass_are_refused_together(tmp_path, make_tokenizer):
    """Encoding runs the normalizer, then the pre-tokenizer: their factors multiply (17 x 4 = 68)."""
    data = _toy_json(make_tokenizer)
    data["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "x" * 17}
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    _refused(tmp_path, data, "normalizer (Replace, x17) and pre_tokenizer (ByteLevel, x4)", "up to 68 times")


def test_nesting_and_component_counts_are_bounded(tmp_path, make_tokenizer):
    """Each component is a pass over every text: thousands of harmless ones cost as much as one that explodes."""
    data = _toy_json(make_tokenizer)
    nested: dict = {"type": "NFC"}
    for _ in range(9):
        nested = {"type": "Sequence", "normalizers": [nested]}
    data["normalizer"] = nested
    _refused(tmp_path, data, "its normalizer nests Sequences more than 8 deep", "cannot be bounded")
    data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}] * 65}
    _refused(tmp_path, data, "its normalizer has more than 64 components")


def test_a_component_of_an_unknown_type_cannot_be_bounded():
    class Fake:  # what a newer `tokenizers` could serialize
        def __getstate__(self) -> bytes:
            return b'{"type": "Repeat", "times": 1000}'

    class FakeTokenizer:
        normalizer, pre_tokenizer, post_processor, decoder = Fake(), None, None, None

    with pytest.raises(ValueError, match="type 'Repeat' that this runtime does not know"):
        growth_factors(FakeTokenizer())
    with pytest.raises(ArtifactError, match="x.json: its normalizer has a component of type 'Repeat'"):
        check_growth(FakeTokenizer(), "x.json")


# ------------------------------------------------------------------ the bounds are bounds of what the library does
def _grown(slot: str, component, text) -> float:
    """How many times longer (UTF-8 bytes) the library makes ``text`` (a list of tokens for a decoder)."""
    if slot == "normalizer":
        return len(component.normalize_str(text).encode()) / len(text.encode())
    if slot == "pre_tokenizer":
        return sum(len(piece.encode()) for piece, _ in component.pre_tokenize_str(text)) / len(text.encode())
    return len(component.decode(text).encode()) / sum(len(t.encode()) for t in text)


@pytest.mark.parametrize("slot, component, text, worst", [
    ("normalizer", normalizers.Replace("H", "H" * 16), "HHH", 16),
    ("normalizer", normalizers.Replace(Regex("x*"), "ab"), "h", 5),
    ("normalizer", normalizers.Replace(Regex(r"\A▁"), "▁▁"), "▁", 2),
    ("normalizer", normalizers.Prepend("▁"), "a", 4),
    ("normalizer", normalizers.NFKC(), "\ufdfa", 11),
    ("normalizer", normalizers.NFD(), "\u0390", 3),
    ("normalizer", normalizers.Lowercase(), "\u0130", 1.5),
    ("normalizer", normalizers.BertNormalizer(), "한", 3),  # NFD (strip_accents) splits it into 3 jamo
    ("normalizer", normalizers.ByteLevel(), "\x00", 2),
    ("normalizer", normalizers.Precompiled(charsmap({"H": "H" * 40})), "H", 40),
    ("normalizer", normalizers.Precompiled(NFKC_LIKE), "\ufdfa", 11),
    ("pre_tokenizer", pre_tokenizers.Metaspace(), "a", 4),
    ("pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False), "\x00", 4),
    ("decoder", decoders.BPEDecoder(suffix=""), ["a", "b"], 2),
    ("decoder", decoders.CTC(word_delimiter_token=""), ["a", "b"], 3),
    ("decoder", decoders.WordPiece(), ["a", "b"], 1.5),
    ("decoder", decoders.ByteLevel(), ["Ã"], 1.5),
    ("decoder", decoders.Replace(Regex(""), "xy"), ["a"], 5),
])
def test_each_factor_bounds_what_the_library_does(slot, component, text, worst):
    """The library, on the text that grows most under each component, stays within the factor computed for it."""
    tok = Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    setattr(tok, slot, component)
    assert _grown(slot, component, text) == pytest.approx(worst)
    assert worst <= growth_factors(tok)[slot]


@pytest.mark.parametrize("pattern, shortest", [
    (" {2,}", 2), (r"\s+", 1), (r"\A▁", 3), (r"\A +| +\z", 1), (r"\s{2,}|[\n\r\t]", 1), ("(?:ab|c)d", 2),
    ("(ab)+c", 3), ("a{3}", 3), ("[^abc]{2,5}", 2), ("[[:alpha:]]", 1), ("é+", 2),
    ("", 0), ("x*", 0), ("a{,3}", 0), ("a|", 0),
    # Where Oniguruma may read it otherwise (case folding "ss" onto "ß", \K cutting the match, a lone "{", a
    # leading "]", nested classes, look-arounds, properties), no bound
    ("(?i)ss", 0), (r"a\Kb", 0), ("a{", 0), ("[]a]", 0), ("[a[b]]", 0), ("(?=a)a", 0), (r"\p{L}+", 0), ("a)", 0),
])
def test_a_replace_patterns_shortest_match(pattern, shortest):
    assert regex_min_bytes(pattern) == shortest


# ------------------------------------------------------------------ real tokenizers load
def test_a_llama_2_tokenizer_loads(tmp_path):
    """Llama-2's tokenizer.json (SentencePiece BPE, byte fallback): Prepend + Replace(" ", "▁") grows 12-fold."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "▁": 259, "H": 260,
             "i": 261, "▁H": 262, "▁Hi": 263}
    tok = Tokenizer(models.BPE(vocab, [("▁", "H"), ("▁H", "i")], unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = ChatTokenizer.from_directory(tmp_path)
    assert growth_factors(loaded.tokenizer) == {"normalizer": 12.0, "decoder": 1.0}
    assert loaded.encode("Hi") == [263] and loaded.decode([263, 3 + 0xC3, 3 + 0xA9]) == "Hié"


def test_a_t5_like_tokenizer_with_an_nfkc_charsmap_loads(tmp_path):
    """SentencePiece's NFKC charsmap (longest replacement 33 bytes, for the 3-byte U+FDFA), its run of spaces made one,
    and Metaspace: 11 x 4 = 44, within the bound."""
    tok = Tokenizer(models.Unigram([("<unk>", 0.0), ("▁", -1.0), ("a", -2.0)], 0, False))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(NFKC_LIKE),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    tok.decoder = decoders.Metaspace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = ChatTokenizer.from_directory(tmp_path)
    assert growth_factors(loaded.tokenizer) == {"normalizer": 11.0, "pre_tokenizer": 4.0, "decoder": 1.0}
    assert loaded.encode("a  a") == [1, 2, 1, 2]


def test_the_tests_tiny_tokenizers_pass(make_tokenizer):
    from conftest import make_chat_tokenizer

    for tok in (make_tokenizer(), make_chat_tokenizer()):
        check_growth(tok.tokenizer, "tiny")


def test_the_default_models_tokenizer_loads(default_model):
    """SmolLM2's byte-level BPE (loaded through the check): 2-fold when encoding, 1.5 when decoding."""
    assert growth_factors(default_model.tokenizer.tokenizer) == {"pre_tokenizer": 2.0, "post_processor": 1.0,
                                                                 "decoder": 1.5}


# ------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("slot", ["normalizer", "decoder"])
def test_generate_on_a_tampered_artifact_exits_2_with_one_line(artifact, tmp_path, slot):
    pytest.importorskip("onnxruntime")
    from test_cli import assert_one_line_error, cli

    art = shutil.copytree(artifact, tmp_path / "art")
    data = json.loads((art / "tokenizer.json").read_text())
    members = "normalizers" if slot == "normalizer" else "decoders"
    data[slot] = {"type": "Sequence", members: [H16] * 3}  # 4096-fold: refused, and harmless were it not
    (art / "tokenizer.json").write_bytes(blob := json.dumps(data).encode())
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    (art / "manifest.json").write_text(json.dumps(manifest))
    result = cli("generate", str(art), "-p", "t1 t2", "--max-new-tokens", "2")
    assert_one_line_error(result, "tokenizer.json", f"its {slot} (Sequence with Replace, x4.1e+03)", FIX)
