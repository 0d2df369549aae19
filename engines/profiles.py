"""TensorRT optimization profiles for the step graphs, computed from the artifact manifest (pure Python).

    profiles = engine_profiles(manifest, "medusa")    # [prefill, tree]; "vanilla" -> [prefill, decode]
    profiles[1].shapes(num_layers=30, kv_heads=3, head_dim=64)["attention_mask"]  # (min, opt, max) shapes

Every profile is batch 1 and describes T new tokens after ``past`` cached ones; the attention mask is
``[1, 1, T, past + T]`` and the KV inputs ``[1, past, kv_heads, head_dim]``. TensorRT checks the min, opt and
max shapes of a profile as three consistent sets, so ``total = past + T`` holds at each of them.

* prefill: T in [1, max_prompt], past in [0, max_seq - max_prompt] (a longer prompt runs in chunks);
* tree:    T = the tree's node count (min = opt = max), past in [0, max_seq - T];
* decode:  T = 1 (the vanilla graph's one-token steps), past in [0, max_seq - 1].
"""

from __future__ import annotations

from dataclasses import dataclass

from medusa_export.runtime import io_table

DEFAULT_OPT_PROMPT = 128  # typical chat prompt after the template
DEFAULT_OPT_PAST = 256  # typical context during generation


@dataclass(frozen=True)
class Profile:
    name: str
    seq: tuple[int, int, int]  # T: min, opt, max
    past: tuple[int, int, int]  # past length: min, opt, max

    def __post_init__(self) -> None:
        for label, r in (("T", self.seq), ("past", self.past)):
            if not (0 <= r[0] <= r[1] <= r[2]):
                raise ValueError(f"profile {self.name}: {label} range {r} is not min <= opt <= max")
        if self.seq[0] < 1:
            raise ValueError(f"profile {self.name}: T must be at least 1")

    @property
    def total(self) -> tuple[int, int, int]:
        return tuple(p + t for p, t in zip(self.past, self.seq))

    def fits(self, t: int, past: int) -> bool:
        return self.seq[0] <= t <= self.seq[2] and self.past[0] <= past <= self.past[2]

    def shapes(self, num_layers: int, kv_heads: int, head_dim: int) -> dict[str, tuple[tuple, tuple, tuple]]:
        """(min, opt, max) shape of every dynamic graph input (``temperature`` is static and left out)."""
        out = {}
        for tensor in io_table.inputs(num_layers):
            if tensor.name in ("input_ids", "position_ids"):
                out[tensor.name] = tuple((1, t) for t in self.seq)
            elif tensor.name == "attention_mask":
                out[tensor.name] = tuple((1, 1, t, total) for t, total in zip(self.seq, self.total))
            elif tensor.name.startswith("past_key_values."):
                out[tensor.name] = tuple((1, p, kv_heads, head_dim) for p in self.past)
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "seq": list(self.seq), "past": list(self.past), "total": list(self.total)}

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        return cls(d["name"], tuple(d["seq"]), tuple(d["past"]))


def engine_profiles(manifest: dict, kind: str, max_prompt: int | None = None, opt_prompt: int | None = None,
                    opt_past: int | None = None) -> list[Profile]:
    """The profiles for graph ``kind`` ("medusa" | "vanilla"): prefill first, then the step profile."""
    max_seq = int(manifest["max_seq"])
    max_prompt = max(1, max_seq // 2) if max_prompt is None else int(max_prompt)
    if not 1 <= max_prompt <= max_seq:
        raise ValueError(f"max_prompt {max_prompt} must be between 1 and max_seq {max_seq}")
    opt_t = min(max_prompt, opt_prompt or DEFAULT_OPT_PROMPT)
    prefill = Profile("prefill", (1, opt_t, max_prompt), (0, 0, max_seq - max_prompt))
    if kind == "medusa":
        t, name = int(manifest["tree"]["num_nodes"]), "tree"
    elif kind == "vanilla":
        t, name = 1, "decode"
    else:
        raise ValueError(f"unknown graph kind {kind!r}: medusa or vanilla")
    if t >= max_seq:
        raise ValueError(f"a {name} step of {t} tokens does not fit max_seq {max_seq}")
    room = max_seq - t
    step = Profile(name, (t, t, t), (0, min(room, opt_past or DEFAULT_OPT_PAST), room))
    return [prefill, step]


def select(profiles: list[Profile], t: int, past: int) -> int | None:
    """Index of the profile for T new tokens after ``past``: the narrowest T range that fits (a fixed-T
    step profile wins over the prefill range), or None."""
    fitting = [i for i, p in enumerate(profiles) if p.fits(t, past)]
    if not fitting:
        return None
    return min(fitting, key=lambda i: (profiles[i].seq[2] - profiles[i].seq[0], i))


def plan_chunks(profiles: list[Profile], t: int, past: int) -> list[tuple[int, int, int]] | None:
    """Split T tokens after ``past`` into ``(start, end, profile)`` runs that each fit a profile, largest
    first; one run when a profile fits all T. None when no split fits. Only valid for a causal mask (each
    run sees the runs before it as its past)."""
    whole = select(profiles, t, past)
    if whole is not None:
        return [(0, t, whole)]
    runs, a = [], 0
    while a < t:
        best = None
        for i, p in enumerate(profiles):
            if not p.past[0] <= past + a <= p.past[2]:
                continue
            n = min(t - a, p.seq[2])
            if n >= p.seq[0] and (best is None or n > best[1]):
                best = (i, n)
        if best is None:
            return None
        runs.append((a, a + best[1], best[0]))
        a += best[1]
    return runs


def max_tokens(profiles: list[Profile]) -> int:
    return max(p.seq[2] for p in profiles)


def max_total(profiles: list[Profile]) -> int:
    return max(p.total[2] for p in profiles)
