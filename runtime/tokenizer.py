"""Tokenizer for the runtime: the `tokenizers` library plus the model's chat template (jinja2).

    tok = ChatTokenizer.from_directory("artifacts/smollm2")
    ids = tok.encode_prompt("Hello!")                        # a user message under the chat template
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    ids = tok.encode("<|im_start|>raw prompt")               # raw completion text: special tokens parsed
    text = tok.decode(ids)

Message text is data: `encode_chat` and `encode_prompt` give control tokens only where the template writes
them (`runtime.chat_template`); text inside a message that looks like one (``<|im_end|>``) is read as
characters. `encode` (a raw completion prompt, `/v1/completions`) parses special tokens, as its users expect.
No transformers at run time: ``tokenizer.json``, the chat template and the special tokens are all it needs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .bounded_read import read_bounded
from .chat_template import ChatTemplate
from .errors import ArtifactError, InputError, first_line
from .tokenizer_limits import check_growth, check_vocabulary, largest_id
from .typed_json import MAX_JSON_BYTES, read_json

# tokenizer.json: the library reads it whole, so a file its manifest records as huge (a sparse one costs no disk)
# took that much memory. Real ones: 2 MB (SmolLM2) to 33 MB (Gemma 3's 262k tokens).
MAX_TOKENIZER_BYTES = 128 << 20
MAX_TOKEN_CHARS = 4096  # any token's text: each generated token is decoded (the default model's longest: 81)
MAX_SPECIAL_CHARS = 256  # a special token's text: markers such as <|im_start|> (every text is searched for them)
# Characters a chat template may write of its own around a conversation's messages: real templates write markers
# and at most a default system prompt (a few KB). The render itself is bounded (`template_limits`), but its output
# is tokenized here, in the caller's process: 16 M characters of template text cost 15 s and 2 GB per request.
MAX_TEMPLATE_CHARS = 1 << 20

if TYPE_CHECKING:
    from .manifest import Manifest


@dataclass
class ChatTokenizer:
    tokenizer: object  # tokenizers.Tokenizer: special tokens parsed
    chat_template: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token: str | None = None
    eos_token: str | None = None
    template_origin: str = "the chat template"  # where the template came from, for its error messages
    _text: object = field(default=None, repr=False, compare=False)  # the same, reading special tokens as text
    _template: ChatTemplate | None = field(default=None, repr=False, compare=False)
    _specials: re.Pattern | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        from tokenizers import Tokenizer

        # Its own copy: the flag is per object
        self._text = _unpanicked(lambda: Tokenizer.from_str(self.tokenizer.to_str()),
                                 lambda why: ArtifactError(f"tokenizer.json does not load again as written out "
                                                           f"({why}): rebuild the artifact with a working "
                                                           f"tokenizer.json"))
        self._text.encode_special_tokens = True
        special = {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        self._special_ids = special
        self._special_set = frozenset(special.values())
        # Leftmost match, longest first: what the tokenizer's own added-token split does.
        self._specials = re.compile("|".join(map(re.escape, sorted(special, key=len, reverse=True)))) if special else None
        if self.chat_template:
            self._template = ChatTemplate(self.chat_template, self.bos_token or "", self.eos_token or "",
                                          origin=self.template_origin)
            self._check_template()

    def _check_template(self) -> None:
        """One user message through the template and the tokenizer, as every chat request goes: a template whose
        own text cannot be tokenized (a lone surrogate, say), or that renders no message text (Jinja writes an
        undefined field, ``message.text``, as nothing: the model saw only markers), is refused when the artifact
        loads, not blamed on each request's text."""
        message = [{"role": "user", "content": "Hello"}]
        try:
            if not any(text.strip() and not own for text, own in self._template.pieces(message)):
                raise ArtifactError(f"{self.template_origin} does not write the text of a user message (it reads a "
                                    f"field other than role and content, or drops the message): fix the template or "
                                    f"remove it, then rebuild the artifact")
            self.encode_chat(message)
        except InputError as e:
            raise ArtifactError(f"{self.template_origin}: one user message under the chat template cannot be "
                                f"tokenized ({e}): fix the template or remove it, then rebuild the artifact") from None

    @classmethod
    def from_directory(cls, directory: str | Path) -> "ChatTokenizer":
        """From a model directory (transformers' files): whichever of them are there."""
        directory = Path(directory)
        return cls._from_files(lambda name: directory / name if (directory / name).exists() else None, directory)

    @classmethod
    def from_artifact(cls, directory: str | Path, manifest: "Manifest") -> "ChatTokenizer":
        """From an artifact: only the files its manifest lists (inside it, size-checked like the graphs); a
        tokenizer-side file there that the manifest does not list is an ArtifactError (`Manifest.listed_file`)."""
        directory = Path(directory)
        return cls._from_files(lambda name: manifest.listed_file(directory, name), directory, manifest.dims.vocab_size)

    @classmethod
    def _from_files(cls, locate: Callable[[str], Path | None], directory: Path,
                    vocab_size: int | None = None) -> "ChatTokenizer":
        """``locate(name)``: the path to read for one of `TOKENIZER_FILES`, or None when there is none.
        ``vocab_size``: the model's; a tokenizer with more tokens, or an id at or past it, is refused before its
        special tokens are compiled into a pattern (tens of thousands of them took 18 s)."""
        from tokenizers import Tokenizer

        tj = locate("tokenizer.json")
        if tj is None:
            raise ArtifactError(f"{directory / 'tokenizer.json'} is missing: rebuild the artifact (medusa-export build)")
        text = _read_text(tj, MAX_TOKENIZER_BYTES)
        # tokenizers panics on some well-formed files (a normalizer's broken charsmap)
        tokenizer = _unpanicked(lambda: Tokenizer.from_str(text),
                                lambda why: ArtifactError(f"{tj} is corrupt ({why}): rebuild the artifact"))
        del text
        # Before anything encodes or decodes with it: a normalizer or decoder that multiplies text (Replace steps in
        # a row, each lengthening it) would take every request, or the loading itself, out of memory
        check_growth(tokenizer, tj)
        # Prompts are encoded exactly: a tokenizer.json's padding or truncation (a model's setting for batched
        # training, or a changed file) would pad every prompt or cut it to a few tokens
        tokenizer.no_padding()
        tokenizer.no_truncation()
        _no_dropout(tokenizer)
        _check_token_lengths(tokenizer, tj)
        if vocab_size is not None:
            check_vocabulary(tokenizer, tj, vocab_size)
        longest = max((len(t.content) for t in tokenizer.get_added_tokens_decoder().values() if t.special), default=0)
        if longest > MAX_SPECIAL_CHARS:  # every text is searched for them: a huge one made loading take minutes
            raise ArtifactError(f"{tj} has a special token of {longest} characters (at most {MAX_SPECIAL_CHARS}): "
                                f"rebuild the artifact from a model whose special tokens are markers")
        cfg_path = locate("tokenizer_config.json")
        cfg = _json_object(cfg_path)
        template, origin = _chat_template(cfg, cfg_path), f"{cfg_path} field chat_template"
        jinja = locate("chat_template.jinja")
        if jinja is not None:  # it replaces tokenizer_config.json's template: an empty one is not "no template"
            template, origin = _read_text(jinja), str(jinja)
            if not template.strip():
                raise ArtifactError(f"{jinja} is empty: write the chat template into it, or remove it and its entry "
                                    f"in the manifest's files (tokenizer_config.json's template is used then)")
        eos = _token_text(cfg, "eos_token", cfg_path)
        bos = _token_text(cfg, "bos_token", cfg_path)
        eos_ids = [_token_id(tokenizer, eos, cfg_path)] if eos else []
        eos_ids += _eos_ids(locate("generation_config.json"), tokenizer.get_vocab_size())
        return cls(tokenizer, template, tuple(dict.fromkeys(eos_ids)), bos, eos, template_origin=origin)

    def save(self, directory: str | Path) -> None:
        """Write what `from_directory` reads (used when building an artifact)."""
        directory = Path(directory)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        cfg = {"eos_token": self.eos_token, "bos_token": self.bos_token, "chat_template": self.chat_template}
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": list(self.eos_token_ids)}) + "\n")

    @property
    def plain_text_tokenizer(self):
        """The tokenizer that reads special-token markup as characters (`encode_text`'s), for batch encoding."""
        return self._text

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_set

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def largest_id(self) -> int:
        """The largest token id the tokenizer can produce (ids need not be dense: a count says nothing of it)."""
        return largest_id(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """A raw prompt (no template): special tokens in it are parsed as such, and the tokenizer's own (its
        post-processor's: Llama's ``<s>``) are added, as ``transformers``' ``tokenizer(text)`` does."""
        return _ids(self.tokenizer, check_text(text), add_special_tokens=True)

    def encode_text(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Plain text: anything that looks like a special token is read as characters. ``add_special_tokens``: a
        whole prompt, with the special tokens the tokenizer adds around one (its post-processor's: Llama's ``<s>``),
        as ``transformers``' ``tokenizer(text)`` gives them; chat templates write their own."""
        if not text and not add_special_tokens:
            return []
        encoding = _encoding(self._text, check_text(text), add_special_tokens)
        ids = encoding.ids
        if self._special_set.intersection(i for i, added in zip(ids, encoding.special_tokens_mask) if not added):
            # a vocabulary whose merges can spell a control token
            raise InputError("the text encodes to one of the model's control tokens with this tokenizer: remove the "
                             "special-token markup from it")
        return ids

    def encode_prompt(self, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
        """Token ids for a user prompt: one user message under the chat template when the model has one and
        ``chat``, else the prompt as plain text."""
        if chat and self._template is not None:
            messages = [{"role": "system", "content": system}] if system is not None else []
            return self.encode_chat(messages + [{"role": "user", "content": prompt}])
        return self.encode_text(prompt, add_special_tokens=True)

    def encode_chat(self, messages: list[dict], continue_final: bool = False) -> list[int]:
        """A conversation under the chat template (``continue_final``: the last, assistant, message is left open
        for the model to continue). Only the template's own markers become special tokens."""
        for m in messages:
            check_text(m["content"])
        # Only role and content reach the template: it would write any other field (a name, tool calls) as its own
        # text, where markup spelling a control token would become one.
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self._template is None:
            return self.encode_text("\n".join(m["content"] for m in messages), add_special_tokens=True)
        ids: list[int] = []
        text = ""  # plain text gathered since the last special token the template wrote
        pieces = self._template.pieces(messages, continue_final)
        # Its own text, and what it writes beyond the messages' text (a message repeated counts as the template's)
        own = sum(len(piece) for piece, from_template in pieces if from_template)
        own = max(own, sum(len(piece) for piece, _ in pieces) - sum(len(m["content"]) for m in messages))
        if own > MAX_TEMPLATE_CHARS:
            raise InputError(f"the chat template writes {own} characters of its own around these messages (at most "
                             f"{MAX_TEMPLATE_CHARS}): fix the model's template")
        for piece, from_template in pieces:
            if not from_template or self._specials is None:
                text += piece
                continue
            start = 0
            for match in self._specials.finditer(piece):
                text += piece[start:match.start()]
                ids += self.encode_text(text) + [self._special_ids[match.group()]]
                text, start = "", match.end()
            text += piece[start:]
        return ids + self.encode_text(text)

    def render_chat(self, messages: list[dict]) -> str:
        """The conversation as the template renders it (text, for display and checks)."""
        if self._template is None:
            raise InputError("this model has no chat template")
        return self._template.render(messages)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; a `tokenizers` panic (`_unpanicked`) is an ArtifactError, an Exception, so a decode loop
        or the batched engine's thread ends the request, not itself. ``skip_special_tokens=False``: special tokens
        as written (an echoed prompt of token ids, as its text prompt would read)."""
        return _unpanicked(lambda: self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens),
                           lambda why: ArtifactError(f"the artifact's tokenizer failed to decode tokens ({why}): "
                                                     f"rebuild the artifact with a working tokenizer.json"))


def _ids(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """``text``'s token ids (`_encoding`)."""
    return _encoding(tokenizer, text, add_special_tokens).ids


def _encoding(tokenizer, text: str, add_special_tokens: bool = False):
    """``text``'s `tokenizers.Encoding` (``add_special_tokens``: with the post-processor's tokens around it). The
    `tokenizers` library panics (a Rust panic, which Python raises as a BaseException that ``except Exception``
    misses) where its pre-tokenizer's regular expression gives up on a text, e.g. one with catastrophic
    backtracking: that becomes an InputError naming the cause."""
    # encode_batch, not encode: `tokenizers`' encode holds the GIL for the whole encoding (1.3 s for a 1 MB prompt),
    # which stalled every running stream and the event loop while a server thread tokenized; encode_batch releases it
    encode = lambda: tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]  # noqa: E731
    return _unpanicked(encode, lambda why: InputError(
        f"the artifact's tokenizer failed on this text ({why}): shorten or change the text, or rebuild the artifact "
        f"with a working tokenizer.json"))


def _no_dropout(tokenizer) -> None:
    """Turn off a BPE model's dropout (a training setting some tokenizer.json files keep): with it every encoding
    skips merges at random, so one prompt became different token ids on each request, and seeded or greedy answers
    were not reproducible."""
    model = tokenizer.model
    if getattr(model, "dropout", None):
        model.dropout = None


def _check_token_lengths(tokenizer, path: Path) -> None:
    """ArtifactError when a token of the vocabulary (added tokens included) is longer than MAX_TOKEN_CHARS: the
    graph chooses which tokens come out, and each one is decoded into text, so a token of 100 M characters made
    every generated token cost that much memory (real vocabularies' longest: about a hundred)."""
    longest = max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=0)
    if longest > MAX_TOKEN_CHARS:
        raise ArtifactError(f"{path} has a token of {longest} characters (at most {MAX_TOKEN_CHARS}): it is not a "
                            f"model's tokenizer, rebuild the artifact")


def _unpanicked(call: Callable, error: Callable[[str], Exception]):
    """``call()``, with a `tokenizers` panic (a BaseException) raised as ``error(its first line)`` instead;
    KeyboardInterrupt, SystemExit and GeneratorExit pass."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        raise error(first_line(e, 120)) from None


def check_text(text: str) -> str:
    """``text``, or an InputError when it cannot be UTF-8 (a lone surrogate such as ``\\ud800``)."""
    if not isinstance(text, str):
        raise InputError(f"expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"the text holds a lone surrogate ({text[e.start]!a}) at character {e.start}, which is not "
                         f"valid Unicode: send UTF-8 text") from None
    return text


def _read_text(path: Path, limit: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of ``path``, read once (what is checked is what is parsed), at most ``limit`` bytes."""
    try:
        return read_bounded(path, limit).decode("utf-8")
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read ({e.strerror or type(e).__name__}): rebuild the artifact") from None
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path} is not UTF-8 text (byte {e.start}): rebuild the artifact") from None


