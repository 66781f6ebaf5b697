"""Adapters made by peft run here as in transformers + peft: logits within 1e-4 relative in float32.

The reference is peft 0.2x's LoRA on a random transformers GptOssForCausalLM: attention through
`target_modules` (q/k/v/o_proj, which our fused qkv takes as three row blocks), experts through
`target_parameters` (the 3-D gate_up_proj / down_proj, nested wrappers), A and B random and non-zero.
Loaded from peft's saved folder and from our own format (written by us, read back), on float experts
and on the MXFP4 base (against transformers with the dequantized experts).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import rel_err
from hf_reference import ATTENTION, EXPERTS, VOCAB, add_lora, clear_routing_tokens, random_base, torch_logits

from oss_mlx.adapters import AdapterError, load_adapter, save_adapter
from oss_mlx.loader import load_model
from oss_mlx.lora import LoRAExperts, LoRALinear, LoRARouter

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4
PROMPT = 80  # 5x the sliding window


def tokens(pm) -> np.ndarray:
    """Two rows the transformers + peft model `pm` routes with no near tie (hf_reference)."""
    return clear_routing_tokens(torch, pm, (2, PROMPT))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-float")
    random_base(torch, transformers, folder)
    return folder


def reference(base_folder, out, **lora):
    """The tokens, their transformers + peft logits and without the adapter; the adapter saved."""
    model = transformers.GptOssForCausalLM.from_pretrained(
        base_folder, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    pm = add_lora(torch, peft, model, **lora)
    pm.save_pretrained(out)
    ids = tokens(pm)
    with pm.disable_adapter():
        plain = torch_logits(torch, pm, ids)
    return ids, torch_logits(torch, pm, ids), plain


def ours(folder, adapter, ids, quantize=False):
    model, _ = load_model(folder, dtype=mx.float32, quantize_experts=quantize)
    load_adapter(model, adapter)
    return model, np.array(model(mx.array(ids)))


@pytest.mark.parametrize(
    "lora",
    [
        {},  # attention + both expert parameters, nested wrappers
        {"transposed": False},  # the layout peft >= 0.19 writes on transformers 4.x
        {"modules": ["q_proj", "v_proj"], "parameters": ["mlp.experts.down_proj"]},
        {"modules": ATTENTION, "parameters": [*EXPERTS, "mlp.router.weight"], "r": 3, "alpha": 5.0},
        {
            "use_rslora": True,
            "alpha_pattern": {"o_proj": 3.0, "gate_up_proj": 1.5},
            "layers_to_transform": [0, 2],
        },
    ],
    ids=["all", "peft-swapped", "subset", "router-rank3", "rslora-patterns-layers"],
)
def test_peft_folder_matches_transformers_peft(base, tmp_path, lora):
    ids, ref, plain = reference(base, tmp_path / "peft", **lora)
    model, out = ours(base, tmp_path / "peft", ids)
    assert rel_err(plain, ref) > 100 * TOL  # the adapter changes the logits: the test can fail
    assert rel_err(out, ref) <= TOL
    # written in our format, read back onto a fresh model: the same logits
    save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["format"] == "oss-mlx-lora"
    _, again = ours(base, tmp_path / "ours", ids)
    assert rel_err(again, ref) <= TOL


def test_modules_wrapped_and_decode_path(base, tmp_path):
    """The adapter sits on the canonical modules, and the cache / decode path applies it too."""
    ids, ref, _ = reference(base, tmp_path / "peft", parameters=[*EXPERTS, "mlp.router.weight"])
    model, _ = load_model(base, dtype=mx.float32, quantize_experts=False)
    load_adapter(model, tmp_path / "peft")
    block = model.blocks[1]
    assert isinstance(block.attn.qkv, LoRALinear) and isinstance(block.attn.out, LoRALinear)
    assert isinstance(block.mlp.experts, LoRAExperts) and isinstance(block.mlp.router, LoRARouter)
    assert sorted(block.attn.qkv.lora_a) == ["k", "q", "v"]
    cache, outs, start = model.make_cache(), [], 0
    for n in [7, 1, 1, 40, 1, PROMPT - 50]:
        outs.append(np.array(model(mx.array(ids[:, start : start + n]), cache=cache)))
        start += n
    assert rel_err(np.concatenate(outs, axis=1), ref) <= TOL


def test_the_decode_batch_applies_the_adapter(base, tmp_path):
    """Two sequences at different positions decoded together (the compiled batched step the scheduler
    runs: decode.py, batch_cache.py) with an adapter on every target: each row's logits are
    transformers + peft's at its own position."""
    from oss_mlx.batch_cache import BatchCache
    from oss_mlx.decode import DecodeStep

    ids, ref, _ = reference(base, tmp_path / "peft", parameters=[*EXPERTS, "mlp.router.weight"])
    model, _ = load_model(base, dtype=mx.float32, quantize_experts=False)
    load_adapter(model, tmp_path / "peft")
    starts = (40, 47)
    batch = BatchCache.for_model(model)
    for r, n in enumerate(starts):
        cache = model.make_cache()
        mx.eval(model(mx.array(ids[r : r + 1, :n]), cache=cache))
        batch.join(r, cache)
    step = DecodeStep(model)
    assert step.compiled
    for i in range(PROMPT - max(starts)):
        feed = mx.array([[int(ids[r, n + i])] for r, n in enumerate(starts)])
        logits = np.array(step(feed, batch))
        for r, n in enumerate(starts):
            assert rel_err(logits[r, 0], ref[r, n + i]) <= TOL, (r, n + i)


