"""The library at its edges: stop strings completed before an unfinished character, byte-fallback text streamed
whole, trees of more nodes than the step-cost table measures, context drafts up to the KV capacity. Each test
failed before its fix."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_PROMPTS

from medusa_export.runtime.decode import GenerationConfig
from medusa_export.runtime.text_output import TextOutput


class _ByteTokenizer:
    """Tokens that are raw UTF-8 bytes, as byte-level BPE vocabularies have them: a token may hold complete
    characters followed by the first bytes of an unfinished one (SmolLM2's has 39, most a space + a lead byte)."""

    PIECES = {1: b"ab", 2: b"!\xf0\x9f", 3: b"\x9a\x80", 4: b"cd", 5: b"\xf0"}
    eos_token_ids = (0,)
    special_ids = frozenset({0})

    def decode(self, ids) -> str:
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("chunks", [[[1, 2, 3, 4]], [[1], [2], [3], [4]], [[1, 2, 5, 5, 5, 5, 5, 5]]])
def test_a_stop_string_before_an_unfinished_character_ends_at_its_token(chunks):
    """Token 2 completes the stop string "!" (its text: "!" and the first bytes of an emoji). The stop was searched
    only in text the detokenizer let out, and it holds back a token whose text ends in an unfinished character:
    the answer kept the tokens after the stop, up to the one that finished the character (or 64 more, for bytes that
    never form one), and counted them."""
    out = TextOutput(_ByteTokenizer(), GenerationConfig(stop_strings=("!",), max_new_tokens=50))
    events = [e for chunk in chunks if (e := out.push(chunk)) is not None]
    assert out.finish == "stop" and out.new == [1, 2] and out.text == "ab"
    assert [t for e in events for t in e.token_ids] == [1, 2]


def test_a_stop_string_in_held_text_still_streams_the_text_before_it():
    """The text before a stop string found in held-back text is shown (its characters are complete)."""
    out = TextOutput(_ByteTokenizer(), GenerationConfig(stop_strings=("b!",), max_new_tokens=50))
    assert out.push([1]).text == "a"  # "b" may begin the stop string: held
    assert out.push([2]).text == "" and out.finish == "stop" and out.text == "a" and out.new == [1, 2]


def _big_tree_choices() -> list[list[int]]:
    """300 paths of a 3-deep top-10 tree: 301 nodes, past the 256 row counts a step's cost is tabled for (trees of
    up to 1,024 paths load)."""
    deep = [[i, j, k] for i in range(10) for j in range(10) for k in range(10)]
    return [[i] for i in range(10)] + [[i, j] for i in range(10) for j in range(10)] + deep[:190]


@pytest.mark.parametrize("heads", [None, True])
def test_a_tree_of_more_than_256_nodes_decodes_exactly(tiny, make_tokenizer, heads):
    """A greedy request with a tree of more than 256 nodes failed with a bare IndexError (`StepCost.table` stopped
    at 256 rows, and the plan looked up the cost of the tree's row count)."""
    from medusa_export.runtime.generator import Generator
    from medusa_export.runtime.tree import Tree

    tree = Tree.from_choices(_big_tree_choices(), topk=10, num_heads=3)
    assert tree.num_nodes == 301
    gen = Generator(tiny.backend(3, max_seq=512), make_tokenizer(), tree)
    prompt = list(TINY_PROMPTS[0])
    res = gen.generate(prompt, GenerationConfig(max_new_tokens=12), heads=heads)
    assert res.token_ids == tiny.reference(prompt, 12)
    if heads:
        assert res.draft_depth >= 3  # the whole tree was verified (context drafts may go deeper)


@pytest.fixture(scope="module")
def byte_fallback():
    """A Llama-2 / Mistral style tokenizer: characters outside its vocabulary are byte tokens ``<0xNN>``, and its
    decoder turns a run of byte tokens that is not valid UTF-8 as a whole into one U+FFFD per byte."""
    from tokenizers import Tokenizer, decoders, models

    words = ["<unk>", "<s>", "</s>", "\u2581hello", "\u2581", "!"]
    vocab = {w: i for i, w in enumerate(words)} | {f"<0x{b:02X}>": len(words) + b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok, lambda text: [vocab[f"<0x{b:02X}>"] for b in text.encode()]


@pytest.mark.parametrize("text", ["語語語", "日本語のテキスト", "🚀🔥 語"])
def test_byte_fallback_characters_stream_whole(byte_fallback, text):
    """A character after another made of byte tokens streamed as U+FFFDs: the decode window started at the last
    byte token of the character before (four tokens of context), inside a character, and the decoder made the
    whole run of byte tokens U+FFFDs ("語語語" streamed as "語語���")."""
    from medusa_export.runtime.detokenize import IncrementalDetokenizer

    tok, as_bytes = byte_fallback
    ids = [i for ch in text for i in ([4] if ch == " " else as_bytes(ch))]  # 4: "▁", a space
    assert tok.decode(ids) == text
    detok = IncrementalDetokenizer(lambda x: tok.decode(list(x)))
    deltas = [detok.push([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == tok.decode(ids)
    assert "\ufffd" not in "".join(deltas)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_byte_fallback_text_streams_exactly_in_any_chunks(byte_fallback, data):
    """Valid text of byte-token characters, words and spaces, pushed in chunks of any size: the deltas add up to the
    full decode, with no U+FFFD."""
    from medusa_export.runtime.detokenize import IncrementalDetokenizer

    tok, as_bytes = byte_fallback
    pieces = data.draw(st.lists(st.sampled_from(["語", "é", "🚀", "ж", " ", "!", "hello"]), min_size=1, max_size=30))
    ids = [i for p in pieces for i in ([3] if p == "hello" else [4] if p == " " else [5] if p == "!" else as_bytes(p))]
    detok, deltas, i = IncrementalDetokenizer(lambda x: tok.decode(list(x))), [], 0
    for n in data.draw(st.lists(st.integers(1, 5), max_size=30)):
        deltas.append(detok.push(ids[i:i + n]))
        i += n
    deltas.append(detok.push(ids[i:]))
    assert "".join(deltas) + detok.flush() == tok.decode(ids)
    assert "\ufffd" not in "".join(deltas)


def test_context_drafts_on_a_repetitive_prompt_up_to_the_kv_capacity_are_exact(artifact):
    """Checked, not a defect: drafts that would run past the KV buffer are cut to it, and the answer to its end is
    exactly plain greedy decoding's, alone and batched."""
    from medusa_export.runtime.api import MedusaRuntime

    prompt = [5, 6, 7, 8, 9] * 20  # 100 of the artifact's 128 positions: long repeated drafts near the end
    with MedusaRuntime.load(artifact, threads=1) as rt:
        plain = rt.generate(prompt, max_new_tokens=10 ** 9, ignore_eos=True, medusa=False)
        assert plain.finish_reason == "length" and plain.new_tokens == 128 - len(prompt) + 1
        for options in ({}, {"context_drafts": False}):
            assert rt.generate(prompt, max_new_tokens=10 ** 9, ignore_eos=True, **options).token_ids == plain.token_ids
        batched = rt.generate_many([prompt, prompt[3:]], max_new_tokens=10 ** 9, ignore_eos=True)
        assert batched[0].token_ids == plain.token_ids
