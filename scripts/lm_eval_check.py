"""lm-evaluation-harness against `medusa-export serve`: its log-likelihood tasks through the server's echo and logprobs,
next to lm-eval's own transformers model on the same weights, item by item.

    pip install --target /tmp/lmeval-pkgs lm_eval==0.4.13 tenacity    # an optional extra, kept out of the venv
    python scripts/lm_eval_check.py artifacts/smollm2 --out /tmp/lmeval-check --lm-eval-path /tmp/lmeval-pkgs
    python scripts/lm_eval_check.py artifacts/smollm2 --out /tmp/lmeval-batch --lm-eval-path /tmp/lmeval-pkgs --batch-size 8

Writes two small tasks of its own (the model hub, where lm-eval's own tasks live, may be out of reach): 140
four-choice questions (largest number, sums, capitals, opposites; multiple_choice) and 20 short texts
(loglikelihood_rolling). Runs lm-eval's `local-completions` model on the served artifact and its `hf` model on the
built-in model's weights (its dequantized cache entry, or --hf-model), then compares each item's log-likelihoods and
chosen answers. Prints one JSON summary line and writes it to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

from script_io import free_port, positive, start_served, with_machine, write_json

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra",
            "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "India": "New Delhi",
            "Kenya": "Nairobi", "Greece": "Athens", "Portugal": "Lisbon", "Norway": "Oslo", "Sweden": "Stockholm",
            "Finland": "Helsinki", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin", "Turkey": "Ankara",
            "Peru": "Lima", "Thailand": "Bangkok", "South Korea": "Seoul", "Hungary": "Budapest",
            "Denmark": "Copenhagen", "Belgium": "Brussels"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
             "early": "late", "open": "closed", "full": "empty", "young": "old", "hard": "soft", "rich": "poor",
             "wet": "dry", "long": "short", "strong": "weak", "loud": "quiet", "high": "low", "thick": "thin",
             "clean": "dirty", "first": "last"}
TEXTS = ["The sun rises in the east and sets in the west, giving light and warmth to the earth every day.",
         "Water boils at one hundred degrees Celsius at sea level, and at a lower temperature higher up.",
         "Cats are small carnivorous mammals that have lived alongside humans for thousands of years.",
         "The library opens at nine in the morning and closes at six in the evening, except on Sundays.",
         "To make tea, boil some water, pour it over a tea bag, and wait for three to five minutes.",
         "Paris is the capital of France. It is known for the Eiffel Tower, the Louvre and its cafes.",
         "A computer program is a sequence of instructions that tells a computer how to perform a task.",
         "The quick brown fox jumps over the lazy dog. This sentence holds every letter of the alphabet.",
         "In autumn the leaves of many trees turn yellow, orange and red before falling to the ground.",
         "Bicycles are an efficient way to travel short distances in a city, and they do not pollute.",
         "The ocean covers about seventy percent of the earth's surface and holds most of its water.",
         "She opened the window, took a deep breath of fresh air, and smiled at the bright blue sky.",
         "Mathematics is the study of numbers, shapes and patterns; science and engineering use it.",
         "The train to London leaves at half past eight. Passengers should arrive at the station early.",
         "Bread is made from flour, water, yeast and salt: the dough is kneaded, left to rise, and baked.",
         "Elephants are the largest land animals. They live in Africa and Asia and weigh several tons.",
         "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
         "Good morning! How are you today? I hope you slept well and are ready for a busy day.",
         "The meeting has moved to Thursday at 3 p.m. Please update your calendars accordingly.",
         "Rain is water that falls from clouds. Plants, animals and people all depend on it."]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: {kind}
{fields}
metadata:
  version: 1.0
"""
MC_FIELDS = """doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}"""
ROLLING_FIELDS = """doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}"""


def questions(seed: int = 1234) -> list[dict]:
    """The four-choice questions, answers shuffled with a fixed seed."""
    rng = random.Random(seed)
    rows = []

    def add(question: str, right: str, wrong: list[str]) -> None:
        choices = [right, *wrong]
        rng.shuffle(choices)
        rows.append({"question": question, "choices": choices, "label": choices.index(right)})

    for _ in range(40):
        nums = rng.sample(range(1, 1000), 4)
        add("Which number is the largest?", str(max(nums)), [str(n) for n in nums if n != max(nums)])
    for _ in range(50):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        near = sorted({a + b + d for d in rng.sample([-10, -3, -2, -1, 1, 2, 3, 10], 3)})
        add(f"What is {a} + {b}?", str(a + b), [str(n) for n in near])
    for table, ask in ((CAPITALS, "What is the capital of {}?"), (OPPOSITES, 'What is the opposite of "{}"?')):
        for key, right in table.items():
            add(ask.format(key), right, rng.sample([v for v in table.values() if v != right], 3))
    rng.shuffle(rows)
    return rows


