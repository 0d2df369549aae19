"""TensorRT optimization profiles for the step graphs, computed from the artifact manifest (pure Python).

    profiles = engine_profiles(manifest, "medusa")    # [prefill, tree]; "vanilla" -> [prefill, decode]
    engine_profiles(manifest, "vanilla", max_num_seqs=8)  # [prefill, decode, batch]
    profiles[1].shapes(num_layers=30, kv_heads=3, head_dim=64)["attention_mask"]  # (min, opt, max) shapes

The `Profile` type and the run-time choice of a profile live with the TensorRT backend
(``medusa_export.runtime.backends.trt_profiles``); this module decides which profiles an engine is built with:

* prefill: T in [1, max_prompt], past in [0, max_seq - max_prompt] (a longer prompt runs in chunks);
* tree:    T = the tree's node count (min = opt = max), past in [0, max_seq - T];
* decode:  T = 1 (the vanilla graph's one-token steps), past in [0, max_seq - 1];
* batch:   (vanilla, ``max_num_seqs`` > 1) 1 to max_num_seqs sequences of T in [1, min(batch_tokens, max_prompt //
  max_num_seqs)] rows each (a token and its drafts, or a prompt chunk; opt 1), past in [0, max_seq - 1]: the batched
  steps (`trt_lanes.py`).
"""

from __future__ import annotations

from medusa_export.runtime.errors import ArtifactError, InputError
from medusa_export.runtime.backends.trt_profiles import Profile
from medusa_export.runtime.manifest import Manifest

DEFAULT_OPT_PROMPT = 128  # typical chat prompt after the template
DEFAULT_OPT_PAST = 256  # typical context during generation
DEFAULT_BATCH_TOKENS = 64  # rows per sequence of a batched step (the engine's default --max-num-batched-tokens)


def engine_profiles(manifest: Manifest, kind: str, max_prompt: int | None = None, opt_prompt: int | None = None,
                    opt_past: int | None = None, max_num_seqs: int = 1,
                    batch_tokens: int = DEFAULT_BATCH_TOKENS) -> list[Profile]:
    """The profiles for graph ``kind`` ("medusa" | "vanilla"): prefill first, then the step profile, then (vanilla,
    ``max_num_seqs`` > 1) the batch profile last."""
    max_seq = manifest.max_seq
    max_prompt = max(1, max_seq // 2) if max_prompt is None else int(max_prompt)
    if not 1 <= max_prompt <= max_seq:
        raise InputError(f"--max-prompt {max_prompt}: give 1..{max_seq} (the artifact's max_seq), or leave it out "
                         f"for {max(1, max_seq // 2)}")
    opt_t = min(max_prompt, opt_prompt or DEFAULT_OPT_PROMPT)
    prefill = Profile("prefill", (1, opt_t, max_prompt), (0, 0, max_seq - max_prompt))
    if kind == "medusa":
        t, name = manifest.tree.num_nodes, "tree"
    elif kind == "vanilla":
        t, name = 1, "decode"
    else:
        raise ValueError(f"unknown graph kind {kind!r}: medusa or vanilla")
    if t >= max_seq:
        raise ArtifactError(f"a {name} step of {t} tokens does not fit the artifact's max_seq {max_seq}: rebuild it "
                            f"with a larger --max-seq or a smaller --tree")
    room = max_seq - t
    opt = min(room, opt_past or DEFAULT_OPT_PAST)
    step = Profile(name, (t, t, t), (0, opt, room))
    if kind == "medusa" or max_num_seqs < 2:
        return [prefill, step]
    # B x T rows at most what the prefill profile takes: a context's activation memory is sized for the largest profile
    # (TensorRT's default static allocation), so the batch profile adds none to it.
    rows = max(1, min(batch_tokens, max_prompt // max_num_seqs))
    batch = Profile("batch", (1, 1, rows), (0, opt, max_seq - 1), (1, max_num_seqs, max_num_seqs))
    return [prefill, step, batch]


