"""Corpus drafts: the n-gram table counts what followed each phrase, proposes its greedy continuation of the longest
known suffix, refuses a malformed file with a one-line error, and greedy decoding that drafts from it gives exactly
the tokens of plain greedy decoding, alone and batched."""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_PROMPTS, TINY_VOCAB, run_decode

from medusa_export.exporter.corpus_table import count_table, encode_texts
from medusa_export.runtime.context_drafts import ContextIndex, Draft
from medusa_export.runtime.corpus_drafts import FILE, CorpusTable, bits_for, rate_kind
from medusa_export.runtime.errors import ArtifactError, InputError
from medusa_export.runtime.manifest import DraftsRecord, FieldError, Manifest, file_record
from medusa_export.runtime.speculation import Speculation

# ------------------------------------------------------------------------------------------------ the table


def _brute_force(streams: list[list[int]], n: int, min_count: int, weights: list[int] | None = None) -> dict:
    """n-gram -> (most frequent next token, smallest id on ties; its share in 255ths), kept from min_count on; stream
    i counted ``weights[i]`` times."""
    follow: dict[tuple, Counter] = {}
    for s, w in zip(streams, weights or [1] * len(streams)):
        for i in range(len(s) - n):
            follow.setdefault(tuple(s[i:i + n]), Counter())[s[i + n]] += w
    out = {}
    for gram, counts in follow.items():
        best = min(counts, key=lambda t: (-counts[t], t))
        if counts[best] >= min_count:
            out[gram] = (best, round(255 * counts[best] / sum(counts.values())))
    return out


@given(streams=st.lists(st.lists(st.integers(0, 5), max_size=30), max_size=6), min_count=st.integers(1, 3),
       vocab=st.sampled_from([6, 1 << 16]), data=st.data())
@settings(max_examples=80, deadline=None)
def test_the_table_keeps_each_phrases_most_frequent_next_token(streams, min_count, vocab, data):
    """A vocabulary of 2**16 takes 16 bits a token: a 4-gram and its next token no longer fit one 64-bit word."""
    weights = data.draw(st.none() | st.lists(st.integers(1, 4), min_size=len(streams), max_size=len(streams)))
    table = count_table([np.asarray(s, np.int64) for s in streams], vocab_size=vocab, min_count=min_count,
                        weights=weights)
    assert table.max_ngram == 4
    bits = bits_for(vocab)
    for n in range(1, 5):
        expected = _brute_force(streams, n, min_count, weights)
        keys = table.keys[n - 1]
        assert len(keys) == len(expected) and np.all(np.diff(keys.astype(np.float64)) > 0)
        for gram, (token, share) in expected.items():
            found = table.lookup(list(gram))
            assert found is not None and found[1] == n
            i = int(np.searchsorted(keys, np.uint64(sum(t << (bits * (n - 1 - j)) for j, t in enumerate(gram)))))
            assert (int(table.nexts[n - 1][i]), int(table.shares[n - 1][i])) == (token, share)


def test_phrases_never_span_two_texts():
    table = count_table([np.array([1, 2]), np.array([3, 4])], vocab_size=8, min_count=1)
    assert table.lookup([2]) is None  # 2 ended the first text: nothing followed it
    assert table.lookup([1]) == (2, 1, 1.0) and table.lookup([9, 3])[:2] == (4, 1)


def test_a_draft_follows_the_longest_known_suffix_one_token_at_a_time():
    # "1 2 3 4" three times, "2 9" once: after 2, 3 is the most frequent (and after 1 2, only 3 ever came).
    streams = [np.array([1, 2, 3, 4, 5])] * 3 + [np.array([7, 2, 9])]
    table = count_table(streams, vocab_size=16, min_count=1)
    draft = table.propose([8, 1, 2], 5)
    assert draft.tokens == [3, 4, 5] and draft.ngram == 2  # the chain stops where nothing ever followed
    assert draft.rate_kind == rate_kind(2, 1.0) and table.propose([6], 3) is None
    assert table.propose([7, 2], 1).tokens == [9]  # the longer match wins over the more frequent shorter one
    assert table.propose([11, 2], 2).tokens == [3, 4]  # an unseen pair backs off to "2"


