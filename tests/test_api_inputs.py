"""The Python API from the outside: wrong sampling options, prompts and tools are one clear exception at
the call, and the model, its samplers and the Session stay usable for the next call."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest

import oss_mlx
from oss_mlx.session import Session


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return oss_mlx.load(tiny_checkpoint, dtype=mx.float32)


def greedy(model, tokenizer, prompt="Hi", n=4):
    return oss_mlx.generate(model, tokenizer, prompt, max_tokens=n, temperature=0).tokens


BAD_OPTIONS = [
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"temperature": -0.5}, ValueError, "temperature"),
    ({"temperature": float("inf")}, ValueError, "temperature"),
    ({"temperature": "0.5"}, TypeError, "temperature"),
    ({"top_p": 1.5}, ValueError, "top_p"),
    ({"top_p": float("nan")}, ValueError, "top_p"),
    ({"min_p": 2.0}, ValueError, "min_p"),
    ({"top_k": -3}, ValueError, "top_k"),
    ({"top_k": 10**9}, ValueError, "top_k"),
    ({"max_tokens": 1.5}, TypeError, "max_tokens"),
    ({"max_tokens": "5"}, TypeError, "max_tokens"),
    ({"max_tokens": None}, TypeError, "max_tokens"),
    ({"seed": "a"}, TypeError, "seed"),
    ({"logit_bias": {-1: 2.0}}, ValueError, "logit_bias"),
    ({"logit_bias": {"7": 2.0}}, TypeError, "logit_bias"),
    ({"logit_bias": {7: float("nan")}}, ValueError, "logit_bias"),
]


@pytest.mark.parametrize("options,error,name", BAD_OPTIONS, ids=lambda v: repr(v)[:30])
def test_bad_sampling_options_are_refused_at_the_call(loaded, options, error, name):
    model, tokenizer = loaded
    before = greedy(model, tokenizer)
    with pytest.raises(error, match=name):
        oss_mlx.generate(model, tokenizer, "Hi", max_tokens=3, **{"temperature": 1.0, **options})
    with pytest.raises(error, match=name):
        oss_mlx.batch_generate(model, tokenizer, ["Hi", "Yo"], **{"max_tokens": 3, **options})
    assert greedy(model, tokenizer) == before


def test_a_wrongly_typed_option_leaves_sampling_working(loaded):
    """A TypeError raised while MLX traced its compiled sampler left that sampler broken for every later
    sampled reply ('Attempting to eval an array without a primitive')."""
    model, tokenizer = loaded
    with pytest.raises(TypeError, match="temperature"):
        oss_mlx.generate(model, tokenizer, "Hi", max_tokens=2, temperature="0.5")
    reply = oss_mlx.generate(model, tokenizer, "Hi", max_tokens=3, temperature=0.7)
    assert reply.stats.generated_tokens == 3


def test_a_logit_bias_outside_the_vocabulary_is_an_error_not_a_crash(tiny_checkpoint):
    """The bias vector was written at the id: past its end the process died (SIGSEGV on the CPU)."""
    code = (
        "import oss_mlx, sys\n"
        f"m, t = oss_mlx.load({str(tiny_checkpoint)!r})\n"
        "try:\n"
        "    oss_mlx.generate(m, t, 'Hi', max_tokens=2, logit_bias={10**7: 5.0})\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
        "print(len(oss_mlx.generate(m, t, 'Hi', max_tokens=2, temperature=0).tokens))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "refused: a logit_bias token id must be from 0 to" in run.stdout
    assert run.stdout.strip().endswith("2")


def test_a_negative_seed_is_taken_modulo_2_64_as_the_server_takes_it(loaded):
    model, tokenizer = loaded
    a = oss_mlx.generate(model, tokenizer, "Hi", max_tokens=4, seed=-1).tokens
    b = oss_mlx.generate(model, tokenizer, "Hi", max_tokens=4, seed=2**64 - 1).tokens
    assert a == b and len(a) == 4


@pytest.mark.parametrize(
    "prompt,error,words",
    [
        (b"Hi", TypeError, "not bytes"),
        ([], ValueError, "the prompt is empty"),
        (5, TypeError, "not int"),
        ([1, "a"], TypeError, "all token ids"),
        ([1.0, 2.0], TypeError, "all token ids"),
        ([True, False], TypeError, "all token ids"),
    ],
    ids=repr,
)
def test_a_prompt_of_the_wrong_kind_is_refused(loaded, prompt, error, words):
    model, tokenizer = loaded
    with pytest.raises(error, match=words):
        oss_mlx.generate(model, tokenizer, prompt, max_tokens=2)


def test_arrays_of_ids_are_prompts_like_lists(loaded):
    model, tokenizer = loaded
    ids = Session(model, tokenizer).render([{"role": "user", "content": "Hi"}])
    want = greedy(model, tokenizer, ids)
    assert greedy(model, tokenizer, np.array(ids, dtype=np.int64)) == want
    assert greedy(model, tokenizer, mx.array(ids)) == want


def test_batch_generate_refuses_a_str_as_its_list_of_prompts(loaded):
    model, tokenizer = loaded
    with pytest.raises(TypeError, match="list of prompts"):
        oss_mlx.batch_generate(model, tokenizer, "ab", max_tokens=2)


def test_one_session_streamed_twice_at_once_is_refused_and_the_first_is_intact(loaded):
    """Two replies at once on one Session rewound the cache the first was filling (a broadcast error
    from attention, wrong tokens, or a wait without end)."""
    model, tokenizer = loaded
    want = greedy(model, tokenizer, "Hello", n=12)
    seen: dict = {}
    worker = threading.Thread(target=_two_at_once, args=(Session(model, tokenizer), seen), daemon=True)
    worker.start()
    worker.join(90)
    assert not worker.is_alive(), "the session hung"
    assert isinstance(seen["second"], RuntimeError) and "already generating" in str(seen["second"])
    assert isinstance(seen["thread"], RuntimeError)
    assert seen["first"] == want
    assert seen["after"] == 2


def _two_at_once(session: Session, seen: dict) -> None:
    first = session.stream("Hello", max_tokens=12, temperature=0)
    next(first)
    try:
        next(session.stream("Other", max_tokens=3, temperature=0))
    except Exception as e:  # noqa: BLE001 - the test reads it
        seen["second"] = e
    other = threading.Thread(target=_send_from_a_thread, args=(session, seen), daemon=True)
    other.start()
    other.join(30)
    seen["first"] = list(first)[-1].reply.tokens
    seen["after"] = list(session.send("Again", max_tokens=2, temperature=0))[-1].reply.stats.generated_tokens


def _send_from_a_thread(session: Session, seen: dict) -> None:
    try:
        list(session.send("From a thread", max_tokens=3))
    except Exception as e:  # noqa: BLE001 - the test reads it
        seen["thread"] = e


@pytest.fixture(scope="module")
def short_context(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ctx") / "m"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 120
    (folder / "config.json").write_text(json.dumps(config))
    return oss_mlx.load(folder, dtype=mx.float32)


def test_a_prompt_longer_than_the_context_is_refused_and_the_history_kept(short_context):
    model, tokenizer = short_context
    long = "word " * 200
    with pytest.raises(ValueError, match="context is 120"):
        oss_mlx.generate(model, tokenizer, long, max_tokens=2)
    session = Session(model, tokenizer)
    with pytest.raises(ValueError, match="no room for a reply"):
        list(session.send(long, max_tokens=2))
    assert session.messages == []
    with pytest.raises(ValueError, match="context"):
        oss_mlx.batch_generate(model, tokenizer, ["Hi", long], max_tokens=2)


def test_max_tokens_stops_at_the_end_of_the_context(short_context):
    model, tokenizer = short_context
    reply = oss_mlx.generate(model, tokenizer, "Hi", max_tokens=500, temperature=0)
    assert reply.stats.prompt_tokens + reply.stats.generated_tokens == 120
    assert reply.stats.finish_reason == "length"


def test_send_refuses_bad_options_before_the_message_is_added(loaded):
    model, tokenizer = loaded
    session = Session(model, tokenizer)
    for kwargs in ({"top_p": 7}, {"nonsense": 1}):
        with pytest.raises((ValueError, TypeError)):
            list(session.send("Hi", max_tokens=2, **kwargs))
    with pytest.raises(TypeError, match="str"):
        list(session.send(42))
    assert session.messages == []


@pytest.mark.parametrize(
    "tools,words",
    [
        ("get_weather", "list of tools"),
        ([{"name": 1}], 'needs a "name"'),
        ([{"parameters": {}}], 'needs a "name"'),
        ([{"name": "x", "parameters": "y"}], "JSON schema"),
        ([3], "Tool or a dict"),
    ],
    ids=repr,
)
def test_malformed_tools_are_refused_when_the_session_is_made(loaded, tools, words):
    model, tokenizer = loaded
    with pytest.raises(TypeError, match=words):
        Session(model, tokenizer, tools=tools)
    with pytest.raises(TypeError, match=words):
        oss_mlx.generate(model, tokenizer, "Hi", tools=tools, max_tokens=2)
