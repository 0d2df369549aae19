"""Tokenizer for the runtime: the `tokenizers` library plus the model's chat template (jinja2).

    tok = ChatTokenizer.from_directory("artifacts/smollm2")
    ids = tok.encode_prompt("Hello!")        # chat template applied when the model has one
    text = tok.decode(ids)

No transformers at run time: `tokenizer.json`, the chat template and the special tokens are all it needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ArtifactError


@dataclass
class ChatTokenizer:
    tokenizer: object  # tokenizers.Tokenizer
    chat_template: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token: str | None = None
    eos_token: str | None = None
    _template: object = field(default=None, repr=False, compare=False)

    @classmethod
    def from_directory(cls, directory: str | Path) -> "ChatTokenizer":
        from tokenizers import Tokenizer

        directory = Path(directory)
        tj = directory / "tokenizer.json"
        if not tj.exists():
            raise ArtifactError(f"{tj} is missing: rebuild the artifact (medusa-export build)")
        try:
            tokenizer = Tokenizer.from_file(str(tj))
        except Exception as e:
            raise ArtifactError(f"{tj} is corrupt ({str(e)[:120]}): rebuild the artifact") from None
        cfg = {}
        if (directory / "tokenizer_config.json").exists():
            cfg = json.loads((directory / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()
        eos, bos = _token_text(cfg.get("eos_token")), _token_text(cfg.get("bos_token"))
        eos_ids = [tokenizer.token_to_id(eos)] if eos else []
        gen_cfg = directory / "generation_config.json"
        if gen_cfg.exists():
            extra = json.loads(gen_cfg.read_text()).get("eos_token_id")
            eos_ids += extra if isinstance(extra, list) else [extra] if extra is not None else []
        ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        return cls(tokenizer, template, ids, bos, eos)

    def save(self, directory: str | Path) -> None:
        """Write what `from_directory` reads (used when building an artifact)."""
        directory = Path(directory)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        cfg = {"eos_token": self.eos_token, "bos_token": self.bos_token, "chat_template": self.chat_template}
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": list(self.eos_token_ids)}) + "\n")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
        """Token ids for a user prompt, under the chat template when the model has one."""
        if chat and self.chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return self.encode(self.render_chat(messages))
        return self.encode(prompt)

    def render_chat(self, messages: list[dict]) -> str:
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages, add_generation_prompt=True, bos_token=self.bos_token or "", eos_token=self.eos_token or ""
        )

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok
