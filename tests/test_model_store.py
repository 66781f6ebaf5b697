"""One model store: every entry point resolves a hub id by model_store's rule (the converted copy,
else the Hugging Face cache, else downloaded and converted once), offline here; `oss-mlx models`
lists, locates and removes what the store holds, and nothing outside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from chat_helpers import TmuxChat, env_has_tmux
from conftest import make_hub_cache
from server_helpers import ServerProcess, running

from oss_mlx import model_store
from oss_mlx.runtime import runtime_of

REPO_ID = "acme/tiny-gpt-oss"
REV = "0123456789abcdef0123456789abcdef01234567"


def dead_pid() -> int:
    """A process id that has just exited (the converter's working folders are named by pid)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def cli(*args: str, env: dict, timeout: float = 120, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oss_mlx.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


@pytest.fixture
def places(tmp_path, monkeypatch, vocab_dir):
    """A data folder (OSS_MLX_HOME) and a Hugging Face cache (HF_HUB_CACHE), both empty, for this
    process and its children (huggingface_hub reads the cache folder once, at import)."""
    import huggingface_hub.constants

    home, hub = tmp_path / "home", tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("OSS_MLX_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    env = {
        **os.environ,
        "OSS_MLX_HOME": str(home),
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    return home, hub, env


def stage_download(home: Path, src: Path) -> None:
    """What a finished download leaves in the store's download cache (the network is not reachable
    here; huggingface_hub's own cache layout, as its snapshot_download writes it)."""
    make_hub_cache(home / "models" / ".downloads", REPO_ID, src, REV)


def poison_hub_cache(hub: Path, src: Path) -> Path:
    """The same repo in the Hugging Face cache, unreadable: a config that no loader accepts and a
    truncated shard. An entry point that read it instead of the converted copy would fail."""
    bad = hub.parent / "bad-src"
    bad.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["hidden_size"] = "not a number"
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:100])
    make_hub_cache(hub, REPO_ID, bad, "f" * 40)
    return hub / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / ("f" * 40)


@pytest.fixture
def converted(places, tiny_checkpoint):
    """The store after a first use: the model downloaded (staged) and converted once."""
    home, hub, env = places
    stage_download(home, tiny_checkpoint)
    said = []
    folder = model_store.resolve(REPO_ID, say=said.append)
    assert said and "first use of acme/tiny-gpt-oss" in said[0]
    return folder


def test_first_use_converts_once_into_the_store_and_drops_the_download(converted, places):
    home, _, _ = places
    assert converted == home / "models" / "acme--tiny-gpt-oss"
    section = json.loads((converted / "config.json").read_text())["oss_mlx"]
    assert section["source"] == REPO_ID and section["revision"] == REV
    assert not (home / "models" / ".downloads" / "models--acme--tiny-gpt-oss").exists()  # on disk once
    assert model_store.resolve(REPO_ID, say=pytest.fail) == converted  # later uses: no conversion
    assert [m.repo_id for m in model_store.stored_models()] == [REPO_ID]


def test_every_entry_point_resolves_a_hub_id_to_the_converted_folder(converted, places, tiny_checkpoint):
    """chat, generate, serve, plan, bench --model and oss_mlx.load, offline, with the same repo also in
    the Hugging Face cache (unreadable there: only the converted copy can make them succeed)."""
    import oss_mlx
    from oss_mlx.loader import load_model
    from oss_mlx.plan_cli import config_of

    home, hub, env = places
    poisoned = poison_hub_cache(hub, tiny_checkpoint)
    assert model_store.hub_cached(REPO_ID) == poisoned  # it is there, and complete-looking

    model, _ = oss_mlx.load(REPO_ID)
    info = runtime_of(model).info
    assert info.path == converted and info.layout == "oss-mlx"
    assert load_model(REPO_ID)[1].path == converted
    assert "oss_mlx" in config_of(REPO_ID)[1]  # the planner reads the converted config

    plan = cli("plan", REPO_ID, env=env)
    assert plan.returncode == 0, plan.stderr
    generate = cli("generate", "--model", REPO_ID, "--max-tokens", "2", "--seed", "1", "Hi", env=env)
    assert generate.returncode == 0, generate.stderr
    results = home / "bench.jsonl"
    bench = cli(
        *("bench", "--model", REPO_ID, "--engines", "oss-mlx", "--prompt-lengths", "8"),
        *("--decode-tokens", "2", "--warmup", "0", "--results", str(results)),
        env=env,
    )
    assert bench.returncode == 0, bench.stderr
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert rows and all(f"from {converted}" in r["source"] for r in rows)

    server = ServerProcess(Path(REPO_ID), home / "serve.log", env=env)
    with running(server):
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        assert any(m["id"] == REPO_ID for m in models["data"])

    listed = cli("models", env=env)
    assert listed.returncode == 0 and str(converted) in listed.stdout and "store" in listed.stdout
    where = cli("models", "path", REPO_ID, env=env)
    assert where.returncode == 0 and where.stdout.strip() == str(converted)

    if env_has_tmux():
        chat = TmuxChat(home, Path(env["TIKTOKEN_CACHE_DIR"]))
        app = chat.start(["--model", REPO_ID], env_extra={"HF_HUB_CACHE": str(hub)})
        try:
            screen = app.wait_prompt(timeout=60)
            assert "first use" not in screen and "(oss-mlx) loaded" in screen, screen
        finally:
            app.close()


