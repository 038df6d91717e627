"""Text in and out of the engine: the checkpoint's ``tokenizer.json``, streaming detokenization,
stop strings and the chat template.

End of sequence: the ``eos_token_id`` of ``generation_config.json`` (one id or several) when the folder
has one, else the first of :data:`EOS_CANDIDATES` in the vocabulary.

Chat template: a Jinja ``chat_template`` from ``tokenizer_config.json`` or ``chat_template.jinja`` in the
checkpoint folder when there is one, rendered as transformers does (with ``bos_token``, ``eos_token``...
of ``tokenizer_config.json`` and ``raise_exception``); otherwise the documented default
:data:`DEFAULT_CHAT_TEMPLATE`,
one ``"<role>: <content>\\n"`` line per message followed by ``"assistant:"``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from sapwood.errors import SapwoodError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end|>")
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class TextTokenizer:
    def __init__(
        self, tokenizer: Tokenizer, chat_template: str | None = None, eos_ids: list[int] | None = None,
        special_tokens: dict[str, str] | None = None,
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self.special_tokens = special_tokens or {}  # bos_token, eos_token, ... as chat templates use them
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.eos_id: int | None = next((vocab[t] for t in EOS_CANDIDATES if t in vocab), None)
        if eos_ids:  # generation_config.json's eos ids (Llama 3 has several) take precedence
            self.eos_id = eos_ids[0]
        self.eos_ids: frozenset[int] = frozenset(eos_ids or ([] if self.eos_id is None else [self.eos_id]))
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._template = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> TextTokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise SapwoodError(
                f"{folder}: no tokenizer.json; text generation needs the checkpoint's tokenizer"
            )
        template = None
        config = {}
        if (folder / "tokenizer_config.json").exists():
            config = json.loads((folder / "tokenizer_config.json").read_text())
            template = config.get("chat_template")
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        special_tokens = {}
        for key in SPECIAL_TOKEN_KEYS:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value  # AddedToken form
            if isinstance(value, str):
                special_tokens[key] = value
        eos_ids = None
        if (folder / "generation_config.json").exists():
            eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
            eos_ids = [eos] if isinstance(eos, int) else eos
        return cls(
            Tokenizer.from_file(str(path)), template if isinstance(template, str) else None, eos_ids,
            special_tokens,
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt for the assistant's next turn (the conversation, then the generation prompt)."""
        return self.render_chat(messages, add_generation_prompt=True)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """``messages`` rendered with the chat template in a sandboxed Jinja environment (the one renderer,
        for serving and for fine-tuning data)."""
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            self._template = ImmutableSandboxedEnvironment().from_string(self.chat_template)
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, raise_exception=_raise_exception,
            **self.special_tokens,
        )


def _raise_exception(message: str) -> None:
    """What HF chat templates call to reject a conversation (e.g. roles not alternating)."""
    raise SapwoodError(f"chat template: {message}")


class TextStream:
    """Turns a growing list of token ids into text deltas, applying stop strings.

    Decoding is incremental (each push decodes only the last few tokens, as vLLM does: a window from
    the previous read offset, so tokenizers that drop a leading space still join correctly), and the
    stop search looks only at the new text and the few characters before it, so each push costs
    O(new text + longest stop) whatever the length of the output. A delta never ends inside a multi-byte
    character (held back while decoding gives U+FFFD) nor with a prefix of a stop string (held back
    until it is clear it is not a stop).
    """

    def __init__(self, tokenizer: TextTokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._prefix = 0
        self._read = 0

    def push(self, ids: list[int], final: bool = False) -> str:
        """The new text after the output grew to ``ids`` (``final``: flush everything held back)."""
        if not self.stopped and len(ids) > self._read:
            prefix_text = self.tokenizer.decode(ids[self._prefix : self._read])
            window = self.tokenizer.decode(ids[self._prefix :])
            if len(window) > len(prefix_text) and (final or not window.endswith("\ufffd")):
                searched_from = max(0, len(self.text) - self.longest_stop + 1)
                self.text += window[len(prefix_text) :]
                self._prefix, self._read = self._read, len(ids)
                found = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
                if found:
                    self.text, self.stopped = self.text[: min(found)], True
        end = len(self.text)
        if not (final or self.stopped):
            for stop in self.stop:
                start = self.text.find(stop[0], max(self.emitted, end - len(stop) + 1))
                while start != -1:
                    if stop.startswith(self.text[start:]):
                        end = min(end, start)
                        break
                    start = self.text.find(stop[0], start + 1)
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
