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

import json
import os
import re
from dataclasses import dataclass, field

from jinja2 import TemplateSyntaxError, nodes
from jinja2.ext import Extension

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
# What transformers passes a template beside the messages when a chat has no tools or documents: None, not undefined
# (Mistral's ``{% if tools is not none %}`` wrote an empty [AVAILABLE_TOOLS] block for an undefined one).
NO_TOOLS = {"tools": None, "documents": None}
MAX_ALIGN_STATES = 4096  # partial placements kept while finding each message's text in a rendering (`_aligned`)
MAX_ALIGN_WORK = 1 << 18  # placements `_one_placement` looks at in all (else a request's CPU grew as messages x states)


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
                                   eos_token=self.eos_token, **NO_TOOLS) for m, g in calls]
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
        # An empty text is marked by nothing (it writes nothing either): a template's `{% if m.content %}` takes the
        # same branch for both renders. The turn to continue keeps its mark, which tells where the text ends.
        keep = len(messages) - 1 if continue_final else -1
        marked = [{**m, "content": f"{_OPEN}{i}{_CLOSE}" if m["content"] or i == keep else ""}
                  for i, m in enumerate(messages)]
        rendered, real = self._render_all([(marked, not continue_final), (messages, not continue_final)])
        skeleton = _split(rendered)
        if _writes_marks(skeleton, len(contents)):
            raise InputError("this model's chat template writes the noncharacters U+FDD0 / U+FDD1 itself, or cuts a "
                             "message's text apart (a slice), where they mark message text here: fix the template")
        texts = iter(_aligned(skeleton, contents, real))
        pieces = [(text if index is None else next(texts), index) for text, index in skeleton]
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


def tojson(value: object, ensure_ascii: bool = False, indent: int | str | None = None,
           separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Hugging Face's ``tojson`` (tool schemas, tool calls): plain JSON in the given key order. Jinja's own escapes
    ``<``, ``>``, ``&`` and ``'`` for HTML, sorts keys and writes non-ASCII text as ``\\u`` escapes, so a template
    writing JSON gave the model other text than transformers does."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}``: transformers' tag marking the assistant's text (for its
    assistant-token masks). It writes its body as it is; without it such a template did not compile."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def environment():
    """The environment Hugging Face renders chat templates in: sandboxed, trim / lstrip blocks, loop controls
    (``{% break %}``), ``{% generation %}``, ``raise_exception``, ``strftime_now`` and its ``tojson``; bounded in
    time and size (`template_limits`)."""
    env = bounded_environment(filters={"tojson": tojson}, trim_blocks=True, lstrip_blocks=True,
                              extensions=["jinja2.ext.loopcontrols", _Generation])
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


def _aligned(skeleton: list[tuple[str, int | None]], contents: list[str], real: str) -> list[str]:
    """The text each message piece of ``skeleton`` stands for in ``real`` (the conversation rendered with its own
    text), in order. A template may write each message its own way (Mistral trims only the assistant's: ``| trim``,
    ``| tojson``); the forms of `_FORMS` are tried per message. Where none fits (``content.split('</think>')[-1]``),
    the one placement of the template's own text in ``real`` gives each message its text; with none or several,
    each message's text as it is (the template's own text then still comes out whole and alone)."""
    templates = [text for text, index in skeleton if index is None]
    indices = [index for _, index in skeleton if index is not None]
    found = _fixed_forms(templates, [[form(contents[i]) for form in _FORMS] for i in indices], real)
    if found is None:
        spans = _one_placement(templates, real)
        found = [real[a:b] for a, b in spans] if spans is not None else None
    return found if found is not None else [contents[i] for i in indices]


