"""A Medusa-1 run's output files, whole or not at all: heads, config.json, eval.json, heldout_prompts.jsonl,
training.json and, when the run made them, draft_vocab.json and the model's own answers (answers.npz).

    write_outputs(out, heads, {"trained_on": ...}, {"eval.json": text, ...}, vocab, answers)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from medusa_export.exporter.heads import MedusaHeads, save_heads
from medusa_export.exporter.own_answers import FILE as ANSWERS
from medusa_export.exporter.own_answers import save_answers
from medusa_export.exporter.train_out_dir import TRAIN_STAGE, commit_stage

from .examples import DraftVocab

DRAFT_VOCAB = "draft_vocab.json"
STAGE = TRAIN_STAGE  # the new files, in OUT until all are written (one filesystem: renames)


def write_outputs(out: Path, heads: MedusaHeads, heads_extra: dict, texts: dict[str, str], vocab: DraftVocab | None,
                  answers) -> None:
    """The run's files, whole or not at all: written into ``out/STAGE`` first, marked done, then moved over the
    earlier run's (`commit_stage`: a run killed while moving them is finished by the next one on ``out``). A
    failure while writing leaves the old set and no stage; ``vocab`` or ``answers`` None removes an earlier run's
    file (it would restrict or mislead these heads)."""
    stage = out / STAGE
    if stage.is_symlink():  # rmtree refuses a link (silently here), and the files would go where it points
        stage.unlink()
    shutil.rmtree(stage, ignore_errors=True)
    try:
        save_heads(heads, stage, extra=heads_extra)
        for name, text in texts.items():
            (stage / name).write_text(text)
        if vocab is not None:  # the subset trained on: `heads.restrict_vocab(heads, ids)` can reuse it at decode time
            vocab.save(stage / DRAFT_VOCAB)
        if answers is not None:
            save_answers(stage / ANSWERS, answers)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    commit_stage(out, [name for name in (DRAFT_VOCAB, ANSWERS) if not (stage / name).exists()])