def test_corpus_text_is_read_as_plain_text():
    from conftest import make_chat_tokenizer

    tok = make_chat_tokenizer()
    streams = encode_texts(tok, ["t1 t2 t3", "t4 <|im_end|> t5", "", "t6"], batch=2)
    assert [s.tolist() for s in streams] == [[1, 2, 3], [4, 0, 5], [6]]  # markup is a word (unknown: t0)
    assert all(tok.special_ids.isdisjoint(s.tolist()) for s in streams)


def test_save_and_load_round_trip(tmp_path):
    table = count_table([np.arange(40) % 7], vocab_size=TINY_VOCAB, min_count=1)
    table.save(tmp_path / FILE)
    back = CorpusTable.load(tmp_path / FILE, TINY_VOCAB)
    assert back.entries == table.entries and back.propose([1, 2], 4) == table.propose([1, 2], 4)


@pytest.mark.parametrize("damage", ["garbage", "missing", "other_vocab", "unsorted", "token_out_of_range", "no_meta",
                                    "extra_member", "compressed", "forged_header", "encrypted", "forged_directory"])
def test_a_malformed_table_is_a_one_line_artifact_error(tmp_path, damage):
    path = tmp_path / FILE
    table = count_table([np.arange(40) % 7], vocab_size=TINY_VOCAB, min_count=1)
    arrays = {"meta": np.array([table.bits, table.max_ngram], np.int64)}
    for n in range(1, table.max_ngram + 1):
        arrays |= {f"keys_{n}": table.keys[n - 1], f"next_{n}": table.nexts[n - 1], f"share_{n}": table.shares[n - 1]}
    if damage == "unsorted":
        arrays["keys_2"] = arrays["keys_2"][::-1].copy()
    if damage == "token_out_of_range":
        arrays["next_1"] = arrays["next_1"] + np.uint32(TINY_VOCAB)
    if damage == "no_meta":
        del arrays["meta"]
    if damage == "extra_member":
        arrays["payload"] = np.zeros(3)
    np.savez(path, **arrays)
    if damage == "compressed":  # a compressed member could unpack to any size
        np.savez_compressed(path, **arrays)
    if damage == "forged_header":  # a header claiming 10^13 keys over 16 bytes of data
        import io
        import zipfile

        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<u8", "fortran_order": False, "shape": (10 ** 13,)})
        with zipfile.ZipFile(path, "w") as z:
            for name, array in arrays.items():
                if name != "keys_1":
                    z.writestr(f"{name}.npy", _npy_bytes(array))
            z.writestr("keys_1.npy", header.getvalue() + bytes(16))
    if damage in ("encrypted", "forged_directory"):  # zipfile raised RuntimeError, and EOFError (the CLI: "interrupted")
        _patch_directory(path, b"keys_1.npy", damage)
    if damage == "garbage":
        path.write_bytes(b"not a zip file")
    if damage == "missing":
        path.unlink()
    with pytest.raises(ArtifactError) as e:
        CorpusTable.load(path, 1 << 20 if damage == "other_vocab" else TINY_VOCAB)
    assert "\n" not in str(e.value) and "rebuild the artifact" in str(e.value)


def _patch_directory(path, member: bytes, damage: str) -> None:
    """Set a member's encryption flag (local and central headers), or make the central directory claim 4 GiB."""
    import struct

    data = bytearray(path.read_bytes())
    for signature, flags_at, sizes_at in ((b"PK\x03\x04", 6, None), (b"PK\x01\x02", 8, 20)):
        i = data.find(signature)
        while i >= 0:
            name_at = i + (30 if signature == b"PK\x03\x04" else 46)
            if data[name_at:name_at + len(member)] == member:
                if damage == "encrypted":
                    data[i + flags_at] |= 1
                elif sizes_at is not None:
                    struct.pack_into("<II", data, i + sizes_at, 0xFFFFFFF0, 0xFFFFFFF0)
            i = data.find(signature, i + 4)
    path.write_bytes(bytes(data))


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


# ---------------------------------------------------------------------------------------- choosing a draft


