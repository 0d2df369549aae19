"""The transformers-release differences the project absorbs: the KV-cache keyword of the decoder's forward, and
the byte-level tokenizer a GGUF conversion writes (seen on transformers 5.17 against 5.25)."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from medusa_export.exporter.hf_compat import cache_kwargs
from medusa_export.exporter.model_loading import normalize_byte_level_tokenizer
from medusa_export.runtime import whole_file


class NewDecoder:
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None, **kwargs):
        return cache


class OldDecoder:
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                **kwargs):
        return past_key_values


def test_the_cache_goes_under_the_name_the_forward_takes():
    """A wrong keyword would land in **kwargs unnoticed and leave the caller's cache empty."""
    marker = object()
    for decoder in (NewDecoder(), OldDecoder()):
        kwargs = cache_kwargs(decoder, marker)
        assert len(kwargs) == 1 and decoder.forward(**kwargs) is marker


def test_a_compiled_wrapper_is_looked_through():
    """torch.compile's wrapper takes ``*args``: the wrapped module's forward decides."""

    class Compiled:
        def __init__(self, inner):
            self._orig_mod = inner

        def forward(self, *args, **kwargs):
            return self._orig_mod.forward(*args, **kwargs)

    marker = object()
    assert cache_kwargs(Compiled(NewDecoder()), marker) == {"cache": marker}
    assert cache_kwargs(Compiled(OldDecoder()), marker) == {"past_key_values": marker}


def test_the_installed_decoder_fills_the_callers_cache(tiny_model):
    """With this machine's transformers: a forward through `cache_kwargs` writes the new keys into our cache."""
    import torch
    from transformers import DynamicCache

    model = tiny_model
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([[1, 2, 3]])
    model.model(input_ids=ids, use_cache=True, **cache_kwargs(model.model, cache))
    assert cache.get_seq_length() == 3


def _byte_level_file(tmp_path, convert_like_5_17: bool):
    """A byte-level BPE whose vocabulary lacks the character of byte 0x13, as a GGUF conversion writes it."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    probe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    probe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    missing = probe.encode("\x13").tokens[0]
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(c for c in alphabet if c != missing)}}
    bpe = models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>" if convert_like_5_17 else None,
                     byte_fallback=convert_like_5_17)
    tok = Tokenizer(bpe)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = (decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " "),
                                      decoders.ByteLevel()]) if convert_like_5_17 else decoders.ByteLevel())
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_a_gguf_byte_level_tokenizer_is_normalized_to_the_models_own(tmp_path):
    old = _byte_level_file(tmp_path, convert_like_5_17=True)
    before = Tokenizer.from_file(str(old))
    assert 0 in before.encode("a\x13b").ids  # the control character became end-of-text
    assert normalize_byte_level_tokenizer(old) is True
    after = Tokenizer.from_file(str(old))
    assert 0 not in after.encode("a\x13b").ids
    assert after.decode(after.encode("x \u2581 y").ids) == "x \u2581 y"
    (tmp_path / "ref").mkdir()
    reference = Tokenizer.from_file(str(_byte_level_file(tmp_path / "ref", convert_like_5_17=False)))
    for text in ("a\x13b", "plain words, 123", "x \u2581 y", "<|endoftext|>"):
        assert after.encode(text).ids == reference.encode(text).ids
    assert normalize_byte_level_tokenizer(old) is False  # idempotent: nothing left to change


def test_other_tokenizers_are_left_alone(tmp_path):
    path = tmp_path / "tokenizer.json"
    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    text = path.read_text()
    assert normalize_byte_level_tokenizer(path) is False
    assert path.read_text() == text and json.loads(text)["model"]["unk_token"] == "[UNK]"


def test_a_file_it_cannot_read_or_write_is_left_to_the_loader(tmp_path, monkeypatch):
    assert normalize_byte_level_tokenizer(tmp_path / "missing.json") is False
    (tmp_path / "broken.json").write_text("{not json")
    assert normalize_byte_level_tokenizer(tmp_path / "broken.json") is False
    path = _byte_level_file(tmp_path, convert_like_5_17=True)
    before = path.read_text()

    def read_only(src, dst):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(whole_file.os, "replace", read_only)  # a read-only cache directory
    assert normalize_byte_level_tokenizer(path) is False
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json", "tokenizer.json"]  # no temporary left
