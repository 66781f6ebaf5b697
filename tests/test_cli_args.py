"""Bad command-line input, every subcommand: a one-line message naming the flag and the range, exit
status 2 (1 for a file or model that cannot be used), never a traceback.

Most cases are checked in-process through each subcommand's parser (fast); a representative subset
runs the real `oss-mlx` console script in a subprocess, and so do the cases that need a model, the
network or the file system.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_helpers import free_port

from oss_mlx import cli, cli_args

SUBCOMMANDS = sorted(cli.SUBCOMMANDS)
OSS_MLX = shutil.which("oss-mlx")


def parser_of(sub: str):
    return importlib.import_module(cli.SUBCOMMANDS[sub][0]).build_parser()


def oss_mlx(
    *args: str, env: dict | None = None, timeout: float = 120, stdin: str = ""
) -> subprocess.CompletedProcess:
    """The console script as a user runs it (`python -m oss_mlx.cli` where it is not installed)."""
    command = [OSS_MLX] if OSS_MLX else [sys.executable, "-m", "oss_mlx.cli"]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=full_env, timeout=timeout, input=stdin
    )


def assert_one_line_error(sub: str, stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith(f"oss-mlx {sub}: error:")]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], (needle, stderr)


# ---- the types ----------------------------------------------------------------------------------------


def test_number_types_state_their_range():
    with pytest.raises(cli_args.BadValue, match=r"^must be between 0 and 2 \(got -3\)$"):
        cli_args.TEMPERATURE("-3")
    with pytest.raises(cli_args.BadValue, match=r"greater than 0 and at most 1 \(got 9\)"):
        cli_args.TOP_P("9")
    with pytest.raises(
        cli_args.BadValue, match=r"must be a whole number between -1 and 2\^64-1 \(got '1.5'\)"
    ):
        cli_args.SEED("1.5")
    with pytest.raises(cli_args.BadValue, match=r"between -1 and 2\^64-1 \(got 99999999999999999999\)"):
        cli_args.SEED("99999999999999999999")
    with pytest.raises(cli_args.BadValue, match=r"finite"):
        cli_args.TEMPERATURE("nan")
    assert cli_args.SEED("-1") is None and cli_args.SEED("random") is None  # llama.cpp's "random"
    assert cli_args.SEED(str(2**64 - 1)) == 2**64 - 1 and cli_args.SEED("0") == 0
    assert cli_args.TOP_P("1") == 1.0 and cli_args.TEMPERATURE("0") == 0.0
    assert issubclass(cli_args.BadValue, ValueError)  # the chat's /set and env vars catch ValueError


def test_every_seed_the_flags_accept_is_one_mlx_accepts():
    import mlx.core as mx

    for text in ("0", "1", str(2**63), str(2**64 - 1)):
        mx.random.seed(cli_args.SEED(text))  # would raise a pybind TypeError out of range


def test_sizes_and_lists():
    assert cli_args.parse_size("6GB") == 6 * 10**9 and cli_args.parse_size("512 MiB") == 2**29
    for bad in ("six GB", "-1GB", "0", "6XB", ""):
        with pytest.raises(ValueError):
            cli_args.parse_size(bad)
    lengths = cli_args.NumberList(cli_args.Number(int, 1, 100))
    assert lengths("1, 2,3") == [1, 2, 3]
    for bad in ("banana", "-5", "0", "", ",", "1.5", "101"):
        with pytest.raises(cli_args.BadValue, match="comma-separated"):
            lengths(bad)
    engines = cli_args.ChoiceList(("a", "b"))
    assert engines("a,b,a") == ["a", "b"]
    with pytest.raises(cli_args.BadValue, match="of a, b"):
        engines("c")


# ---- every flag, bad values, in-process ---------------------------------------------------------------

BAD: list[tuple[str, list[str], str]] = []


def bad(sub: str, flag: str, values: list[str], before: list[str] = (), after: list[str] = ()) -> None:
    for value in values:
        BAD.append((sub, [*before, flag, value, *after], flag))


SAMPLING = {
    "--max-tokens": ["0", "-1", "abc", "2.5", "99999999999"],
    "--temperature": ["-3", "2.5", "nan", "inf", "warm"],
    "--top-p": ["9", "0", "-0.1", "abc"],
    "--seed": ["-2", str(2**64), "99999999999999999999", "abc", "1.5"],
    "--memory-budget": ["six GB", "-1GB", "0", "6XB"],
    "--reasoning-effort": ["extreme"],
}
for sub in ("generate", "chat"):
    for flag, values in SAMPLING.items():
        bad(sub, flag, values)
bad("chat", "--python-timeout", ["-5", "0", "abc", "inf"])
bad("chat", "--python-memory", ["0", "-1", "10", "abc"])
bad("chat", "--reasoning", ["verbose"])
bad("serve", "--max-queue", ["-1", "abc", "1.5"])
bad("serve", "--host", ["", " "])  # an empty bind address is every interface
bad("serve", "--allowed-host", [""])
bad("serve", "--max-body-bytes", ["0", "-5", "abc"])
bad("serve", "--context-limit", ["0", "-1", "abc"])
bad("serve", "--cache-slots", ["0", "-2"])
bad("serve", "--max-stored-responses", ["-1", "x"])
bad("serve", "--memory-budget", ["lots", "-3GB"])
bad("serve", "--reasoning-field", ["thoughts"])
bad("serve", "--reasoning-effort", ["max"])
bad("serve", "--log-level", ["loud"])
bad("serve", "--api-key", ["", "  "])
bad("serve", "--model-id", [""])
bad("bench", "--config", ["7b"])
bad("bench", "--prompt-lengths", ["banana", "-5", "0", "", "1,,x", "1.5", "128,2048,-1"])
bad("bench", "--decode-tokens", ["-1", "0", "many"])
bad("bench", "--engines", ["vllm", "", "oss-mlx,llama.cpp"])
bad("bench", "--warmup", ["-1", "x"])
bad("bench", "--check-logits", ["-1"])
bad("bench", "--check-layers", ["-1"])
bad("bench", "--repeat", ["0", "-3"])
bad("bench", "--seed", ["-1", "x"])
bad("bench", "--quality", ["best"])
bad("bench", "--prefill-step", ["0", "-512"])
bad("bench", "--json", ["/nonexistent-folder/rows.json", "/"])
bad("bench", "--memory-budget", ["0.6XB"])
bad("plan", "--memory", ["0", "-16", "abc", "inf"], before=["20b"])
bad("plan", "--context", ["0", "-1", "abc"], before=["20b"])
bad("plan", "--preset", ["huge"], before=["20b"])
bad("plan", "--config", ["7b"])
bad("plan", "--platform", ["windows"], before=["20b", "--memory", "16"])
bad("convert", "--context", ["-1", "0", "x"], before=["src", "dst", "--plan"])
bad("convert", "--quality", ["best"], before=["src", "dst"])
bad("convert", "--dtype", ["int8"], before=["src", "dst"])
bad("convert", "--verify-tokens", ["0"], before=["src", "dst"])
bad("synthetic", "--max-shard-bytes", ["-1", "x"], before=["dst"])
bad("synthetic", "--seed", ["-1", "x"], before=["dst"])
bad("synthetic", "--num-layers", ["0", "-2"], before=["dst"])
bad("synthetic", "--num-experts", ["0", "-3"], before=["dst"])
bad("synthetic", "--vocab-size", ["0", "x"], before=["dst"])
bad("synthetic", "--config", ["7b"], before=["dst"])
bad("synthetic", "--layout", ["gguf"], before=["dst"])
bad("synthetic", "--dtype", ["int4"], before=["dst"])
bad("synthetic", "--config-style", ["v3"], before=["dst"])
FT = ["--data", "d.jsonl", "--out", "o"]
bad("finetune", "--rank", ["0", "-1", "x", "1.5"], before=FT)
bad("finetune", "--alpha", ["0", "-2", "x"], before=FT)
bad("finetune", "--dropout", ["-0.1", "1", "x"], before=FT)
bad("finetune", "--learning-rate", ["0", "-1e-4", "x"], before=FT)
bad("finetune", "--steps", ["0", "-3"], before=FT)
bad("finetune", "--epochs", ["0", "-1"], before=FT)
bad("finetune", "--batch-size", ["0"], before=FT)
bad("finetune", "--grad-accum", ["0"], before=FT)
bad("finetune", "--max-length", ["8", "x"], before=FT)
bad("finetune", "--warmup", ["-1"], before=FT)
bad("finetune", "--checkpointing", ["sometimes"], before=FT)
bad("finetune", "--turns", ["first"], before=FT)
FU = ["--model", "m", "--adapter", "a", "--out", "o"]
bad("fuse", "--quality", ["best"], before=FU)
bad("fuse", "--dtype", ["int4"], before=FU)
BAD += [
    ("models", [action, value, "--yes"][: 2 + (action == "remove")], "ID")
    for action in ("path", "remove")
    for value in ("../etc", "/etc/passwd", "acme", "", "a b/c")
]
BAD += [("models", ["frobnicate"], "ACTION")]


def test_the_bad_input_list_is_broad():
    assert len(BAD) >= 130 and {sub for sub, _, _ in BAD} == set(SUBCOMMANDS)


@pytest.mark.parametrize("sub,argv,flag", BAD, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD])
def test_bad_values_are_refused_by_the_parser(sub, argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parser_of(sub).parse_args(argv)
    assert e.value.code == 2
    assert_one_line_error(sub, capsys.readouterr().err, flag)


@pytest.mark.parametrize(
    "sub,argv,needle",
    [
        ("bench", ["--memory-budget", "1GB"], "--memory-budget needs --model"),
        ("bench", ["--config", "tiny", "--quality", "small"], "--quality applies to"),
        ("bench", ["--config", "tiny", "--model", "x"], "not allowed with argument"),
        ("plan", ["20b", "--platform", "linux"], "--platform applies to --memory"),
        ("plan", ["20b", "--context", "1000000"], "--context: the model's limit is 131,072 tokens"),
        ("plan", ["--config", "20b", "120b"], "not both"),
        ("plan", [], "give a model"),
        ("models", ["remove"], "remove needs a hub repo id"),
        ("models", ["path", "acme/x", "--yes"], "--yes applies to remove"),
        ("models", ["list", "acme/x"], "list takes no ID"),
    ],
)
def test_combinations_are_refused_in_words(sub, argv, needle, capsys):
    main = importlib.import_module(cli.SUBCOMMANDS[sub][0]).main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert_one_line_error(sub, capsys.readouterr().err, needle)


def test_slash_set_uses_the_same_checks():
    """/set temperature|top_p|max_tokens|seed take exactly what the flags take."""
    for name, kind in cli_args.SAMPLING.items():
        flag = "--" + name.replace("_", "-")
        for sub in ("generate", "chat"):
            action = next(a for a in parser_of(sub)._actions if flag in a.option_strings)
            assert action.type is kind


# ---- --help shows the defaults --------------------------------------------------------------------------


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_shows_every_default(sub):
    p = parser_of(sub)
    assert "--debug" in p.format_help()
    for action in p._actions:
        if not action.option_strings or action.help == "==SUPPRESS==" or action.dest == "help":
            continue
        if action.default in (None, False, [], "==SUPPRESS=="):
            continue
        entry = p._get_formatter()._format_action(action)  # this option's entry in --help
        text = re.sub(r"-\s+", "-", " ".join(entry.split()))  # argparse wraps after hyphens
        shown = (
            ",".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
        )
        assert "default" in text.lower() and shown in text, (sub, text)


# ---- errors after parsing ------------------------------------------------------------------------------


def test_an_unexpected_error_is_one_line_unless_debug(monkeypatch, capsys):
    plan = importlib.import_module("oss_mlx.plan_cli")

    def broken(argv):
        raise RuntimeError("planner fell over")

    monkeypatch.setattr(plan, "main", broken)
    monkeypatch.delenv("OSS_MLX_DEBUG", raising=False)
    assert cli.main(["plan", "20b"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "oss-mlx plan: internal error: RuntimeError: planner fell over" in err and "--debug" in err
    assert cli.main(["--debug", "plan", "20b"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert cli.main(["plan", "20b", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("OSS_MLX_DEBUG", "1")
    assert cli.main(["plan", "20b"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_bad_environment_variable_is_a_usage_error(capsys):
    os.environ["OSS_MLX_MEMORY_GB"] = "lots"
    try:
        assert cli.main(["plan", "20b"]) == 2
    finally:
        del os.environ["OSS_MLX_MEMORY_GB"]
    assert_one_line_error("plan", capsys.readouterr().err, "OSS_MLX_MEMORY_GB must be a number")


@pytest.fixture(scope="module")
def sixty_four(tmp_path_factory, tiny_checkpoint) -> Path:
    """A checkpoint whose config.json says "hidden_size": "sixty-four"."""
    folder = tmp_path_factory.mktemp("sixty-four")
    for f in tiny_checkpoint.iterdir():
        shutil.copy(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = "sixty-four"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("sub", ["chat", "serve", "generate", "plan"])
def test_a_config_value_of_the_wrong_type_names_the_key_and_the_file(sub, sixty_four):
    args = {
        "chat": ["chat", "--model", str(sixty_four), "--no-autosave"],
        "serve": ["serve", "--model", str(sixty_four), "--port", str(free_port())],
        "generate": ["generate", "--model", str(sixty_four), "hi"],
        "plan": ["plan", str(sixty_four)],
    }[sub]
    out = oss_mlx(*args, env={"OSS_MLX_HOME": str(sixty_four.parent / "home")})
    assert out.returncode == 1, out.stderr
    assert_one_line_error(sub, out.stderr, "hidden_size", str(sixty_four / "config.json"), "sixty-four")
    assert "not all arguments converted" not in out.stderr


# ---- the real console script: a representative subset -------------------------------------------------

SUBPROCESS = [
    (["generate", "--seed", "-2", "hi"], 2, "generate", "--seed"),
    (
        ["generate", "--temperature", "-3", "hi"],
        2,
        "generate",
        "--temperature: must be between 0 and 2 (got -3)",
    ),
    (["generate", "--top-p", "9", "hi"], 2, "generate", "--top-p"),
    (["chat", "--seed", "99999999999999999999"], 2, "chat", "2^64-1"),
    (["chat", "--python-timeout", "-5"], 2, "chat", "--python-timeout"),
    (["chat", "--memory-budget", "six GB"], 2, "chat", "--memory-budget"),
    (["serve", "--context-limit", "0"], 2, "serve", "--context-limit"),
    (["serve", "--max-queue", "-1"], 2, "serve", "--max-queue"),
    (["serve", "--api-key", ""], 2, "serve", "--api-key"),
    (["plan", "20b", "--memory", "0"], 2, "plan", "--memory"),
    (["plan", "20b", "--memory", "-16"], 2, "plan", "--memory"),
    (["convert", "src", "dst", "--plan", "--context", "-1"], 2, "convert", "--context"),
    (["synthetic", "dst", "--max-shard-bytes", "-1"], 2, "synthetic", "--max-shard-bytes"),
    (["bench", "--prompt-lengths", "banana"], 2, "bench", "--prompt-lengths"),
    (["bench", "--prompt-lengths", "-5"], 2, "bench", "--prompt-lengths"),
    (["bench", "--decode-tokens", "-1"], 2, "bench", "--decode-tokens"),
    (["bench", "--json", "/nonexistent-folder/x.json", "--config", "tiny"], 2, "bench", "does not exist"),
    (["bench", "--config", "tiny", "--memory-budget", "1GB"], 2, "bench", "--memory-budget needs --model"),
    (["plan", "/definitely/not/here"], 1, "plan", "no such folder"),
    (["generate", "--model", "/definitely/not/here", "hi"], 1, "generate", "no such folder"),
]


@pytest.mark.parametrize("argv,code,sub,needle", SUBPROCESS, ids=[" ".join(a) for a, *_ in SUBPROCESS])
def test_the_console_script_refuses_bad_input_in_one_line(argv, code, sub, needle):
    out = oss_mlx(*argv, timeout=60)
    assert out.returncode == code, out.stderr
    assert_one_line_error(sub, out.stderr, needle)


# ---- bench with no arguments ---------------------------------------------------------------------------


def test_bench_says_what_it_builds_and_refuses_what_does_not_fit():
    """`oss-mlx bench` alone builds a random 20b (~13 GB): it says so, and checks memory first."""
    start = time.monotonic()
    out = oss_mlx("bench", env={"OSS_MLX_MEMORY_GB": "8"}, timeout=60)
    assert time.monotonic() - start < 30  # refused before anything is built
    assert out.returncode == 1, out.stderr
    assert "building a random-weight gpt-oss (20b: 24 layers, 32 experts" in out.stdout
    assert "prompts of 128, 2,048, 8,192 tokens, 64 decoded after each" in out.stdout
    assert_one_line_error("bench", out.stderr, "does not fit", "--config tiny", "--ignore-memory")


# ---- synthetic -------------------------------------------------------------------------------------------


def test_synthetic_names_the_flag_not_the_keyword(tmp_path):
    assert oss_mlx("synthetic", str(tmp_path)).returncode == 0
    out = oss_mlx("synthetic", str(tmp_path))
    assert out.returncode == 2
    assert_one_line_error("synthetic", out.stderr, "pass --overwrite")
    assert "overwrite=True" not in out.stderr


def _unwritable(tmp_path: Path) -> list[Path]:
    folders = []
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    if not os.access(ro, os.W_OK):  # root writes anywhere
        folders.append(ro / "model")
    if Path("/sys/kernel").is_dir():
        folders.append(Path("/sys/oss-mlx-synthetic-test"))  # sysfs refuses new folders, even to root
    (tmp_path / "a-file").write_text("")
    folders.append(tmp_path / "a-file" / "model")
    return folders


def test_synthetic_into_a_folder_it_cannot_write(tmp_path):
    for dest in _unwritable(tmp_path):
        out = oss_mlx("synthetic", str(dest))
        assert out.returncode == 1, out.stderr
        assert_one_line_error("synthetic", out.stderr, f"cannot write {dest}")


# ---- offline --------------------------------------------------------------------------------------------


@pytest.fixture
def no_hub(tmp_path) -> dict:
    """An environment in which the hub does not answer (a closed local port), with an empty cache."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "HF_HUB_OFFLINE"}
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
        OSS_MLX_HOME=str(tmp_path / "home"),
    )
    return env