def test_the_hugging_face_cache_is_used_as_it_is(places, tiny_checkpoint):
    """Step 2: a complete snapshot in the Hugging Face cache is loaded from there, not copied."""
    home, hub, _ = places
    make_hub_cache(hub, REPO_ID, tiny_checkpoint, REV)
    folder = model_store.resolve(REPO_ID, say=pytest.fail)
    assert folder == hub / "models--acme--tiny-gpt-oss" / "snapshots" / REV
    assert not (home / "models").exists()
    assert [(m.repo_id, m.where) for m in model_store.cached_models()] == [(REPO_ID, "hf-cache")]


def test_offline_without_a_copy_says_what_to_do(places):
    with pytest.raises(model_store.CheckpointError, match="not in the Hugging Face cache") as e:
        model_store.resolve("acme/absent-model", say=pytest.fail)
    assert "oss-mlx convert acme/absent-model" in str(e.value)
    with pytest.raises(model_store.CheckpointError, match="not in the Hugging Face cache"):
        model_store.resolve("acme/absent-model", need="config")
    with pytest.raises(model_store.CheckpointError, match="not a hub repo id"):
        model_store.resolve("no such folder")


def test_an_unfinished_conversion_is_no_model_and_is_cleaned_up(places, tiny_checkpoint):
    """A converter killed mid-way leaves DEST.partial-<pid> (the converter writes there and renames
    only once complete): never listed, removed by `oss-mlx models` once its process is gone, and the
    next use converts afresh. A running conversion's folder is left alone."""
    home, _, env = places
    store = home / "models"
    dead = store / f"acme--tiny-gpt-oss.partial-{dead_pid()}"
    dead.mkdir(parents=True)
    (dead / "config.json").write_text(
        json.dumps({"oss_mlx": {"preset": "reference"}})
    )  # even complete-looking
    alive = store / f"acme--other.partial-{os.getpid()}"
    alive.mkdir()
    assert model_store.stored_models() == []
    assert model_store.converted(REPO_ID) is None

    listed = cli("models", env=env)
    assert listed.returncode == 0
    assert f"removed an unfinished conversion: {dead}" in listed.stderr
    assert "conversion running" in listed.stdout and not dead.exists() and alive.exists()

    dead2 = store / f"acme--tiny-gpt-oss.partial-{dead_pid()}"
    dead2.mkdir()
    stage_download(home, tiny_checkpoint)
    folder = model_store.resolve(REPO_ID, say=lambda _: None)
    assert model_store.converted(REPO_ID) == folder and not dead2.exists()


def test_an_interrupted_conversion_leaves_nothing_that_looks_complete(places, tiny_checkpoint, monkeypatch):
    from oss_mlx.convert import converter

    home, _, _ = places
    stage_download(home, tiny_checkpoint)

    def cut(*args, **kwargs):
        raise KeyboardInterrupt

    real = converter.write_shards
    monkeypatch.setattr(converter, "write_shards", cut)
    with pytest.raises(KeyboardInterrupt):
        model_store.resolve(REPO_ID, say=lambda _: None)
    assert model_store.converted(REPO_ID) is None and model_store.stored_models() == []
    leftovers = [p.name for p in (home / "models").iterdir() if p.name != ".downloads"]
    assert leftovers == []
    # the download stays (it resumes): the next use converts from it
    monkeypatch.setattr(converter, "write_shards", real)
    assert model_store.resolve(REPO_ID, say=lambda _: None) == model_store.converted(REPO_ID)


