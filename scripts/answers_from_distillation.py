"""Write a heads directory's answers.npz (`exporter/own_answers.py`) from a self-distillation cache: the greedy
answers in its shards, except those of the prompts in the heads' heldout_prompts.jsonl. `train-heads` writes the file
itself at the end of a run; this script makes it for heads trained before that, or from the shards a run has
finished so far (the shards hold answers sorted by prompt length: the first N are the N shortest-prompt blocks).

    python scripts/answers_from_distillation.py work-cache/distill/<key> exporter/shipped_heads/smollm2-135m-instruct \
        [--shards N] [--data sharegpt]

The cache directory is the one `scripts/train_default_heads.sh` fills (its index.json names the prompt set's
sha256, which must be the --data's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medusa_export.exporter.own_answers import FILE, answers_without, save_answers
from medusa_export.exporter.training.prompt_source import load_prompt_set
from script_io import run_main, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache", type=Path, help="a distillation cache directory (holds index.json and shard_*.npz)")
    ap.add_argument("heads", type=Path, help="the heads directory: reads heldout_prompts.jsonl, writes answers.npz")
    ap.add_argument("--shards", type=int, default=None, help="the first N shards only (default: all there are)")
    ap.add_argument("--data", default="sharegpt", help="the prompt set the cache was distilled from")
    args = ap.parse_args()
    index = json.loads((args.cache / "index.json").read_text())
    prompts = load_prompt_set(args.data)
    if prompts.sha256 != index["data_sha256"]:
        raise SystemExit(f"{args.cache} was distilled from another prompt set than --data {args.data}")
    if index["config"]["temperature"] != 0:
        raise SystemExit(f"{args.cache} holds sampled answers: the table wants the model's greedy ones")
    trained = json.loads((args.heads / "training.json").read_text()).get("base_model", {})
    if trained.get("sha256_16") and trained["sha256_16"] not in index["model"]:
        raise SystemExit(f"{args.cache} was distilled from {index['model']}, not the model these heads were trained on")
    count = index["shards"] if args.shards is None else args.shards
    paths = [args.cache / f"shard_{b:05d}.npz" for b in range(count)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"{args.cache} lacks {missing[:3]}: pass --shards with the number finished")
    held = {json.loads(line)["prompt"] for line in (args.heads / "heldout_prompts.jsonl").read_text().splitlines()}
    held_index = np.array([i for i, p in enumerate(prompts.prompts) if p in held], np.int64)
    answers = []
    for path in paths:
        with np.load(path) as z:
            answers += answers_without(z["tokens"], z["seq_lens"], z["prompt_index"], held_index)
    save_answers(args.heads / FILE, answers)
    record = {"cache_key": index["key"], "data_sha256": index["data_sha256"], "model": index["model"],
              "config": index["config"], "shards": f"{count} of {index['shards']}", "answers": len(answers),
              "tokens": int(sum(len(a) for a in answers)), "heldout_prompts_left_out": int(len(held_index))}
    write_json(args.heads / "answers.json", record)
    print(json.dumps(record))


if __name__ == "__main__":
    run_main(main)
