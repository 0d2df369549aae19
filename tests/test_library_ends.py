"""How a library request ends (found by attacking the library): the text held back when the KV capacity ends an
answer, batchers dropped without close(), and options changed after they were checked."""

from __future__ import annotations

import gc
import threading
import time

import pytest

from medusa_export.runtime.decode import GenerationConfig
from medusa_export.runtime.errors import InputError
from medusa_export.runtime.text_output import TextOutput

pytest.importorskip("onnxruntime")

PROMPT = list(range(5, 15))  # token ids: no chat template
CAPACITY = 16  # max_seq at load: the answer reaches the end of the KV buffer after a few tokens


def test_an_end_outside_the_tokens_shows_the_text_held_back(make_tokenizer):
    """A tail that may begin a stop string is held back while the answer goes on; when the answer ends for a reason
    its tokens do not give (the KV buffer is full), that tail is the answer's end, as at the token budget."""
    out = TextOutput(make_tokenizer(), GenerationConfig(stop_strings=("t7 zz",)))
    assert out.push([5, 6, 7]).text == "t5 t6 "
    event = out.end("length")
    assert event.text == "t7" and event.token_ids == []
    assert out.text == "t5 t6 t7" and out.finish == "length"
    assert out.end("length") is None  # ended once


def _ended_at_capacity(result, text: str) -> None:
    assert result.finish_reason == "length" and result.text == text


def test_an_answer_ended_by_the_kv_capacity_keeps_its_last_text(artifact):
    """The text held back for a possible stop string was dropped when the KV buffer, not the token budget, ended the
    answer: the result and the stream ended early, alone and batched, Medusa on or off."""
    from medusa_export.runtime.api import MedusaRuntime

    with MedusaRuntime.load(artifact, threads=1, max_seq=CAPACITY) as rt:
        plain = rt.generate(PROMPT, max_new_tokens=64, ignore_eos=True, medusa=False)
        assert plain.finish_reason == "length" and plain.new_tokens < 64  # the capacity ended it
        options = dict(max_new_tokens=64, ignore_eos=True, stop_strings=[plain.text[-1] + "\x01"])
        for medusa in (False, True):
            _ended_at_capacity(rt.generate(PROMPT, medusa=medusa, **options), plain.text)
            stream = rt.stream(PROMPT, medusa=medusa, **options)
            assert "".join(e.text for e in stream) == plain.text
            _ended_at_capacity(stream.result, plain.text)
        for result in rt.generate_many([PROMPT, PROMPT[:3], PROMPT], **options):
            if result.prompt_tokens == len(PROMPT):
                _ended_at_capacity(result, plain.text)
        with rt.batcher(max_num_seqs=1) as batcher:  # alone in the engine: one-sequence steps
            handle = batcher.submit(PROMPT, **options)
            assert "".join(e.text for e in handle) == plain.text
            _ended_at_capacity(handle.wait(), plain.text)


def _engine_threads() -> int:
    return sum(t.name == "medusa-engine" for t in threading.enumerate())


def _settle(count: int, timeout: float = 60.0) -> int:
    """The number of engine threads once it reaches ``count`` (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while _engine_threads() != count and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    return _engine_threads()


def test_a_dropped_batcher_finishes_its_requests_then_stops(artifact):
    """A batcher dropped without close() kept its thread and KV slots for ever, out of reach of the runtime's close:
    now its requests still end as they would, and then the thread stops."""
    from medusa_export.runtime.api import MedusaRuntime

    with MedusaRuntime.load(artifact, threads=1) as rt:
        before = _engine_threads()
        alone = rt.generate(PROMPT, max_new_tokens=8, ignore_eos=True).token_ids
        handle = rt.batcher(max_num_seqs=2).submit(PROMPT, max_new_tokens=8, ignore_eos=True)  # the batcher dropped
        assert handle.wait().token_ids == alone
        for _ in range(3):
            rt.batcher()
        assert _settle(before) == before


def test_closing_the_runtime_stops_a_dropped_batchers_requests(artifact):
    from medusa_export.runtime.api import MedusaRuntime

    runtime = MedusaRuntime.load(artifact, threads=1)
    before = _engine_threads()
    handle = runtime.batcher().submit([5, 6], max_new_tokens=10_000, ignore_eos=True, medusa=False)
    gc.collect()
    next(iter(handle))  # running
    runtime.close()
    assert handle.wait().finish_reason == "abort"
    assert _settle(before) == before


@pytest.mark.parametrize("field, value", [("stop_strings", "t7"), ("max_new_tokens", 0), ("temperature", -1.0),
                                          ("medusa", "no")])
def test_options_changed_after_they_were_checked_are_checked_again(rt_tiny, field, value):
    """A GenerationConfig is checked when made; a field set afterwards reached decoding unchecked (a stop_strings
    set to one string stopped at any of its characters)."""
    cfg = GenerationConfig(max_new_tokens=4)
    setattr(cfg, field, value)
    if field == "stop_strings":  # a string is one stop string, as the constructor takes it
        ended = rt_tiny.generator.generate(PROMPT, cfg)
        assert ended.text == rt_tiny.generate(PROMPT, max_new_tokens=4, stop_strings=["t7"]).text
        return
    with pytest.raises(InputError, match=field):
        rt_tiny.generator.generate(PROMPT, cfg)
    with pytest.raises(InputError, match=field):
        rt_tiny.generator.stream(PROMPT, cfg)


@pytest.mark.parametrize("cfg", [{"max_new_tokens": 3}, 3, "greedy"])
def test_options_that_are_no_generation_config_are_refused(rt_tiny, cfg):
    with pytest.raises(InputError, match="GenerationConfig"):
        rt_tiny.generator.generate(PROMPT, cfg)


@pytest.fixture(scope="module")
def rt_tiny(artifact):
    from medusa_export.runtime.api import MedusaRuntime

    with MedusaRuntime.load(artifact, threads=1) as runtime:
        yield runtime


def test_a_cancel_after_the_last_event_keeps_the_finish_reason(rt_tiny):
    """A request cancelled once its last event was sent (before the engine handed back its slot) ended as "abort",
    though its answer was whole: as a closed stream, it keeps the reason it ended with."""
    from medusa_export.runtime.engine import Engine
    from medusa_export.runtime.text_output import StreamEvent

    engine = Engine(rt_tiny.generator, max_num_seqs=2)
    ends = []

    def sink(item):
        if isinstance(item, StreamEvent):
            engine.cancel(seq)  # the caller has what it wanted
        else:
            ends.append(item)

    seq = engine.add(PROMPT, GenerationConfig(max_new_tokens=1), sink)
    try:
        while engine.step():
            pass
    finally:
        engine.close()
    assert [r.finish_reason for r in ends] == ["length"] and ends[0].new_tokens == 1


def test_a_dropped_handle_cancels_its_request(rt_tiny):
    """A handle nobody holds any more decoded its request to the end (the engine held it), keeping a slot from the
    others; now its request is cancelled and the slot freed."""
    with rt_tiny.batcher(max_num_seqs=1) as batcher:
        dropped = batcher.submit([5, 6], max_new_tokens=10_000, ignore_eos=True, medusa=False)
        next(iter(dropped))  # running
        seq = dropped.sequence
        del dropped
        gc.collect()
        assert seq.cancelled == "abort"
        after = batcher.submit(PROMPT, max_new_tokens=4, ignore_eos=True).wait()  # gets the only slot
        assert after.finish_reason == "length" and after.new_tokens == 4