def _json_object(path: Path | None) -> dict:
    """A JSON object file, ``{}`` when there is none (``path`` None); ArtifactError naming the file otherwise."""
    if path is None:
        return {}
    value = read_json(path, fix="rebuild the artifact")
    if not isinstance(value, dict):
        raise ArtifactError(f"{path} must hold a JSON object, not {type(value).__name__}: rebuild the artifact")
    return value


def _chat_template(cfg: dict, path: Path) -> str | None:
    """tokenizer_config.json's chat template: a string, or (Command-R, Hermes) a list of named templates
    ``[{"name": "default", "template": ...}, {"name": "tool_use", ...}]``, of which the one named "default" (the one
    transformers renders when no name is given). ArtifactError for any other form."""
    value = cfg.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    named = value if isinstance(value, list) else []
    if not named or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                            and isinstance(t.get("template"), str) for t in named):
        what = "a list of other items" if isinstance(value, list) and named else type(value).__name__
        raise ArtifactError(f"{path}: field chat_template must be a string or a list of {{\"name\", \"template\"}} "
                            f"objects, not {what}: fix the model's tokenizer_config.json")
    default = [t["template"] for t in named if t["name"] == "default"]
    if len(default) != 1:
        names = ", ".join(repr(t["name"][:40]) for t in named[:8])
        raise ArtifactError(f"{path}: field chat_template holds named templates ({names}) but not exactly one named "
                            f"'default': name the one to use 'default' or write it to chat_template.jinja")
    return default[0]


