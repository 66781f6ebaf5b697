"""Generation API and Session: events, stats, prefix reuse across turns, interruption."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

import oss_mlx
from oss_mlx.generation import SamplingOptions
from oss_mlx.runtime import runtime_of
from oss_mlx.session import Done, Session
from oss_mlx.testing.scripted import Script


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return oss_mlx.load(tiny_checkpoint, dtype=mx.float32)


ANSWER = "<|channel|>analysis<|message|>The user greets. Reply briefly.<|end|><|start|>assistant<|channel|>final<|message|>Hello there! How can I help?<|return|>"  # noqa: E501


def test_generate_splits_analysis_and_final(loaded):
    model, tokenizer = loaded
    replies = Script.replies([ANSWER], tokenizer).sampling
    reply = oss_mlx.generate(model, tokenizer, "Hi", options=replies(max_tokens=200))
    assert reply.text == "Hello there! How can I help?"
    assert reply.analysis == "The user greets. Reply briefly."
    assert reply.stats.finish_reason == "stop"
    assert reply.stats.generated_tokens == len(tokenizer.encode(ANSWER, allow_special=True))
    assert reply.stats.prompt_tokens > 20 and reply.stats.generation_tps > 0


def test_stream_events_and_tool_call(loaded):
    model, tokenizer = loaded
    call = (
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
    )
    replies = Script.replies([call], tokenizer).sampling
    tools = [
        {
            "name": "get_weather",
            "description": "Weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ]
    options = replies(max_tokens=100)
    events = list(
        oss_mlx.stream_generate(model, tokenizer, "Weather in Paris?", tools=tools, options=options)
    )
    done = events[-1]
    assert isinstance(done, Done)
    assert [c.name for c in done.reply.tool_calls] == ["get_weather"]
    assert done.reply.tool_calls[0].arguments == '{"city": "Paris"}'
    assert done.reply.stats.finish_reason == "tool_call"


@pytest.mark.parametrize("channel", ["analysis", "commentary"])
def test_tool_result_follows_its_call_channel(loaded, channel):
    """A function called on analysis gets its output on analysis: once the turn is answered, harmony
    drops both (on commentary, both stay). The output never outlives its call in the next prompt."""
    model, tokenizer = loaded
    args = '{"city": "Paris"}'
    call = f"<|channel|>{channel} to=functions.get_weather <|constrain|>json<|message|>{args}<|call|>"
    final = "<|channel|>final<|message|>It is sunny in Paris.<|return|>"
    replies = Script.replies([call, final], tokenizer).sampling
    city = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [{"name": "get_weather", "parameters": city}]
    session = Session(model, tokenizer, tools=tools)
    list(session.send("Weather in Paris?", options=replies(max_tokens=100)))
    session.add_tool_result("get_weather", '{"sky": "sunny"}')
    assert session.messages[-1].channel == channel
    list(session.send(options=replies(max_tokens=100)))
    text = tokenizer.decode(session._to_tokens("Thanks!"))
    kept = channel == "commentary"
    assert ('"city": "Paris"' in text) is kept and ('{"sky": "sunny"}' in text) is kept
    assert "It is sunny in Paris." in text


def test_greedy_is_deterministic_and_bounded(loaded):
    model, tokenizer = loaded
    a = oss_mlx.generate(model, tokenizer, "Count to three.", temperature=0.0, max_tokens=12)
    b = oss_mlx.generate(model, tokenizer, "Count to three.", temperature=0.0, max_tokens=12)
    assert a.tokens == b.tokens and 1 <= len(a.tokens) <= 12


def test_turns_prefill_only_what_is_new(loaded):
    """Turn 3 of a conversation processes only its new tokens, though each turn's analysis was dropped."""
    model, tokenizer = loaded
    texts = [ANSWER.replace("Hello there!", f"Answer {i}.") for i in range(3)]
    replies = Script.replies(texts, tokenizer).sampling
    session = Session(model, tokenizer)
    prompts = []
    seen = []  # what the model was fed: each prompt, then each reply
    for question in ["Hi", "Tell me more about yourself, at length.", "And a third question?"]:
        prompts.append(session._to_tokens(question))
        reply = list(session.send(question, options=replies(max_tokens=200)))[-1].reply
        assert reply.text.startswith("Answer")
        seen.append(prompts[-1] + reply.tokens)
    first, second, third = session.turn_stats
    assert first.prefilled_tokens == len(prompts[0])
    # Each turn drops the previous turns' analysis, so the prompt leaves the cache right after the
    # previous prompt's <|start|>assistant - 40+ tokens back, past the 16-token window (a mark).
    assert second.prefilled_tokens == len(prompts[1]) - len(prompts[0])
    assert third.prefilled_tokens == len(prompts[2]) - len(prompts[1])
    assert seen[1][: len(prompts[1])] == prompts[2][: len(prompts[1])]  # the shared part is exact
    assert third.prefilled_tokens < len(prompts[2]) // 2


