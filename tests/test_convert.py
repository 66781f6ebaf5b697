"""oss-mlx convert: every layout -> the oss-mlx layout, exactly; streaming, safe, planned, verified."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_hub_cache

from oss_mlx.convert import converter as C
from oss_mlx.convert.cli import main
from oss_mlx.convert.hub import resolve_source
from oss_mlx.convert.presets import PRESETS
from oss_mlx.convert.verify import VerifyError, check_shards, verify_logits, verify_tokens
from oss_mlx.loader import load_model, quantize_dense
from oss_mlx.memory import weight_bytes
from oss_mlx.synthetic import SyntheticSpec, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
SPEC = SyntheticSpec.tiny(num_layers=3, vocab_size=1024, sliding_window=8)
TOKENS = verify_tokens(SPEC.vocab_size, 16)
LAYOUTS = ("hf-mxfp4", "hf-float", "original")


@pytest.fixture(scope="module", autouse=True)
def _vocab(vocab_dir):
    """The conversion copies the real vocabulary (conftest finds it, or skips these tests)."""
    return vocab_dir


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {
        layout: write_checkpoint(root / layout, SPEC, layout=layout, seed=11, max_shard_bytes=200_000)
        for layout in LAYOUTS
    }


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory) -> Path:
    """The hub layout converted with the reference preset (shared by read-only tests)."""
    dest = tmp_path_factory.mktemp("converted") / "ref"
    assert main([str(sources["hf-mxfp4"]), str(dest)]) == 0
    return dest


def logits(path: Path, dtype=None, quantization=None) -> np.ndarray:
    model, _ = load_model(path, dtype=dtype)
    if quantization:
        quantize_dense(model, quantization)
    return np.array(model(mx.array(TOKENS[None, :])).astype(mx.float32))[0]


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.glob(f"{dest.name}*"))


def header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8 : 8 + n])
    head.pop("__metadata__", None)
    return 8 + n, head


# ---- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_converts_to_identical_logits(sources, tmp_path, layout):
    dest = tmp_path / "out"
    assert main([str(sources[layout]), str(dest)]) == 0
    model, info = load_model(dest)
    assert info.layout == "oss-mlx"
    assert model.blocks[0].mlp.experts.quantized  # float fine-tunes get MXFP4 experts
    assert np.array_equal(logits(dest), logits(sources[layout], mx.bfloat16))


def test_float32_dtype_is_exact_too(sources, tmp_path):
    dest = tmp_path / "f32"
    assert main([str(sources["original"]), str(dest), "--dtype", "float32"]) == 0
    assert load_model(dest)[0].blocks[1].attn.qkv.weight.dtype == mx.float32
    assert np.array_equal(logits(dest), logits(sources["original"], mx.float32))


@pytest.mark.parametrize("preset", ["balanced", "small"])
def test_quantized_presets(sources, tmp_path, preset, capsys):
    dest = tmp_path / preset
    assert main([str(sources["hf-float"]), str(dest), "--quality", preset, "--verify"]) == 0
    assert "verify OK" in capsys.readouterr().out
    spec = PRESETS[preset].spec()
    model, _ = load_model(dest)
    assert isinstance(model.embedding, nn.QuantizedEmbedding)
    assert model.embedding.bits == spec["embedding"]["bits"]
    assert isinstance(model.unembedding, nn.QuantizedLinear)
    assert isinstance(model.blocks[0].attn.qkv, nn.QuantizedLinear)
    assert model.blocks[0].attn.qkv.bits == spec["attention"]["bits"]
    # router, sinks and norms are never quantized
    block = model.blocks[0]
    for a in (block.mlp.router.weight, block.attn.sinks, block.attn.norm.weight, model.norm.weight):
        assert a.dtype == mx.bfloat16
    # exactly the source quantized in memory with the same spec, end to end ...
    assert np.array_equal(logits(dest), logits(sources["hf-float"], mx.bfloat16, spec))
    # ... and stage by stage, each stage within the preset's documented deviation from the source
    report = verify_logits(dest, sources["hf-float"])
    assert all(s.identical for s in report.stages)
    assert 0 < report.worst.deviation <= PRESETS[preset].max_deviation
    assert all(s.deviation == 0 for s in report.stages if s.name.endswith("mlp"))  # MoE untouched


# ---- the layout -----------------------------------------------------------------------------------


def test_layout_shards_provenance_and_expert_offsets(converted, sources):
    cfg = json.loads((converted / "config.json").read_text())
    section = cfg["oss_mlx"]
    assert section["format_version"] == 1 and section["experts_mxfp4"] is True
    assert section["preset"] == "reference"
    assert section["quantization"] == {"attention": None, "embedding": None, "unembedding": None}
    assert section["source"] == str(sources["hf-mxfp4"].resolve())
    assert section["source_layout"] == "hf-mxfp4"
    assert section["converter_version"].startswith("oss-mlx ")
    names = ["model-embedding.safetensors"] + [f"model-layer-{i:02d}.safetensors" for i in range(3)]
    names.append("model-unembedding.safetensors")
    assert sorted(section["shards"]) == sorted(names)
    for name, digest in section["shards"].items():
        assert hashlib.sha256((converted / name).read_bytes()).hexdigest() == digest
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(names)
    assert (converted / "o200k_base.tiktoken").is_file()

    E = SPEC.num_experts
    for i in range(SPEC.num_layers):
        path = converted / f"model-layer-{i:02d}.safetensors"
        data_start, head = header(path)
        assert data_start % 4096 == 0  # page-aligned data
        tensors = sorted(head, key=lambda k: head[k]["data_offsets"][0])
        # the layer's experts come first, one contiguous region
        assert [t.rsplit(".", 1)[1] for t in tensors[:6]] == list(C.EXPERT_ORDER)
        assert all(t.startswith(f"blocks.{i}.") for t in tensors)
        info = section["experts"][f"blocks.{i}"]
        assert info["shard"] == path.name
        arrays = mx.load(str(path))
        raw = path.read_bytes()
        for short, where in info["tensors"].items():
            name = f"blocks.{i}.mlp.experts.{short}"
            assert where["offset"] == data_start + head[name]["data_offsets"][0]
            a = arrays[name]
            for e in (0, E - 1):
                chunk = raw[
                    where["offset"] + e * where["stride"] : where["offset"] + (e + 1) * where["stride"]
                ]
                assert chunk == bytes(memoryview(mx.contiguous(a[e])))


def test_planner_arithmetic_equals_written_bytes(sources, tmp_path):
    src = resolve_source(str(sources["hf-float"]))
    for name, preset in PRESETS.items():
        plan = C.plan_conversion(src.folder, preset, "bfloat16")
        assert plan.component_bytes() == weight_bytes(plan.config, preset.spec(), 2), name
    dest = tmp_path / "small"
    assert main([str(sources["hf-float"]), str(dest), "--quality", "small"]) == 0
    total = 0
    for shard in dest.glob("*.safetensors"):
        start, head = header(shard)
        total += shard.stat().st_size - start
    assert total == sum(weight_bytes(plan.config, PRESETS["small"].spec(), 2).values())


def test_converted_folder_runs_offline(converted, tmp_path, monkeypatch):
    empty = tmp_path / "no-cache"
    empty.mkdir()
    for var in ("TIKTOKEN_CACHE_DIR", "TIKTOKEN_RS_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        monkeypatch.setenv(var, str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OSS_MLX_OFFLINE", "1")
    from oss_mlx.tokenizer import load_tokenizer

    tok = load_tokenizer(converted)
    assert tok.decode(tok.encode("Hello, world")) == "Hello, world"
    assert Path(tok.source) == converted / "o200k_base.tiktoken"


# ---- safety ---------------------------------------------------------------------------------------


def _convert_cmd(src: Path, dest: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "oss_mlx.cli", "convert", str(src), str(dest), *extra]


def test_kill_mid_way_leaves_nothing_and_rerun_works(sources, tmp_path):
    src = sources["hf-mxfp4"]
    before = tree_hash(src)
    dest = tmp_path / "killed"
    env = {**os.environ, "OSS_MLX_CONVERT_DELAY": "0.2"}
    proc = subprocess.Popen(
        _convert_cmd(src, dest), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    partial = tmp_path / f"killed.partial-{proc.pid}"
    deadline = time.monotonic() + 30
    while not (partial / "model-layer-00.safetensors").exists():  # the embedding shard is done
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the converter never started writing"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not dest.exists()
    assert partial.exists()  # a SIGKILL cannot clean up: the next run does
    assert tree_hash(src) == before
    assert main([str(src), str(dest)]) == 0
    assert leftovers(dest) == ["killed"]  # the dead run's partial folder is gone
    assert tree_hash(src) == before
    assert np.array_equal(logits(dest), logits(src, mx.bfloat16))


def test_sigterm_cleans_up(sources, tmp_path):
    dest = tmp_path / "termed"
    env = {**os.environ, "OSS_MLX_CONVERT_DELAY": "0.2"}
    proc = subprocess.Popen(
        _convert_cmd(sources["original"], dest), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    partial = tmp_path / f"termed.partial-{proc.pid}"
    deadline = time.monotonic() + 30
    while not (partial / "model-embedding.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert b"interrupted" in stderr
    assert leftovers(dest) == []


def test_force_replaces_only_when_complete(sources, tmp_path, capsys):
    dest = tmp_path / "dest"
    assert main([str(sources["hf-mxfp4"]), str(dest)]) == 0
    first = json.loads((dest / "config.json").read_text())["oss_mlx"]["created"]
    capsys.readouterr()
    assert main([str(sources["hf-mxfp4"]), str(dest)]) != 0
    assert "already exists" in capsys.readouterr().err
    # a failing --force run keeps the old DEST
    broken = tmp_path / "broken"
    shutil.copytree(sources["hf-mxfp4"], broken)
    next(broken.glob("model-00001-*.safetensors")).unlink()
    assert main([str(broken), str(dest), "--force"]) != 0
    assert json.loads((dest / "config.json").read_text())["oss_mlx"]["created"] == first
    assert main([str(sources["original"]), str(dest), "--force", "--quality", "balanced"]) == 0
    assert json.loads((dest / "config.json").read_text())["oss_mlx"]["preset"] == "balanced"
    assert leftovers(dest) == ["dest"]


def test_force_never_deletes_the_source_or_a_users_files(sources, tmp_path, capsys):
    """--force replaces an earlier conversion or an empty folder only: never a DEST holding the source
    (or the current folder), never a folder of the user's; each refused in one line, status 2."""
    proj = tmp_path / "proj"
    shutil.copytree(sources["hf-mxfp4"], proj / "ckpt" / "orig")
    (proj / "notes.txt").write_text("mine")
    home = tmp_path / "home_like"
    home.mkdir()
    (home / "thesis.txt").write_text("years of work")
    before = tree_hash(tmp_path)
    for src, dest, words in [
        (proj / "ckpt" / "orig", proj, "contains"),
        (sources["hf-mxfp4"], home, "is not an earlier conversion"),
    ]:
        capsys.readouterr()
        assert main([str(src), str(dest), "--force"]) == 2
        err = capsys.readouterr().err
        assert words in err and str(dest) in err and "Traceback" not in err
    # DEST is the current folder: `cd proj; oss-mlx convert ckpt/orig . --force`
    run = subprocess.run(
        _convert_cmd(Path("ckpt/orig"), Path("."), "--force"), cwd=proj, capture_output=True, text=True
    )
    assert run.returncode == 2, run.stderr
    assert "contains" in run.stderr and "Traceback" not in run.stderr
    assert tree_hash(tmp_path) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(sources["hf-mxfp4"]), str(empty), "--force"]) == 0  # an empty folder is replaced
    capsys.readouterr()
    run = subprocess.run(  # an earlier conversion that holds the current folder: not replaced
        _convert_cmd(sources["hf-mxfp4"], Path("."), "--force"), cwd=empty, capture_output=True, text=True
    )
    assert run.returncode == 2 and "holds the current folder" in run.stderr, run.stderr


