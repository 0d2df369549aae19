"""OpenAI's ``logprobs`` through `medusa-export serve`: chat's ``logprobs`` / ``top_logprobs`` and the completions
endpoint's ``logprobs: N``, parsed by the `openai` client, equal to the library's values, the same streamed as
whole and whatever shares the batch."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from serve_helpers import (KEY, PROMPT, build_chat_artifact, load_runtime, openai_client, serving,  # noqa: E402
                           stream_chunks)

MESSAGES = [{"role": "user", "content": PROMPT}]


@dataclass
class Served:
    artifact: object  # its directory
    base: str  # the server's URL
    client: object  # an openai client of it
    runtime: object  # the same artifact in-process, for the values a request must equal


@pytest.fixture(scope="module")
def served(tiny_dirs, tmp_path_factory):
    artifact = build_chat_artifact(tiny_dirs, tmp_path_factory.mktemp("logprobs"))
    rt = load_runtime(artifact)
    try:
        with serving(artifact, "--max-num-seqs", "4", "--threads", "1", "--api-key", KEY) as (base, _):
            yield Served(artifact, base, openai_client(base), rt)
    finally:
        rt.close()


def _name(client) -> str:
    """The served model's name (the artifact's)."""
    return client.models.list().data[0].id


def test_chat_logprobs_are_the_librarys_and_parse(served):
    client, runtime = served.client, served.runtime
    ids = runtime.generator.tokenizer.encode_chat(MESSAGES)
    want = runtime.generate(ids, max_new_tokens=8, logprobs=3, medusa=False, ignore_eos=True)
    r = client.chat.completions.create(model=_name(client), messages=MESSAGES, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    (choice,) = r.choices
    assert not choice.logprobs.model_extra and choice.logprobs.refusal is None
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens == len(want.token_ids)
    tok = runtime.generator.tokenizer.tokenizer
    for got, e in zip(content, want.logprobs):
        assert got.token == tok.decode([e.token_id]) and bytes(got.bytes) == got.token.encode()
        assert got.logprob == pytest.approx(e.logprob, abs=1e-5)  # the server decoded with Medusa, batched
        assert [t.token for t in got.top_logprobs] == [tok.decode([i]) for i, _ in e.top]
        assert got.top_logprobs[0].logprob == got.logprob  # greedy: the chosen token is the best
    plain = client.chat.completions.create(model=_name(client), messages=MESSAGES, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None  # not asked for
    zero = client.chat.completions.create(model=_name(client), messages=MESSAGES, max_tokens=2, temperature=0,
                                          logprobs=True)
    assert [c.top_logprobs for c in zero.choices[0].logprobs.content] == [[], []]


def test_completion_logprobs_shape_and_offsets(served):
    client, runtime = served.client, served.runtime
    want = runtime.generate(runtime.generator.tokenizer.encode(PROMPT), max_new_tokens=6, logprobs=2,
                            medusa=False, ignore_eos=True)
    r = client.completions.create(model=_name(client), prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e.logprob for e in want.logprobs], abs=1e-5)
    assert len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == value and len(top) <= 3  # the two best, and the chosen token (among them: greedy)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    none = client.completions.create(model=_name(client), prompt=PROMPT, max_tokens=2, temperature=0, logprobs=0)
    assert all(list(top) == [token] for token, top in zip(none.choices[0].logprobs.tokens,
                                                           none.choices[0].logprobs.top_logprobs))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_carries_the_same_logprobs_as_the_whole_answer(served, path):
    client = served.client
    chat = "chat" in path
    body = ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 2} if chat else
            {"prompt": PROMPT, "logprobs": 2}) | {"max_tokens": 10, "temperature": 0, "ignore_eos": True}
    whole = (client.chat.completions.create if chat else client.completions.create)(
        model=_name(client), **{k: v for k, v in body.items() if k != "ignore_eos"}, extra_body={"ignore_eos": True})
    chunks = stream_chunks(served.base, path, {"model": _name(client), **body})
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    if chat:
        assert [x for p in parts for x in p["content"]] == whole.to_dict()["choices"][0]["logprobs"]["content"]
    else:
        merged = {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                  "text_offset")}
        assert merged == whole.to_dict()["choices"][0]["logprobs"]


def test_batched_requests_get_the_values_they_get_alone(served):
    """Four greedy requests at once (one batch) with logprobs: each equals the same request sent alone."""
    client = served.client
    prompts = [PROMPT, "t40 t41", "t9 t9 t9 t9", "t100 t3"]

    def ask(prompt: str) -> dict:
        r = client.completions.create(model=_name(client), prompt=prompt, max_tokens=12, temperature=0,
                                      logprobs=1, extra_body={"ignore_eos": True})
        return r.to_dict()["choices"][0]["logprobs"]

    alone = [ask(p) for p in prompts]
    together: list = [None] * 4
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(prompts[i]))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for a, b in zip(alone, together):
        assert b["tokens"] == a["tokens"]
        assert b["token_logprobs"] == pytest.approx(a["token_logprobs"], abs=1e-5)


def test_a_byte_level_tokens_bytes_are_exact_where_it_holds_part_of_a_character():
    """A byte-level BPE token may hold part of a character: its text shows U+FFFD, its bytes are the real ones, so a
    client joins the bytes of an answer's tokens into its text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from medusa_export.runtime.serve.logprobs_json import TokenPieces
    from medusa_export.runtime.tokenizer import ChatTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world", "caf\u00e9 au lait"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|im_end|>"]))
    pieces = TokenPieces(ChatTokenizer(tok))
    text = "caf\u00e9 \U0001f600 hello"
    ids = tok.encode(text).ids
    assert any("\ufffd" in pieces.text(i) for i in ids)  # the emoji's four bytes are split over tokens
    assert bytes(b for i in ids for b in pieces.bytes(i)).decode() == text
    assert pieces.text(tok.token_to_id("<|im_end|>")) == "<|im_end|>"  # special tokens as written
    # text_offset: positions in the answer's text, a split character counted once (it drifted by the U+FFFDs before)
    from medusa_export.runtime.logprobs import TokenLogprob
    from medusa_export.runtime.serve.logprobs_json import AnswerLogprobs

    answer = AnswerLogprobs(pieces, chat=False)
    first = answer.render([TokenLogprob(i, -1.0, ()) for i in ids[:3]])  # rendered in two parts, as a stream's chunks
    rest = answer.render([TokenLogprob(i, -1.0, ()) for i in ids[3:]])
    offsets, tokens = first["text_offset"] + rest["text_offset"], first["tokens"] + rest["tokens"]
    assert offsets == sorted(offsets) and answer.offset == len(text)
    whole = [(at, t) for at, t in zip(offsets, tokens) if "\ufffd" not in t]
    assert whole and all(text[at:at + len(t)] == t for at, t in whole), list(zip(offsets, tokens))


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(served):
    """lm-evaluation-harness's loglikelihood request (`local-completions`): token ids, max_tokens 1, logprobs 1, echo.
    The prompt's tokens come first, the first with null, each with the library's values; then the answer's."""
    client, runtime = served.client, served.runtime
    ids = runtime.generator.tokenizer.encode("t5 t6 t7 t8 t9 t10 t11")
    want = runtime.generate(ids, max_new_tokens=1, prompt_logprobs=1, logprobs=1, medusa=False)
    r = client.completions.create(model=_name(client), prompt=[ids], max_tokens=1, temperature=0, logprobs=1,
                                  echo=True, seed=1234)
    choice = r.choices[0]
    assert choice.text == runtime.generator.tokenizer.decode(ids) + want.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([e.logprob for e in want.prompt_logprobs[1:] + want.logprobs],
                                                  abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1
    text = client.completions.create(model=_name(client), prompt="t5 t6", max_tokens=2, temperature=0, echo=True)
    assert text.choices[0].text.startswith("t5 t6") and text.choices[0].logprobs is None


def test_a_sentencepiece_tokens_text_keeps_its_space_and_a_byte_piece_its_byte():
    """Llama 2-style tokenizers (Metaspace, byte fallback): decoding one token alone drops its leading space and
    turns a byte piece into U+FFFD; read from the piece, the tokens join into the answer's text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from medusa_export.runtime.logprobs import TokenLogprob
    from medusa_export.runtime.serve.logprobs_json import AnswerLogprobs, TokenPieces
    from medusa_export.runtime.tokenizer import ChatTokenizer

    vocab = {"<unk>": 0, "\u2581Hello": 1, "\u2581world": 2, "<0xF0>": 3, "<0x9F>": 4, "<0x8C>": 5, "<0xB1>": 6}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    pieces = TokenPieces(ChatTokenizer(tok))
    ids = [1, 2, 3, 4, 5, 6]
    assert [pieces.text(i) for i in ids[:2]] == [" Hello", " world"]
    assert bytes(b for i in ids for b in pieces.bytes(i)).decode() == " " + tok.decode(ids)  # the answer's first
    # space is the one the decoder strips at the start of a text
    # Byte pieces share the text U+FFFD: an entry keeps the best of them (the chosen token's own value where it is one)
    lp = AnswerLogprobs(pieces, chat=False).render([TokenLogprob(1, -0.1, ((1, -0.1), (3, -0.5), (4, -1.5))),
                                                    TokenLogprob(4, -1.5, ((3, -0.5), (4, -1.5)))])
    assert lp["top_logprobs"] == [{" Hello": -0.1, "\ufffd": -0.5}, {"\ufffd": -1.5}]


def test_an_answer_that_ends_on_its_end_of_sequence_token_lists_that_tokens_entry(served):
    """An echoed prompt whose next token is the end of sequence: lm-evaluation-harness reads the entry after the prompt
    (max_tokens 1), which the completions endpoint gives as OpenAI's did, though the token is no part of the text.
    In-process, with the greedy token after the prompt made the tokenizer's end of sequence."""
    from fastapi.testclient import TestClient

    from medusa_export.runtime.serve.app import create_app

    rt = load_runtime(served.artifact)
    ids = [5, 6, 7]
    stop = rt.generate(ids, max_new_tokens=1, medusa=False).token_ids[0]
    chat_ids = rt.generator.tokenizer.encode_chat(MESSAGES)
    rt.generator.tokenizer.eos_token_ids = (stop, rt.generate(chat_ids, max_new_tokens=1, medusa=False).token_ids[0])
    try:
        want = rt.generate(ids, max_new_tokens=1, logprobs=1, prompt_logprobs=1, medusa=False)
        assert want.new_tokens == 0 and want.logprobs == [] and want.eos_logprob.token_id == stop
        with TestClient(create_app(rt), base_url="http://127.0.0.1") as http:
            body = {"prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1}
            r = http.post("/v1/completions", json=body | {"echo": True}).json()
            lp = r["choices"][0]["logprobs"]
            assert r["usage"]["completion_tokens"] == 0 and len(lp["token_logprobs"]) == len(ids) + 1
            assert lp["token_logprobs"][-1] == pytest.approx(want.eos_logprob.logprob, abs=1e-5)
            assert lp["tokens"][-1] == f"t{stop}"
            chunks = [json.loads(line[len("data: "):]) for line in http.post(
                "/v1/completions", json=body | {"stream": True}).text.splitlines() if line.startswith("data: {")]
            assert [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])] == [f"t{stop}"]
            chat = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1, "temperature": 0,
                                                           "logprobs": True}).json()
            assert chat["choices"][0]["logprobs"]["content"] == [] and chat["usage"]["completion_tokens"] == 0  # chat
            # lists the tokens of its content only, as OpenAI's chat does
    finally:
        rt.close()


