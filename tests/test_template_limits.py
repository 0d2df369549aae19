"""Chat templates are code an artifact carries: rendered in a worker process bounded in memory and killed past its
time (`runtime.template_worker`), with checks on values and output (`runtime.template_limits`), so a template
cannot hang a load or a request or allocate gigabytes in the host; message text is never what is checked."""

from __future__ import annotations

import time

import pytest

from conftest import CHATML

from medusa_export.runtime.chat_template import ChatTemplate
from medusa_export.runtime.errors import ArtifactError, InputError

USER = [{"role": "user", "content": "t5 t6"}]
TAIL = "{{ messages[0]['content'] }}"


@pytest.mark.parametrize("body, words", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran for more than 2 s"),
    ("{% for m in messages %}{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}"
     "{% endfor %}{% endfor %}", "ran for more than 2 s"),
    ("{{ 'x' * 3000000000 }}", "repeats a value"),
    ("{{ [1] * 3000000000 }}", "repeats a value"),
    ("{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x + ns.x %}{% endfor %}{{ ns.x|length }}",
     "joins values"),
    ("{{ 10 ** 10 ** 8 }}", "power above 64|number above"),  # (10 ** 10) ** 8: its left side is refused
    ("{{ 2 ** 100000000 }}", "power above 64"),
    ("{{ 'x' | center(1000000000) }}", "number above"),
    ("{{ 'x'.ljust(1000000000) }}", "number above"),
    ("{{ [1, 2] | batch(1000000000, 0) | list }}", "number above"),
    ("{{ '%1000000000s' % 'x' }}", "width of a million"),
    ("{{ '{:>999999999}'.format('x') }}", "width of a million"),
    ("{{ '%1000000000s' | format('x') }}", "width of a million"),
    ("{% for i in range(20000) %}{{ 'x' * 1000 }}{% endfor %}", "wrote more than|ran for more than"),
])
def test_a_template_past_a_limit_is_refused_when_the_artifact_loads(body, words):
    _refused_at_load(body, words, within=15)


def _refused_at_load(body: str, words: str, within: float) -> None:
    """Loading a template of ``body`` fails with an ArtifactError matching ``words`` in under ``within`` seconds."""
    t0 = time.monotonic()
    with pytest.raises(ArtifactError, match=words):
        ChatTemplate(body + TAIL)
    assert time.monotonic() - t0 < within


def test_a_limit_reached_by_a_request_is_an_input_error():
    """A template fine on the load's one message but quadratic in a conversation's length: the request is
    refused (serve answers 400), the process carries on."""
    template = ChatTemplate("{% for a in messages %}{% for b in messages %}{% for i in range(100000) %}{% endfor %}"
                            "{% endfor %}{% endfor %}" + TAIL)
    with pytest.raises(InputError, match="ran for more than 2 s"):
        template.render([{"role": "user", "content": "x"}] * 400)
    assert template.render(USER).endswith("t5 t6")


def test_message_text_is_data_not_checked():
    """Text that looks like a wide format or is long passes through filters and operators untouched."""
    template = ChatTemplate("{% for m in messages %}{{ m['content'] | trim | upper }}{{ m['content'] + '!' }}"
                            "{{ m['content'].strip() }}{% endfor %}")
    text = "%1234567890s {:>99999999} " + "y" * 200_000
    out = template.render([{"role": "user", "content": text}])
    assert out == text.upper() + text + "!" + text.strip()


def test_a_real_template_renders_as_before():
    template = ChatTemplate(CHATML)
    assert "t5 t6" in template.render(USER)


@pytest.mark.parametrize("body, words", [
    # `~` joins and block captures are no binop the environment sees: the worker's address-space limit stops them
    ("{% set a = 'a' * 16000000 %}{% set b = a ~ a ~ a ~ a %}{% set c = b ~ b ~ b ~ b %}{% set d = c ~ c ~ c ~ c %}"
     "{{ d | length }}", "more than 1024 MiB|ended its worker|ran for more than"),
    ("{% set a = 'a' * 16000000 %}{% set b %}{{ a }}{{ a }}{{ a }}{{ a }}{% endset %}{% set c %}{{ b }}{{ b }}{{ b }}"
     "{{ b }}{% endset %}{% set d %}{{ c }}{{ c }}{{ c }}{{ c }}{% endset %}{{ d | length }}",
     "more than 1024 MiB|ended its worker|ran for more than"),
    # a filter doing seconds of work per call, in a short loop: the worker is killed at the deadline
    ("{% for i in range(200) %}{% set _ = ([i] * 16000000) | unique | list %}{% endfor %}", "ran for more than 2 s"),
])
def test_what_the_checks_cannot_see_the_worker_bounds(body, words):
    _refused_at_load(body, words, within=30)
    assert ChatTemplate(CHATML).render(USER).count("t5 t6") == 1  # a new worker, or the same one, renders on


def test_without_a_worker_the_checks_still_bound_time(monkeypatch):
    """Where no worker process can start, templates render in this process, under the line tracer's deadline."""
    import medusa_export.runtime.chat_template as chat_template

    monkeypatch.setattr(chat_template, "shared_worker", lambda: None)
    with pytest.raises(ArtifactError, match="ran for more than 2 s"):
        ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + TAIL)
    assert "t5 t6" in ChatTemplate(CHATML).render(USER)


