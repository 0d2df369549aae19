"""The PyTorch reference backend's sessions (`exporter/torch_backend.py`)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")


def test_a_reset_torch_session_serves_a_new_sequence_as_a_fresh_one(tiny):
    """The batched engine reuses a slot's session for the next request (`Session.reset`); the PyTorch session could
    not, so it allocated a second cache beside the first while the old one was still held."""
    backend = tiny.backend(2, "own")
    first, second = [5, 6, 7, 8, 9], [1, 2, 3]
    session = backend.new_session()

    def run(s, prompt):
        return s.run(np.asarray(prompt), np.arange(len(prompt)), np.tri(len(prompt), dtype=bool), True, 0.0)

    out = run(session, first)
    session.keep(np.arange(len(first)))
    session.reset()
    assert session.length == 0
    again, fresh = run(session, second), run(backend.new_session(), second)
    np.testing.assert_array_equal(again.next_ids, fresh.next_ids)
    np.testing.assert_array_equal(again.next_probs, fresh.next_probs)
    np.testing.assert_array_equal(again.medusa_ids, fresh.medusa_ids)
    assert out.next_ids.shape[0] == len(first)