def test_echo_with_no_tokens_to_make_scores_the_prompt_alone(served):
    """max_tokens 0 with echo (vLLM's echo without generation, OpenAI's scoring call): the prompt's text and values,
    no answer; without echo, 0 is refused under its name."""
    client = served.client
    ids = served.runtime.generator.tokenizer.encode("t5 t6 t7 t8")
    one = client.completions.create(model=_name(client), prompt=[ids], max_tokens=1, temperature=0, logprobs=2,
                                    echo=True)
    zero = client.completions.create(model=_name(client), prompt=[ids], max_tokens=0, temperature=0, logprobs=2,
                                     echo=True)
    assert zero.choices[0].text == served.runtime.generator.tokenizer.decode(ids)
    assert zero.usage.completion_tokens == 0 and zero.choices[0].finish_reason == "length"
    assert zero.choices[0].logprobs.tokens == one.choices[0].logprobs.tokens[:len(ids)]
    assert zero.choices[0].logprobs.token_logprobs == one.choices[0].logprobs.token_logprobs[:len(ids)]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=_name(client), prompt=[ids], max_tokens=0)
    assert e.value.param == "max_tokens"


def test_echo_with_logprobs_is_a_400_where_the_backend_cannot_score_prompts(served):
    """TensorRT (`Backend.scores_prompts` False): the engine refused the request when it was queued, an InputError
    that reached the client as a 500; the server refuses it first, naming echo. Echo alone still answers."""
    from fastapi.testclient import TestClient

    from medusa_export.runtime.serve.app import create_app

    rt = load_runtime(served.artifact)
    rt.generator.backend.scores_prompts = False  # as TrtBackend sets it
    try:
        with TestClient(create_app(rt), base_url="http://127.0.0.1") as http:
            body = {"prompt": "t1 t2 t3", "max_tokens": 1, "echo": True}
            r = http.post("/v1/completions", json=body | {"logprobs": 1})
            assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
            assert http.post("/v1/completions", json=body).status_code == 200
    finally:
        rt.close()