def test_a_render_waits_for_a_free_worker_only_so_long(monkeypatch):
    """Slow renders hold workers: another render waits at most WAIT_S for one (BusyError: serve's 503), not
    without end behind them."""
    import threading

    from medusa_export.runtime import template_worker
    from medusa_export.runtime.errors import BusyError

    monkeypatch.setattr(template_worker, "WAIT_S", 0.3)
    pool = template_worker.TemplatePool(size=1)
    slow = ("{% if messages[0]['content'] == 'SLOW' %}{% for i in range(100000) %}{% for j in range(100000) %}"
            "{% endfor %}{% endfor %}{% endif %}" + TAIL)
    try:
        holder = threading.Thread(target=lambda: pytest.raises(Exception, pool.render, slow, "", "",
                                                               [([{"role": "user", "content": "SLOW"}], True)]))
        holder.start()
        time.sleep(0.5)  # the slow render holds the only worker
        t0 = time.monotonic()
        with pytest.raises(BusyError, match="stayed busy"):
            pool.render(slow, "", "", [(USER, True)])
        assert time.monotonic() - t0 < 2
        holder.join(30)
        assert pool.render(slow, "", "", [(USER, True)]) == ["t5 t6"]  # free again once the slow one ended
    finally:
        pool.close()


def test_an_interrupted_render_never_hands_its_reply_to_the_next(monkeypatch):
    """A call interrupted while the worker renders (Ctrl-C in a notebook): that worker is replaced, so the next
    call gets its own reply, not the interrupted one's."""
    from medusa_export.runtime import template_worker

    pool = template_worker.TemplatePool(size=1)
    slow = ("{% if messages[0]['content'] == 'SLOW' %}{% for i in range(3000) %}{% for j in range(3000) %}"
            "{% endfor %}{% endfor %}{% endif %}{{ messages[0]['content'] }}")
    try:
        with pytest.raises(KeyboardInterrupt):
            monkeypatch.setattr(template_worker, "_receive", _interrupting(template_worker._receive))
            pool.render(slow, "", "", [([{"role": "user", "content": "SLOW"}], True)])
        monkeypatch.undo()
        assert pool.render(slow, "", "", [([{"role": "user", "content": "B"}], True)]) == ["B"]
        assert pool.render(slow, "", "", [([{"role": "user", "content": "C"}], True)]) == ["C"]
    finally:
        pool.close()


def _interrupting(receive):
    """`_receive` raising KeyboardInterrupt once the request is on its way (the worker busy with it)."""
    def interrupted(pipe, timeout_s):
        time.sleep(0.1)
        raise KeyboardInterrupt

    return interrupted


def test_a_worker_that_cannot_start_leaves_the_render_to_this_process(monkeypatch):
    """A worker killed, then no interpreter to start another: that render runs here, under the checks, and is
    not blamed on the template or the client."""
    from medusa_export.runtime import template_worker

    template = ChatTemplate(CHATML)
    worker = template._worker
    if worker is None:
        pytest.skip("no worker process on this machine")
    for w in worker.workers:
        w.close()
    monkeypatch.setattr(template_worker.sys, "executable", "/nonexistent/python")
    assert "t5 t6" in template.render(USER)


def test_a_program_that_is_no_worker_is_refused_at_start(monkeypatch, tmp_path):
    """Whatever another program prints (a usage text) is not read as a frame: the start fails, in one error."""
    from medusa_export.runtime import template_worker

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Usage: python [options]'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(template_worker.sys, "executable", str(fake))
    with pytest.raises(template_worker.WorkerUnavailable):
        template_worker.TemplateWorker().start()


def test_a_path_object_on_sys_path_does_not_stop_the_worker(monkeypatch, tmp_path):
    """The import system ignores a pathlib.Path in sys.path; the worker's start did not (a TypeError)."""
    from pathlib import Path

    from medusa_export.runtime import template_worker

    monkeypatch.setattr(template_worker.sys, "path", [Path(tmp_path), *template_worker.sys.path])
    worker = template_worker.TemplateWorker()
    try:
        assert worker.render(CHATML, "", "", [(USER, True)])[0].count("t5 t6") == 1
    finally:
        worker.close()


def test_a_template_writing_the_sentinels_itself_is_an_input_error():
    template = ChatTemplate(CHATML + "{{ '\\ufdd0' }}7{{ '\\ufdd1' }}".encode().decode("unicode_escape"))
    with pytest.raises(InputError, match="writes the noncharacters"):
        template.pieces(USER)


@pytest.mark.parametrize("body", ["{{ ('x' * 1000000) | wordwrap(1) | length }}",
                                  "{{ lipsum(n=20000, html=False, min=100, max=101) | length }}"])
def test_a_slow_filter_is_stopped_in_time_in_the_host_process(body):
    """Where no worker runs, a render runs here under the trace: a filter written in Python (wordwrap, lipsum) ran
    for 16 s in untraced host code before the template's next line found its time up. Its calls are timed too."""
    from medusa_export.runtime.chat_template import environment
    from medusa_export.runtime.template_limits import MAX_RENDER_S, TemplateLimitError, bounded_render

    t0 = time.monotonic()
    with pytest.raises(TemplateLimitError, match="ran for more than"):
        bounded_render(environment().from_string(body), messages=USER)
    assert time.monotonic() - t0 < MAX_RENDER_S + 1.5