def run_env(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    command = [OSS_MLX] if OSS_MLX else [sys.executable, "-m", "oss_mlx.cli"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL
    )


@pytest.mark.parametrize(
    "args,sub",
    [
        (["chat", "--model", "acme/gpt-oss-tiny"], "chat"),
        (["plan", "acme/gpt-oss-tiny"], "plan"),
        (["generate", "--model", "acme/gpt-oss-tiny", "hi"], "generate"),
        (["serve", "--model", "acme/gpt-oss-tiny", "--port", str(free_port())], "serve"),
        (["convert", "acme/gpt-oss-tiny", "out"], "convert"),
    ],
)
def test_offline_first_run_is_told_fast_what_to_do(no_hub, args, sub):
    start = time.monotonic()
    out = run_env(no_hub, *args)
    took = time.monotonic() - start
    assert out.returncode == 1, out.stderr
    assert took < 20, f"{took:.1f} s: huggingface_hub's retries were not skipped"  # they take ~25 s
    text = out.stderr
    assert (
        "Traceback" not in text
        and "not in the Hugging Face cache here, and the hub cannot be reached" in text
    )
    assert "oss-mlx convert acme/gpt-oss-tiny gpt-oss-tiny" in text and "HF_HUB_CACHE" in text


def test_the_offline_advice_works(no_hub, tiny_checkpoint, tmp_path):
    """Each step the message gives, followed with the hub unreachable."""
    # A converted folder, made where there is network (here: from the local tiny checkpoint), copied
    # over, runs with no network and no vocabulary anywhere else.
    converted = tmp_path / "gpt-oss-tiny"
    assert run_env(no_hub, "convert", str(tiny_checkpoint), str(converted)).returncode == 0
    env = {
        **no_hub,
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"),
        "TIKTOKEN_RS_CACHE_DIR": str(tmp_path / "empty"),
    }
    out = run_env(env, "generate", "--model", str(converted), "--max-tokens", "3", "hi")
    assert out.returncode == 0, out.stderr
    # A Hugging Face cache that holds the model: used at once, without waiting for the hub.
    from conftest import make_hub_cache

    cache = make_hub_cache(tmp_path / "cache", "acme/gpt-oss-tiny", tiny_checkpoint, "ab" * 20)
    start = time.monotonic()
    out = run_env({**no_hub, "HF_HUB_CACHE": str(cache)}, "plan", "acme/gpt-oss-tiny")
    assert out.returncode == 0 and time.monotonic() - start < 15, out.stderr
    out = run_env({**no_hub, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}, "plan", "acme/gpt-oss-tiny")
    assert out.returncode == 0, out.stderr


def test_plan_of_an_official_model_offline_uses_its_known_shapes(no_hub):
    out = run_env(no_hub, "plan", "openai/gpt-oss-120b", "--memory", "96")
    assert out.returncode == 0, out.stderr
    assert "planning with the shapes of gpt-oss-120b" in out.stderr and "36 x 128 experts" in out.stdout


def test_the_hub_probe_reports_why(monkeypatch):
    from oss_mlx.hub import hub_unreachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reason = hub_unreachable(f"http://127.0.0.1:{port}")
    assert reason and re.search(r"127\.0\.0\.1:\d+: Connection refused", reason)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub_unreachable(f"http://127.0.0.1:{server.getsockname()[1]}") is None
