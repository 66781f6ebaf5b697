"""Loading checks: config.json read as transformers / OpenAI's reference read it, and every way a
checkpoint can be wrong (shapes, dtypes, missing / extra tensors, corrupt or incomplete files, a
vocabulary too small) is a LoadError naming the file, the tensor or key, and what was expected."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import rel_err, vocabulary_dir
from hf_reference import clear_routing_tokens

import oss_mlx
from oss_mlx.config import HF_DEFAULT_ROPE, HF_DEFAULTS, ConfigError, ModelConfig
from oss_mlx.errors import LoadError
from oss_mlx.loader import load_model
from oss_mlx.rope import yarn_inv_freq
from oss_mlx.synthetic import SyntheticSpec, write_checkpoint
from oss_mlx.weights import CheckpointError, CheckpointWarning

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
load_file, save_file = safetensors_numpy.load_file, safetensors_numpy.save_file

SPEC = SyntheticSpec.tiny(
    num_layers=2,
    num_experts=4,
    experts_per_token=2,
    vocab_size=256,
    hidden_size=64,
    intermediate_size=64,
    head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=8,
)
LAYOUTS = ("hf-mxfp4", "hf-float", "original", "oss-mlx")


class Layouts(dict):
    """The checkpoints by layout; a layout that could not be built skips the test asking for it."""

    def __init__(self, built: dict[str, Path], missing: dict[str, str]):
        super().__init__(built)
        self.missing = missing

    def __missing__(self, layout: str) -> Path:
        pytest.skip(self.missing[layout])


@pytest.fixture(scope="module")
def sources(tmp_path_factory, request):
    """The same tiny model in every layout (oss-mlx: converted from hf-mxfp4), float32."""
    from oss_mlx.convert.cli import main as convert

    root = tmp_path_factory.mktemp("load-errors")
    out = {
        layout: write_checkpoint(root / layout, SPEC, layout=layout, seed=5, dtype="float32")
        for layout in LAYOUTS[:3]
    }
    # The converter writes the tokenizer beside the weights, so oss-mlx needs the vocabulary.
    if vocabulary_dir() is None:
        return Layouts(out, {"oss-mlx": "o200k_base vocabulary not found: the converter needs it"})
    request.getfixturevalue("vocab_dir")
    assert convert([str(out["hf-mxfp4"]), str(root / "oss-mlx"), "--dtype", "float32"]) == 0
    out["oss-mlx"] = root / "oss-mlx"
    return Layouts(out, {})


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, change) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def edit_tensors(folder: Path, change) -> Path:
    """Apply change(dict of numpy arrays) to the shard holding the first name change touches."""
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        tensors = load_file(f)
        if change(tensors):
            save_file(tensors, f)
            return f
    raise AssertionError("nothing changed")


def loads_cleanly(folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(folder)


# ---- config.json: what a missing key means ---------------------------------------------------------


def test_hf_defaults_are_transformers_defaults():
    ref = transformers.GptOssConfig()
    for key, value in HF_DEFAULTS.items():
        theirs = ref.default_theta if key == "rope_theta" else getattr(ref, key)
        assert theirs == value, key
    assert {k: v for k, v in ref.rope_parameters.items() if k != "rope_theta"} == HF_DEFAULT_ROPE


# SPEC's config.json with only the keys that set sizes: everything else is left to the defaults.
BASE = {
    key: SPEC.hf_config()[key]
    for key in (
        "model_type",
        "num_hidden_layers",
        "num_local_experts",
        "num_experts_per_tok",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "head_dim",
        "num_attention_heads",
        "num_key_value_heads",
        "sliding_window",
    )
}
YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
FULL_ROPE = {**YARN, "original_max_position_embeddings": 4096}
MXFP4 = {"bits": 4, "group_size": 32, "mode": "mxfp4"}


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


CONFIG_CASES = {
    "no rope section": BASE,
    "only rope_theta": {**BASE, "rope_theta": 10000.0},
    "4.x rope_scaling": {**BASE, "rope_scaling": FULL_ROPE, "rope_theta": 150000},
    "no original_max_position_embeddings": {**BASE, "rope_scaling": YARN},
    "no original, max_position_embeddings set": {
        **BASE,
        "rope_parameters": YARN,
        "max_position_embeddings": 8192,
    },
    "no truncate": {**BASE, "rope_parameters": _without(FULL_ROPE, "truncate")},
    "truncate null": {**BASE, "rope_parameters": {**FULL_ROPE, "truncate": None}},
    "betas null": {**BASE, "rope_parameters": {**FULL_ROPE, "beta_fast": None, "beta_slow": None}},
    "factor null": {**BASE, "rope_parameters": {**FULL_ROPE, "factor": None}},
    "no rope_type": {**BASE, "rope_parameters": _without(FULL_ROPE, "rope_type")},
    "type instead of rope_type": {
        **BASE,
        "rope_scaling": {**_without(FULL_ROPE, "rope_type"), "type": "yarn"},
    },
    "empty rope_parameters": {**BASE, "rope_parameters": {}},
    "empty rope_scaling": {**BASE, "rope_scaling": {}},
    "rope_scaling over rope_parameters": {
        **BASE,
        "rope_scaling": {**FULL_ROPE, "factor": 4.0},
        "rope_parameters": FULL_ROPE,
    },
    "attention_factor": {**BASE, "rope_parameters": {**FULL_ROPE, "attention_factor": 1.25}},
    "mscale": {**BASE, "rope_parameters": {**FULL_ROPE, "mscale": 1.0, "mscale_all_dim": 0.5}},
    "no head_dim": _without(BASE, "head_dim"),
    "no num_key_value_heads": {**_without(BASE, "num_key_value_heads"), "num_attention_heads": 16},
    "no num_local_experts": _without(BASE, "num_local_experts"),
    "num_experts alias": {**_without(BASE, "num_local_experts"), "num_experts": 8},
    "no num_experts_per_tok": {**_without(BASE, "num_experts_per_tok"), "experts_per_token": 3},
    "no num_hidden_layers": _without(BASE, "num_hidden_layers"),
    "no vocab/hidden/intermediate": _without(BASE, "vocab_size", "hidden_size", "intermediate_size"),
    "no sliding_window": _without(BASE, "sliding_window"),
    "layer_types": {**BASE, "layer_types": ["full_attention", "sliding_attention"]},
    "no rms_norm_eps, swiglu": {**BASE, "rms_norm_eps": 1e-6, "swiglu_limit": 5.0},
    "the hub's 20b config.json": SyntheticSpec.gpt_oss_20b().hf_config(),
    "a transformers 5 save of the 120b": SyntheticSpec.gpt_oss_120b().hf_config(False, "transformers5"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_reads_as_transformers_reads_it(case):
    """Every field, and the rotary frequencies and scale transformers' GptOss computes from them."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    raw = json.loads(json.dumps(CONFIG_CASES[case]))  # each side gets its own copy
    ours = ModelConfig.from_dict(json.loads(json.dumps(raw)))
    theirs = transformers.GptOssConfig.from_dict(raw)
    pairs = {
        "num_layers": "num_hidden_layers",
        "num_experts": "num_local_experts",
        "experts_per_token": "num_experts_per_tok",
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "intermediate_size": "intermediate_size",
        "head_dim": "head_dim",
        "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": "num_key_value_heads",
        "sliding_window": "sliding_window",
        "rms_norm_eps": "rms_norm_eps",
        "swiglu_alpha": "swiglu_alpha",
        "swiglu_limit": "swiglu_limit",
        "max_position_embeddings": "max_position_embeddings",
    }
    for mine, key in pairs.items():
        assert getattr(ours, mine) == getattr(theirs, key), mine
    assert list(ours.layer_types) == list(theirs.layer_types)
    rotary = GptOssRotaryEmbedding(theirs)
    inv_freq, scale = yarn_inv_freq(ours)
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.double().numpy(), rtol=1e-6)
    assert scale == pytest.approx(rotary.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_the_converted_dialect_keeps_every_field(case):
    """`oss-mlx convert` writes ModelConfig.to_hf_dict(): read back, it is the same config."""
    ours = ModelConfig.from_dict(json.loads(json.dumps(CONFIG_CASES[case])))
    assert ModelConfig.from_dict(json.loads(json.dumps(ours.to_hf_dict()))) == ours


@pytest.mark.parametrize(
    "raw,words",
    [
        (
            {**BASE, "hidden_size": "sixty-four"},
            "hidden_size must be an integer, not 'sixty-four' (a string)",
        ),
        ({**BASE, "num_hidden_layers": 2.5}, "num_hidden_layers must be an integer, not 2.5"),
        ({**BASE, "head_dim": None}, "head_dim must be an integer, not None (null)"),
        ({**BASE, "rms_norm_eps": "small"}, "rms_norm_eps must be a number"),
        ({**BASE, "tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false"),
        ({**BASE, "layer_types": "sliding"}, "layer_types must be a list"),
        ({**BASE, "rope_parameters": {"rope_type": "yarn"}}, "no 'factor'"),
        ({**BASE, "rope_parameters": [1, 2]}, "rope_parameters must be an object"),
        (
            {**BASE, "rope_parameters": {**FULL_ROPE, "factor": "big"}},
            "rope_parameters.factor must be a number",
        ),
        ({**BASE, "rope_parameters": {**FULL_ROPE, "factor": 0.5}}, "YaRN factor 0.5 must be at least 1"),
        ({**BASE, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope type 'linear'"),
        ({**BASE, "sliding_window": None}, "sliding_window is null"),
        ({**BASE, "sliding_window": 0}, "sliding_window=0 must be at least 1"),
        ({**BASE, "vocab_size": 0}, "vocab_size=0 must be at least 1"),
        ({**BASE, "vocab_size": 10**12}, "vocab_size=1000000000000 is beyond 2147483647"),
        ({**BASE, "num_hidden_layers": 2**40}, "num_layers=1099511627776 is beyond 2147483647"),
        ({**BASE, "num_hidden_layers": 10**6}, "num_layers=1000000 is more than 65536"),
        ({**BASE, "num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({**BASE, "attention_bias": False}, "attention_bias is false"),
        ({**BASE, "quantization_config": {"quant_method": "gptq"}}, "quant_method is 'gptq'"),
        ([1, 2], "expected a JSON object, not a list"),
        ({**BASE, "oss_mlx": {"format_version": 2}}, "oss_mlx.format_version is 2: this oss-mlx reads"),
        ({**BASE, "oss_mlx": {"quantization": {"attention": {"bits": "four"}}}}, "attention.bits must be"),
        ({**BASE, "oss_mlx": {"quantization": {"router": None}}}, "oss_mlx.quantization.router: unknown"),
        (
            {**BASE, "oss_mlx": {"quantization": {"attention": {"bits": 3, "group_size": 7}}}},
            "attention.group_size is 7; MLX's affine quantization takes group_size 32 or 64 or 128",
        ),
        (
            {**BASE, "oss_mlx": {"quantization": {"embedding": {"bits": 7, "group_size": 64}}}},
            "embedding.bits is 7; MLX's affine quantization takes bits 2 or 3 or 4 or 5 or 6 or 8",
        ),
        (
            {**BASE, "oss_mlx": {"quantization": {"attention": {**MXFP4, "group_size": 64}}}},
            "group_size is 64; MLX's mxfp4 quantization takes group_size 32",
        ),
        ({**BASE, "oss_mlx": []}, "oss_mlx must be an object"),
    ],
)
def test_bad_config_values_name_the_key_and_file(raw, words):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(raw, source="/models/x/config.json")
    assert str(e.value).startswith("/models/x/config.json: ") and words in str(e.value)
    assert isinstance(e.value, LoadError)


def test_a_config_error_names_the_defaults_behind_it():
    with pytest.raises(
        ConfigError,
        match=r"layer_types has 2 entries for 36 layers \(not in config.json, so "
        r"defaults were used: num_hidden_layers=36\)",
    ):
        ModelConfig.from_dict({**_without(BASE, "num_hidden_layers"), "layer_types": ["full_attention"] * 2})


def test_sliding_window_null_without_sliding_layers_is_fine():
    cfg = ModelConfig.from_dict({**BASE, "sliding_window": None, "layer_types": ["full_attention"] * 2})
    assert not any(cfg.is_sliding(i) for i in range(2))


def test_original_config_missing_keys_take_the_reference_defaults(sources, tmp_path):
    """OpenAI's reference reads original/config.json as ModelConfig(**json): missing keys are its
    defaults; a default that disagrees with the weights is named in the error."""
    raw = json.loads((sources["original"] / "config.json").read_text())
    full = ModelConfig.from_dict(raw)
    assert ModelConfig.from_dict(_without(raw, "swiglu_limit", "rope_ntk_alpha")) == full
    folder = copy(sources["original"], tmp_path)
    edit_config(folder, lambda c: c.pop("hidden_size"))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    message = str(e.value)
    assert "embedding.weight' is [256, 64] float32, expected [256, 2880]" in message
    assert "(not in config.json, so defaults were used: hidden_size=2880)" in message
    assert "KeyError" not in message


def test_original_dialect_is_recognised_without_num_experts():
    raw = {"num_hidden_layers": 2, "experts_per_token": 2, "hidden_size": 64, "intermediate_size": 64}
    cfg = ModelConfig.from_dict({**raw, "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2})
    assert cfg.num_experts == 128 and cfg.rope_truncate is False  # the reference's defaults


# ---- logits against transformers with keys removed ---------------------------------------------------


def _transformers_checkpoint(folder: Path, config_edit, tie: bool = False):
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(
        **{k: v for k, v in BASE.items() if k != "model_type"},
        rope_parameters={**FULL_ROPE, "rope_theta": 150000.0},
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    model = transformers.GptOssForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    edit_config(folder, config_edit)
    # The reference is transformers reading the edited config.json, as a user's fine-tune would be read.
    ref = transformers.GptOssForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
    tokens = clear_routing_tokens(torch, ref, (1, 200), vocab=256)
    with torch.no_grad():
        return tokens, ref(torch.from_numpy(tokens)).logits.numpy()


def _drop_rope(cfg):
    cfg.pop("rope_parameters", None), cfg.pop("rope_scaling", None), cfg.pop("rope_theta", None)


def _drop_rope_key(key):
    def edit(cfg):
        cfg["rope_parameters"].pop(key)

    return edit


@pytest.mark.parametrize(
    "edit",
    [_drop_rope, _drop_rope_key("original_max_position_embeddings"), _drop_rope_key("truncate")],
    ids=["no-rope-section", "no-original-max-positions", "no-truncate"],
)
def test_logits_with_keys_removed_match_transformers(tmp_path, edit):
    tokens, ref = _transformers_checkpoint(tmp_path, edit)
    model, _ = load_model(tmp_path, dtype=mx.float32, quantize_experts=False)
    assert rel_err(np.array(model(mx.array(tokens))), ref) <= 1e-4


def test_tied_embeddings_match_transformers(tmp_path):
    tokens, ref = _transformers_checkpoint(tmp_path, lambda cfg: None, tie=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, info = load_model(tmp_path, dtype=mx.float32, quantize_experts=False)
    assert info.config.tie_word_embeddings
    assert rel_err(np.array(model(mx.array(tokens))), ref) <= 1e-4


# ---- tensors: shapes and dtypes, named with their file -----------------------------------------------


def test_every_layout_loads_without_warnings(sources):
    for layout in LAYOUTS:
        loads_cleanly(sources[layout])


def _kv_input(layout):
    if layout == "original":
        return "block.0.attn.qkv.weight", lambda t: t.update(
            {"block.0.attn.qkv.weight": np.zeros((128, 96), np.float32)}
        )
    name = {"oss-mlx": "blocks.0.attn.qkv.weight"}.get(layout, "model.layers.0.self_attn.k_proj.weight")
    return name, lambda t: t.update({name: np.zeros((t[name].shape[0], 96), t[name].dtype)})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_weight_of_the_wrong_input_size(sources, tmp_path, layout):
    folder = copy(sources[layout], tmp_path)
    name, damage = _kv_input(layout)
    f = edit_tensors(folder, lambda t: name in t and (damage(t) or True))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    msg = str(e.value)
    assert msg.startswith(f"{f}: tensor {name!r} is [") and ", 96] float32, expected [" in msg
    assert "concatenate" not in msg


MXFP4_SCALES = {
    "hf-mxfp4": "model.layers.1.mlp.experts.down_proj_scales",
    "original": "block.1.mlp.mlp2_weight.scales",
    "oss-mlx": "blocks.1.mlp.experts.down_scales",
}
MXFP4_BLOCKS = {
    "hf-mxfp4": "model.layers.0.mlp.experts.gate_up_proj_blocks",
    "original": "block.0.mlp.mlp1_weight.blocks",
}


@pytest.mark.parametrize("layout", sorted(MXFP4_SCALES))
def test_mxfp4_scales_stored_as_float(sources, tmp_path, layout):
    folder = copy(sources[layout], tmp_path)
    name = MXFP4_SCALES[layout]
    f = edit_tensors(folder, lambda t: name in t and t.update({name: t[name].astype(np.float32)}) is None)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)  # at load, not in the first forward ([gather_qmm])
    msg = str(e.value)
    assert msg.startswith(f"{f}: tensor {name!r} is [") and "float32, expected" in msg and "uint8" in msg


@pytest.mark.parametrize("layout", sorted(MXFP4_BLOCKS))
def test_mxfp4_blocks_stored_as_int32(sources, tmp_path, layout):
    folder = copy(sources[layout], tmp_path)
    name = MXFP4_BLOCKS[layout]
    as_int32 = lambda t: name in t and t.update({name: t[name].view(np.int32)}) is None  # noqa: E731
    f = edit_tensors(folder, as_int32)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    msg = str(e.value)
    assert msg.startswith(f"{f}: tensor {name!r} is [") and "int32, expected" in msg
    assert "MXFP4 blocks are uint8" in msg and "reshape" not in msg


@pytest.mark.parametrize("layout", ["hf-float", "oss-mlx"])
def test_float64_tensor_is_named(sources, tmp_path, layout):
    folder = copy(sources[layout], tmp_path)
    name = "model.norm.weight" if layout == "hf-float" else "norm.weight"
    f = edit_tensors(folder, lambda t: name in t and t.update({name: t[name].astype(np.float64)}) is None)
    with pytest.raises(CheckpointError, match=rf"^{f}: tensor '{name}' is stored as float64, which MLX"):
        load_model(folder)


# ---- missing and extra tensors -------------------------------------------------------------------------

SOME_TENSOR = {
    "hf-mxfp4": "model.layers.1.self_attn.sinks",
    "hf-float": "model.layers.0.mlp.experts.down_proj",
    "original": "block.1.mlp.gate.bias",
    "oss-mlx": "blocks.1.attn.out.bias",
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_missing_tensor_is_named(sources, tmp_path, layout):
    folder = copy(sources[layout], tmp_path)
    name = SOME_TENSOR[layout]
    edit_tensors(folder, lambda t: t.pop(name, None) is not None)
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # keep the index true to the shards
        idx = json.loads(index.read_text())
        idx["weight_map"].pop(name, None)
        index.write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=rf"missing tensor\(s\) '{name}'"):
        load_model(folder)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_more_layers_than_the_config_is_refused(sources, tmp_path, layout):
    """A 2-layer checkpoint whose config says 1 layer must not load as 1 layer."""
    folder = copy(sources[layout], tmp_path)

    def one_layer(cfg):
        cfg["num_hidden_layers"] = 1
        if "layer_types" in cfg:
            cfg["layer_types"] = cfg["layer_types"][:1]

    edit_config(folder, one_layer)
    with pytest.raises(CheckpointError, match=r"holds layer\(s\) 1 that config.json does not have"):
        load_model(folder)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unused_tensor_is_named_in_a_warning(sources, tmp_path, layout):
    folder = copy(sources[layout], tmp_path)
    extra = "model.rotary_emb.inv_freq"
    edit_tensors(folder, lambda t: t.update({extra: np.ones(8, np.float32)}) is None)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text())
        idx["weight_map"][extra] = sorted(set(idx["weight_map"].values()))[0]
        index.write_text(json.dumps(idx))
    with pytest.warns(CheckpointWarning, match=rf"1 tensor\(s\) of the checkpoint are not used: '{extra}'"):
        model, _ = load_model(folder)
    ref, _ = load_model(sources[layout])
    tokens = mx.array([[1, 2, 3]])
    assert np.array_equal(np.array(model(tokens)), np.array(ref(tokens)))


# ---- files: truncated, corrupt, duplicated, missing ----------------------------------------------------


def _rewrite_header(f: Path, change) -> None:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8 : 8 + n])
    change(head)
    text = json.dumps(head).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _first_tensor(head: dict) -> str:
    return next(k for k in head if k != "__metadata__")


def _bad_offsets(folder):
    f = sorted(folder.glob("*.safetensors"))[0]

    def change(head):
        info = head[_first_tensor(head)]
        info["data_offsets"][1] -= 2

    _rewrite_header(f, change)
    return rf"{f}: tensor '.*' has a corrupt header entry: \d+ bytes for \[.*\] BF16"


def _overlapping_offsets(folder):
    """Two tensors of one size sharing the same bytes: every size agrees, one tensor is the other's copy."""
    f = sorted(folder.glob("*.safetensors"))[0]
    moved = {}

    def change(head):
        names = [k for k in head if k != "__metadata__"]
        size = lambda k: head[k]["data_offsets"][1] - head[k]["data_offsets"][0]  # noqa: E731
        a, b = next((a, b) for a in names for b in names if a < b and size(a) == size(b) > 0)
        head[b]["data_offsets"] = list(head[a]["data_offsets"])
        moved["names"] = (a, b)

    _rewrite_header(f, change)
    a, b = moved["names"]
    return rf"{f}: tensor '({a}|{b})' \(bytes \d+-\d+\) overlaps tensor '({a}|{b})'.*the header is corrupt"


def _unknown_dtype(folder):
    f = sorted(folder.glob("*.safetensors"))[0]
    _rewrite_header(f, lambda head: head[_first_tensor(head)].update(dtype="Q7"))
    return rf"{f}: tensor '.*' has a corrupt header entry: unknown dtype 'Q7'"


def _header_not_object(folder):
    f = sorted(folder.glob("*.safetensors"))[0]
    text = b"[1, 2, 3]"
    f.write_bytes(struct.pack("<Q", len(text)) + text)
    return rf"{f} is not a valid safetensors file \(its header is not an object\)"


def _empty_file(folder):
    f = sorted(folder.glob("*.safetensors"))[0]
    f.write_bytes(b"")
    return rf"{f} is truncated or not a safetensors file \(only 0 bytes\)"


def _stale_copy(folder):
    f = sorted(folder.glob("*.safetensors"))[0]
    (folder / "model.safetensors.index.json").unlink()
    shutil.copyfile(f, folder / "zz-old-copy.safetensors")
    return r"is in both .* and .*zz-old-copy.safetensors: remove the stale file"


def _index_lists_absent_tensor(folder):
    index = folder / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    name = "model.layers.0.mlp.router.weight"
    others = sorted(set(idx["weight_map"].values()) - {idx["weight_map"][name]})
    idx["weight_map"][name] = others[0]  # a shard that does not hold it
    index.write_text(json.dumps(idx))
    return rf"index.json lists 1 tensor\(s\) its shards do not hold: '{name}' \(in {others[0]}\)"


def _index_not_json(folder):
    (folder / "model.safetensors.index.json").write_text("{not json")
    return r"model.safetensors.index.json is not a valid safetensors index"


def _index_weight_map_list(folder):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    return r"weight_map must map tensor names to shard file names"


def _no_safetensors(folder):
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    return r"holds no .safetensors files"


def _config_not_json(folder):
    (folder / "config.json").write_bytes(b"\xff\xfe{")
    return r"config.json is not valid JSON"


def _empty_folder(folder):
    shutil.rmtree(folder)
    folder.mkdir()
    return r"config.json not found"


FILE_DAMAGE = [
    _bad_offsets,
    _overlapping_offsets,
    _unknown_dtype,
    _header_not_object,
    _empty_file,
    _stale_copy,
    _index_lists_absent_tensor,
    _index_not_json,
    _index_weight_map_list,
    _no_safetensors,
    _config_not_json,
    _empty_folder,
]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    return write_checkpoint(root / "hub", SPEC, layout="hf-mxfp4", seed=5, max_shard_bytes=100_000)


@pytest.mark.parametrize("damage", FILE_DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_damaged_files_are_load_errors(sharded, tmp_path, damage):
    folder = copy(sharded, tmp_path)
    assert len(list(folder.glob("*.safetensors"))) >= 2
    pattern = damage(folder)
    with pytest.raises(LoadError, match=pattern):
        load_model(folder)


# ---- token ids and the vocabulary ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory, vocab_dir):
    """What `oss-mlx synthetic --vocab-size 10` writes: a model the tokenizer's ids overflow."""
    from oss_mlx.synthetic import main as synthetic

    folder = tmp_path_factory.mktemp("vocab10") / "m"
    assert synthetic([str(folder), "--vocab-size", "10"]) == 0
    return folder


def test_vocabulary_smaller_than_the_tokenizer_is_refused_at_load(small_vocab):
    with pytest.raises(
        LoadError, match=r"config.json: vocab_size is 10, but the tokenizer's ids go up to 201087"
    ):
        oss_mlx.load(small_vocab)


def test_token_ids_outside_the_vocabulary_are_refused(small_vocab):
    """Raw ids reach the embedding through the model's call (prefill, a user's own loop)."""
    model, _ = load_model(small_vocab)
    for ids, bad in (([[3, 10]], 10), ([[-1, 2]], -1), ([[200006]], 200006)):
        with pytest.raises(
            ValueError, match=rf"token id {bad} is outside this model's vocabulary \(ids 0..9"
        ):
            model(mx.array(ids))
    with pytest.raises(ValueError, match="token ids must be integers"):
        model(mx.array([[1.0, 2.0]]))
    cache = model.make_cache()
    with pytest.raises(ValueError, match="token id 12 is outside"):
        model(mx.array([[12]]), cache=cache)  # one token with a cache: the eager decode path
    assert cache.offset == 0
    assert model(mx.array([[0, 9]])).shape == (1, 2, 10)


def test_session_with_raw_ids_out_of_range_stays_usable(tiny_checkpoint):
    model, tokenizer = oss_mlx.load(tiny_checkpoint, dtype=mx.float32)
    session = oss_mlx.Session(model, tokenizer)
    bad = [1, 2, 3, 4, 5, 201088]
    with pytest.raises(ValueError, match="token id 201088 is outside"):
        list(session.stream(bad, max_tokens=2))
    # The cache holds exactly what it says it holds (a prefix of the prompt), and the session goes on.
    assert (
        session.cache.offset == len(session.cached_tokens)
        and session.cached_tokens == bad[: session.cache.offset]
    )
    assert len(list(session.stream([1, 2, 3], max_tokens=2))) >= 1


# ---- the command line: one line, an exit code, no traceback --------------------------------------------


def _generate(model: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oss_mlx.cli", "generate", "--model", str(model), "--max-tokens", "2", "Hi"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )


def _bad_type(folder):
    edit_config(folder, lambda c: c.update(hidden_size="sixty-four"))
    return "hidden_size must be an integer, not 'sixty-four' (a string)"


def _truncated(folder):
    f = sorted(folder.glob("*.safetensors"))[-1]
    f.write_bytes(f.read_bytes()[:1000])
    return f"{f.name} is truncated"


def _fewer_layers(folder):
    edit_config(folder, lambda c: c.update(num_hidden_layers=1, layer_types=c["layer_types"][:1]))
    return "that config.json does not have"


@pytest.mark.parametrize(
    "damage", [_bad_type, _truncated, _fewer_layers], ids=lambda f: f.__name__.strip("_")
)
def test_generate_prints_a_load_error_as_one_line(tiny_checkpoint, vocab_dir, tmp_path, damage):
    folder = copy(tiny_checkpoint, tmp_path)
    words = damage(folder)
    out = _generate(folder)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith("oss-mlx generate: ") and words in lines[0] and str(folder) in lines[0]


def test_generate_with_a_too_small_vocabulary_is_a_message_not_a_segfault(small_vocab):
    out = _generate(small_vocab)
    assert out.returncode == 1, (out.returncode, out.stderr)  # was -11 (SIGSEGV), exit 139 in a shell
    assert out.stderr.strip().count("\n") == 0 and "vocab_size is 10" in out.stderr


def test_a_checkpoint_warning_is_one_line_on_the_command_line(tiny_checkpoint, vocab_dir, tmp_path):
    """An unused tensor is worth a word, not Python's file:line and source line: the command prints
    `oss-mlx generate: warning: ...` on one line and still answers."""
    import torch
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    folder = copy(tiny_checkpoint, tmp_path)
    extra = "model.rotary_emb.inv_freq"
    shard = sorted(folder.glob("*.safetensors"))[0]
    tensors = load_torch(shard)
    tensors[extra] = torch.ones(8)
    save_torch(tensors, shard)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text())
        idx["weight_map"][extra] = shard.name
        index.write_text(json.dumps(idx))
    out = _generate(folder)
    assert out.returncode == 0, out.stderr
    warned = [line for line in out.stderr.splitlines() if "not used" in line]
    assert len(warned) == 1 and warned[0].startswith("oss-mlx generate: warning: "), out.stderr
    assert extra in warned[0] and ".py:" not in out.stderr