def test_remove_asks_and_touches_nothing_outside_the_store(converted, places, tiny_checkpoint, tmp_path):
    home, hub, env = places
    make_hub_cache(hub, "acme/cached-only", tiny_checkpoint, REV)

    refused = cli("models", "remove", REPO_ID, env=env)  # no terminal to ask on: --yes is needed
    assert refused.returncode == 2 and "pass --yes" in refused.stderr and converted.exists()
    declined = cli("models", "remove", REPO_ID, env=env, stdin="n\n")
    assert converted.exists() and declined.returncode in (1, 2)

    cached = cli("models", "remove", "acme/cached-only", "--yes", env=env)
    assert cached.returncode == 1 and "Hugging Face cache" in cached.stderr
    assert model_store.hub_cached("acme/cached-only") is not None

    for bad in ("../etc", "/etc/passwd", "acme"):
        out = cli("models", "remove", bad, "--yes", env=env)
        assert out.returncode == 2 and "hub repo id" in out.stderr and "Traceback" not in out.stderr

    done = cli("models", "remove", REPO_ID, "--yes", env=env)
    assert done.returncode == 0 and f"removed {converted}" in done.stdout and not converted.exists()
    assert cli("models", "path", REPO_ID, env=env).returncode == 1

    # A link in the store is unlinked; what it points to is kept.
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    (home / "models" / "acme--linked").symlink_to(target)
    assert [p.name for p in model_store.remove("acme/linked")] == ["acme--linked"]
    assert (target / "keep.txt").read_text() == "mine"


def test_several_ranks_resolve_a_hub_id_by_the_store_and_convert_it_once(places, tiny_checkpoint, tmp_path):
    """`generate --hosts` (two ranks on this machine) at a hub id's first use: the first rank on the
    machine downloads (staged here) and converts it once, the other finds that copy; the answer is the
    one-process model's."""
    import oss_mlx

    home, _, env = places
    stage_download(home, tiny_checkpoint)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2}))
    args = ["--temperature", "0", "--max-tokens", "4", "--reasoning-effort", "low", "Hi"]
    run = cli(
        *("generate", "--model", REPO_ID, "--hosts", str(hosts), "--distributed", "pipeline", *args),
        env={**env, "OSS_MLX_DISTRIBUTED_LOG": "1"},  # the other rank's output on this one's stderr
        timeout=150,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count(f"first use of {REPO_ID}") == 1, run.stderr[-3000:]
    folder = model_store.converted(REPO_ID)
    assert folder is not None and [m.repo_id for m in model_store.stored_models()] == [REPO_ID]
    model, tokenizer = oss_mlx.load(folder)
    alone = oss_mlx.generate(model, tokenizer, "Hi", reasoning_effort="low", temperature=0, max_tokens=4)
    assert run.stdout == alone.text + "\n"


def _delete_a_shard(folder: Path) -> str:
    (folder / "model-layer-01.safetensors").unlink()
    return "model-layer-01.safetensors missing"


def _truncate_a_shard(folder: Path) -> str:
    shard = folder / "model-layer-00.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    return "model-layer-00.safetensors is truncated"


@pytest.mark.parametrize("damage", [_delete_a_shard, _truncate_a_shard], ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_copy_in_the_store_is_named_with_the_store_s_fix(converted, places, damage):
    """A store copy damaged after its conversion was used as it was: the load then failed advising a
    re-download, and `oss-mlx models` listed it as fine."""
    import oss_mlx

    _, _, env = places
    what = damage(converted)
    fix = f"oss-mlx models remove {REPO_ID}"
    with pytest.raises(model_store.CheckpointError, match=f"in the model store is damaged: .*{what}.*{fix}"):
        oss_mlx.load(REPO_ID)
    listing = cli("models", env=env)
    assert listing.returncode == 0 and "damaged, not used: " in listing.stdout and what in listing.stdout
    path = cli("models", "path", REPO_ID, env=env)
    assert path.returncode == 1 and what in path.stderr and fix in path.stderr
    generate = cli("generate", "--model", REPO_ID, "--max-tokens", "2", "Hi", env=env)
    assert generate.returncode == 1 and fix in generate.stderr and "Traceback" not in generate.stderr
    assert cli("models", "remove", REPO_ID, "--yes", env=env).returncode == 0
    assert not converted.exists()


def test_an_empty_model_name_is_not_the_current_folder(tmp_path, tiny_checkpoint, monkeypatch):
    """`oss_mlx.load("")` loaded whatever the current folder (or its original/) held."""
    import shutil

    import oss_mlx

    shutil.copytree(tiny_checkpoint, tmp_path / "original")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(model_store.CheckpointError, match="no model given"):
        oss_mlx.load("")
    with pytest.raises(TypeError, match="not NoneType"):
        oss_mlx.load(None)
