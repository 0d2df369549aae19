"""What a request asks of decoding (`GenerationConfig`), checked once for the library, the CLI and the server.

    cfg = GenerationConfig(max_new_tokens=64, temperature=0.7, top_p=0.95, seed=1)
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from .errors import InputError
from .logprobs import MAX_TOP_LOGPROBS

MIN_TEMPERATURE = 1e-5  # lower temperatures decode greedily (as vLLM): sampling there is argmax, and in float32
# the logits / temperature of a temperature near 1e-38 overflow to NaN probabilities
MAX_TEMPERATURE = float(np.finfo(np.float32).max)  # the graphs take it as float32: above, it is infinite there
# Stop strings are searched at every token: bounded, so a request's text costs the decode loop (and, in the batched
# engine, every sequence sharing its steps) a fixed amount per token.
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 1000


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (lossless); > 0 = typical acceptance + sampling
    typical_epsilon: float = 0.09
    typical_alpha: float = 0.3
    stop_strings: tuple[str, ...] = ()
    medusa: bool = True  # speculate: the heads' tree, and context drafts when greedy
    context_drafts: bool = True  # greedy speculation also verifies continuations found in the context
    seed: int | None = None
    chat: bool = True  # apply the chat template when the model has one
    ignore_eos: bool = False  # decode past end-of-sequence tokens up to max_new_tokens (benchmarks, as vLLM's)
    # Last, so that fields given by position keep the meaning they had before the cuts came
    top_p: float = 1.0  # sampling: the fewest best tokens whose probability reaches it (1 = no cut, 0 = the best)
    top_k: int = 0  # sampling: the k best tokens only (0 = every rank the graph returns, its sample_topk)
    logprobs: int | None = None  # per token its log-probability and this many best alternatives (None: none)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (its first has none: nothing precedes it)

    def __post_init__(self) -> None:
        """Every option checked once, here, for the library, the CLI and the server alike (a bad value surfaced
        as a numpy or ONNX Runtime error deep in decoding)."""
        # Compared as Python floats: against a numpy float16 the bound itself would turn to float16 (infinity).
        t = _as_float(self.temperature)
        if t is None or not 0 <= t <= MAX_TEMPERATURE:
            raise InputError(f"temperature must be a number in [0, {MAX_TEMPERATURE:.3g}] (0 = greedy), "
                             f"got {self.temperature!r:.40}")
        self.temperature = effective_temperature(t)
        for name, rule, ok in (("typical_epsilon", "in [0, 1]", lambda v: 0 <= v <= 1),
                               ("typical_alpha", f"in [0, {MAX_TEMPERATURE:.3g}]", lambda v: 0 <= v <= MAX_TEMPERATURE),
                               ("top_p", "in [0, 1] (1 = no cut)", lambda v: 0 <= v <= 1)):  # OpenAI's: 0 = the best
            v = getattr(self, name)
            if (f := _as_float(v)) is None or not ok(f):  # float32 in the acceptance: past its range, infinite
                raise InputError(f"{name} must be a number {rule}, got {v!r:.40}")
            setattr(self, name, f)
        if not is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = no cut), got {self.top_k!r:.40}")
        self.top_k = int(self.top_k)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= MAX_TOP_LOGPROBS):
                raise InputError(f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}] (the alternatives per token; "
                                 f"None: off), got {v!r:.40}")
            setattr(self, name, None if v is None else int(v))
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r:.40}")
        self.max_new_tokens = int(self.max_new_tokens)  # a numpy integer as a plain one (JSON, comparisons)
        if self.seed is not None:
            if not is_int(self.seed) or not -2 ** 63 <= self.seed < 2 ** 64:
                raise InputError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r:.40}")
            self.seed = int(self.seed) % 2 ** 64  # a negative seed names the same generator as its unsigned form
        self.stop_strings = _stop_strings(self.stop_strings)
        for name in ("medusa", "context_drafts", "chat", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r:.40}")

    @classmethod
    def from_options(cls, **options) -> "GenerationConfig":
        """``GenerationConfig(**options)``, with an unknown option an InputError naming it rather than a TypeError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InputError(f"unknown option {unknown[0]!r}: the options are {', '.join(sorted(known))}")
        return cls(**options)


def checked_config(cfg) -> GenerationConfig:
    """``cfg`` checked again, as a copy (a caller may have changed a field since it was made: a ``stop_strings`` set to
    one string would stop at any of its characters), or the defaults for None."""
    if cfg is None:
        return GenerationConfig()
    if not isinstance(cfg, GenerationConfig):
        raise InputError(f"the options must be a GenerationConfig, got {type(cfg).__name__:.40}: pass "
                         f"GenerationConfig(...), or keyword options to MedusaRuntime.generate")
    return replace(cfg)


def request_config(config: GenerationConfig | None, options: dict) -> GenerationConfig:
    """A library request's options: ``config`` (checked, as a copy) or the keyword ``options``; InputError for both."""
    if config is None:
        return GenerationConfig.from_options(**options)
    if options:
        first = sorted(options)[0]
        raise InputError(f"give the options as a GenerationConfig or as keywords, not both (config and {first}=...): "
                         f"set {first} in the GenerationConfig")
    return checked_config(config)


def _stop_strings(value) -> tuple[str, ...]:
    """The stop strings as a tuple, or an InputError worded for the library, the CLI (--stop) and the server alike."""
    stops = (value,) if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or not all(isinstance(x, str) for x in stops):
        raise InputError(f"stop strings must be text, got {value!r:.60}")
    if not all(stops):
        raise InputError("a stop string is empty (it would end every answer at once): give non-empty stop strings")
    if len(stops) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in stops):
        raise InputError(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters each "
                         f"(each step's check reads them all): shorten them")
    for x in stops:
        try:
            x.encode("utf-8")
        except UnicodeEncodeError as e:  # no text the model writes can hold it: the string could never match
            raise InputError(f"a stop string holds a lone surrogate ({x[e.start]!a}), which is not valid Unicode: "
                             f"give UTF-8 text") from None
    return tuple(stops)


def effective_temperature(t: float) -> float:
    """The temperature decoding uses: below MIN_TEMPERATURE, 0 (greedy)."""
    return float(t) if t >= MIN_TEMPERATURE else 0.0


def is_int(x) -> bool:
    """An integer, a numpy one included, but not a bool (True is an int to Python, never a count or an id)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _as_float(x) -> float | None:
    """``x`` as a Python float (compared so, a numpy float16's bound cannot overflow), or None when it is no number
    or no float can hold it (an integer of 400 digits)."""
    if not _is_number(x):
        return None
    try:
        return float(x)
    except OverflowError:
        return None


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
