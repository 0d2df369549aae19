"""scripts/peer_runners.py and compare_peers.summarize: what the peer comparison records per request, the closed
loop that keeps N requests in flight, and our rows through the batched engine (same answers as one at a time)."""

from __future__ import annotations

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def runners():
    return load_script("peer_runners")


def test_delivery_stops_at_eos_and_at_the_budget(runners):
    run = runners.Run(submitted=0.0)
    assert not run.deliver([5, 6], eos={9}, max_new=10)
    assert run.deliver([7, 9, 8], eos={9}, max_new=10)  # EOS ends it; what follows EOS is dropped
    assert run.ids == [5, 6, 7] and len(run.arrivals) == 2 and run.done >= run.arrivals[-1]
    assert run.deliver([4, 4], eos={9}, max_new=10) and run.ids == [5, 6, 7]  # a tool that goes on past our EOS
    capped = runners.Run(submitted=0.0)
    assert capped.deliver([1, 2, 3], eos=set(), max_new=2) and capped.ids == [1, 2]
    empty = runners.Run(submitted=0.0)
    assert empty.deliver([9], eos={9}, max_new=4) and empty.ids == [] and empty.arrivals == []


@pytest.mark.parametrize("n,concurrency", [(7, 3), (2, 8), (5, 1)])
def test_closed_loop_keeps_n_in_flight_and_runs_each_request_once(runners, n, concurrency):
    in_flight, started, peak = [], [], [0]

    def submit(i: int) -> None:
        started.append(i)
        in_flight.append(i)
        peak[0] = max(peak[0], len(in_flight))

    def step() -> list[int]:
        ended = in_flight[:1] if len(in_flight) % 2 or len(started) == n else []  # not every step ends one
        for i in ended:
            in_flight.remove(i)
        return ended

    runners.closed_loop(n, concurrency, submit, step)
    assert started == list(range(n)) and not in_flight and peak[0] == min(n, concurrency)


def test_our_rows_batched_equal_one_at_a_time(artifact):
    """The batched engine through the comparison's runner: every answer equals its one-at-a-time answer, and the
    summary says so."""
    from medusa_export.runtime.api import MedusaRuntime

    runners = load_script("peer_runners")
    compare = load_script("compare_peers")
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12], [13], [2, 4, 6, 8]]
    with MedusaRuntime.load(artifact, backend="ort", threads=1) as rt:
        alone = runners.run_ours(rt, prompts, 12, 1, medusa=False)
        for medusa in (False, True):
            batched = runners.run_ours(rt, prompts, 12, 3, medusa=medusa)
            assert [r.ids for r in batched] == [r.ids for r in alone]
            row = compare.summarize("ours", 3, batched, [r.ids for r in alone])
            assert row["identical_to_reference"] == "5/5" and row["agreement"] == 1.0
            assert row["new_tokens"] == sum(len(r.ids) for r in alone) and row["tokens_per_s"] > 0