def test_reused_cache_gives_the_same_tokens_as_a_fresh_one(loaded):
    model, tokenizer = loaded
    replies = Script.replies([ANSWER, ANSWER], tokenizer).sampling
    session = Session(model, tokenizer)
    for q in ["Hi", "Again"]:
        list(session.send(q, options=replies(max_tokens=200)))
    # real greedy sampling from here
    session.messages.append(oss_mlx.harmony.Message("user", "Third"))
    history = list(session.messages)
    reused = list(session.stream(temperature=0.0, max_tokens=8))[-1].reply
    fresh = list(Session(model, tokenizer).stream(history, temperature=0.0, max_tokens=8))[-1].reply
    assert reused.stats.prefilled_tokens < fresh.stats.prefilled_tokens
    assert reused.tokens == fresh.tokens


def test_interrupted_reply_keeps_conversation_and_cache_consistent(loaded):
    model, tokenizer = loaded
    session = Session(model, tokenizer)
    events = session.send("Write a long story.", temperature=0.0, max_tokens=50)
    for _ in itertools.islice(events, 3):
        pass
    events.close()  # what the chat does on Ctrl-C
    assert session.messages[0].content == "Write a long story."
    assert session.cache.offset == len(session.cached_tokens)
    assert all(c.offset == session.cache.offset for c in session.cache)
    # The session goes on, reusing the cache.
    reply = list(session.send("Shorter, please.", temperature=0.0, max_tokens=4))[-1].reply
    assert reply.stats.prefilled_tokens < reply.stats.prompt_tokens


def test_regenerating_the_same_prompt_prefills_one_token(loaded):
    """/regen: the same prompt again after a long reply reuses all but its last token."""
    model, tokenizer = loaded
    replies = Script.replies([ANSWER, ANSWER], tokenizer).sampling
    session = Session(model, tokenizer)
    list(session.send("Hi", options=replies(max_tokens=200)))
    session.messages = session.messages[:1]  # drop the reply, keep the question
    reply = list(session.send(options=replies(max_tokens=200)))[-1].reply
    assert reply.stats.prefilled_tokens == 1
    assert reply.text == "Hello there! How can I help?"