def test_the_draft_expected_to_give_more_tokens_is_chosen():
    spec = Speculation()
    spec.corpus = count_table([np.array([1, 2, 3, 4])] * 5, vocab_size=16, min_count=1)
    seq = [1, 2]  # the context holds no earlier "2": only the table drafts
    assert spec.propose(ContextIndex(seq), 3) == Draft([3, 4], 2, rate_kind(2, 1.0))
    seq = [5, 6, 7, 5, 6, 7, 5, 6]  # "7 5 6" came before, followed by "7 5 6": a 3-gram context draft
    context = ContextIndex(seq)
    assert spec.propose(context, 3) == context.propose(3)  # the table knows neither 6 nor 5 6
    for _ in range(100):  # the context's 2-gram drafts turn out always wrong, the table's always right
        spec.rates.record(3, proposed=1, accepted=0)
    spec.corpus = count_table([np.array([5, 6, 9, 9])] * 5, vocab_size=16, min_count=1)
    assert spec.propose(context, 3).tokens == [9, 9, 9]


# ------------------------------------------------------------------------------------------- lossless decoding


def _own_answers_table(tiny, backend, vocab: int = TINY_VOCAB) -> CorpusTable:
    """A table of the tiny model's own greedy answers: its drafts get accepted."""
    streams = [np.asarray(list(p) + tiny.reference(p, 40), np.int64) for p in TINY_PROMPTS]
    return count_table(streams, vocab_size=vocab, min_count=1)


@pytest.mark.parametrize("spec_name", [None, "chain-2", "mc_sim_7b_63"])
def test_greedy_with_corpus_drafts_equals_plain_greedy(tiny, spec_name, clock_free_steps):
    from medusa_export.runtime.decode import DecodeStats, GenerationConfig, decode
    from medusa_export.runtime.tree import Tree, load_choices

    from conftest import take

    backend = tiny.backend(4, "shared")
    tree = Tree.from_choices(load_choices(spec_name), topk=10, num_heads=4) if spec_name else None
    spec = Speculation()
    spec.corpus = _own_answers_table(tiny, backend)
    corpus_tried = spec.rates.proposed[CORPUS_KINDS].sum()
    accepted = 0
    for prompt in [*TINY_PROMPTS, [9, 9, 9], [5, 6, 7, 8, 10]]:
        stats = DecodeStats()
        tokens = take(decode(backend.new_session(), list(prompt), tree, GenerationConfig(medusa=True), stats, spec), 40)
        assert tokens == tiny.reference(prompt, 40), prompt
        accepted += stats.accepted_context
    assert accepted > 0
    assert spec.rates.accepted[CORPUS_KINDS].sum() > _prior_accepted(spec, CORPUS_KINDS)  # the table's drafts were
    assert spec.rates.proposed[CORPUS_KINDS].sum() > corpus_tried  # verified, and some accepted


CORPUS_KINDS = slice(rate_kind(1, 0.0), None)  # the acceptance classes of corpus drafts


def _prior_accepted(spec: Speculation, kinds: slice) -> float:
    return Speculation().rates.accepted[kinds].sum()


def _with_table(artifact, tmp_path, table: CorpusTable):
    out = tmp_path / "with-table"
    shutil.copytree(artifact, out)
    table.save(out / FILE)
    m = Manifest.read(out)
    record = DraftsRecord(file=FILE, source="test", corpus_tokens=1, max_ngram=table.max_ngram, min_count=1,
                          entries=table.entries)
    m.replace(files={**m.files, FILE: file_record(out / FILE)}, drafts=record).write(out)
    return out


def test_an_artifact_with_a_table_drafts_from_it_alone_and_batched(artifact, tmp_path, clock_free_steps):
    from medusa_export.runtime import MedusaRuntime

    with MedusaRuntime.load(artifact, plain=True) as rt:
        prompts = [list(p) for p in TINY_PROMPTS]
        plain = [rt.generate(p, max_new_tokens=24, medusa=False).token_ids for p in prompts]
        tok_streams = [np.asarray(p + a, np.int64) for p, a in zip(prompts, plain)]
    art = _with_table(artifact, tmp_path, count_table(tok_streams, vocab_size=TINY_VOCAB, min_count=1))
    with MedusaRuntime.load(art) as rt:
        assert rt.generator.spec.corpus is not None and rt.manifest.drafts.entries > 0
        alone = [rt.generate(p, max_new_tokens=24) for p in prompts]
        assert rt.generator.spec.rates.accepted[CORPUS_KINDS].sum() > _prior_accepted(rt.generator.spec, CORPUS_KINDS)
        assert [r.token_ids for r in alone] == plain
        assert sum(r.step_tokens - r.steps for r in alone) > 0  # drafts were accepted
        batched = rt.generate_many(prompts, max_new_tokens=24)
        assert [r.token_ids for r in batched] == plain


