"""Shared fixtures: the real vocabulary (when present) and tiny synthetic checkpoints."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption(
        "--shard",
        default="1/1",
        help="i/n: run every n-th collected test from the i-th on (a suite split over calls of a few "
        "minutes each, as on the GPU machine: benchmarks/device_profile.sh, stage suites)",
    )


def pytest_collection_modifyitems(config, items):
    """--shard i/n keeps items i-1, i-1+n, ... (round robin: each part gets its share of every test's
    parameter grid, so the parts take about the same time)."""
    shard = config.getoption("--shard")
    try:
        i, n = (int(v) for v in shard.split("/"))
        if not 1 <= i <= n:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"--shard {shard!r}: expected i/n, 1 <= i <= n (e.g. 2/3)") from None
    if n > 1:
        kept = items[i - 1 :: n]
        chosen = {id(item) for item in kept}
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in chosen])
        items[:] = kept


VOCAB_DIRS = [
    Path(p) for p in (os.environ.get("TIKTOKEN_CACHE_DIR"), os.environ.get("TIKTOKEN_RS_CACHE_DIR")) if p
] + [REPO.parent / "shared" / "data" / "tiktoken-cache"]
VOCAB_FILE = "fb374d419588a4632f3f557e76b4b70aebbca790"  # sha1 of o200k_base's public address


def pytest_terminal_summary(terminalreporter):
    """How many of the Metal kernels ran on this CPU in the run (tests/metal_emulator), printed even
    under -q: the count the Metal kernels' CI check reports."""
    emulator = sys.modules.get("metal_emulator")
    if emulator is None or not emulator.LAUNCHES:
        return
    from oss_mlx import kernels

    launches, built = emulator.LAUNCHES, emulator.build.library_counts
    ran = sorted({n.removeprefix("oss_") for n in launches} & set(kernels.SPECS))
    missing = sorted(set(kernels.SPECS) - set(ran))
    terminalreporter.write_line(
        f"Metal emulator: {len(ran)} of {len(kernels.SPECS)} kernels in SPECS executed on the CPU "
        f"({sum(launches.values())} launches of {sum(built.values())} instantiations, "
        f"{built['compiled']} compiled now)" + (f"; not run: {', '.join(missing)}" if missing else "")
    )


def vocabulary_dir() -> Path | None:
    return next((d for d in VOCAB_DIRS if (d / VOCAB_FILE).is_file()), None)


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    found = vocabulary_dir()
    if found is None:
        pytest.skip(f"o200k_base vocabulary not found (looked in {[str(d) for d in VOCAB_DIRS]})")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(found))
    os.environ.setdefault("TIKTOKEN_RS_CACHE_DIR", str(found))
    return found


@pytest.fixture(scope="module")
def tok(vocab_dir: Path, tmp_path_factory):
    """Our harmony tokenizer on the real vocabulary (a model folder holding it)."""
    from oss_mlx.tokenizer import VOCAB_FILENAME, load_tokenizer

    folder = tmp_path_factory.mktemp("model")
    (folder / VOCAB_FILENAME).write_bytes((vocab_dir / VOCAB_FILE).read_bytes())
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def enc(vocab_dir: Path):
    """openai-harmony's gpt-oss encoding, on the same vocabulary."""
    oh = pytest.importorskip("openai_harmony")
    os.environ.setdefault("TIKTOKEN_RS_CACHE_DIR", str(vocab_dir))
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, vocab_dir) -> Path:
    """A tiny random gpt-oss in the hub layout, with the real 201088-token vocabulary beside it."""
    from oss_mlx.synthetic import SyntheticSpec, write_checkpoint
    from oss_mlx.tokenizer import copy_vocabulary

    folder = tmp_path_factory.mktemp("tiny-hub")
    write_checkpoint(folder, SyntheticSpec.tiny(num_layers=4, sliding_window=16), layout="hf-mxfp4", seed=7)
    copy_vocabulary(folder)
    return folder


def make_hub_cache(root: Path, repo: str, src: Path, rev: str) -> Path:
    """A real huggingface_hub cache layout of `src`: blobs by hash, snapshot files as relative links."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(rev)
    snap = repo_dir / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo_dir / "blobs" / digest)
        rel = f.relative_to(src)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(Path("../" * (len(rel.parts) + 1)) / "blobs" / digest)
    return root


def rel_err(a, b) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    import numpy as np

    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture
def chat(tmp_path, vocab_dir, tiny_checkpoint):
    """Start `oss-mlx chat` in tmux (the tiny model unless `model=`), waited for its prompt; all
    closed at the end of the test."""
    from chat_helpers import TmuxChat

    apps = []

    def start(*args: str, replies=None, model: Path | None = None, **size):
        app = TmuxChat(tmp_path / "home", vocab_dir, **size).start(
            ["--model", str(model or tiny_checkpoint), *args], replies=replies
        )
        apps.append(app)
        app.wait_prompt(timeout=60)
        return app

    yield start
    for app in apps:
        app.close()
