"""Training data renders as inference sees it (token for token against openai-harmony), with the right
tokens scored; bad files fail naming the line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from oss_mlx.finetune.data import (
    BatchOrder,
    DataError,
    DataPosition,
    RenderOptions,
    load_dataset,
    make_batch,
    render_record,
)

oh = pytest.importorskip("openai_harmony")
from openai_harmony import (  # noqa: E402
    Author,
    Conversation,
    DeveloperContent,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
)
from openai_harmony import Message as M  # noqa: E402

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
KEEP = RenderConversationConfig(auto_drop_analysis=False)


def head(effort="medium", instructions=None, tools=()) -> list:
    system = SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize()))
    out = [M.from_role_and_content(Role.SYSTEM, system)]
    if instructions or tools:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions(instructions)
        if tools:
            dev = dev.with_function_tools(
                [ToolDescription.new(t["name"], t["description"], t["parameters"]) for t in tools]
            )
        out.append(M.from_role_and_content(Role.DEVELOPER, dev))
    return out


def user(text):
    return M.from_role_and_content(Role.USER, text)


def analysis(text):
    return M.from_role_and_content(Role.ASSISTANT, text).with_channel("analysis")


def final(text):
    return M.from_role_and_content(Role.ASSISTANT, text).with_channel("final")


def call(name, args):
    msg = M.from_role_and_content(Role.ASSISTANT, args).with_channel("commentary")
    return msg.with_recipient(f"functions.{name}").with_content_type("<|constrain|>json")


def result(name, text):
    msg = M.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), text)
    return msg.with_channel("commentary").with_recipient("assistant")


def scored_text(tok, seq) -> str:
    return tok.decode([t for t, s in zip(seq.tokens, seq.scored) if s])


def test_single_turn_with_reasoning(tok, enc):
    record = {
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "thinking": "User greets. Reply in French.", "content": "Bonjour !"},
        ]
    }
    (seq,) = render_record(record, tok, RenderOptions(), "x.jsonl:1")
    conv = [*head(instructions="Answer in French."), user("Hi")]
    prompt = enc.render_conversation_for_completion(Conversation.from_messages(conv), Role.ASSISTANT)
    full = enc.render_conversation_for_training(
        Conversation.from_messages([*conv, analysis("User greets. Reply in French."), final("Bonjour !")]),
        KEEP,
    )
    assert seq.tokens == full and seq.tokens[: len(prompt)] == prompt
    assert not any(seq.scored[: len(prompt)])
    assert seq.tokens[-1] == tok.RETURN
    # analysis is context by default; the answer's header, text and <|return|> are scored
    assert scored_text(tok, seq) == "<|start|>assistant<|channel|>final<|message|>Bonjour !<|return|>"
    (seq2,) = render_record(record, tok, RenderOptions(include_analysis=True), "x.jsonl:1")
    assert seq2.tokens == seq.tokens
    assert scored_text(tok, seq2) == tok.decode(seq.tokens[len(prompt) :])


def test_multi_turn_tools_as_inference_sees_each_turn(tok, enc):
    """Two turns, the first with a tool call: two sequences; the second's prompt drops turn 1's
    reasoning (harmony's rule); the tool result is context, the calls and answers are scored."""
    record = {
        "tools": [WEATHER],
        "reasoning_effort": "low",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "reasoning_content": "Need the tool.",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "18C"},
            {"role": "assistant", "thinking": "Got it.", "content": "18 degrees."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "thinking": "Polite.", "content": "You're welcome."},
        ],
    }
    first, second = render_record(record, tok, RenderOptions(include_analysis=True), "x.jsonl:3")
    h = head(effort="low", tools=[WEATHER["function"]])
    turn1 = [
        analysis("Need the tool."),
        call("get_weather", '{"city":"Paris"}'),
        result("get_weather", "18C"),
    ]
    turn1 += [analysis("Got it."), final("18 degrees.")]
    want1 = enc.render_conversation_for_training(
        Conversation.from_messages([*h, user("Weather in Paris?"), *turn1]), KEEP
    )
    assert first.tokens == want1
    # mid-turn: what the prompt after the tool result is at inference
    mid = enc.render_conversation_for_completion(
        Conversation.from_messages([*h, user("Weather in Paris?"), *turn1[:3]]), Role.ASSISTANT, KEEP
    )
    assert first.tokens[: len(mid)] == mid
    assert not any(first.scored[len(mid) - 3 : len(mid)])  # <|start|>assistant after the result: prompt
    assert "18C" not in scored_text(tok, first)
    assert '{"city":"Paris"}<|call|>' in scored_text(tok, first)
    # turn 2: turn 1's reasoning dropped from its prompt, as Session renders it
    history = [*h, user("Weather in Paris?"), turn1[1], turn1[2], turn1[4], user("Thanks")]
    want2 = enc.render_conversation_for_training(
        Conversation.from_messages([*history, analysis("Polite."), final("You're welcome.")]), KEEP
    )
    assert second.tokens == want2
    assert tok.decode(second.tokens).count("Need the tool.") == 0
    assert scored_text(tok, second).endswith("You're welcome.<|return|>")
    assert "18 degrees." not in scored_text(tok, second)  # earlier answers are context now
    (last,) = render_record(record, tok, RenderOptions(turns="last"), "x.jsonl:3")
    assert last.tokens == second.tokens


