"""What differs between the transformers 5.x releases the project runs on, in one place.

transformers renamed the decoder's KV-cache argument (``past_key_values`` up to about 5.17, ``cache`` in later
5.x releases). An unknown keyword lands in ``**kwargs`` and is ignored, so passing the wrong one does not fail:
the model builds a cache of its own and the caller's stays empty. Ask the forward signature instead.
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _cache_argument(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(decoder, cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``: whichever ``decoder.forward`` takes. A
    ``torch.compile`` wrapper is looked through; a forward that names neither gets ``past_key_values``, which the
    releases that renamed it still accept."""
    decoder = getattr(decoder, "_orig_mod", decoder)
    return {_cache_argument(type(decoder).forward): cache}
