"""TEST HOOK, not a feature: scripted replies, for testing the chat, the server and the API against a
random tiny model.

A tiny random checkpoint writes random text, so a test that needs a tool call or a reasoning/final
split scripts the sampler instead: the model still runs every step (prefill, cache, decode), only the
choice of the next token is replaced. `oss-mlx chat` and `oss-mlx serve` turn it on only by the
environment variable (and say so: the server logs a warning at start)::

    OSS_MLX_SCRIPTED_REPLIES=/path/rules.json oss-mlx serve --model <folder>

rules.json is a list of rules. For each reply the first rule whose ``match`` is a substring of the last
message's content is used (no ``match``: any message); when none matches, the reply is sampled::

    [{"match": "weather", "reply": "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\\"city\\": \\"Paris\\"}<|call|>"},
     {"match": "slow", "reply": "<|channel|>final<|message|>...", "token_delay": 0.05},
     {"reply": "<|channel|>final<|message|>Hi!<|return|>", "once": true},
     {"reply": null, "once": true}]

``reply`` is harmony text as the model would write it after ``<|start|>assistant`` (special tokens
allowed); after it the sampler repeats ``<|return|>``; null samples the reply for real. ``token_delay``
(seconds) slows each step. ``once``: the rule serves one reply and is dropped, so a list of ``once``
rules (`in_order`) scripts a conversation's replies in turn. When the reply is constrained (structured
outputs), a scripted token the constraint forbids is replaced by the best token it allows: the script
shows what is accepted, never an invalid output.
"""  # noqa: E501

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx

from ..generation import SamplingOptions

ENV = "OSS_MLX_SCRIPTED_REPLIES"
_KEYS = {"match", "reply", "token_delay", "once"}


def scripted_pick(logprobs: mx.array, token: int) -> mx.array:
    """`token`, unless a constraint masked it out (its log-probability is -inf): then the best token
    the constraint allows, so a constrained reply stays valid whatever the script says. Depends on
    the logits, so that each decode step is evaluated as a real one would be (a constant would leave
    the model's work lazy, piling up in the cache)."""
    best = mx.argmax(logprobs, axis=-1)
    return mx.where(logprobs[..., token] > -mx.inf, mx.array(token, dtype=best.dtype), best)


@dataclass
class ScriptedSampling(SamplingOptions):
    script: tuple[int, ...] = ()
    fill: int = 0
    token_delay: float = 0.0

    def sampler(self):
        tokens = iter(self.script)

        def pick(logprobs: mx.array) -> mx.array:
            if self.token_delay:
                time.sleep(self.token_delay)
            return scripted_pick(logprobs, next(tokens, self.fill))

        return pick


@dataclass
class Rule:
    match: str
    reply: tuple[int, ...] | None  # None: sample for real
    token_delay: float
    once: bool


def in_order(replies: Sequence[str | None]) -> list[dict[str, Any]]:
    """Rules scripting replies one after the other (None: that reply is sampled)."""
    return [{"reply": r, "once": True} for r in replies]


class Script:
    """The rules, tokenized; `options` gives each reply its sampling options."""

    def __init__(self, rules: list[dict], tokenizer):
        if not isinstance(rules, list) or not all(isinstance(r, dict) and set(r) <= _KEYS for r in rules):
            raise ValueError(f"{ENV}: the file must hold a list of rules with keys {sorted(_KEYS)}")
        self.tokenizer = tokenizer
        self.rules = [
            Rule(
                str(r.get("match", "")),
                None if r.get("reply") is None else tuple(tokenizer.encode(r["reply"], allow_special=True)),
                float(r.get("token_delay", 0)),
                bool(r.get("once", False)),
            )
            for r in rules
        ]

    @classmethod
    def replies(cls, texts: Sequence[str | None], tokenizer) -> Script:
        """These replies in turn (`in_order`): for in-process tests, with `sampling`."""
        return cls(in_order(texts), tokenizer)

    @classmethod
    def from_file(cls, path: str | os.PathLike, tokenizer) -> Script:
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f), tokenizer)

    @classmethod
    def from_env(cls):
        """A factory taking the tokenizer (called once the model is loaded), or None if the hook is off."""
        path = os.environ.get(ENV)
        if not path:
            return None
        with open(path, encoding="utf-8") as f:
            rules = json.load(f)
        return lambda tokenizer: cls(rules, tokenizer)

    def options(self, options: SamplingOptions, messages: Sequence[Any] = ()) -> SamplingOptions:
        """`options` with the scripted sampler of the first rule matching the last message's content
        (a `Message` or a str), or `options` itself when no rule matches or the rule samples."""
        last = messages[-1] if messages else ""
        text = last if isinstance(last, str) else (last.content or "")
        for rule in self.rules:
            if rule.match in text:
                if rule.once:
                    self.rules.remove(rule)
                if rule.reply is None:
                    return options
                kept = {f.name: getattr(options, f.name) for f in fields(SamplingOptions)}
                return ScriptedSampling(
                    **kept, script=rule.reply, fill=self.tokenizer.RETURN, token_delay=rule.token_delay
                )
        return options

    def sampling(self, **sampling: Any) -> SamplingOptions:
        """The next reply's options (`SamplingOptions(**sampling)`, scripted), no message to match."""
        return self.options(SamplingOptions(**sampling))
