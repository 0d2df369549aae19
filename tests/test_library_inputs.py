"""What a library caller may pass to `MedusaRuntime`: every bad value is an InputError naming it, raised before any
decoding (found by attacking the library: ids outside the vocabulary failed inside ONNX Runtime or wrapped
around, a negative seed or a string option failed in numpy, an unknown option was a TypeError)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_VOCAB

from medusa_export.runtime.decode import GenerationConfig
from medusa_export.runtime.errors import InputError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def rt(artifact):
    from medusa_export.runtime.api import MedusaRuntime

    with MedusaRuntime.load(artifact, threads=1) as runtime:
        yield runtime


@pytest.mark.parametrize("prompt", [[TINY_VOCAB], [-1], [5, 10 ** 6], ["a"], [2 ** 70], [True], [5.0], 7])
def test_token_ids_outside_the_vocabulary_are_refused(rt, prompt):
    with pytest.raises(InputError, match="token ids|prompt must be"):
        rt.generate(prompt, max_new_tokens=2)


def test_numpy_token_ids_are_token_ids(rt):
    ids = [5, 17, 3]
    want = rt.generate(ids, max_new_tokens=4, medusa=False).token_ids
    assert rt.generate(np.array(ids, np.int32), max_new_tokens=4, medusa=False).token_ids == want


@pytest.mark.parametrize("options, needle", [
    ({"seed": "x"}, "seed"), ({"seed": 2 ** 64}, "seed"), ({"max_new_tokens": "5"}, "max_new_tokens"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"medusa": 1}, "medusa"), ({"stop_strings": [""]}, "stop_strings"),
    ({"temperature": float("nan")}, "temperature"), ({"max_tokens": 3}, "unknown option 'max_tokens'"),
])
def test_bad_options_are_input_errors(options, needle):
    with pytest.raises(InputError, match=needle):
        GenerationConfig.from_options(**options)


def test_a_negative_seed_is_its_unsigned_form(rt):
    """As the server reads it: -1 and 2**64 - 1 name the same sampling (numpy refused negative seeds)."""
    a = rt.generate([5, 17, 3], max_new_tokens=6, temperature=0.9, seed=-1, medusa=False)
    b = rt.generate([5, 17, 3], max_new_tokens=6, temperature=0.9, seed=2 ** 64 - 1, medusa=False)
    assert a.token_ids == b.token_ids


def test_generate_many_refuses_an_unknown_option(rt):
    with pytest.raises(InputError, match="unknown option 'max_tokens'"):
        rt.generate_many([[5, 6]], max_tokens=3)


def test_generate_refuses_an_unknown_option(rt):
    with pytest.raises(InputError, match="unknown option 'max_tokens'"):
        rt.generate([5, 6], max_tokens=3)


@pytest.mark.parametrize("threads", [0, -1, 10 ** 11, 2.5])
def test_thread_counts_onnx_runtime_cannot_take_are_refused(artifact, threads):
    from medusa_export.runtime.api import MedusaRuntime

    with pytest.raises(InputError, match="threads must be an integer"):
        MedusaRuntime.load(artifact, threads=threads)


def test_a_closed_runtime_says_so(artifact):
    from medusa_export.runtime.api import MedusaRuntime

    runtime = MedusaRuntime.load(artifact, threads=1)
    runtime.close()
    with pytest.raises(InputError, match="closed"):
        runtime.generate([5, 6], max_new_tokens=2)