def test_mxfp4_base_matches_dequantized_reference(tmp_path):
    """QLoRA-style: the experts stay MXFP4 (hub layout, bytes unchanged) with the adapter beside them;
    transformers + peft run on the same experts dequantized (the hf-float layout of the same numbers)."""
    from oss_mlx.synthetic import SyntheticSpec, write_checkpoint

    spec = SyntheticSpec.tiny(
        num_layers=3, num_experts=8, experts_per_token=4, vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, head_dim=16, num_attention_heads=8, num_key_value_heads=2, sliding_window=16,
    )  # fmt: skip
    for layout in ("hf-mxfp4", "hf-float"):
        write_checkpoint(tmp_path / layout, spec, layout=layout, seed=5, dtype="float32")
    model = transformers.GptOssForCausalLM.from_pretrained(
        tmp_path / "hf-float",
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
    ).eval()
    pm = add_lora(torch, peft, model, seed=3)
    pm.save_pretrained(tmp_path / "peft")
    ids = tokens(pm)
    ref = torch_logits(torch, pm, ids)
    ours_model, info = load_model(tmp_path / "hf-mxfp4", dtype=mx.float32)
    assert info.layout == "hf-mxfp4"
    load_adapter(ours_model, tmp_path / "peft")
    experts = ours_model.blocks[0].mlp.experts
    assert isinstance(experts, LoRAExperts) and experts.base.quantized
    assert experts.base.gate_up_weight.dtype == mx.uint32  # still MXFP4
    assert rel_err(np.array(ours_model(mx.array(ids))), ref) <= TOL


def test_our_adapter_exported_to_peft_runs_in_transformers(base, tmp_path):
    """The other direction: an adapter attached here (random, as after training), saved in PEFT's
    format, loads in transformers + peft and gives our logits."""
    from oss_mlx.lora import LoRAConfig, attach

    model, _ = load_model(base, dtype=mx.float32, quantize_experts=False)
    attach(model, LoRAConfig(rank=4, alpha=8, targets="attention,experts,router").sites(3), seed=4)
    rng = np.random.default_rng(0)
    model.update_modules  # noqa: B018 - (the module tree is what we fill below)
    from oss_mlx.lora import adapter_weights

    model.load_weights(
        [
            (k, mx.array(0.2 * rng.standard_normal(v.shape), dtype=mx.float32))
            for k, v in adapter_weights(model).items()
        ],
        strict=False,
    )
    save_adapter(model, tmp_path / "peft", format="peft")
    hf = transformers.GptOssForCausalLM.from_pretrained(
        base, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    pm = peft.PeftModel.from_pretrained(hf.eval(), tmp_path / "peft").eval()
    ids = tokens(pm)
    assert rel_err(np.array(model(mx.array(ids))), torch_logits(torch, pm, ids)) <= TOL


def test_bad_adapter_folders(base, tmp_path):
    model, _ = load_model(base, dtype=mx.float32, quantize_experts=False)
    with pytest.raises(AdapterError, match="no such adapter folder"):
        load_adapter(model, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="holds no adapter_config.json"):
        load_adapter(model, tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(model, tmp_path / "bad")
    reference(base, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key, value, message in (
        ("use_dora", True, "DoRA is not supported"),
        ("peft_type", "IA3", "only LORA"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
    ):
        (tmp_path / key).mkdir()
        (tmp_path / key / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(AdapterError, match=message):
            load_adapter(load_model(base, dtype=mx.float32)[0], tmp_path / key)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        load_adapter(load_model(base, dtype=mx.float32)[0], tmp_path / "noweights")
    # an adapter for another model's shapes
    other = tmp_path / "other-base"
    random_base(torch, transformers, other, hidden=96)
    with pytest.raises(AdapterError, match="fits neither|needs"):
        load_adapter(load_model(other, dtype=mx.float32)[0], tmp_path / "peft")


def test_adapter_config_values_are_checked(base, tmp_path):
    """A NaN scale (NaN logits; a fused model of NaNs), a rank below 1, a NaN lora_alpha, a dropout of 2:
    one AdapterError naming the file and the value."""
    from oss_mlx.lora import LoRAConfig, attach

    model, _ = load_model(base, dtype=mx.float32, quantize_experts=False)
    attach(model, LoRAConfig(rank=4, targets="attention").sites(model.config.num_layers), seed=1)
    save_adapter(model, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    site = next(iter(cfg["sites"]))
    rank = cfg["sites"][site][0]
    for name, change, message in (
        ("nan", {"sites": {**cfg["sites"], site: [rank, float("nan")]}}, "scale nan must be a finite number"),
        ("inf", {"sites": {**cfg["sites"], site: [rank, float("inf")]}}, "scale inf must be a finite number"),
        ("rank", {"sites": {**cfg["sites"], site: [-1, 2.0]}}, "rank -1 must be a positive whole number"),
        ("dropout", {"dropout": 2.0}, "dropout 2.0 must be at least 0 and below 1"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapters.safetensors").write_bytes(
            (tmp_path / "ours" / "adapters.safetensors").read_bytes()
        )
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(AdapterError, match=message):
            load_adapter(load_model(base, dtype=mx.float32)[0], folder)
    reference(base, tmp_path / "peft")
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(
        json.dumps({**peft_cfg, "lora_alpha": float("nan")})
    )
    with pytest.raises(AdapterError, match="lora_alpha of .* is nan; it must be a finite number"):
        load_adapter(load_model(base, dtype=mx.float32)[0], tmp_path / "peft")
