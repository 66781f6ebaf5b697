"""Training data: JSONL conversations -> the token sequences inference sees, and which tokens are scored.

One JSON object a line, in OpenAI's chat format (what the Chat Completions server takes, read by the
same code: server/chat_completions.py `conversation`)::

    {"messages": [{"role": "system", "content": "..."},               -> developer instructions
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "thinking": "...",            -> analysis (or reasoning_content,
                   "content": "...", "tool_calls": [...]},               reasoning), final / tool calls
                  {"role": "tool", "tool_call_id": "...", "content": "..."}, ...],
     "tools": [{"type": "function", "function": {...}}],             (optional)
     "reasoning_effort": "low"}                                       (optional; default --reasoning-effort)

Each answer is trained as inference produces it. The prompt of turn k is what `Session` renders at that
point (our harmony renderer, token-exact with openai-harmony): system, developer, the earlier turns with
their chain of thought dropped (harmony's rule), then ``<|start|>assistant``. The scored part is what
the model writes from there: its messages of turn k (analysis, tool calls ending in ``<|call|>``,
``<|start|>assistant`` between its own consecutive messages, the final answer ending in ``<|return|>``);
tool results inside the turn (and the ``<|start|>assistant`` the prompt adds after them) are context,
not scored. So a conversation with N final answers gives N sequences, turn k's reasoning seen only in
sequence k, exactly as at inference (a single sequence would show every turn's reasoning, which
inference never does). `turns="last"` keeps the last one only. Analysis tokens are context unless
`include_analysis` (the brief's default: loss on the answer and tool calls).

No packing: each sequence is its own row (packing would need block-diagonal masks through the sliding-
window attention tiles); a batch is padded on the right, where causal attention cannot see it, and pads
are never scored. A sequence longer than `max_length` is an error naming its line, or cut to its first
`max_length` tokens with `truncate`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..harmony import Message, Tool, render_conversation, render_message
from ..tokenizer import HarmonyTokenizer
from .errors import DataError


@dataclass(frozen=True)
class RenderOptions:
    reasoning_effort: str = "medium"
    include_analysis: bool = False
    turns: str = "all"  # "all" | "last"
    max_length: int = 2048
    truncate: bool = False


@dataclass
class TrainSequence:
    tokens: list[int]
    scored: list[bool]  # scored[j]: token j is a target (predicted from tokens[:j])
    line: int

    @property
    def targets(self) -> int:
        return sum(self.scored)


@dataclass
class Dataset:
    path: Path
    sha256: str
    sequences: list[TrainSequence] = field(default_factory=list)
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

    @property
    def targets(self) -> int:
        return sum(s.targets for s in self.sequences)


def _segments(messages: list[Message], turns: str) -> list[tuple[int, int]]:
    """(first, last) message index of each turn the model writes: from the first assistant message after
    the previous final answer to the next final answer (or to the last assistant message)."""
    out, start, last_assistant = [], None, None
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        last_assistant = i
        if start is None:
            start = i
        if m.channel == "final" and m.recipient is None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, last_assistant))
    return out[-1:] if turns == "last" else out


_SAYS = ("content", "tool_calls", "thinking", "reasoning_content", "reasoning")


def _check_assistants_say_something(messages, where: str) -> None:
    """An assistant message with no text, reasoning or call would train the model to answer nothing
    (an API request may send one; training data that does is a mistake)."""
    if not isinstance(messages, list):
        return  # conversation() says what is wrong with it
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant" and not any(m.get(k) for k in _SAYS):
            raise DataError(
                f"{where}: message {i} (assistant) has no content, reasoning or tool calls, so it would "
                "teach an empty answer: give its text or drop it"
            )


def render_record(
    record: dict, tokenizer: HarmonyTokenizer, options: RenderOptions, where: str
) -> list[TrainSequence]:
    """One JSONL record -> its training sequences (see the module docstring)."""
    from ..server.chat_completions import conversation, function_tools
    from ..server.schemas import APIError, join_instructions, reasoning_effort

    line = int(where.rsplit(":", 1)[-1]) if ":" in where else 0
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with 'messages', got {type(record).__name__}")
    if "messages" not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(
            f"{where}: no 'messages' field (keys: {keys}); each line needs {{\"messages\": [...]}}"
        )
    _check_assistants_say_something(record["messages"], where)
    try:
        messages, system_texts, _ = conversation(record["messages"])
        tools: list[Tool] = function_tools(record)
        effort = (
            reasoning_effort(record.get("reasoning_effort"), "reasoning_effort") or options.reasoning_effort
        )
    except APIError as e:
        raise DataError(f"{where}: {e.message}") from None
    instructions = join_instructions(*system_texts)
    segments = _segments(messages, options.turns)
    if not segments:
        raise DataError(
            f"{where}: no assistant message, so nothing to learn (the loss is on the assistant's tokens)"
        )
    role_prefix = [tokenizer.START, *tokenizer.encode("assistant")]
    out = []
    for first, last in segments:
        prompt = render_conversation(
            messages[:first],
            tokenizer,
            reasoning_effort=effort,
            tools=tools or None,
            developer_instructions=instructions,
        )
        tokens, scored = list(prompt), [False] * len(prompt)
        for j in range(first, last + 1):
            m = messages[j]
            ids = render_message(m, tokenizer)
            if j == last and m.role == "assistant" and m.channel == "final" and m.recipient is None:
                ids[-1] = tokenizer.RETURN  # what generation ends with; history shows <|end|>
            if m.role != "assistant":
                tokens += ids
                scored += [False] * len(ids)
                continue
            after_other = j > first and messages[j - 1].role != "assistant"
            if j == first:
                ids = ids[len(role_prefix) :]  # the prompt ends with <|start|>assistant
            elif after_other:  # after a tool result, the prompt adds <|start|>assistant, not the model
                tokens += role_prefix
                scored += [False] * len(role_prefix)
                ids = ids[len(role_prefix) :]
            score = options.include_analysis or m.channel != "analysis"
            tokens += ids
            scored += [score] * len(ids)
        if len(tokens) > options.max_length:
            if not options.truncate:
                raise DataError(
                    f"{where}: {len(tokens):,} tokens (turn {len(out) + 1}), longer than --max-length "
                    f"{options.max_length:,}: raise --max-length, shorten the example, or pass --truncate "
                    "to cut such sequences at the limit"
                )
            tokens, scored = tokens[: options.max_length], scored[: options.max_length]
        if any(scored):
            out.append(TrainSequence(tokens, scored, line))
    if not out:
        what = "within --max-length" if options.truncate else "outside analysis (see --include-analysis)"
        raise DataError(f"{where}: no assistant token to learn from {what}")
    return out


def load_dataset(path: str | Path, tokenizer: HarmonyTokenizer, options: RenderOptions) -> Dataset:
    """Read and render a JSONL file; every problem names its line."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"{path} is a folder; give the JSONL file (one JSON object a line, with 'messages')")
    if not path.exists():
        raise DataError(f"{path}: no such file (training data: one JSON object a line, with 'messages')")
    if _is_device(path):  # /dev/zero, /dev/urandom: read to the end, they would fill the memory
        raise DataError(f"{path} is a device, not a file; give the JSONL file")
    raw = path.read_bytes()  # also a pipe (`--data <(...)`); /dev/null reads as an empty file
    data = Dataset(path, hashlib.sha256(raw).hexdigest())
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark some editors write
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None
    # Lines end at \n only: str.splitlines also splits at U+2028, U+0085 ..., which JSON strings may hold.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            rendered = render_record(record, tokenizer, options, f"{path}:{n}")
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:  # Python's JSON reader gives up on deep nesting; no conversation is
            raise DataError(f"{path}:{n}: nested too deeply to be a conversation") from None
        for seq in rendered:
            data.truncated += options.truncate and len(seq.tokens) == options.max_length
            data.sequences.append(seq)
    if not data.sequences:
        raise DataError(f"{path}: no examples (the file is empty)")
    return data