def test_an_echoed_prompt_of_token_ids_keeps_its_special_tokens(served):
    """Echoed as the same prompt sent as text reads: special tokens as written, as the logprobs' tokens name them."""
    client = served.client
    text = "<|im_start|>user\nt5 t6<|im_end|>"
    ids = served.runtime.generator.tokenizer.encode(text)
    by_ids = client.completions.create(model=_name(client), prompt=[ids], max_tokens=0, echo=True, logprobs=0)
    by_text = client.completions.create(model=_name(client), prompt=text, max_tokens=0, echo=True, logprobs=0)
    assert "<|im_start|>" in by_ids.choices[0].text and by_ids.choices[0].logprobs.tokens[0] == "<|im_start|>"
    assert by_ids.choices[0].logprobs.tokens == by_text.choices[0].logprobs.tokens


def test_text_offset_indexes_the_text_past_cut_characters_and_skipped_special_tokens():
    """An echoed prompt of token ids may end inside a character, or cut one short (lm-eval's windows of ids): its text
    shows U+FFFD there, and the answer's text starts afresh; an answer's special tokens are no part of its text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from medusa_export.runtime.logprobs import TokenLogprob
    from medusa_export.runtime.serve.logprobs_json import AnswerLogprobs, TokenPieces
    from medusa_export.runtime.tokenizer import ChatTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|im_end|>"]))
    pieces = TokenPieces(ChatTokenizer(tok))
    emoji = tok.encode("\U0001f600").ids  # its four bytes, one token each
    hello, special = tok.encode(" hello").ids, tok.token_to_id("<|im_end|>")

    def check(prompt, answer, text):
        scored = [None] + [TokenLogprob(i, -1.0, ()) for i in prompt[1:]]
        lp = AnswerLogprobs(pieces, chat=False).render_echo(prompt, scored, [TokenLogprob(i, -1.0, ()) for i in answer])
        for at, t in zip(lp["text_offset"], lp["tokens"]):
            if "\ufffd" not in t and not (t == "<|im_end|>" and len(answer)):
                assert text[at:at + len(t)] == t, (lp, text)

    a = tok.token_to_id("a")
    ids = [a, *emoji[:2], *hello]  # a character cut short inside the prompt
    check(ids, [], tok.decode(ids))
    ids = [a, *emoji[:2]]  # the prompt ends inside a character; the answer's text is decoded apart
    check(ids, hello, tok.decode(ids) + tok.decode(hello))
    check([a], [special, *hello], "a" + tok.decode(hello))  # a special token the answer's text skips
