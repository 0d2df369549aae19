"""The server decodes concurrent requests together (the batched engine) and every answer is exactly what the
request gets alone; /metrics shows the batch size of each step and how often a step speculated."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from serve_helpers import KEY, build_chat_artifact, metric, serving, wait_idle  # noqa: E402

SEQS = 3
PROMPTS = ["t5 t6 t7", "t40 t41", "t9 t8 t7 t6 t5 t4 t3 t2", "t100"]


@pytest.fixture(scope="module")
def artifact(tiny_dirs, tmp_path_factory):
    return build_chat_artifact(tiny_dirs, tmp_path_factory.mktemp("batching"))


@pytest.fixture(scope="module")
def server(artifact):
    with serving(artifact, "--max-num-seqs", str(SEQS), "--max-queue", "4", "--threads", "1", "--api-key", KEY) as s:
        yield s[0]


def test_concurrent_requests_are_batched_and_answer_as_alone(server, artifact):
    from medusa_export.runtime.api import MedusaRuntime

    rt = MedusaRuntime.load(artifact, threads=1)
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)
    name = client.models.list().data[0].id
    medusa = [True, False, True, False]
    want = [rt.chat([{"role": "user", "content": p}], max_new_tokens=48, medusa=m, ignore_eos=True).text
            for p, m in zip(PROMPTS, medusa)]
    batch_before = (metric(server, "step_batch_size_sum"), metric(server, "step_batch_size_count"))
    got, barrier = {}, threading.Barrier(len(PROMPTS))

    def ask(i: int) -> None:
        barrier.wait(timeout=30)
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPTS[i]}],
                                           max_tokens=48, temperature=0,
                                           extra_body={"medusa": medusa[i], "ignore_eos": True})
        got[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got[i] for i in range(len(PROMPTS))] == want
    total = metric(server, "step_batch_size_sum") - batch_before[0]
    steps = metric(server, "step_batch_size_count") - batch_before[1]
    assert steps > 0 and total / steps > 1.5  # most steps decoded several requests
    wait_idle(server)
    spec = metric(server, "speculative_steps_total")
    r = client.completions.create(model=name, prompt="t5 t6", max_tokens=20, temperature=0)  # alone
    # Whether a step alone verifies drafts follows the step costs measured on this machine (it may not pay): the
    # counter counts exactly the steps of this lone request that did.
    grew, reported = metric(server, "speculative_steps_total") - spec, r.model_extra["metrics"]["speculative_decoding"]
    assert (grew > 0) == (reported["draft_tokens"] > 0) and grew <= reported["steps"]
