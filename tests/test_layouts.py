"""Every checkpoint layout loads to the same model, equal to transformers; bad ones fail clearly."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_hub_cache, rel_err
from hf_reference import clear_routing_tokens

from oss_mlx.config import ConfigError
from oss_mlx.loader import load_model
from oss_mlx.synthetic import SyntheticSpec, write_checkpoint
from oss_mlx.weights import CheckpointError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SPEC = SyntheticSpec.tiny(
    num_layers=4,
    num_experts=8,
    experts_per_token=4,
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=96,
    head_dim=16,
    num_attention_heads=8,
    num_key_value_heads=2,
    sliding_window=16,
)
PROMPT = 320
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for layout in ("hf-mxfp4", "hf-float", "original"):
        out[layout] = write_checkpoint(
            root / layout, SPEC, layout=layout, seed=3, dtype="float32", max_shard_bytes=2_000_000
        )
    return out


@pytest.fixture(scope="module")
def reference(checkpoints):
    model = transformers.GptOssForCausalLM.from_pretrained(
        checkpoints["hf-float"], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = clear_routing_tokens(torch, model, (1, PROMPT), vocab=SPEC.vocab_size)
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens)).logits.numpy()
    return tokens, logits


@pytest.mark.parametrize(
    "layout,quantize", [("hf-mxfp4", True), ("hf-float", False), ("hf-float", True), ("original", True)]
)
def test_layout_matches_transformers(checkpoints, reference, layout, quantize):
    tokens, ref = reference
    model, info = load_model(checkpoints[layout], dtype=mx.float32, quantize_experts=quantize)
    assert info.layout == layout
    assert model.blocks[0].mlp.experts.quantized is (layout != "hf-float" or quantize)
    out = np.array(model(mx.array(tokens)))
    assert rel_err(out, ref) <= TOL
    # and through the cache, in uneven chunks
    cache, outs, start = model.make_cache(), [], 0
    for n in [7, 50, 1, 1, 200, PROMPT - 259]:
        outs.append(np.array(model(mx.array(tokens[:, start : start + n]), cache=cache)))
        start += n
    assert rel_err(np.concatenate(outs, axis=1), ref) <= TOL


def test_mxfp4_bytes_are_kept_unchanged(checkpoints):
    """Hub blocks are used as they are (no requantization): same bytes in the model."""
    from safetensors.numpy import load_file

    model, _ = load_model(checkpoints["hf-mxfp4"])
    files = sorted(checkpoints["hf-mxfp4"].glob("*.safetensors"))
    blocks = {}
    for f in files:
        blocks.update({k: v for k, v in load_file(f).items() if k.endswith("_blocks")})
    hub = blocks["model.layers.1.mlp.experts.down_proj_blocks"]
    ours = np.array(model.blocks[1].mlp.experts.down_weight)
    assert ours.dtype == np.uint32
    assert ours.tobytes() == np.ascontiguousarray(hub).tobytes()


def test_bfloat16_default_dtype(checkpoints):
    model, _ = load_model(checkpoints["hf-mxfp4"], dtype=mx.bfloat16)
    assert model.blocks[0].attn.qkv.weight.dtype == mx.bfloat16
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, SPEC.vocab_size) and bool(mx.all(mx.isfinite(logits)))


# ---- bad checkpoints ---------------------------------------------------------------------------


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = _copy(checkpoints["original"], tmp_path)
    f = next(folder.glob("*.safetensors"))
    tensors = load_file(f)
    del tensors["block.2.attn.sinks"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"missing tensor.*block\.2\.attn\.sinks"):
        load_model(folder)


def test_wrong_shape_names_file_tensor_and_expectation(checkpoints, tmp_path):
    folder = _copy(checkpoints["hf-float"], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"model-\d+-of-\d+\.safetensors: tensor '.*gate_up_proj' is \[8, 64, 192\] float32, "
        r"expected \[8, 64, 128\] float",
    ):
        load_model(folder)


def test_unknown_model_type(checkpoints, tmp_path):
    folder = _copy(checkpoints["hf-mxfp4"], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type is 'llama', expected 'gpt_oss'"):
        load_model(folder)


def test_truncated_file(checkpoints, tmp_path):
    folder = _copy(checkpoints["hf-mxfp4"], tmp_path)
    f = sorted(folder.glob("*.safetensors"))[-1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{f.name} is truncated"):
        load_model(folder)


def test_missing_shard(checkpoints, tmp_path):
    folder = _copy(checkpoints["hf-float"], tmp_path)
    assert (folder / "model.safetensors.index.json").is_file()
    victim = sorted(folder.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"{victim.name}.*missing"):
        load_model(folder)


def test_not_a_folder_nor_a_repo(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_model(tmp_path / "nope" / "deeper" / "x")
    with pytest.raises(ConfigError, match="config.json not found"):
        load_model(tmp_path)


def test_hub_repo_id_loads_offline_from_the_hub_cache(checkpoints, tmp_path, monkeypatch):
    """A repo id goes through huggingface_hub (here its cache, offline); the top-level layout is used."""
    import huggingface_hub.constants

    rev = "89abcdef0123456789abcdef0123456789abcdef"
    src = _copy(checkpoints["hf-mxfp4"], tmp_path)
    (src / "original").mkdir()  # the hub repos carry a second copy of the weights here
    (src / "original" / "model.safetensors").write_bytes(b"not to be downloaded")
    cache = make_hub_cache(tmp_path / "hub", "acme/tiny-gpt-oss", src, rev)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, info = load_model("acme/tiny-gpt-oss", dtype=mx.float32)
    assert info.layout == "hf-mxfp4" and info.path.name == rev
    ref, _ = load_model(checkpoints["hf-mxfp4"], dtype=mx.float32)
    tokens = mx.array([[1, 2, 3, 4]])
    assert np.array_equal(np.array(model(tokens)), np.array(ref(tokens)))
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        load_model("acme/other-model")
