"""`scripts/lm_eval_check.py` without lm-eval: the tasks it writes and its item-by-item comparison."""

from __future__ import annotations

import json
import re

import yaml
from conftest import load_script


def test_the_questions_have_four_distinct_choices_and_the_right_label():
    check = load_script("lm_eval_check")
    rows = check.questions()
    assert len(rows) == 140 and rows == check.questions()  # fixed by its seed
    for row in rows:
        assert len(set(row["choices"])) == 4 and 0 <= row["label"] < 4
        right = row["choices"][row["label"]]
        if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", row["question"]):
            assert right == str(int(m[1]) + int(m[2]))
        elif row["question"] == "Which number is the largest?":
            assert int(right) == max(map(int, row["choices"]))
    assert sum(row["label"] == 0 for row in rows) < 60  # the right answer is not always first


def test_the_task_files_are_what_lm_eval_reads(tmp_path):
    check = load_script("lm_eval_check")
    tasks = check.write_tasks(tmp_path)
    mc = yaml.safe_load((tasks / "simple_mc.yaml").read_text())
    assert mc["output_type"] == "multiple_choice" and mc["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert [m["metric"] for m in mc["metric_list"]] == ["acc", "acc_norm"]
    data = mc["dataset_kwargs"]["data_files"]
    assert [json.loads(line) for line in open(data)] == check.questions()
    rolling = yaml.safe_load((tasks / "simple_rolling.yaml").read_text())
    assert rolling["output_type"] == "loglikelihood_rolling" and rolling["doc_to_target"] == "{{text}}"


def test_the_comparison_counts_answers_and_the_largest_difference(tmp_path):
    check = load_script("lm_eval_check")

    def run(name: str, mc: list[list[float]], rolling: list[float]):
        d = tmp_path / name / "model"
        d.mkdir(parents=True)
        docs = [{"choices": ["a", "bb", "c", "dddd"]}] * len(mc)
        (d / "samples_simple_mc_1.jsonl").write_text("".join(
            json.dumps({"doc_id": i, "doc": doc, "resps": [[[str(x), False]] for x in lls]}) + "\n"
            for i, (doc, lls) in enumerate(zip(docs, mc))))
        (d / "samples_simple_rolling_1.jsonl").write_text("".join(
            json.dumps({"doc_id": i, "resps": [[x]]}) + "\n" for i, x in enumerate(rolling)))
        return tmp_path / name

    a = run("a", [[-1, -2, -3, -4], [-5, -1, -6, -8]], [-10.0])
    b = run("b", [[-1, -2, -3, -4], [-0.6, -1, -6, -8]], [-10.5])  # item 1: choice 0 best, per character still 1
    assert check.compare(a, b) == {"items": 2, "same_answer": 1, "same_answer_norm": 2,
                                   "max_abs_loglik_diff_mc": 4.4, "max_abs_loglik_diff_rolling": 0.5}

