"""Streaming text: incremental detokenization equals a full decode, and costs the same per token at any length."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_export.runtime.detokenize import CONTEXT_TOKENS, IncrementalDetokenizer

CORPUS = ["Les élèves étudient à l'école.", "日本語のテキストも少し。", "Emoji: 🚀🔥 and ümlauts: Grüße!",
          "def f(x):\n    return x * 2  # code", "Plain ASCII text with spaces and punctuation..."] * 4


@pytest.fixture(scope="module")
def byte_bpe():
    """A small byte-level BPE (GPT-2 style, like SmolLM2's): multi-byte characters span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<eos>"]))
    return tok


def _stream(decode, ids, chunks):
    detok = IncrementalDetokenizer(decode)
    out, i = [], 0
    for n in chunks:
        out.append(detok.push(ids[i:i + n]))
        i += n
    out.append(detok.push(ids[i:]))
    return out, detok.flush(cut=True)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_deltas_add_up_to_the_full_decode(byte_bpe, data):
    vocab = byte_bpe.get_vocab_size()
    ids = data.draw(st.lists(st.integers(1, vocab - 1), min_size=1, max_size=60), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 5), max_size=30), label="chunks")
    decode = lambda x: byte_bpe.decode(list(x), skip_special_tokens=True)  # noqa: E731
    deltas, tail = _stream(decode, ids, chunks)
    # unfinished characters are held back, and one left unfinished at the end is dropped
    assert "".join(deltas) + tail == decode(ids).rstrip("\ufffd")
    assert not any(d.endswith("\ufffd") for d in deltas + [tail])


def test_an_answer_cut_inside_a_character_ends_before_it(byte_bpe):
    """The budget ran out after the first of an emoji's byte tokens: the text ends with what came before."""
    ids = byte_bpe.encode("Emoji: 🚀").ids
    decode = lambda x: byte_bpe.decode(list(x))  # noqa: E731
    cut = next(n for n in range(len(ids), 0, -1) if decode(ids[:n]).endswith("\ufffd"))
    deltas, tail = _stream(decode, ids[:cut], [1] * cut)
    assert "".join(deltas) + tail == "Emoji: "


