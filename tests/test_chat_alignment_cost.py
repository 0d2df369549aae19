"""Finding each message's text in a rendering (`chat_template._one_placement`) costs a bounded amount per request:
a conversation of thousands of short messages under a template that transforms message text (Qwen3's
``content.split('</think>')[-1]``) took seconds of CPU for a 100 kB body (every later turn boundary was a
placement tried for every turn)."""

from medusa_export.runtime import chat_template as ct

QWEN = ("{% for m in messages %}{% if m.role == 'assistant' %}{% set c = m.content.split('</think>')[-1] %}"
        "{% else %}{% set c = m.content %}{% endif %}<|im_start|>{{ m.role }}\n{{ c }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SEP = "<|im_end|>\n<|im_start|>user\n"


def _counting(monkeypatch) -> list[int]:
    looked = []
    occurrences = ct._occurrences

    def counted(*args):
        found = occurrences(*args)
        looked.append(len(found))
        return found

    monkeypatch.setattr(ct, "_occurrences", counted)
    return looked


def test_a_long_conversation_is_placed_in_linear_work(monkeypatch):
    looked = _counting(monkeypatch)
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a</think>b"}] * 2000
    pieces = ct.ChatTemplate(QWEN).pieces(msgs)
    assert [text for text, own in pieces if not own] == ["x", "b"] * 2000  # each message's own text, placed
    assert sum(looked) < 10 * len(msgs)


def test_separators_in_the_text_cannot_make_placement_quadratic(monkeypatch):
    looked = _counting(monkeypatch)
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a</think>b"}] * 1000
    msgs.append({"role": "user", "content": SEP * 2000})  # slack: every turn could be placed in 2,000 more ways
    pieces = ct.ChatTemplate(QWEN).pieces(msgs)
    assert sum(looked) <= ct.MAX_ALIGN_WORK
    own = "".join(text for text, is_own in pieces if is_own)
    assert SEP * 2 not in own  # the template's own text stays its own, whatever placement was found