def test_the_python_api_example_runs(tiny_checkpoint):
    """examples/python_api.py as a user runs it (the tiny random model, replies capped at 6 tokens):
    load, one reply with its stats, a stream, a two-turn session whose second turn prefills only what
    is new, three prompts decoded together."""
    example = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"
    cmd = [sys.executable, str(example), str(tiny_checkpoint), "--max-tokens", "6"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^[1-6] tokens at [\d.]+ tok/s$", out.stdout, re.M), out.stdout
    assert "\n> My name is Ada.\n" in out.stdout and "\n> What is my name?\n" in out.stdout
    turns = re.search(r"^prefilled per turn: \[(\d+), (\d+)\]$", out.stdout, re.M)
    assert turns and 0 < int(turns[2]) < int(turns[1]), out.stdout
    batched = re.findall(
        r"^Name a (?:prime number|colour|planet)\. -> .* \(([1-6]) tokens\)$", out.stdout, re.M
    )
    assert len(batched) == 3, out.stdout


def test_prefill_progress_reports_without_changing_the_tokens(loaded):
    from oss_mlx.runtime import generate_tokens

    model, _ = loaded
    tokens = list(range(300, 350))
    seen: list[tuple[int, int]] = []
    options = SamplingOptions(temperature=0.0, max_tokens=3)
    quiet = list(generate_tokens(model, tokens, model.make_cache(), options, set(), prefill_chunk=16))
    reported = list(
        generate_tokens(
            model,
            tokens,
            model.make_cache(),
            options,
            set(),
            prefill_chunk=16,
            on_prefill=lambda d, n: seen.append((d, n)),
        )
    )
    assert quiet == reported
    # at the start, each chunk once it is in the cache, and the whole prompt with the first token
    assert seen == [(0, 50), (16, 50), (32, 50), (48, 50), (49, 50), (50, 50)]


def test_a_prefill_stopped_half_way_reports_what_it_did_and_keeps_it(loaded, monkeypatch):
    """Ctrl-C during a long prompt: the stats say how many tokens were processed (not the whole
    prompt), how long it took and the peak memory; those tokens stay in the cache for the next turn."""
    model, tokenizer = loaded
    monkeypatch.setattr(runtime_of(model), "prefill_chunk", 64)
    replies = Script.replies([ANSWER, ANSWER], tokenizer).sampling
    session = Session(model, tokenizer)
    long_text = " ".join(f"fact {i} is worth keeping" for i in range(60))
    calls: list[tuple[int, int]] = []

    def stop_after_two_chunks(done: int, total: int) -> None:
        calls.append((done, total))
        if done >= 128:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        for _ in session.send(long_text, on_prefill=stop_after_two_chunks, options=replies()):
            pass
    total = calls[0][1]
    assert calls[0] == (0, total) and total > 4 * 64
    stats = session.turn_stats[-1]
    # The scheduler goes on while the reader is told; it stops at the next chunk boundary after the
    # cancel, and the stats say what the cache really holds.
    done = stats.prefilled_tokens
    assert 128 <= done < total and done % 64 == 0
    assert done == session.cache.offset == len(session.cached_tokens)
    assert stats.generated_tokens == 0 and stats.finish_reason == "interrupted"
    assert stats.prompt_seconds > 0 and stats.peak_memory_gb > 0
    assert session.messages[-1].content == long_text  # the question is kept
    # The next reply to the same history prefills only the rest.
    reply = None
    for event in session.send(None, options=replies(max_tokens=200)):
        if isinstance(event, Done):
            reply = event.reply
    assert reply.text == "Hello there! How can I help?"
    assert reply.stats.prefilled_tokens == total - done


QUESTIONS = [
    "Hi",
    "What is the capital of France, and why?",
    "Count to five. " * 6,
    "Tell me a story about a cat.",
]


def test_batch_generate_equals_each_alone(loaded):
    """batch_generate decodes the prompts together; each reply is what generate gives it alone."""
    model, tokenizer = loaded
    limits = [12, 30, 7, 21]
    alone = [
        oss_mlx.generate(model, tokenizer, q, max_tokens=m, temperature=0) for q, m in zip(QUESTIONS, limits)
    ]
    together = oss_mlx.batch_generate(model, tokenizer, QUESTIONS, max_tokens=limits, temperature=0)
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [(r.text, r.analysis) for r in together] == [(r.text, r.analysis) for r in alone]
    assert max(r.stats.max_batch for r in together) >= 3  # they really were decoded together
    with pytest.raises(ValueError, match="max_tokens: 2 values for 4 prompts"):
        oss_mlx.batch_generate(model, tokenizer, QUESTIONS, max_tokens=[3, 4])


def test_constrained_replies_batched_equal_each_alone(loaded):
    """Structured outputs in the batch: each constrained reply (its mask made from the token just
    read, the batch sampled after it) is what it is alone, and valid; a free reply decoded beside
    constrained ones is unchanged too."""
    import json
    import threading

    model, tokenizer = loaded
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
        "additionalProperties": False,
    }
    keys = dict(json_schema=schema, reasoning_budget=6, temperature=0)
    limits = [40, 28, 34]
    alone = [oss_mlx.generate(model, tokenizer, q, max_tokens=m, **keys) for q, m in zip(QUESTIONS, limits)]
    together = oss_mlx.batch_generate(model, tokenizer, QUESTIONS[:3], max_tokens=limits, **keys)
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert max(r.stats.max_batch for r in together) >= 2
    for reply in together:
        assert reply.stats.masked_tokens > 0
        if reply.stats.finish_reason == "stop":
            assert set(json.loads(reply.text)) == {"n", "ok"}

    free_alone = oss_mlx.generate(model, tokenizer, QUESTIONS[3], max_tokens=30, temperature=0)
    results: dict[str, oss_mlx.Reply] = {}
    gate = threading.Barrier(2)

    def run(name: str, **kwargs) -> None:
        gate.wait(30)
        results[name] = oss_mlx.generate(model, tokenizer, **kwargs)

    threads = [
        threading.Thread(
            target=run, args=("free",), kwargs=dict(prompt=QUESTIONS[3], max_tokens=30, temperature=0)
        ),
        threading.Thread(target=run, args=("json",), kwargs=dict(prompt=QUESTIONS[0], max_tokens=40, **keys)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["free"].tokens == free_alone.tokens
    assert results["json"].tokens == alone[0].tokens
    assert results["free"].stats.masked_tokens == 0


def test_a_constrained_reply_makes_each_mask_beside_the_queuing_of_its_step(loaded, monkeypatch):
    """generate(..., json_schema=) alone (batch 1, the model's scheduler thread): every token's mask
    is asked of the mask thread before the step fed that token is queued, nothing waits in between,
    and the grammar runs on that other thread, so its host work overlaps the queuing and the run of
    the forward pass (only the sampling waits for it)."""
    import threading

    from oss_mlx.constrained import TurnConstraint
    from oss_mlx.model import Transformer
    from oss_mlx.scheduler import Scheduler

    model, tokenizer = loaded
    events: list[str] = []
    masks: list[int] = []
    mask_threads: set[int] = set()
    step_threads: set[int] = set()
    real_step, real_advance, real_ask = Transformer.step_into, TurnConstraint.advance, Scheduler._ask_mask
    real_eval, real_sync = mx.eval, mx.synchronize

    def step_into(self, batch, tokens, step=None):
        events.append("step")
        step_threads.add(threading.get_ident())
        return real_step(self, batch, tokens, step)

    def advance(self, token, remaining):
        mask_threads.add(threading.get_ident())
        masks.append(token)
        return real_advance(self, token, remaining)

    def ask(self, seq):
        events.append("ask")
        return real_ask(self, seq)

    def waits(real):
        def wait(*args, **kwargs):
            if threading.get_ident() in step_threads:
                events.append("wait")
            return real(*args, **kwargs)

        return wait

    monkeypatch.setattr(Transformer, "step_into", step_into)
    monkeypatch.setattr(TurnConstraint, "advance", advance)
    monkeypatch.setattr(Scheduler, "_ask_mask", ask)
    monkeypatch.setattr(mx, "eval", waits(real_eval))
    monkeypatch.setattr(mx, "synchronize", waits(real_sync))
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    reply = oss_mlx.generate(
        model, tokenizer, QUESTIONS[0], max_tokens=40, temperature=0, json_schema=schema, reasoning_budget=6
    )
    monkeypatch.undo()
    assert reply.stats.max_batch == 1 and reply.stats.masked_tokens == reply.stats.generated_tokens
    asks = [i for i, e in enumerate(events) if e == "ask"]
    # every fed token is asked for, the stop too (not yet read when its step is queued); the stop
    # makes no mask, and the first mask is made during the prompt
    assert len(asks) == reply.stats.generated_tokens and reply.tokens[-1] == tokenizer.RETURN
    assert masks == reply.tokens[:-1]
    assert all(events[i + 1] == "step" for i in asks), events  # asked, then queued, nothing waited
    assert mask_threads and not mask_threads & step_threads  # the grammar ran beside, not on, it


def test_a_mask_that_takes_long_costs_no_more_than_the_step_beside_it(loaded, monkeypatch):
    """The overlap, timed: with the host's queuing of a step made to take 40 ms, a constrained reply
    whose masks are made to take 40 ms too is not ~40 ms a token slower than the same reply with
    quick masks (one after the other it would be). Measured against that reply in the same process,
    not against a fixed time: a loaded machine slows both alike."""
    from oss_mlx.constrained import TurnConstraint
    from oss_mlx.model import Transformer

    model, tokenizer = loaded
    real_step, real_advance = Transformer.step_into, TurnConstraint.advance
    pause, mask_pause = 0.04, [0.0]

    def step_into(self, batch, tokens, step=None):
        time.sleep(pause)
        return real_step(self, batch, tokens, step)

    def advance(self, token, remaining):
        time.sleep(mask_pause[0])
        return real_advance(self, token, remaining)

    monkeypatch.setattr(Transformer, "step_into", step_into)
    monkeypatch.setattr(TurnConstraint, "advance", advance)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    keys = dict(max_tokens=24, temperature=0, json_schema=schema, reasoning_budget=6)
    extra = []
    for _ in range(3):  # a pair at a time; made one after the other, no pair would pass
        replies = []
        for mask_pause[0] in (0.0, pause):
            replies.append(oss_mlx.generate(model, tokenizer, QUESTIONS[0], **keys))
        quick, slow = (r.stats for r in replies)
        assert replies[0].text == replies[1].text
        steps = slow.generated_tokens - 1  # between the first token read and the last
        assert steps >= 10 and slow.mask_seconds >= steps * pause
        extra.append(slow.generation_seconds - quick.generation_seconds)
        if extra[-1] < 0.5 * steps * pause:
            break
    monkeypatch.undo()
    assert min(extra) < 0.5 * steps * pause, (extra, steps * pause)


def test_a_grammar_failing_on_the_mask_thread_ends_its_reply_alone(loaded, monkeypatch):
    """A constraint that fails on the mask thread (here: its fourth mask raises) ends that reply with
    the grammar's error, raised to its caller; a reply decoding beside it gives what it gives alone,
    and the next constrained reply is made as before."""
    import threading

    from oss_mlx.constrained import TurnConstraint

    model, tokenizer = loaded
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    keys = dict(json_schema=schema, reasoning_budget=6, temperature=0)
    free_alone = oss_mlx.generate(model, tokenizer, QUESTIONS[3], max_tokens=30, temperature=0)
    json_alone = oss_mlx.generate(model, tokenizer, QUESTIONS[0], max_tokens=40, **keys)
    real, calls = TurnConstraint.advance, []

    def advance(self, token, remaining):
        calls.append(threading.current_thread().name)
        if len(calls) == 4:
            raise RuntimeError("constrained decoding: the grammar broke")
        return real(self, token, remaining)

    monkeypatch.setattr(TurnConstraint, "advance", advance)
    results: dict[str, object] = {}
    gate = threading.Barrier(2)

    def run(name: str, **kwargs) -> None:
        gate.wait(30)
        try:
            results[name] = oss_mlx.generate(model, tokenizer, **kwargs)
        except Exception as e:
            results[name] = e

    threads = [
        threading.Thread(
            target=run, args=("free",), kwargs=dict(prompt=QUESTIONS[3], max_tokens=30, temperature=0)
        ),
        threading.Thread(target=run, args=("json",), kwargs=dict(prompt=QUESTIONS[0], max_tokens=40, **keys)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    monkeypatch.undo()
    assert isinstance(results["json"], RuntimeError) and "the grammar broke" in str(results["json"])
    assert calls[3].startswith("oss-mlx-masks")  # it failed on the mask thread
    assert results["free"].tokens == free_alone.tokens
    again = oss_mlx.generate(model, tokenizer, QUESTIONS[0], max_tokens=40, **keys)
    assert again.tokens == json_alone.tokens


def test_sessions_on_one_model_stream_from_threads_at_once(loaded):
    """Four conversations of two turns each, every one in its own thread, on one model: each gives
    what it gives alone (second turns reuse their own session's prefix), decoded together."""
    import threading

    model, tokenizer = loaded

    def conversation(first: str) -> tuple[list[list[int]], list[int], int]:
        session = Session(model, tokenizer)
        tokens, prefilled = [], []
        for text in (first, "And then?"):
            reply = None
            for event in session.send(text, max_tokens=15, temperature=0):
                if isinstance(event, Done):
                    reply = event.reply
            tokens.append(reply.tokens)
            prefilled.append(reply.stats.prefilled_tokens)
        return tokens, prefilled, max(s.max_batch for s in session.turn_stats)

    alone = [conversation(q)[:2] for q in QUESTIONS]
    results: dict[int, tuple] = {}
    gate = threading.Barrier(len(QUESTIONS))

    def run(i: int) -> None:
        gate.wait(30)
        results[i] = conversation(QUESTIONS[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i][:2] for i in range(len(QUESTIONS))] == alone
    assert max(results[i][2] for i in results) >= 2