def test_only_an_answer_cut_by_its_budget_drops_an_unfinished_end(byte_bpe):
    """Ended otherwise (an end-of-sequence token), the text is the whole decode, U+FFFD included."""
    ids = byte_bpe.encode("Emoji: 🚀").ids
    decode = lambda x: byte_bpe.decode(list(x))  # noqa: E731
    cut = next(n for n in range(len(ids), 0, -1) if decode(ids[:n]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(decode)
    assert detok.push(ids[:cut]) + detok.flush() == decode(ids[:cut])


def test_real_text_streams_exactly(byte_bpe):
    text = " ".join(CORPUS)
    ids = byte_bpe.encode(text).ids
    decode = lambda x: byte_bpe.decode(list(x))  # noqa: E731
    deltas, tail = _stream(decode, ids, [1] * len(ids))
    assert "".join(deltas) == text and tail == ""
    assert "\ufffd" not in "".join(deltas)


def test_decode_work_per_token_stays_flat():
    """The quadratic version decoded the whole output at every step; here each push decodes a short window."""
    seen = []

    def decode(ids):
        seen.append(len(ids))
        return " ".join(f"t{i}" for i in ids)

    detok = IncrementalDetokenizer(decode)
    rng = np.random.default_rng(0)
    pushed = 0
    while pushed < 2000:
        n = int(rng.integers(1, 4))  # Medusa steps accept 1..3 tokens
        detok.push(list(range(pushed, pushed + n)))
        pushed += n
    assert max(seen) <= CONTEXT_TOKENS + 3


def test_stop_string_helpers():
    """A tail that may begin a stop string is held back; a stop found in held text cuts there (the decode loop
    itself is covered by test_decode_lossless's stop-string test)."""
    from medusa_export.runtime.text_output import _find_stop, _safe_prefix

    assert _safe_prefix("hello wor", ("world",)) == "hello "
    assert _find_stop("wor", "ld and more", ("world",)) == 0  # began in the shown tail: cut at once
    assert _find_stop("", "say world now", ("world",)) == 4


@pytest.mark.parametrize("chunks", [[[5, 6, 7, 8, 9]], [[5], [6, 7, 8, 9]], [[5], [6], [7], [8], [9]]])
def test_a_stop_string_ends_the_answer_at_the_token_that_completes_it(make_tokenizer, chunks):
    """However the tokens arrive (one speculative step, or one per step as plain decoding makes them), the answer
    keeps and counts the tokens up to the one that completes the stop string: the usage reported with Medusa on
    once counted every token of the last accepted step (14 vs 9 completion tokens for the same text)."""
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.text_output import TextOutput

    out = TextOutput(make_tokenizer(), GenerationConfig(stop_strings=("t7",)))
    events = [e for c in chunks if (e := out.push(c)) is not None]
    assert out.finish == "stop" and out.new == [5, 6, 7] and out.text == "t5 t6 "
    assert [t for e in events for t in e.token_ids] == [5, 6, 7]


class _Counting:
    """A tokenizer for `TextOutput` whose decode records the length of every window it is asked for."""

    def __init__(self, tok, eos: int) -> None:
        self.tok, self.eos_token_ids, self.special_ids, self.windows = tok, (eos,), frozenset({eos}), []

    def decode(self, ids) -> str:
        self.windows.append(len(ids))
        return self.tok.decode(list(ids), skip_special_tokens=True)


def _byte_token(tok, b: int) -> int:
    """The id of the byte-level token for the single byte ``b``."""
    from tokenizers import pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [x for x in range(256) if x not in printable]
    ch = chr(b) if b in printable else chr(256 + others.index(b))
    assert ch in pre_tokenizers.ByteLevel.alphabet()
    return tok.token_to_id(ch)


def test_a_run_of_skipped_end_tokens_keeps_the_decode_window_short(byte_bpe):
    """Under ignore_eos, end-of-sequence tokens (special: the decode skips them) stayed in the window, which grew by
    one token per token: 1000 of them made each step decode 1000 tokens (quadratic). The text is unchanged."""
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.text_output import TextOutput

    eos = byte_bpe.token_to_id("<eos>")
    tok = _Counting(byte_bpe, eos)
    ids = byte_bpe.encode("Grüße").ids + [eos] * 1000 + byte_bpe.encode(" 🚀 done").ids
    out = TextOutput(tok, GenerationConfig(ignore_eos=True, max_new_tokens=len(ids)))
    streamed = "".join(e.text for t in ids if (e := out.push([t])) is not None)
    assert out.finish == "length" and out.new == ids
    assert streamed == out.text == byte_bpe.decode(ids, skip_special_tokens=True) == "Grüße 🚀 done"
    assert max(tok.windows) <= CONTEXT_TOKENS + 4


def test_bytes_that_never_form_a_character_stream_in_a_bounded_window(byte_bpe):
    """A run of stray continuation bytes (each decodes to U+FFFD, so each step's text looked unfinished) was held
    back whole: nothing streamed, and the window grew without bound. Now a held run is cut where its text splits
    cleanly; the streamed text is still exactly the full decode."""
    from medusa_export.runtime.detokenize import MAX_HELD

    stray, lead = _byte_token(byte_bpe, 0x80), _byte_token(byte_bpe, 0xE2)
    ids = [stray] * 300 + [lead] * 100 + byte_bpe.encode("€ and Grüße").ids + [stray] * 3
    windows = []

    def decode(x):
        windows.append(len(x))
        return byte_bpe.decode(list(x))

    deltas, tail = _stream(decode, ids, [1] * len(ids))
    assert max(windows) <= MAX_HELD + 8
    assert "".join(deltas) + tail == byte_bpe.decode(ids).rstrip("\ufffd")
    assert next(i for i, d in enumerate(deltas) if d) <= MAX_HELD + 1  # text flows before the run ends


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_byte_garbage_streams_exactly_in_a_bounded_window(byte_bpe, data):
    from medusa_export.runtime.detokenize import MAX_HELD

    pool = [_byte_token(byte_bpe, b) for b in (0x80, 0x82, 0xAC, 0xE2, 0xF0, 0x9F)] + byte_bpe.encode("a €").ids
    ids = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=300), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=100), label="chunks")
    windows = []

    def decode(x):
        windows.append(len(x))
        return byte_bpe.decode(list(x))

    detok = IncrementalDetokenizer(decode)
    text, i = "", 0
    for n in [*chunks, len(ids)]:
        text += detok.push(ids[i:i + n])
        i += n
    text += detok.flush()
    assert max(windows) <= MAX_HELD + 8 + 4
    assert text == byte_bpe.decode(ids)