def _json_body(text: str) -> str:
    """``text`` as Hugging Face's ``tojson`` writes it, without the quotes (those are the template's text)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


_FORMS = (str, str.strip, str.rstrip, str.lstrip, _json_body)


def _fixed_forms(templates: list[str], options: list[list[str]], real: str) -> list[str] | None:
    """``real`` as templates[0], one of options[0], templates[1], ..., templates[-1]: the chosen options (the
    earliest-listed where several fit), or None. Each step keeps every position reached (at most MAX_ALIGN_STATES)."""
    if not real.startswith(templates[0]):
        return None
    states: dict[int, tuple | None] = {len(templates[0]): None}  # position -> (text chosen, previous choice)
    for k, texts in enumerate(options):
        after, reached = templates[k + 1], {}
        for pos, chosen in states.items():
            for text in dict.fromkeys(texts):
                end = pos + len(text)
                if real.startswith(text, pos) and real.startswith(after, end):
                    reached.setdefault(end + len(after), (text, chosen))
        states = dict(list(reached.items())[:MAX_ALIGN_STATES])
    if len(real) not in states:
        return None
    out, chosen = [], states[len(real)]
    while chosen is not None:
        out.append(chosen[0])
        chosen = chosen[1]
    return out[::-1]


def _one_placement(templates: list[str], real: str) -> list[tuple[int, int]] | None:
    """The spans of ``real`` between its template texts when they fit it in exactly one way (templates[0] at the
    start, templates[-1] at the end, each other one somewhere after the one before), or None."""
    if len(templates) < 2 or not real.startswith(templates[0]) or not real.endswith(templates[-1]):
        return None
    if any(not t for t in templates[1:-1]) or len(templates[0]) + len(templates[-1]) > len(real):
        return None  # two texts of messages side by side: where one ends is anyone's guess
    latest = [len(real) - len(templates[-1])]  # each text's latest start that leaves room for the ones after it
    for t in reversed(templates[1:-1]):
        latest.append(real.rfind(t, 0, latest[-1]))
        if latest[-1] < 0:
            return None
    latest = [0, *latest[::-1]]
    ways, work = [{len(templates[0]): 1}], 0  # per step: end of the template text -> ways there (counted up to 2)
    for k, after in enumerate(templates[1:], start=1):
        starts = ([len(real) - len(after)] if k == len(templates) - 1 else
                  _occurrences(real, after, min(ways[-1]), latest[k] + len(after)))
        work += len(starts) + len(ways[-1])
        if work > MAX_ALIGN_WORK:
            return None
        reached, total, prior = {}, 0, sorted(ways[-1].items())
        j = 0
        for q in starts:
            while j < len(prior) and prior[j][0] <= q:
                total, j = min(2, total + prior[j][1]), j + 1
            if total:
                reached[q + len(after)] = total
        if not reached or len(reached) > MAX_ALIGN_STATES:
            return None
        ways.append(reached)
    if ways[-1].get(len(real)) != 1:
        return None
    spans, end = [], len(real)
    for k in range(len(templates) - 1, 0, -1):  # back: the one earlier end at or before this text's start
        start = end - len(templates[k])
        prev = max(p for p in ways[k - 1] if p <= start)
        spans.append((prev, start))
        end = prev
    return spans[::-1]


def _occurrences(text: str, part: str, start: int, end: int) -> list[int]:
    """Where ``part`` lies in ``text[start:end]`` (at most MAX_ALIGN_STATES + 1 of them)."""
    out, at = [], text.find(part, start, end)
    while at >= 0 and len(out) <= MAX_ALIGN_STATES:
        out.append(at)
        at = text.find(part, at + 1, end)
    return out


def _split(rendered: str) -> list[tuple[str, int | None]]:
    """Template text (index None) and message sentinels (the message's index), in order. One pass (a partition
    loop copied the rest of the text per message: quadratic in a long conversation)."""
    parts = _SENTINEL.split(rendered)  # text, index, text, index, ..., text
    out: list[tuple[str, int | None]] = []
    for k in range(0, len(parts) - 1, 2):
        out += [(parts[k], None), ("", int(parts[k + 1]))]
    return out + [(parts[-1], None)]