def write_tasks(out: Path) -> Path:
    """The tasks' data and YAML under OUT/tasks; the directory lm-eval's --include_path takes."""
    tasks = out / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for name, kind, rows, fields in (("simple_mc", "multiple_choice", questions(), MC_FIELDS),
                                     ("simple_rolling", "loglikelihood_rolling", [{"text": t} for t in TEXTS],
                                      ROLLING_FIELDS)):
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(TASK.format(name=name, data=data, kind=kind, fields=fields))
    return tasks


def lm_eval(model: str, model_args: str, tasks: Path, out: Path, env: dict, batch_size: int = 1) -> Path:
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args, "--tasks",
           "simple_mc,simple_rolling", "--include_path", str(tasks), "--log_samples", "--output_path", str(out),
           "--batch_size", str(batch_size)]
    if model == "hf":
        cmd += ["--device", "cpu"]
    subprocess.run(cmd, env=env, check=True, timeout=3600)
    return out


def scores(run: Path) -> dict:
    """lm-eval's own figures of a run: acc, acc_norm, bits_per_byte."""
    results = json.loads(Path(sorted(glob.glob(f"{run}/*/results_*.json"))[-1]).read_text())["results"]
    return {m: round(results[task][f"{m},none"], 4) for task, m in (("simple_mc", "acc"), ("simple_mc", "acc_norm"),
                                                                     ("simple_rolling", "bits_per_byte"))}


def samples(run: Path, task: str) -> dict[int, dict]:
    path = sorted(glob.glob(f"{run}/*/samples_{task}_*.jsonl"))[-1]
    return {row["doc_id"]: row for row in map(json.loads, Path(path).read_text().splitlines())}


def compare(served: Path, reference: Path) -> dict:
    """Chosen answers (acc, acc_norm) and log-likelihoods, item by item."""
    a, b = samples(served, "simple_mc"), samples(reference, "simple_mc")
    same = same_norm = 0
    worst = 0.0
    for k, row in a.items():
        la = [float(r[0][0]) for r in row["resps"]]
        lb = [float(r[0][0]) for r in b[k]["resps"]]
        worst = max(worst, *(abs(x - y) for x, y in zip(la, lb)))
        lengths = [len(c) for c in row["doc"]["choices"]]
        same += max(range(4), key=la.__getitem__) == max(range(4), key=lb.__getitem__)
        same_norm += (max(range(4), key=lambda i: la[i] / lengths[i]) == max(range(4), key=lambda i: lb[i] / lengths[i]))
    ra, rb = samples(served, "simple_rolling"), samples(reference, "simple_rolling")
    rolling = max(abs(_ll(ra[k]) - _ll(rb[k])) for k in ra)
    return {"items": len(a), "same_answer": same, "same_answer_norm": same_norm, "max_abs_loglik_diff_mc": worst,
            "max_abs_loglik_diff_rolling": rolling}


def _ll(row: dict) -> float:
    x = row["resps"][0][0]
    return float(x[0] if isinstance(x, list) else x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="Directory for the tasks, runs and summary.")
    ap.add_argument("--lm-eval-path", help="Where lm_eval is installed, if not in this environment (pip --target).")
    ap.add_argument("--hf-model", type=Path, help="A transformers directory of the artifact's base model (default: the "
                    "built-in model's, as its dequantized cache entry).")
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--batch-size", type=positive, default=1, help="Prompts per request lm-eval sends the server "
                    "(a completions batch).")
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.lm_eval_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.lm_eval_path, env.get("PYTHONPATH")) if p)
    tasks = write_tasks(args.out)
    port = free_port()
    server = start_served(["medusa-export", "serve", str(args.artifact), "--port", str(port), "--threads",
                           str(args.threads), "--max-num-seqs", "4"], port, str(args.artifact))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
            name = json.load(r)["data"][0]["id"]  # the served model's name
        served = lm_eval("local-completions", f"model={name},base_url=http://127.0.0.1:{port}/v1/completions,"
                         f"tokenizer={args.artifact},num_concurrent=1,max_retries=1,tokenized_requests=True",
                         tasks, args.out / "served", env, args.batch_size)
    finally:
        server.terminate()
        server.wait(30)
    from medusa_export.exporter.model_loading import hf_directory

    reference = lm_eval("hf", f"pretrained={args.hf_model or hf_directory()},dtype=float32", tasks, args.out / "hf", env)
    summary = with_machine({"artifact": str(args.artifact), "batch_size": args.batch_size, "served": scores(served), "hf": scores(reference),
                            **compare(served, reference)})
    write_json(args.out / "summary.json", summary, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