def test_a_manifest_naming_an_unlisted_table_or_a_damaged_one_is_refused(artifact, tmp_path):
    from medusa_export.runtime import MedusaRuntime

    art = _with_table(artifact, tmp_path, count_table([np.arange(30) % 5], vocab_size=TINY_VOCAB, min_count=1))
    m = Manifest.read(art)
    with pytest.raises(FieldError):
        m.replace(files={k: v for k, v in m.files.items() if k != FILE})
    (art / FILE).write_bytes(b"x" * m.files[FILE].bytes)  # same size, not a table
    with pytest.raises(ArtifactError) as e:
        MedusaRuntime.load(art)
    assert "corpus-draft table" in str(e.value) and "\n" not in str(e.value)


def test_a_table_other_than_the_one_the_manifest_records_is_refused(artifact, tmp_path):
    """The record's entries and n-gram lengths are the table's: a record that disagrees (edited, or another table
    swapped in and relisted) is refused rather than trusted."""
    from medusa_export.runtime import MedusaRuntime

    art = _with_table(artifact, tmp_path, count_table([np.arange(30) % 5], vocab_size=TINY_VOCAB, min_count=1))
    m = Manifest.read(art)
    m.replace(drafts=replace(m.drafts, entries=m.drafts.entries + 1)).write(art)
    with pytest.raises(ArtifactError, match="the manifest records"):
        MedusaRuntime.load(art)
    with pytest.raises(FieldError, match=f"drafts is missing while the manifest lists {FILE}"):
        m.replace(drafts=None)  # a listed table with no record would go unused
    m.replace(drafts=None, files={k: v for k, v in m.files.items() if k != FILE}).write(art)
    with pytest.raises(ArtifactError, match="does not list it"):  # a table the manifest does not know of
        MedusaRuntime.load(art)


def test_a_table_declaring_more_entries_than_the_manifest_records_is_refused_before_it_is_read(artifact, tmp_path):
    """A table file can be as large as it claims yet cost nothing on disk (a sparse file): the manifest's entry count
    bounds what each array's header may declare, checked before any array is read."""
    from medusa_export.runtime import MedusaRuntime

    art = _with_table(artifact, tmp_path, count_table([np.arange(30) % 5], vocab_size=TINY_VOCAB, min_count=1))
    m = Manifest.read(art)
    m.replace(drafts=replace(m.drafts, entries=2)).write(art)  # fewer than any n-gram length's array holds
    with pytest.raises(ArtifactError, match=r"_\d\.npy holds \d+ items, more than the 2 expected"):
        MedusaRuntime.load(art)
    assert CorpusTable.load(art / FILE, TINY_VOCAB, m.drafts.entries).entries == m.drafts.entries


def test_an_unknown_corpus_source_is_refused_before_any_work():
    from medusa_export.runtime.build_options import BuildOptions

    with pytest.raises(InputError, match="--corpus-drafts 'wiki'"):
        BuildOptions(corpus_drafts="wiki")


# ---------------------------------------------------------------------------------------- the model's own answers


