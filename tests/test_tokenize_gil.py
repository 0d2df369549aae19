"""Tokenizing a prompt near the size limit must let other threads run: the server tokenizes on threads of its own
(`serve/app.py`, parse lanes) while the event loop and the engine thread need the GIL between steps. `tokenizers`'
`Tokenizer.encode` holds the GIL for the whole encoding (1.3 s for a 1 MB prompt of the default model): every running
stream stalled that long. `encode_batch` releases it."""

from __future__ import annotations

import threading
import time


def test_encoding_a_long_text_lets_other_threads_run(make_tokenizer):
    tok = make_tokenizer()
    text = " ".join(f"t{i % 300}" for i in range(600_000))
    ticks: list[float] = []
    done = threading.Event()

    def tick() -> None:  # a Python thread that needs the GIL for every tick
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.002)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        time.sleep(0.05)
        start = time.perf_counter()
        ids = tok.encode(text)
        end = time.perf_counter()
    finally:
        done.set()
        ticker.join()
    assert len(ids) == 600_000 and ids[:3] == [0, 1, 2]
    during = sum(start < t < end for t in ticks)
    # With the GIL held the ticker cannot run at all while the text is encoded (0 or 1 tick at its edges); released,
    # it ticks every few milliseconds of the encoding's 0.3 s or more, however loaded the machine
    assert during >= 5, f"another thread ran {during} times in {end - start:.3f} s of encoding"
