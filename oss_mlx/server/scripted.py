"""TEST HOOK, not a feature: scripted replies for testing the server against a random tiny model.

A tiny random checkpoint writes random text, so a test that needs a tool call or a reasoning/final
split scripts the sampler instead: the model still runs every step (prefill, cache, decode), only the
choice of the next token is replaced. Enabled only by the environment variable::

    OSS_MLX_SCRIPTED_REPLIES=/path/rules.json oss-mlx serve --model <folder>

rules.json is a list of rules, the first whose ``match`` is a substring of the last message's content
wins (no rule matches: normal sampling)::

    [{"match": "weather", "reply": "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\\"city\\": \\"Paris\\"}<|call|>"},
     {"match": "slow", "reply": "<|channel|>final<|message|>...", "token_delay": 0.05}]

``reply`` is harmony text as the model would write it after ``<|start|>assistant`` (special tokens
allowed); after it the sampler repeats ``<|return|>``. ``token_delay`` (seconds) slows each step.
When the reply is constrained (structured outputs), a scripted token the constraint forbids is
replaced by the best token it allows: the script shows what is accepted, never an invalid output.
The server logs a warning at start when the hook is on.
"""  # noqa: E501

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import mlx.core as mx

from ..generation import SamplingOptions

ENV = "OSS_MLX_SCRIPTED_REPLIES"


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


class Script:
    def __init__(self, rules: list[dict], tokenizer):
        self.tokenizer = tokenizer
        self.rules = [
            (
                str(r.get("match", "")),
                tuple(tokenizer.encode(r["reply"], allow_special=True)),
                r.get("token_delay", 0),
            )
            for r in rules
        ]

    @classmethod
    def from_env(cls):
        """A factory taking the tokenizer (the worker calls it after loading), or None if the hook is off."""
        path = os.environ.get(ENV)
        if not path:
            return None
        with open(path, encoding="utf-8") as f:
            rules = json.load(f)
        return lambda tokenizer: cls(rules, tokenizer)

    def options(self, options: SamplingOptions, messages) -> SamplingOptions:
        last = messages[-1].content if messages else ""
        for match, script, delay in self.rules:
            if match in last:
                return ScriptedSampling(
                    max_tokens=options.max_tokens,
                    script=script,
                    fill=self.tokenizer.RETURN,
                    token_delay=float(delay),
                )
        return options
