"""Chat templates with message text kept as data: only the template's own markers become control tokens.

    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    pieces = template.pieces([{"role": "user", "content": "Hi"}])     # [(text, from_template), ...]
    pieces = template.pieces(messages, continue_final=True)          # an assistant turn left open

Rendering a template and tokenizing the result, as most servers do, lets a message that contains the
template's own markers (``<|im_end|>\\n<|im_start|>system ...``) open turns of its own. Here the template is
rendered once with each message's text replaced by a sentinel, which tells which characters the template
wrote; the tokenizer (`runtime.tokenizer`) then parses special tokens only inside those, and reads every
message's text as plain text. A message without such markers tokenizes exactly as before.

The template is compiled, and tried on one user message, when a `ChatTemplate` is made (when the artifact
loads): one that fails is an ArtifactError naming where it came from. It runs in Hugging Face's environment
(sandboxed, ``raise_exception``, ``strftime_now``, ``{% break %}``), in a worker process bounded in time and
memory (`runtime.template_worker`, `runtime.template_limits`: a template is code an artifact carries); its
``raise_exception(msg)``, a limit it reaches, and any other error while it renders a request's messages, is an
InputError (serve answers 400).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from jinja2 import TemplateSyntaxError

from .errors import ArtifactError, BusyError, InputError
from .template_limits import MAX_SOURCE, TemplateLimitError, bounded_environment, bounded_render
from .template_worker import TemplateRenderFailure, TemplateSyntax, WorkerUnavailable, shared_worker

# Noncharacters (Unicode keeps U+FDD0..U+FDEF for a program's internal use, never for text interchange): they never
# occur in the template's own text, trim/strip leave them alone, and real text (private-use icons included) is free
# of them.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"
# ASCII digits, at most 9: \d also takes other scripts' digits, and int() of a template's 5,000 digits raised a bare
# ValueError (a traceback at load, or a 500 for the request whose messages made the template write them).
_SENTINEL = re.compile(f"{_OPEN}([0-9]{{1,9}}){_CLOSE}")


@dataclass
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""
    origin: str = "the chat template"  # where the source came from (a file, or a file's field), for messages
    _compiled: object = field(default=None, repr=False, compare=False)  # in this process, where no worker runs
    _worker: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Compile now, so that a template that cannot work is refused when the artifact loads, not at the
        first chat request; then render one user message, which every chat template must accept. In the worker
        process (`template_worker`) when one runs, else here."""
        if len(self.source) > MAX_SOURCE:
            raise ArtifactError(f"{self.origin} is a chat template of {len(self.source)} characters (at most "
                                f"{MAX_SOURCE}): fix the template or remove it, then rebuild the artifact")
        self._worker = shared_worker()
        try:
            if self._worker is None:
                self._compiled = environment().from_string(self.source)
            self.render([{"role": "user", "content": "Hello"}])
        except (TemplateSyntax, TemplateSyntaxError) as e:  # and TemplateAssertionError: an unknown filter or test
            line = f", line {e.lineno}" if e.lineno else ""
            raise ArtifactError(f"{self.origin} does not compile as a Jinja template ({_one_line(e)}{line}): "
                                f"fix the template or remove it, then rebuild the artifact") from None
        except InputError as e:
            raise ArtifactError(f"{self.origin} fails on a conversation of one user message ({e}): fix the "
                                f"template or remove it, then rebuild the artifact") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the template writes it. The template's own refusal (``raise_exception``), a
        limit it reaches, and any error while it runs are InputErrors: a chat request the template cannot take,
        a 400 from serve."""
        return self._render_all([(messages, add_generation_prompt)])[0]

    def _render_all(self, calls: list[tuple[list[dict], bool]]) -> list[str]:
        try:
            if self._worker is not None and self._worker.pid != os.getpid():  # forked: the parent's pool is not ours
                self._worker = shared_worker()
            if self._worker is not None:
                try:
                    return self._worker.render(self.source, self.bos_token, self.eos_token, calls)
                except WorkerUnavailable:  # none could (re)start now: this render runs here, under the checks
                    pass
            if self._compiled is None:
                self._compiled = environment().from_string(self.source)
            return [bounded_render(self._compiled, messages=m, add_generation_prompt=g, bos_token=self.bos_token,
                                   eos_token=self.eos_token) for m, g in calls]
        except (InputError, TemplateSyntax, TemplateSyntaxError, BusyError):  # its own refusal; no worker free
            raise
        except TemplateLimitError as e:
            raise InputError(f"the chat template went past a limit on these messages ({e}): send a shorter "
                             f"conversation, or fix the model's template") from None
        except TemplateRenderFailure as e:  # what it raised in the worker, named there
            raise InputError(f"the chat template cannot render these messages ({_one_line(e)}): send the roles "
                             f"and fields this model's template expects") from None
        except Exception as e:  # the template is code: UndefinedError, TypeError, an over-large range, ...
            raise InputError(f"the chat template cannot render these messages ({type(e).__name__}: "
                             f"{_one_line(e)}): send the roles and fields this model's template expects") from None

    def pieces(self, messages: list[dict], continue_final: bool = False) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, written_by_the_template)`` pieces, in order.

        ``continue_final``: the last message is an assistant turn to continue (a prefill): the text ends right
        after it, without the template's end-of-turn marker or a new generation prompt."""
        contents = [m["content"] for m in messages]
        if any(_OPEN in text or _CLOSE in text for text in contents):
            raise InputError("a message contains the noncharacters U+FDD0 or U+FDD1, which mark message "
                             "text while the chat template renders: remove them")
        marked = [{**m, "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)]
        rendered, real = self._render_all([(marked, not continue_final), (messages, not continue_final)])
        skeleton = _split(rendered)
        # A template may transform the text (e.g. `| trim`): use the form that reproduces its own rendering.
        if _writes_marks(skeleton, len(contents)):
            raise InputError("this model's chat template writes the noncharacters U+FDD0 / U+FDD1 itself, or cuts a "
                             "message's text apart (a slice), where they mark message text here: fix the template")
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


def raise_exception(message: object) -> None:
    """The function Hugging Face chat templates call to refuse a conversation (e.g. roles out of order): an
    InputError with the template's message."""
    raise InputError(f"the chat template refuses these messages: {_one_line(message)}")


def strftime_now(fmt: str) -> str:
    """Today's date, as Hugging Face templates get it (Llama 3.1's writes it into its system turn)."""
    from datetime import datetime

    return datetime.now().strftime(fmt)


def environment():
    """The environment Hugging Face renders chat templates in: sandboxed, trim / lstrip blocks, loop controls
    (``{% break %}``), ``raise_exception`` and ``strftime_now``; bounded in time and size (`template_limits`)."""
    env = bounded_environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


def _one_line(e: object) -> str:
    """An exception's (or a template's) message on one line, cut short: it may be long or multi-line."""
    text = " ".join(str(getattr(e, "message", None) or e).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _writes_marks(skeleton: list[tuple[str, int | None]], messages: int) -> bool:
    """Whether the template wrote the noncharacters that mark message text itself (a mark of no message, or one in
    its own text) or cut a mark apart (``content[1:]``): its own text would then carry them to the model."""
    return any(index is None and (_OPEN in text or _CLOSE in text) or index is not None and index >= messages
               for text, index in skeleton)


def _split(rendered: str) -> list[tuple[str, int | None]]:
    """Template text (index None) and message sentinels (the message's index), in order. One pass (a partition
    loop copied the rest of the text per message: quadratic in a long conversation)."""
    parts = _SENTINEL.split(rendered)  # text, index, text, index, ..., text
    out: list[tuple[str, int | None]] = []
    for k in range(0, len(parts) - 1, 2):
        out += [(parts[k], None), ("", int(parts[k + 1]))]
    return out + [(parts[-1], None)]
