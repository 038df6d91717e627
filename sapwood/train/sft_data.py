"""Fine-tuning data: chat or instruction JSONL, rendered with the checkpoint's chat template, labelled so the
loss sees assistant tokens only, and packed into rows whose examples never attend to each other.

Two line shapes are read (as TRL, torchtune and litgpt read them)::

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"instruction": "...", "input": "...", "output": "..."}      # input optional

An instruction line is the conversation ``user: instruction (+ blank line + input)``, ``assistant: output``.

Rendering (:func:`render_example`): for every assistant turn ``i`` the template renders the conversation up to
``i`` with the generation prompt, and up to and including ``i`` without it; the difference is the assistant's
text. The pieces are tokenized one by one, so the prompt tokens are exactly those the server feeds the model
for that conversation. After an assistant turn an end-of-sequence token is appended (and learnt) unless the
template already put one of the tokenizer's end ids in it, so a fine-tuned model stops where its answer ends.

Packing (:class:`PackedRows`): examples go into rows of ``seq_len`` tokens in a shuffled order, each keeping
its own positions (from 0) and a document id; attention is causal within a document only
(:class:`DocumentMask`). Targets are the next token where that token is the assistant's, else
:data:`IGNORE`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapwood.errors import SapwoodError
from sapwood.infer.tokenizer import TextTokenizer

IGNORE = -100  # target of a token the loss does not see (F.cross_entropy's ignore_index)
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One tokenized conversation: ``ids``, ``trained`` (True where the token is the assistant's), and for
    exact match the prompt of its last assistant turn and that turn's text."""

    ids: list[int]
    trained: list[bool]
    prompt_ids: list[int]
    answer: str


def messages_of(record: Any, where: str) -> list[dict[str, str]]:
    """The conversation of one JSONL record (chat or instruction shape); one-line error otherwise."""
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise SapwoodError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for message in messages:
            if (
                not isinstance(message, dict)
                or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)
            ):
                raise SapwoodError(
                    f"{where}: message {str(message)[:60]!r} needs role in {', '.join(ROLES)} "
                    "and a string content"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise SapwoodError(f"{where}: no assistant message; fine-tuning learns the assistant's turns")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if isinstance(record, dict) and "instruction" in record and "output" in record:
        fields = {k: record.get(k, "") for k in ("instruction", "input", "output")}
        bad = [k for k, v in fields.items() if not isinstance(v, str)]
        if bad:
            raise SapwoodError(f"{where}: {bad[0]!r} must be a string")
        prompt = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}]
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise SapwoodError(
        f'{where}: a line holds {keys}; expected {{"messages": [...]}} or '
        '{"instruction", "input", "output"}'
    )


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Every conversation in a JSONL file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise SapwoodError(f"sft data {path} does not exist (a JSONL file)")
    conversations = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SapwoodError(f"{path}:{number}: not JSON ({exc.msg})") from None
            conversations.append(messages_of(record, f"{path}:{number}"))
    if not conversations:
        raise SapwoodError(f"{path}: no examples")
    return conversations


def render_example(tokenizer: TextTokenizer, messages: list[dict[str, str]]) -> Example:
    """Tokens and loss labels of one conversation (see the module docstring)."""
    ids: list[int] = []
    trained: list[bool] = []
    done = ""  # rendered text already tokenized
    prompt_ids: list[int] = []
    answer = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        turn = tokenizer.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not turn.startswith(prompt):
            raise SapwoodError(
                "the chat template does not render a conversation as a prefix of its continuation "
                f"(at message {i}); fine-tuning needs prefix-consistent templates"
            )
        context = tokenizer.encode(prompt[len(done) :])
        reply = tokenizer.encode(turn[len(prompt) :])
        if tokenizer.eos_id is not None and not tokenizer.eos_ids.intersection(reply):
            reply.append(tokenizer.eos_id)
        ids += context
        trained += [False] * len(context)
        prompt_ids = list(ids)
        ids += reply
        trained += [True] * len(reply)
        done, answer = turn, message["content"]
    return Example(ids, trained, prompt_ids, answer)


def split_held_out(conversations: list, fraction: float) -> tuple[list, list]:
    """The first ``1 - fraction`` for training, the last ``fraction`` held out (at least one of each when
    ``fraction > 0`` and there are two or more)."""
    if fraction <= 0 or len(conversations) < 2:
        return conversations, []
    held = min(max(1, round(len(conversations) * fraction)), len(conversations) - 1)
    return conversations[:-held], conversations[-held:]