def test_answers_round_trip_and_a_malformed_file_is_one_line(tmp_path):
    from medusa_export.exporter.own_answers import load_answers, save_answers

    answers = [np.array([5, 6, 7]), np.array([], np.int64), np.array([70_000, 1])]  # a wide id: stored as uint32
    save_answers(tmp_path / "a.npz", answers)
    assert [a.tolist() for a in load_answers(tmp_path / "a.npz", 80_000)] == [a.tolist() for a in answers]
    for name, arrays in {"beyond the vocabulary": {"tokens": np.array([9], np.uint16), "lengths": np.array([1])},
                         "lengths": {"tokens": np.array([1, 2], np.uint16), "lengths": np.array([3])},
                         "negative": {"tokens": np.array([1, 2], np.uint16), "lengths": np.array([3, -1])},
                         "other member": {"tokens": np.array([1], np.uint16), "lengths": np.array([1]), "x": np.ones(1)},
                         "missing": {"tokens": np.array([1], np.uint16)}}.items():
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(InputError) as e:
            load_answers(tmp_path / "bad.npz", 8)
        assert "\n" not in str(e.value) and "train-heads" in str(e.value), name


def test_the_build_counts_the_models_answers_over_the_corpus(monkeypatch, tmp_path, make_tokenizer):
    """Where the corpus and the model's answers (beside its heads) continue a phrase differently, the table follows
    the model; the record says how many of its tokens counted and how often."""
    from medusa_export.exporter import build, corpus_table
    from medusa_export.exporter.own_answers import FILE as ANSWERS
    from medusa_export.exporter.own_answers import WEIGHT, save_answers
    from medusa_export.runtime.build_options import BuildOptions

    tok = make_tokenizer()
    corpus = [tok.plain_text_tokenizer.encode("t1 t2 t3 t4", add_special_tokens=False).ids] * 10
    monkeypatch.setattr(corpus_table, "sharegpt_answers", lambda: (["t1 t2 t3 t4"] * 10, "ten lines"))
    heads = tmp_path / "heads"
    heads.mkdir()
    own = [np.asarray(corpus[0][:2] + corpus[0][:1])]  # the model says "t1 t2 t1"
    save_answers(heads / ANSWERS, own)
    log = build._StepLog(lambda _: None)
    record = build._corpus_table(tok, TINY_VOCAB, BuildOptions(corpus_drafts="sharegpt"), tmp_path, log, str(heads))
    table = CorpusTable.load(tmp_path / FILE, TINY_VOCAB)
    assert table.lookup(corpus[0][:2])[0] == corpus[0][0]  # the model's continuation, not the corpus's t3
    assert table.lookup(corpus[0][1:3])[0] == corpus[0][3]  # elsewhere the corpus's
    assert (record.answers_tokens, record.answers_weight) == (3, WEIGHT) and "own answers" in record.source
    plain = build._corpus_table(tok, TINY_VOCAB, BuildOptions(corpus_drafts="sharegpt"), tmp_path, log, None)
    assert plain.answers_tokens == 0 and CorpusTable.load(tmp_path / FILE, TINY_VOCAB).lookup(corpus[0][:2])[0] == \
        corpus[0][2]


def test_the_answers_fields_are_written_only_when_answers_counted(artifact, tmp_path):
    """A table without the model's answers keeps the manifest readable by releases before the fields."""
    art = _with_table(artifact, tmp_path, count_table([np.arange(30) % 5], vocab_size=TINY_VOCAB, min_count=1))
    m = Manifest.read(art)
    assert "answers_tokens" not in m.to_json()["drafts"]
    m = m.replace(drafts=replace(m.drafts, answers_tokens=30, answers_weight=1000))
    assert m.to_json()["drafts"]["answers_weight"] == 1000 and Manifest.from_json(m.to_json()).drafts == m.drafts
    with pytest.raises(FieldError, match="answers_tokens"):
        replace(m.drafts, answers_tokens=-1)


def test_a_table_s_arrays_together_may_declare_no_more_than_its_entries(tmp_path):
    """Each array within the record's entries was not enough: twelve of them could each declare that many (a sparse
    file costs no disk), so loading allocated twelve times what the record allows."""
    from medusa_export.runtime.npz_arrays import read_arrays

    path = tmp_path / "t.npz"
    np.savez(path, a=np.zeros(3, np.int64), b=np.zeros(3, np.int64))
    assert len(read_arrays(path, {"a": np.int64, "b": np.int64}, max_items=3, max_total=6)) == 2
    with pytest.raises(ValueError, match="more than the 5 items expected in all"):
        read_arrays(path, {"a": np.int64, "b": np.int64}, max_items=3, max_total=5)
