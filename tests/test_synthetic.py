"""oss_mlx.testing.synthetic (and `oss-mlx synthetic`): the random gpt-oss checkpoints the suite runs on.

Facts checked here come from openai/gpt-oss (gpt_oss/torch/model.py, weights.py,
metal/scripts/create-local-model.py) and transformers (models/gpt_oss/convert_gpt_oss_weights_to_hf.py,
integrations/mxfp4.py).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from oss_mlx.mxfp4 import FP4_VALUES
from oss_mlx.mxfp4 import dequantize_blocks as dequantize_mxfp4
from oss_mlx.mxfp4 import quantize_blocks as quantize_mxfp4
from oss_mlx.synthetic import main
from oss_mlx.testing.synthetic import (
    ORIGINAL_CONFIG_KEYS,
    SyntheticSpec,
    checkpoint_tensors,
    write_checkpoint,
)

SPEC = SyntheticSpec(vocab_size=1024)  # tiny; a small vocabulary keeps the files ~1 MB
H, I, E, D, NQ, NKV, V = 64, 64, 4, 16, 4, 2, 1024


def header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8 : 8 + n])
    h.pop("__metadata__", None)
    return h


def folder_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder as numpy (bfloat16 widened to float32 exactly)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in mx.load(str(f)).items():
            assert k not in out, f"{k} in two shards"
            out[k] = np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)
    return out


def hf_expected(spec: SyntheticSpec, quantized: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of the hub layout (bfloat16) as in openai/gpt-oss-20b's index."""
    h, i, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
    q, kv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    out = {"model.embed_tokens.weight": ((spec.vocab_size, h), "BF16")}
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        out |= {
            p + "input_layernorm.weight": ((h,), "BF16"),
            p + "post_attention_layernorm.weight": ((h,), "BF16"),
            p + "self_attn.q_proj.weight": ((q, h), "BF16"),
            p + "self_attn.q_proj.bias": ((q,), "BF16"),
            p + "self_attn.k_proj.weight": ((kv, h), "BF16"),
            p + "self_attn.k_proj.bias": ((kv,), "BF16"),
            p + "self_attn.v_proj.weight": ((kv, h), "BF16"),
            p + "self_attn.v_proj.bias": ((kv,), "BF16"),
            p + "self_attn.o_proj.weight": ((h, q), "BF16"),
            p + "self_attn.o_proj.bias": ((h,), "BF16"),
            p + "self_attn.sinks": ((spec.num_attention_heads,), "BF16"),
            p + "mlp.router.weight": ((e, h), "BF16"),
            p + "mlp.router.bias": ((e,), "BF16"),
            p + "mlp.experts.gate_up_proj_bias": ((e, 2 * i), "BF16"),
            p + "mlp.experts.down_proj_bias": ((e, h), "BF16"),
        }
        if quantized:
            out |= {
                p + "mlp.experts.gate_up_proj_blocks": ((e, 2 * i, h // 32, 16), "U8"),
                p + "mlp.experts.gate_up_proj_scales": ((e, 2 * i, h // 32), "U8"),
                p + "mlp.experts.down_proj_blocks": ((e, h, i // 32, 16), "U8"),
                p + "mlp.experts.down_proj_scales": ((e, h, i // 32), "U8"),
            }
        else:
            out |= {
                p + "mlp.experts.gate_up_proj": ((e, h, 2 * i), "BF16"),
                p + "mlp.experts.down_proj": ((e, i, h), "BF16"),
            }
    out |= {"model.norm.weight": ((h,), "BF16"), "lm_head.weight": ((spec.vocab_size, h), "BF16")}
    return out


def original_expected(spec: SyntheticSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """gpt_oss/torch/model.py parameter shapes; MXFP4 pairs as gpt_oss/torch/weights.py reads them."""
    h, i, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
    qkv = (spec.num_attention_heads + 2 * spec.num_key_value_heads) * spec.head_dim
    out = {"embedding.weight": ((spec.vocab_size, h), "BF16")}
    for n in range(spec.num_layers):
        b = f"block.{n}."
        out |= {
            b + "attn.norm.scale": ((h,), "BF16"),
            b + "attn.qkv.weight": ((qkv, h), "BF16"),
            b + "attn.qkv.bias": ((qkv,), "BF16"),
            b + "attn.sinks": ((spec.num_attention_heads,), "BF16"),
            b + "attn.out.weight": ((h, spec.num_attention_heads * spec.head_dim), "BF16"),
            b + "attn.out.bias": ((h,), "BF16"),
            b + "mlp.norm.scale": ((h,), "BF16"),
            b + "mlp.gate.weight": ((e, h), "BF16"),
            b + "mlp.gate.bias": ((e,), "BF16"),
            b + "mlp.mlp1_weight.blocks": ((e, 2 * i, h // 32, 16), "U8"),
            b + "mlp.mlp1_weight.scales": ((e, 2 * i, h // 32), "U8"),
            b + "mlp.mlp1_bias": ((e, 2 * i), "BF16"),
            b + "mlp.mlp2_weight.blocks": ((e, h, i // 32, 16), "U8"),
            b + "mlp.mlp2_weight.scales": ((e, h, i // 32), "U8"),
            b + "mlp.mlp2_bias": ((e, h), "BF16"),
        }
    out |= {"norm.scale": ((h,), "BF16"), "unembedding.weight": ((spec.vocab_size, h), "BF16")}
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """The same tiny model in every layout, bfloat16 and float32."""
    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    for layout in ("hf-mxfp4", "hf-float", "original"):
        for dtype in ("bfloat16", "float32"):
            out[layout, dtype] = write_checkpoint(
                root / f"{layout}-{dtype}", SPEC, layout, seed=3, dtype=dtype
            )
    return out


@pytest.fixture(scope="module")
def values(ckpts) -> dict:
    return {key: folder_tensors(p) for key, p in ckpts.items()}


# -- files, names, shapes, dtypes -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hf-mxfp4", "hf-float", "original"])
def test_layout_files_names_shapes_dtypes(ckpts, layout):
    folder = ckpts[layout, "bfloat16"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    want = original_expected(SPEC) if layout == "original" else hf_expected(SPEC, layout == "hf-mxfp4")
    got = {k: (tuple(v["shape"]), v["dtype"]) for k, v in header(folder / "model.safetensors").items()}
    assert got == want
    assert checkpoint_tensors(SPEC, layout) == want
    f32 = header(ckpts[layout, "float32"] / "model.safetensors")
    assert {k: v["dtype"] for k, v in f32.items()} == {
        k: "F32" if d == "BF16" else d for k, (_, d) in want.items()
    }


def test_safetensors_layout_is_contiguous_and_aligned(ckpts):
    path = ckpts["hf-mxfp4", "bfloat16"] / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and json.loads(raw[8 : 8 + n])["__metadata__"] == {"format": "pt"}
    spans = sorted((v["data_offsets"], v["dtype"]) for v in header(path).values())
    pos = 0
    for (a, b), dtype in spans:
        assert a == pos and (8 + n + a) % {"F32": 4, "BF16": 2, "U8": 1}[dtype] == 0
        pos = b
    assert 8 + n + pos == len(raw)


def test_hf_config_matches_the_hub_20b():
    # https://huggingface.co/openai/gpt-oss-20b/raw/main/config.json (transformers 4.55.0.dev0)
    hub = {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "experts_per_token": 4,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 12,
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": 64,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 24,
        "num_key_value_heads": 8,
        "num_local_experts": 32,
        "output_router_logits": False,
        "pad_token_id": 199999,
        "quantization_config": {
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
            "quant_method": "mxfp4",
        },
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": 201088,
    }
    assert SyntheticSpec.gpt_oss_20b().hf_config() == hub
    big = SyntheticSpec.gpt_oss_120b().hf_config()
    assert big["num_hidden_layers"] == 36 and big["num_local_experts"] == 128
    assert big["layer_types"] == ["sliding_attention", "full_attention"] * 18
    plain = SyntheticSpec.gpt_oss_20b().hf_config(quantized=False)
    assert "quantization_config" not in plain and plain["torch_dtype"] == "bfloat16"
    v5 = SyntheticSpec.gpt_oss_20b().hf_config(quantized=False, style="transformers5", dtype="float32")
    assert (
        v5["rope_parameters"] == {**hub["rope_scaling"], "rope_theta": 150000.0} and v5["dtype"] == "float32"
    )
    assert "rope_scaling" not in v5 and "rope_theta" not in v5


def test_original_config_is_openais_and_describes_the_hf_model(ckpts):
    cfg = json.loads((ckpts["original", "bfloat16"] / "config.json").read_text())
    assert tuple(cfg) == ORIGINAL_CONFIG_KEYS  # exactly gpt_oss.torch.model.ModelConfig's fields
    assert SyntheticSpec.gpt_oss_20b().original_config() == {
        "num_hidden_layers": 24,
        "num_experts": 32,
        "experts_per_token": 4,
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "swiglu_limit": 7.0,
        "head_dim": 64,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "sliding_window": 128,
        "initial_context_length": 4096,
        "rope_theta": 150000,
        "rope_scaling_factor": 32.0,
        "rope_ntk_alpha": 1.0,
        "rope_ntk_beta": 32.0,
    }
    # transformers' convert_gpt_oss_weights_to_hf.py maps these keys so; the rest pass through unchanged.
    hf = json.loads((ckpts["hf-mxfp4", "bfloat16"] / "config.json").read_text())
    rest = dict(cfg)
    assert rest.pop("num_experts") == hf["num_local_experts"]
    assert rest.pop("rope_ntk_beta") == hf["rope_scaling"]["beta_fast"]
    assert rest.pop("rope_ntk_alpha") == hf["rope_scaling"]["beta_slow"]
    assert rest.pop("rope_scaling_factor") == hf["rope_scaling"]["factor"]
    assert rest.pop("initial_context_length") == hf["rope_scaling"]["original_max_position_embeddings"]
    assert hf["rope_scaling"]["truncate"] is False
    assert rest.pop("experts_per_token") == hf["num_experts_per_tok"]
    for k, v in rest.items():
        assert hf[k] == v, k
    # model.py: `sliding_window if layer_idx % 2 == 0 else 0`
    assert hf["layer_types"] == ["sliding_attention" if n % 2 == 0 else "full_attention" for n in range(2)]


def test_original_layout_refuses_what_it_cannot_describe(tmp_path):
    with pytest.raises(ValueError, match="alternate"):
        write_checkpoint(
            tmp_path, SyntheticSpec(layer_types=["full_attention", "sliding_attention"]), "original"
        )
    with pytest.raises(ValueError, match="truncate"):
        write_checkpoint(tmp_path, SyntheticSpec(rope_truncate=True), "original")
    # the HF layouts can describe both
    spec = SyntheticSpec(vocab_size=64, layer_types=["full_attention", "full_attention"], rope_truncate=True)
    cfg = json.loads((write_checkpoint(tmp_path / "hf", spec, "hf-float") / "config.json").read_text())
    assert cfg["layer_types"] == ["full_attention"] * 2 and cfg["rope_scaling"]["truncate"] is True
    with pytest.raises(ValueError, match="multiple of 32"):
        SyntheticSpec(hidden_size=48).validate()


def test_default_tiny_has_the_real_vocabulary_and_harmony_ids(tmp_path):
    folder = write_checkpoint(tmp_path, SyntheticSpec.tiny(), "hf-mxfp4")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["vocab_size"] == 201088 and cfg["eos_token_id"] == 200002 and cfg["pad_token_id"] == 199999
    assert header(folder / "model.safetensors")["lm_head.weight"]["shape"] == [201088, 64]
    small = SyntheticSpec(vocab_size=100).hf_config()  # ids inside a small vocabulary
    assert (small["eos_token_id"], small["pad_token_id"]) == (99, 98)


def test_float16_holds_the_same_experts(tmp_path, values):
    f16 = folder_tensors(write_checkpoint(tmp_path, SPEC, "hf-float", seed=3, dtype="float16"))
    assert header(tmp_path / "model.safetensors")["model.norm.weight"]["dtype"] == "F16"
    for name in expert_pairs(SPEC.num_layers):
        assert np.array_equal(f16[name].astype(np.float32), values["hf-float", "float32"][name]), name


def test_sharding_and_index(tmp_path):
    total = {}
    for layout in ("hf-mxfp4", "hf-float", "original"):
        # the embedding and lm_head (131 kB each) can't share a shard
        folder = write_checkpoint(tmp_path / layout, SPEC, layout, max_shard_bytes=140_000)
        n = len(list(folder.glob("*.safetensors")))
        assert n >= 3
        if layout == "hf-mxfp4":  # the hub's names (transformers' convert script): zero-based, "of" the last
            names = [f"model-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(n)]
        else:  # save_pretrained's
            names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        assert sorted(p.name for p in folder.glob("*.safetensors")) == names
        headers = {f: header(folder / f) for f in names}
        assert all(
            sum(v["data_offsets"][1] - v["data_offsets"][0] for v in h.values()) for h in headers.values()
        )
        where = {k: f for f, h in headers.items() for k in h}
        assert sum(len(h) for h in headers.values()) == len(where)  # every tensor in exactly one shard
        assert set(where) == set(checkpoint_tensors(SPEC, layout))
        size = sum(v["data_offsets"][1] - v["data_offsets"][0] for h in headers.values() for v in h.values())
        total[layout] = size
        if layout == "original":  # OpenAI's loader reads every *.safetensors of the folder: no index
            assert not (folder / "model.safetensors.index.json").exists()
            continue
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == where and index["metadata"]["total_size"] == size
    # the same model: the fused original has the same bytes as the hub layout
    assert total["original"] == total["hf-mxfp4"]


def test_existing_checkpoint_is_not_overwritten_silently(tmp_path):
    write_checkpoint(tmp_path, SyntheticSpec(vocab_size=64), max_shard_bytes=100_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    with pytest.raises(FileExistsError):
        write_checkpoint(tmp_path, SyntheticSpec(vocab_size=64))
    write_checkpoint(tmp_path, SyntheticSpec(vocab_size=64), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_an_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path):
    """--overwrite writes beside DEST and swaps once complete: Ctrl-C mid-way leaves the old one whole."""
    dest = tmp_path / "m"
    write_checkpoint(dest, SyntheticSpec(vocab_size=64), max_shard_bytes=100_000)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}

    def interrupt(name, done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(dest, SyntheticSpec(vocab_size=64, num_layers=3), overwrite=True, progress=interrupt)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no half-written folder beside it


def test_cli_never_replaces_files_that_are_not_a_checkpoint(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "own"}')
    for extra in ([], ["--overwrite"]):
        assert main([str(mine), *extra]) == 2
        err = capsys.readouterr().err
        assert "is not a checkpoint" in err and str(mine) in err, err
    assert (mine / "config.json").read_text() == '{"my": "own"}' and len(list(mine.iterdir())) == 1
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    assert main([str(a_file), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "pass --overwrite" not in err
    assert a_file.read_text() == "x"


# -- MXFP4 ------------------------------------------------------------------------------------------------


def test_dequantize_mxfp4_low_nibble_first_and_e8m0():
    blocks = np.zeros((1, 1, 16), np.uint8)
    blocks[0, 0, 0] = 0x2F  # low nibble 0xF = -6.0 comes first, high nibble 0x2 = +1.0 second
    blocks[0, 0, 15] = 0x87  # low 0x7 = +6.0, high 0x8 = -0.0
    got = dequantize_mxfp4(blocks, np.array([[127 - 3]], np.uint8))
    assert got.shape == (1, 32) and got.dtype == np.float32
    assert got[0, 0] == -0.75 and got[0, 1] == 0.125 and got[0, 30] == 0.75 and got[0, 31] == 0
    assert np.signbit(got[0, 31]) and not got[0, 2:30].any()
    codes = np.arange(16, dtype=np.uint8)
    blocks = np.stack([codes, codes << 4])[None]  # [1, 2 groups, 16]: the codes as low, then as high nibbles
    vals = dequantize_mxfp4(blocks, np.array([[127, 128]], np.uint8))[0]
    assert np.array_equal(vals[0:32:2], FP4_VALUES) and not vals[1:32:2].any()
    assert np.array_equal(vals[33:64:2], 2 * FP4_VALUES) and not vals[32:64:2].any()


def test_quantize_mxfp4_round_trips_and_matches_mlx():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 256)) * 0.05).astype(np.float32)
    w[0, :32] = 0.0
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (8, 8, 16) and scales.shape == (8, 8) and scales[0, 0] == 0
    deq = dequantize_mxfp4(blocks, scales)
    assert np.array_equal(dequantize_mxfp4(*quantize_mxfp4(deq)), deq)  # representable values survive
    amax = np.abs(w.reshape(8, 8, 32)).max(-1, keepdims=True)
    assert (np.abs(deq - w).reshape(8, 8, 32) <= amax / 4 + 1e-9).all()
    wq, sq = mx.quantize(mx.array(w), group_size=32, bits=4, mode="mxfp4")[:2]
    ref = np.array(mx.dequantize(wq, sq, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32))
    assert np.abs(ref - deq).max() <= np.abs(ref - w).max() * 2


def expert_pairs(layers: int):
    for n in range(layers):
        for proj in ("gate_up_proj", "down_proj"):
            yield f"model.layers.{n}.mlp.experts.{proj}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_hf_float_experts_are_the_dequantized_hub_blocks(values, dtype):
    q, f = values["hf-mxfp4", dtype], values["hf-float", dtype]
    for name in expert_pairs(SPEC.num_layers):
        deq = dequantize_mxfp4(q[name + "_blocks"], q[name + "_scales"])  # [E, out, in]
        assert np.array_equal(f[name], deq.transpose(0, 2, 1)), name  # stored [E, in, out]
        assert np.array_equal(f[name + "_bias"], q[name + "_bias"])
    gate_up = f["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (E, H, 2 * I)  # gate = even columns, up = odd columns, in both layouts
    for k, v in q.items():  # every non-expert tensor is the same in both layouts
        if not k.endswith(("_blocks", "_scales")):
            assert np.array_equal(f[k], v), k
    # bfloat16 holds the dequantized values exactly: both dtypes carry the same experts
    for name in expert_pairs(SPEC.num_layers):
        assert np.array_equal(values["hf-float", "bfloat16"][name], values["hf-float", "float32"][name])


def test_hub_blocks_are_mlx_mxfp4_byte_for_byte(values):
    q = values["hf-mxfp4", "float32"]
    for name in expert_pairs(SPEC.num_layers):
        blocks, scales = q[name + "_blocks"], q[name + "_scales"]
        e, out, g, _ = blocks.shape
        packed = mx.array(blocks).view(mx.uint32).reshape(e, out, g * 4)
        got = mx.dequantize(packed, mx.array(scales), group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
        assert np.array_equal(np.array(got), dequantize_mxfp4(blocks, scales)), name
        # and MLX's own quantizer represents these values exactly
        wq, sq = mx.quantize(got, group_size=32, bits=4, mode="mxfp4")[:2]
        again = mx.dequantize(wq, sq, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
        assert np.array_equal(np.array(again), np.array(got))


def test_values_are_sane(values):
    q = values["hf-mxfp4", "float32"]
    assert np.all(np.abs(q["model.layers.0.input_layernorm.weight"] - 1) < 0.5)
    assert 0.5 < q["model.embed_tokens.weight"].std() < 2
    assert 0.05 < q["lm_head.weight"].std() * np.sqrt(H) < 2
    scales = q["model.layers.0.mlp.experts.gate_up_proj_scales"].astype(int) - 127
    assert set(np.unique(scales)) <= {-6, -5, -4}  # 2^(c +- 1), c = round(-log2(2.93 * 8)) = -5
    w = dequantize_mxfp4(
        q["model.layers.0.mlp.experts.gate_up_proj_blocks"],
        q["model.layers.0.mlp.experts.gate_up_proj_scales"],
    )
    assert 0.5 < w.std() * np.sqrt(H) < 2


# -- the same model in every layout ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_original_is_the_hub_model_rearranged(values, dtype):
    q, o = values["hf-mxfp4", dtype], values["original", dtype]
    # transformers' convert script: split qkv at q_len, q_len + k_len, no permutation; rename the rest
    for n in range(SPEC.num_layers):
        p, b = f"model.layers.{n}.", f"block.{n}."
        for kind in ("weight", "bias"):
            qkv = o[b + f"attn.qkv.{kind}"]
            parts = [q[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"]
            assert np.array_equal(qkv, np.concatenate(parts, axis=0))
            assert [len(x) for x in parts] == [NQ * D, NKV * D, NKV * D]
        same = {
            "attn.norm.scale": "input_layernorm.weight",
            "attn.sinks": "self_attn.sinks",
            "attn.out.weight": "self_attn.o_proj.weight",
            "attn.out.bias": "self_attn.o_proj.bias",
            "mlp.norm.scale": "post_attention_layernorm.weight",
            "mlp.gate.weight": "mlp.router.weight",
            "mlp.gate.bias": "mlp.router.bias",
            "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
            "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
            "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
            "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
            "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
            "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
        }
        for a, c in same.items():
            assert np.array_equal(o[b + a], q[p + c]), a
    assert np.array_equal(o["embedding.weight"], q["model.embed_tokens.weight"])
    assert np.array_equal(o["norm.scale"], q["model.norm.weight"])
    assert np.array_equal(o["unembedding.weight"], q["lm_head.weight"])
    assert len(o) == len(q) - 4 * SPEC.num_layers  # q, k, v fused, weight and bias


def test_transformers_loads_and_runs_it(ckpts):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([[5, 900, 3, 77, 12, 400, 8, 9, 10, 11, 12, 13]])  # longer than the window (8)
    model, info = transformers.GptOssForCausalLM.from_pretrained(
        ckpts["hf-float", "float32"], dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert torch.isfinite(logits).all()
    assert (logits.std(-1) > 0.3).all() and (logits.std(-1) < 5).all()  # O(1) spread, not degenerate
    assert len(set(logits.argmax(-1).tolist())) > 3  # different tokens predict different things
    # transformers' own dequantization of the hub layout gives the very same model
    quant, info = transformers.GptOssForCausalLM.from_pretrained(
        ckpts["hf-mxfp4", "float32"],
        dtype=torch.float32,
        output_loading_info=True,
        quantization_config=transformers.Mxfp4Config(dequantize=True),
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(quant(ids).logits[0], logits)


# -- determinism ------------------------------------------------------------------------------------------


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_values(tmp_path, ckpts, values):
    again = write_checkpoint(tmp_path / "again", SPEC, "hf-mxfp4", seed=3)
    assert digest(again) == digest(ckpts["hf-mxfp4", "bfloat16"])
    other = folder_tensors(write_checkpoint(tmp_path / "other", SPEC, "hf-mxfp4", seed=4, dtype="float32"))
    same = values["hf-mxfp4", "float32"]
    for k, v in other.items():
        assert v.shape == same[k].shape and not np.array_equal(v, same[k]), k
    # a tensor's values depend only on (seed, name): more layers leave the first ones unchanged
    deeper = folder_tensors(
        write_checkpoint(tmp_path / "deeper", SPEC.tiny(vocab_size=V, num_layers=4), seed=3)
    )
    ref = values["hf-mxfp4", "bfloat16"]
    for k, v in ref.items():
        assert np.array_equal(deeper[k], v), k


def test_bfloat16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    from oss_mlx.testing.synthetic import _f32_to_bf16_bits

    x = np.random.default_rng(1).standard_normal(100_000).astype(np.float32) * 10
    x[:4] = [1.00390625, 1.01171875, -1.00390625, 3.0e-39]  # ties to even both ways, a subnormal
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(_f32_to_bf16_bits(x), want)


def test_cli_writes_a_checkpoint(tmp_path, capsys):
    dest = tmp_path / "cli"
    args = [str(dest), "--config", "tiny", "--layout", "original", "--vocab-size", "256", "--seed", "5"]
    assert main(args) == 0
    assert "wrote original tiny" in capsys.readouterr().out
    assert json.loads((dest / "config.json").read_text())["vocab_size"] == 256
    assert main(args) == 2  # refuses to overwrite without --overwrite
    assert main([*args, "--overwrite", "--num-experts", "1"]) == 0
    assert json.loads((dest / "config.json").read_text())["experts_per_token"] == 1