def test_unwritable_dest_is_not_called_a_full_disk(sources, capsys):
    assert main([str(sources["hf-mxfp4"]), "/proc/oss-mlx-test"]) == 1
    err = capsys.readouterr().err
    assert "/proc is not a writable folder" in err and "disk space" not in err


def _missing_shard(folder: Path) -> str:
    next(folder.glob("model-00001-*.safetensors")).unlink()
    return "missing"


def _truncated(folder: Path) -> str:
    shard = next(folder.glob("model-00001-*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    return "truncated"


def _wrong_shape(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    return "expected"


def _unknown_model_type(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    return "model_type is 'llama'"


def _not_a_checkpoint(folder: Path) -> str:
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    return "no .safetensors"


@pytest.mark.parametrize(
    "damage", [_missing_shard, _truncated, _wrong_shape, _unknown_model_type, _not_a_checkpoint]
)
def test_bad_sources_fail_clearly(sources, tmp_path, capsys, damage):
    bad = tmp_path / "bad"
    shutil.copytree(sources["hf-mxfp4"], bad)
    words = damage(bad)
    dest = tmp_path / "out"
    assert main([str(bad), str(dest)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and words in err and "Traceback" not in err
    assert leftovers(dest) == []


def test_missing_source_and_bad_repo_id(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere" / "x" / "y"), str(tmp_path / "out")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_no_vocabulary_anywhere_fails_before_writing(sources, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for var in ("TIKTOKEN_CACHE_DIR", "TIKTOKEN_RS_CACHE_DIR"):
        monkeypatch.setenv(var, str(empty))
    monkeypatch.setenv("OSS_MLX_OFFLINE", "1")
    dest = tmp_path / "out"
    assert main([str(sources["hf-mxfp4"]), str(dest)]) == 1
    assert "o200k_base" in capsys.readouterr().err
    assert leftovers(dest) == []


def test_stale_folders_of_dead_runs_are_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dest = tmp_path / "m"
    (tmp_path / f"m.partial-{dead.pid}").mkdir()
    (tmp_path / "m.partial-4194305").mkdir()  # above Linux's largest pid_max: never alive
    (tmp_path / f"m.partial-{os.getppid()}").mkdir()  # a live process: left alone
    (tmp_path / f"m.old-{dead.pid}").mkdir()  # a --force run killed between its two renames
    (tmp_path / f"m.old-{dead.pid}" / "config.json").write_text("{}")
    C.clean_stale(dest)
    assert (dest / "config.json").is_file()  # the old DEST is put back
    assert leftovers(dest) == ["m", f"m.partial-{os.getppid()}"]


def test_no_disk_room(sources, tmp_path, monkeypatch, capsys):
    real = shutil.disk_usage

    def tiny(path):
        return real(path)._replace(free=100_000)

    monkeypatch.setattr(C.shutil, "disk_usage", tiny)
    dest = tmp_path / "out"
    assert main([str(sources["hf-mxfp4"]), str(dest)]) == 1
    err = capsys.readouterr().err
    assert "not enough free disk space" in err
    assert leftovers(dest) == []


def test_disk_filling_up_mid_way(sources, tmp_path, monkeypatch, capsys):
    """A real ENOSPC: a 256 KiB tmpfs (needs root), the free-space check fooled into passing."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    try:
        real = shutil.disk_usage
        monkeypatch.setattr(C.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 40))
        dest = mnt / "out"
        assert main([str(sources["hf-mxfp4"]), str(dest)]) == 1
        assert "filled up" in capsys.readouterr().err
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---- hub, plan, verify ----------------------------------------------------------------------------


def test_hub_source_offline_through_a_real_cache(sources, tmp_path, monkeypatch, capsys):
    rev = "0123456789abcdef0123456789abcdef01234567"
    cache = make_hub_cache(tmp_path / "hub", "acme/tiny-gpt-oss", sources["hf-mxfp4"], rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest = tmp_path / "from-hub"
    assert main(["acme/tiny-gpt-oss", str(dest), "--cache-dir", str(cache)]) == 0
    section = json.loads((dest / "config.json").read_text())["oss_mlx"]
    assert section["source"] == "acme/tiny-gpt-oss" and section["revision"] == rev
    assert np.array_equal(logits(dest), logits(sources["hf-mxfp4"], mx.bfloat16))
    # the --plan of a hub model reads its config.json only
    capsys.readouterr()
    assert main(["acme/tiny-gpt-oss", str(tmp_path / "p"), "--plan", "--cache-dir", str(cache)]) == 0
    assert "weights were not downloaded" in capsys.readouterr().out
    # not in the cache, offline: a clear error
    assert main(["acme/other-model", str(tmp_path / "o"), "--cache-dir", str(cache)]) == 1
    assert "not in the Hugging Face cache" in capsys.readouterr().err


def test_plan_prints_and_writes_nothing(sources, tmp_path, capsys):
    dest = tmp_path / "planned"
    assert main([str(sources["hf-float"]), str(dest), "--plan", "--quality", "balanced"]) == 0
    out = capsys.readouterr().out
    for word in ("experts", "attention", "embedding", "unembedding", "kv cache", "per 1k tokens", "total"):
        assert word in out
    assert "5 shards" in out
    assert leftovers(dest) == []


def test_verify_catches_a_tampered_shard(sources, tmp_path, capsys):
    dest = tmp_path / "v"
    assert main([str(sources["hf-mxfp4"]), str(dest), "--verify"]) == 0
    assert "identical" in capsys.readouterr().out
    shard = dest / "model-layer-01.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="sha256"):
        check_shards(dest)
    # `convert --verify` on an existing conversion verifies it (and fails here, clearly)
    assert main([str(sources["hf-mxfp4"]), str(dest), "--verify"]) == 3
    err = capsys.readouterr().err
    assert "verify FAILED" in err and "model-layer-01.safetensors" in err and "sha256" in err


def test_verify_catches_wrong_weights_with_good_checksums(sources, tmp_path, capsys):
    """Weights from another model but consistent checksums: the forward comparison fails."""
    other = write_checkpoint(tmp_path / "other", SPEC, layout="hf-mxfp4", seed=12)
    dest = tmp_path / "v"
    assert main([str(other), str(dest)]) == 0
    assert main([str(sources["hf-mxfp4"]), str(dest), "--verify"]) == 3
    assert "logits differ" in capsys.readouterr().err


def test_peak_memory_is_about_one_tensor(tmp_path):
    """Streaming: converting ~190 MB peaks at the runtime's overhead plus about its largest tensor."""
    spec = SyntheticSpec.tiny(
        num_layers=6, num_experts=64, hidden_size=512, intermediate_size=512, head_dim=64, vocab_size=16384
    )
    src = write_checkpoint(tmp_path / "src", spec, layout="hf-mxfp4", max_shard_bytes=None)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    largest = 16384 * 512 * 2
    script = (
        "import resource, sys\nfrom oss_mlx.convert.cli import main\n"
        "from oss_mlx.tokenizer import load_ranks\nload_ranks()\nrc = main(sys.argv[1:])\n"
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rc)\n"
    )

    def peak(*args: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, text=True, check=True
        )
        line = next(x for x in out.stdout.splitlines() if x.startswith("MAXRSS"))
        assert line.endswith(" 0"), out.stderr
        return int(line.split()[1])

    base = peak(str(src), str(tmp_path / "plan"), "--plan")
    conv = peak(str(src), str(tmp_path / "out"), "--quality", "balanced")
    assert conv - base < largest * 3 + 40_000_000 < size, (conv - base, size)
