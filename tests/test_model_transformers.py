"""Logits against transformers' GptOssForCausalLM (the reference), in float32, 300+ tokens.

The transformers model is built with random weights and saved with save_pretrained, i.e. in the
layout a fine-tune has (float experts). That exercises YaRN (truncate both ways), sinks, sliding
windows several times shorter than the prompt, GQA, the router and the clamped SwiGLU.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import rel_err
from hf_reference import clear_routing_tokens, random_base

from oss_mlx.loader import load_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = 320
TOL = 1e-4


def build_reference(folder, truncate: bool, seed: int = 0, layers: int = 4):
    model = random_base(torch, transformers, None, seed=seed, layers=layers, truncate=truncate)
    cfg = model.config
    model.save_pretrained(folder)
    tokens = clear_routing_tokens(torch, model, (2, PROMPT), vocab=cfg.vocab_size, seed=seed)
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens)).logits.numpy()
    return tokens, logits


@pytest.fixture(scope="module", params=[False, True], ids=["truncate-false", "truncate-true"])
def reference(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"hf-float-{request.param}")
    tokens, logits = build_reference(folder, truncate=request.param)
    return folder, tokens, logits, request.param


def test_full_forward_matches_transformers(reference):
    folder, tokens, ref, truncate = reference
    model, info = load_model(folder, dtype=mx.float32, quantize_experts=False)
    assert info.layout == "hf-float"
    assert info.config.rope_truncate is truncate
    out = np.array(model(mx.array(tokens)))
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize(
    "chunks",
    [
        [1] * 40 + [PROMPT - 40],  # token by token, then a chunk much longer than the window
        [5, 30, 1, 150, 3] + [1] * (PROMPT - 189),  # shorter and longer than the window, then decode
        [16, 16, 17, 15] + [PROMPT - 64],  # exactly the window, off by one both ways
    ],
    ids=["decode-then-long", "mixed-then-decode", "window-edges"],
)
def test_incremental_matches_full_forward(reference, chunks):
    folder, tokens, ref, _ = reference
    model, _ = load_model(folder, dtype=mx.float32, quantize_experts=False)
    cache = model.make_cache()
    outs, start = [], 0
    for n in chunks:
        outs.append(np.array(model(mx.array(tokens[:, start : start + n]), cache=cache)))
        start += n
    assert start == PROMPT and cache.offset == PROMPT
    assert rel_err(np.concatenate(outs, axis=1), ref) <= TOL


def test_the_rounding_choice_matters(reference):
    """The test can fail: flipping `truncate` (mlx-lm always rounds) measurably changes the logits."""
    folder, tokens, ref, truncate = reference
    from dataclasses import replace

    from oss_mlx.model import Transformer

    model, info = load_model(folder, dtype=mx.float32, quantize_experts=False)
    flipped = Transformer(replace(info.config, rope_truncate=not truncate), quantized_experts=False)
    flipped.update(model.parameters())
    out = np.array(flipped(mx.array(tokens)))
    assert rel_err(out, ref) > 5 * TOL  # measured 7.7e-4 at this size; mlx-lm: 0.18 at gpt-oss size


# ---- a fine-tune's bfloat16 float experts, kept float (quantize_experts=False) ---------------------


@pytest.fixture(scope="module")
def bf16_finetune(tmp_path_factory):
    """A transformers model saved in bfloat16 (a fine-tune's default), with its logits in bfloat16 and,
    for the same bfloat16 weights, in float32."""
    source, folder = tmp_path_factory.mktemp("f32"), tmp_path_factory.mktemp("hf-float-bf16")
    build_reference(source, truncate=False)
    transformers.GptOssForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(folder)
    logits, tokens = {}, None
    for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        model = transformers.GptOssForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="eager"
        ).eval()
        if tokens is None:  # the float32 comparison is the exact one
            tokens = clear_routing_tokens(torch, model, (1, 160), seed=1)
        with torch.no_grad():
            logits[name] = model(torch.from_numpy(tokens)).logits.float().numpy()
    return folder, tokens, logits


def test_bfloat16_float_experts_run(bf16_finetune):
    """MLX's CPU gather_mm refuses bfloat16 (there the experts compute in float32). Prefill (sorted
    experts) and decode (a few tokens) are as close to the float32 result as transformers' own bf16."""
    folder, tokens, ref = bf16_finetune
    model, _ = load_model(folder, quantize_experts=False)
    experts = model.blocks[0].mlp.experts
    assert not experts.quantized and experts.gate_up_weight.dtype == mx.bfloat16
    theirs = rel_err(ref["bf16"], ref["f32"])  # bf16's own error, measured 0.04
    cache = model.make_cache()
    prefill = np.array(model(mx.array(tokens[:, :120]), cache=cache).astype(mx.float32))
    steps = [
        np.array(model(mx.array(tokens[:, t : t + 1]), cache=cache).astype(mx.float32))
        for t in range(120, 160)
    ]
    out = np.concatenate([prefill, *steps], axis=1)
    assert rel_err(out, ref["f32"]) <= 1.5 * theirs
    assert rel_err(out, ref["bf16"]) <= 2 * theirs
    assert (out.argmax(-1) == ref["f32"].argmax(-1)).mean() >= 0.95


def test_bfloat16_checkpoint_in_float32_is_exact(bf16_finetune):
    folder, tokens, ref = bf16_finetune
    model, _ = load_model(folder, dtype=mx.float32, quantize_experts=False)
    assert rel_err(np.array(model(mx.array(tokens))), ref["f32"]) <= TOL


@pytest.mark.parametrize("sorted_indices", [False, True])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_float_expert_product_is_the_float32_one_rounded(dtype, sorted_indices):
    """On the CPU: exactly float32's product of the same values, rounded to the dtype."""
    from oss_mlx.moe import gather_mm_float

    mx.random.seed(0)
    w = mx.random.normal((8, 48, 64)).astype(dtype)
    x = mx.random.normal((12, 1, 1, 64)).astype(dtype)
    indices = mx.random.randint(0, 8, (12, 3)).astype(mx.uint32)
    if sorted_indices:  # the prefill shape: rows grouped by expert
        flat = indices.flatten()
        order = mx.argsort(flat)
        x, indices = x.reshape(12, 1, 64)[order // 3], flat[order]
    with mx.stream(mx.cpu):  # the CPU route (a GPU takes bfloat16 as it is)
        got = gather_mm_float(x, w, indices, sorted_indices)
        f32 = w.astype(mx.float32).swapaxes(-1, -2)
        want = mx.gather_mm(x.astype(mx.float32), f32, rhs_indices=indices, sorted_indices=sorted_indices)
        want = want.astype(dtype)
        mx.eval(got, want)
    assert got.dtype == dtype and got.shape == want.shape
    assert np.array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))


def test_reference_tokens_route_without_near_ties():
    """The prompts compared with transformers avoid top-k near ties (hf_reference.clear_routing_tokens):
    a plain random draw has some, the chosen tokens none, and only those few positions were drawn again."""
    from hf_reference import ROUTING_MARGIN, routing_gaps

    model = random_base(torch, transformers, None, layers=4)
    plain = np.random.default_rng(0).integers(0, 1024, size=(2, PROMPT))
    assert (routing_gaps(torch, model, plain) < ROUTING_MARGIN).any()
    tokens = clear_routing_tokens(torch, model, (2, PROMPT))
    assert routing_gaps(torch, model, tokens).min() >= ROUTING_MARGIN
    assert 0 < (tokens != plain).sum() <= 0.05 * tokens.size