@dataclass
class Row:
    """One packed row of ``seq_len`` positions."""

    tokens: torch.Tensor  # long [seq]
    targets: torch.Tensor  # long [seq], IGNORE where nothing is learnt
    positions: torch.Tensor  # long [seq], from 0 in every document
    documents: torch.Tensor  # long [seq], the document id of each position (padding: one id per position)


def pack(examples: list[Example], order: list[int], seq_len: int, packed: bool) -> list[Row]:
    """Rows of ``seq_len`` tokens from ``examples`` taken in ``order``: whole examples (cut to ``seq_len + 1``
    tokens), several per row when ``packed``, else one each; the rest of a row is padding."""
    rows: list[Row] = []
    tokens: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    documents: list[int] = []

    def close() -> None:
        pad = seq_len - len(tokens)
        start = len(tokens)
        rows.append(
            Row(
                torch.tensor(tokens + [0] * pad, dtype=torch.long),
                torch.tensor(targets + [IGNORE] * pad, dtype=torch.long),
                torch.tensor(positions + [0] * pad, dtype=torch.long),
                torch.tensor(documents + [-1 - i for i in range(start, seq_len)], dtype=torch.long),
            )
        )
        tokens.clear(), targets.clear(), positions.clear(), documents.clear()

    for document, index in enumerate(order):
        example = examples[index]
        ids, trained = example.ids[: seq_len + 1], example.trained[: seq_len + 1]
        length = len(ids) - 1
        if length < 1:
            continue
        if tokens and (not packed or len(tokens) + length > seq_len):
            close()
        tokens += ids[:-1]
        targets += [t if learn else IGNORE for t, learn in zip(ids[1:], trained[1:], strict=True)]
        positions += list(range(length))
        documents += [document] * length
    if tokens:
        close()
    return rows


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """Bool ``[batch, 1, seq, seq]``: query ``q`` attends key ``k`` iff ``k <= q`` and both are in one
    document."""
    seq = documents.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=documents.device).tril()
    return (documents[:, :, None] == documents[:, None, :]).logical_and(causal)[:, None]


class DocumentMask:
    """Attention within documents, given to the decoder through its ``kv_cache`` hook (``KVCacheLike``): it
    keeps no keys or values, it only returns the mask for every layer."""

    def __init__(self, documents: torch.Tensor):
        self.mask = document_mask(documents)

    def update(self, layer_index: int, k: torch.Tensor, v: torch.Tensor):
        return k, v, self.mask


class PackedRows:
    """Endless micro-batches of packed rows: every epoch the examples are shuffled (seeded by epoch) and
    packed again; this rank takes every ``world_size``-th row. ``state_dict`` is (epoch, row), so a resume
    continues with the very next micro-batch."""

    def __init__(
        self, examples: list[Example], seq_len: int, batch_size: int, seed: int, packed: bool = True,
        rank: int = 0, world_size: int = 1,
    ):
        if not examples:
            raise SapwoodError("no training examples")
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.seed, self.packed, self.rank, self.world_size = seed, packed, rank, world_size
        self.epoch, self.row = 0, 0
        self._rows: list[Row] | None = None

    def rows_of_epoch(self, epoch: int) -> list[Row]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)).tolist()
        return pack(self.examples, order, self.seq_len, self.packed)[self.rank :: self.world_size]

    def __iter__(self) -> PackedRows:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        chosen: list[Row] = []
        while len(chosen) < self.batch_size:
            if self._rows is None:
                self._rows = self.rows_of_epoch(self.epoch)
                if not self._rows:
                    raise SapwoodError(
                        f"rank {self.rank} of {self.world_size} gets no rows; fewer examples than ranks"
                    )
            if self.row >= len(self._rows):
                self.epoch, self.row, self._rows = self.epoch + 1, 0, None
                continue
            chosen.append(self._rows[self.row])
            self.row += 1
        return stack(chosen)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "row": self.row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.row, self._rows = int(state["epoch"]), int(state["row"]), None


def stack(rows: list[Row]) -> dict[str, torch.Tensor]:
    return {
        name: torch.stack([getattr(r, name) for r in rows])
        for name in ("tokens", "targets", "positions", "documents")
    }
