"""The model's own greedy answers as token ids, kept beside its heads: the text its corpus-draft table should know best.

    save_answers(heads_dir / FILE, answers)                  # train-heads: its training prompts' distilled answers
    answers = load_answers(heads_dir / FILE, vocab_size)     # build: counted into the table, each WEIGHT times

Greedy verification accepts a draft token when it is the model's own next token, so what the model itself says after
a phrase is a better draft than what ShareGPT's authors said after it. The table counts both: ShareGPT's assistant
turns once each, the model's answers ``WEIGHT`` times, so that for a phrase the model has used its own continuation
wins. Answers to held-out prompts are never in the file (they measure the heads and calibrate the tree).

File: an uncompressed ``.npz`` (read with `runtime.npz_arrays`), ``tokens`` (uint16, or uint32 for vocabularies
beyond 65,536: every answer, one after another, its end-of-sequence token included) and ``lengths`` (int64).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medusa_export.runtime.errors import InputError
from medusa_export.runtime.npz_arrays import read_arrays
from medusa_export.runtime.whole_file import write_whole

FILE = "answers.npz"
# How many times one of the model's answers counts against one ShareGPT turn. Simulated on the default model's
# answers to held-out prompts (docs/speculation.md): 1,000 (its continuation wins wherever it used the phrase) was
# as good as 20 on one set and better on the other.
WEIGHT = 1000


def save_answers(path: str | Path, answers: list[np.ndarray]) -> None:
    """Write ``answers`` (token id arrays) whole (`write_whole`)."""
    tokens = np.concatenate([np.asarray(a, np.int64) for a in answers]) if answers else np.zeros(0, np.int64)
    dtype = np.uint16 if not len(tokens) or int(tokens.max()) < 1 << 16 else np.uint32
    lengths = np.asarray([len(a) for a in answers], np.int64)
    write_whole(Path(path), lambda f: np.savez(f, tokens=tokens.astype(dtype), lengths=lengths))


def load_answers(path: str | Path, vocab_size: int) -> list[np.ndarray]:
    """The answers in ``path``; InputError (one line) for a file that is not such a list for this vocabulary."""
    try:
        arrays = read_arrays(path, {"tokens": (np.uint16, np.uint32), "lengths": np.int64})
        tokens, lengths = arrays["tokens"], arrays["lengths"]
        if (lengths < 0).any() or sum(lengths.tolist()) != len(tokens):  # Python ints: an int64 sum could wrap
            raise ValueError("its lengths do not add up to its tokens")
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise ValueError(f"it holds token ids beyond the model's {vocab_size}-token vocabulary")
    except (KeyError, ValueError) as e:
        raise InputError(f"{path} is not a file of the model's answers ({str(e)[:120]}): remove it, or write it "
                         f"again with `medusa-export train-heads`") from None
    return np.split(tokens.astype(np.int64), np.cumsum(lengths)[:-1]) if len(lengths) else []


def answers_without(tokens: np.ndarray, seq_lens: np.ndarray, prompt_index: np.ndarray,
                    held_out: np.ndarray) -> list[np.ndarray]:
    """Distilled answers (``tokens`` one after another, ``seq_lens`` each) except those of the ``held_out`` prompts."""
    answers = np.split(np.asarray(tokens, np.int64), np.cumsum(seq_lens)[:-1]) if len(seq_lens) else []
    keep = ~np.isin(np.asarray(prompt_index), held_out)
    return [a for a, k in zip(answers, keep) if k]