def _token_text(cfg: dict, key: str, path: Path) -> str | None:
    """A special token's text: a string, or an object with "content" (the transformers form)."""
    value = cfg.get(key)
    if isinstance(value, dict):
        value = value.get("content")
        key = f"{key}.content"
    if value is not None and not isinstance(value, str):
        raise ArtifactError(f"{path}: field {key} must be a string, not {type(value).__name__}: rebuild the artifact")
    if value is not None and len(value) > MAX_SPECIAL_CHARS:  # sent to the template worker with every render
        raise ArtifactError(f"{path}: field {key} has {len(value)} characters (at most {MAX_SPECIAL_CHARS}): a "
                            f"special token is a marker; rebuild the artifact")
    return value


def _token_id(tokenizer, text: str, path: Path) -> int:
    """The id of a special token named in tokenizer_config.json: one the tokenizer lacks would leave the model
    without its end-of-sequence token (generation would run to max_new_tokens), so it is refused."""
    token_id = tokenizer.token_to_id(text)
    if token_id is None:
        raise ArtifactError(f"{path}: field eos_token {text!r:.60} is not a token of tokenizer.json: it belongs to "
                            f"another tokenizer, rebuild the artifact")
    return token_id


def _eos_ids(path: Path | None, vocab: int) -> list[int]:
    value = _json_object(path).get("eos_token_id")
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
        raise ArtifactError(f"{path}: field eos_token_id must be a token id or a list of them in 0..{vocab - 1}, "
                            f"got {_preview(value)}: rebuild the artifact")
    return ids


def _preview(value: object) -> str:
    """A short, one-line form of a JSON value for a message (repr of a deep or huge value could itself fail)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."