def test_ends_on_a_tool_call(tok):
    record = {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": "{}"}}]},
        ],
    }
    (seq,) = render_record(record, tok, RenderOptions(), "x.jsonl:1")
    assert seq.tokens[-1] == tok.CALL and seq.scored[-1]


def test_bad_inputs_name_the_line(tok, tmp_path):
    def chat(*messages):
        return json.dumps({"messages": list(messages)})

    u, a = {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}
    good = chat(u, a)
    cases = [
        ("{not json", r"x\.jsonl:2: not valid JSON"),
        (json.dumps({"prompt": "a"}), r"x\.jsonl:2: no 'messages' field \(keys: prompt\)"),
        (chat(u), r"x\.jsonl:2: no assistant message"),
        (chat(u, {"role": "assistant"}), r"x\.jsonl:2: message 1 \(assistant\) has no content"),
        (chat(u, {"role": "assistant", "content": ""}), r"x\.jsonl:2: message 1 \(assistant\) has no"),
        (chat({"role": "wizard", "content": "a"}), r"x\.jsonl:2: Unknown role 'wizard'"),
        (chat({"content": "a"}), r"x\.jsonl:2: .*messages\[0\]\.role"),
        (json.dumps({"messages": "hi"}), r"x\.jsonl:2: .*expected an array"),
        (json.dumps([1, 2]), r"x\.jsonl:2: expected a JSON object"),
        (
            chat(u, {**a, "content": "b " * 300}),
            r"x\.jsonl:2: \d+ tokens .*longer than --max-length 64.*--truncate",
        ),
    ]
    for line, pattern in cases:
        path = tmp_path / "x.jsonl"
        path.write_text(good + "\n" + line + "\n")
        with pytest.raises(DataError, match=pattern):
            load_dataset(path, tok, RenderOptions(max_length=64))
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing.jsonl", tok, RenderOptions())
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        load_dataset(tmp_path / "empty.jsonl", tok, RenderOptions())
    # --truncate: cut at the limit, still scored
    path.write_text(cases[-1][0] + "\n")
    data = load_dataset(path, tok, RenderOptions(max_length=64, truncate=True))
    assert len(data.sequences[0].tokens) == 64 and data.truncated == 1


def test_odd_files_and_deep_nesting_are_data_errors(tok, tmp_path):
    """A folder, /dev/null, a line nested past Python's JSON reader: one DataError saying what it is."""
    with pytest.raises(DataError, match=r"is a folder; give the JSONL file"):
        load_dataset(tmp_path, tok, RenderOptions())
    with pytest.raises(DataError, match=r"^/dev/null: no examples \(the file is empty\)"):
        load_dataset("/dev/null", tok, RenderOptions())
    path = tmp_path / "deep.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path.write_text(good + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"deep\.jsonl:2: nested too deeply"):
        load_dataset(path, tok, RenderOptions())


def test_batches_and_positions(tok):
    def one(question, answer, where):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return render_record({"messages": messages}, tok, RenderOptions(), where)[0]

    a, b = one("a b c", "d", "x:1"), one("a", "ok", "x:2")
    batch = make_batch([a, b])
    T = batch.inputs.shape[1]
    assert T == max(len(a.tokens), len(b.tokens)) - 1
    for r, s in enumerate([a, b]):
        want = [j - 1 for j in range(1, len(s.tokens)) if s.scored[j]]
        got = [p - r * T for p in batch.positions if r * T <= p < (r + 1) * T]
        assert got == want
        assert list(batch.labels[len(batch.positions) - len(got) :] if r else batch.labels[: len(got)]) == [
            s.tokens[j + 1] for j in want
        ]
    # the order is a function of (seed, epoch): a saved position resumes it exactly
    order = BatchOrder(10, 3, seed=4)
    seen = [order.next() for _ in range(6)]
    assert sorted(sum(seen[:4], [])) == list(range(10)) and len(seen[3]) == 1
    again = BatchOrder(10, 3, seed=4, position=DataPosition(1, 3))
    assert again.next() == seen[5]
    assert not np.array_equal(order.order(0), order.order(1))


def test_line_separators_inside_json_strings_and_a_bom(tok, tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped (json.dumps(ensure_ascii=False) writes
    them so): they are text, not line ends, so the line loads and later lines keep their numbers. A
    byte-order mark before the first line (some editors write one) is not data."""
    text = "a\u2028b\u2029c\x85d"
    good = json.dumps(
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]},
        ensure_ascii=False,
    )
    path = tmp_path / "x.jsonl"
    path.write_text("\ufeff" + good + "\n" + good + "\n", encoding="utf-8")
    data = load_dataset(path, tok, RenderOptions())
    assert len(data) == 2 and text in tok.decode(data.sequences[0].tokens)
    path.write_text(good + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.jsonl:2: not valid JSON"):
        load_dataset(path, tok, RenderOptions())


def test_a_device_is_refused_without_reading_it(tmp_path):
    """--data /dev/zero would be read to the end of memory: it is refused before anything is read (a
    child process with a 2 GB address-space limit, so a read cannot take the machine's memory)."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from oss_mlx.finetune.data import DataError, RenderOptions, load_dataset\n"
        "try:\n"
        "    load_dataset('/dev/zero', None, RenderOptions())\n"
        "except DataError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (
        r.returncode == 0 and r.stdout.strip() == "/dev/zero is a device, not a file; give the JSONL file"
    ), (
        r.stdout,
        r.stderr[-500:],
    )
