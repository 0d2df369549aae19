"""Chat templates with message text kept as data: only the template's own markers become control tokens.

    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    pieces = template.pieces([{"role": "user", "content": "Hi"}])     # [(text, from_template), ...]
    pieces = template.pieces(messages, continue_final=True)          # an assistant turn left open

Rendering a template and tokenizing the result, as most servers do, lets a message that contains the
template's own markers (``<|im_end|>\\n<|im_start|>system ...``) open turns of its own. Here the template is
rendered once with each message's text replaced by a sentinel, which tells which characters the template
wrote; the tokenizer (`runtime.tokenizer`) then parses special tokens only inside those, and reads every
message's text as plain text. A message without such markers tokenizes exactly as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import InputError

# Private-use code points: they never occur in the template's own text, and trim/strip leave them alone.
_OPEN, _CLOSE = "\ue000", "\ue001"
_SENTINEL = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


@dataclass
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""
    _compiled: object = field(default=None, repr=False, compare=False)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._compiled = env.from_string(self.source)
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)

    def pieces(self, messages: list[dict], continue_final: bool = False) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, written_by_the_template)`` pieces, in order.

        ``continue_final``: the last message is an assistant turn to continue (a prefill): the text ends right
        after it, without the template's end-of-turn marker or a new generation prompt."""
        contents = [m["content"] for m in messages]
        if any(_OPEN in text or _CLOSE in text for text in contents):
            raise InputError("a message contains the private-use characters U+E000 or U+E001, which mark message "
                             "text while the chat template renders: remove them")
        marked = [{**m, "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)]
        skeleton = _split(self.render(marked, add_generation_prompt=not continue_final))
        real = self.render(messages, add_generation_prompt=not continue_final)
        # A template may transform the text (e.g. `| trim`): use the form that reproduces its own rendering.
        candidates = [[(text if index is None else form(contents[index]), index) for text, index in skeleton]
                      for form in (str, str.strip)]
        pieces = next((c for c in candidates if "".join(text for text, _ in c) == real), candidates[0])
        if continue_final:
            last = [k for k, (_, index) in enumerate(pieces) if index == len(messages) - 1]
            if not last:
                raise InputError("this model's chat template does not render the final assistant message, so it "
                                 "cannot be continued: end the conversation with a user message")
            pieces = pieces[: last[-1] + 1]
        return [(text, index is None) for text, index in pieces if text]


def _split(rendered: str) -> list[tuple[str, int | None]]:
    """Template text (index None) and message sentinels (the message's index), in order. One pass (a partition
    loop copied the rest of the text per message: quadratic in a long conversation)."""
    parts = _SENTINEL.split(rendered)  # text, index, text, index, ..., text
    out: list[tuple[str, int | None]] = []
    for k in range(0, len(parts) - 1, 2):
        out += [(parts[k], None), ("", int(parts[k + 1]))]
    return out + [(parts[-1], None)]