def _is_device(path: Path) -> bool:
    """A character or block device other than /dev/null (which reads as an empty file) and a terminal
    (which ends at Ctrl-D)."""
    mode = path.stat().st_mode
    if not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) or path.resolve() == Path(os.devnull):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return True
    try:
        return not os.isatty(fd)
    finally:
        os.close(fd)


# ---- batches ---------------------------------------------------------------------------------------


@dataclass
class Batch:
    inputs: np.ndarray  # [B, T] int32: tokens[:-1] of each row, right-padded
    positions: np.ndarray  # [n] int32: flat indices (row * T + t) of the scored positions
    labels: np.ndarray  # [n] int32: the token predicted at each
    tokens: int  # real (unpadded) tokens fed


def make_batch(sequences: list[TrainSequence], pad_id: int = 0) -> Batch:
    T = max(len(s.tokens) for s in sequences) - 1
    inputs = np.full((len(sequences), T), pad_id, dtype=np.int32)
    positions, labels = [], []
    for r, s in enumerate(sequences):
        ids = np.asarray(s.tokens, dtype=np.int32)
        inputs[r, : len(ids) - 1] = ids[:-1]
        where = np.nonzero(np.asarray(s.scored[1:]))[0]
        positions.append(r * T + where)
        labels.append(ids[1:][where])
    return Batch(
        inputs,
        np.concatenate(positions).astype(np.int32),
        np.concatenate(labels).astype(np.int32),
        sum(len(s.tokens) - 1 for s in sequences),
    )


@dataclass
class DataPosition:
    """Where the next batch starts: (epoch, index into that epoch's order). Saved in checkpoints."""

    epoch: int = 0
    index: int = 0


class BatchOrder:
    """Batches of `batch_size` sequences in a shuffled order per epoch (a pure function of the seed and
    the epoch, so a position is enough to resume); an epoch's last batch may be smaller.

    mlx-lm's iterate_batches is not used: its order lives inside a generator (no position to save and
    restore), and it drops the remainder of an epoch."""

    def __init__(self, size: int, batch_size: int, seed: int, position: DataPosition | None = None):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.position = position or DataPosition()

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next(self) -> list[int]:
        p = self.position
        if p.index >= self.size:
            p.epoch, p.index = p.epoch + 1, 0
        chosen = self.order(p.epoch)[p.index : p.index + self.batch_size]
        p.index += len(chosen)
        return [int(i) for i in chosen]

    def peek(self, count: int) -> tuple[list[list[int]], DataPosition]:
        """The next `count` batches and the position after them, the current position left as it is."""
        saved = self.position
        self.position = replace(saved)
        try:
            chosen = [self.next() for _ in range(count)]
            return chosen, self.position
        finally:
            self.position = saved

    def batches_per_epoch(self) -> int:
        return -(-self.size // self.batch_size)


def eval_batches(data: Dataset, batch_size: int) -> Iterator[Batch]:
    for i in range(0, len(data), batch_size):
        yield make_batch(data.sequences[i : i + batch_size])
