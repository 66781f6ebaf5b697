"""Kernels against the reference path on one model: logits end to end (`check_logits`) and each layer's
decode update (`check_layers`); `oss-mlx bench --check-logits / --check-layers` runs them on a random
or real model."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .. import kernels
from ..kernels import decode_moe
from ..model import Transformer
from ..moe import mxfp4_weights
from .random_model import random_prompt


def check_logits(model: Transformer, n: int, steps: int = 8, seed: int = 0) -> dict:
    """Logits with kernels vs the reference path: an n-token prefill, then `steps` decoded tokens
    (the kernel run's greedy tokens fed to both). Max |diff| / max |ref| per step, argmax agreement."""
    prompt = random_prompt(n, model.config.vocab_size, seed + 7)

    def logits_seq(tokens_fed: list[int] | None) -> tuple[list[mx.array], list[int]]:
        cache = model.make_cache()
        out = [model(mx.array(prompt)[None], cache=cache, last_logits_only=True)[0, -1].astype(mx.float32)]
        mx.eval(out[-1])
        fed = []
        for i in range(steps):
            tok = int(mx.argmax(out[-1]).item()) if tokens_fed is None else tokens_fed[i]
            fed.append(tok)
            out.append(model(mx.array([[tok]]), cache=cache)[0, -1].astype(mx.float32))
            mx.eval(out[-1])
        return out, fed

    fast, fed = logits_seq(None)
    with kernels.use_backend("reference"):
        ref, _ = logits_seq(fed)
    errs = [float(mx.max(mx.abs(a - b)).item() / mx.max(mx.abs(b)).item()) for a, b in zip(fast, ref)]
    agree = sum(int(mx.argmax(a).item() == mx.argmax(b).item()) for a, b in zip(fast, ref))
    return {
        "prompt": n,
        "steps": steps,
        "max_rel_err": max(errs),
        "rel_err_per_step": errs,
        "argmax_agree": f"{agree}/{len(errs)}",
        "backend": kernels.backend(),
    }


def check_layers(model: Transformer, n: int, steps: int = 4, seed: int = 0) -> dict:
    """Decode with kernels vs the reference, layer by layer, each layer fed the reference's input.

    A random-weight MoE is chaotic end to end (one ulp in a router near-tie changes an expert and then
    everything after it), so this compares each block's update (output - input) alone: both paths get
    the same input and caches that hold the same keys (the prompt prefilled by the reference into
    both), and the reference's output goes on to the next layer. Max relative RMS over layers/steps.

    Even one layer's router can tie: its logits are rounded to bf16 (as the reference's addmm
    returns them), so the 4th and 5th of 32 experts fall within an ulp now and then, and a different
    expert is a different update. So the MoE is judged three ways: the whole fused block where the
    kernel's router picked the reference's experts (`moe`), the expert kernels given the reference's
    routing everywhere (`moe_experts`), and each disagreement's gap between the k-th and (k+1)-th
    reference logit, in units of that logit's bf16 spacing (a tie is <= 1).
    """
    prompt = mx.array(random_prompt(n, model.config.vocab_size, seed + 11))[None]
    caches = [model.make_cache(), model.make_cache()]
    with kernels.use_backend("reference"):
        for c in caches:
            mx.eval(model(prompt, cache=c, last_logits_only=True))
    worst = {"attention": 0.0, "moe": 0.0, "moe_experts": 0.0}
    disagreements: list[float] = []

    def rel(out: mx.array, ref: mx.array, inp: mx.array) -> float:
        d = (out - inp).astype(mx.float32)
        r = (ref - inp).astype(mx.float32)
        return (mx.sqrt(mx.mean((d - r) ** 2)) / mx.maximum(mx.sqrt(mx.mean(r**2)), 1e-30)).item()

    token = mx.array([[7]])
    for _ in range(steps):
        x = model.embedding(token)
        for i, block in enumerate(model.blocks):
            mask = None  # one query: every cached key is visible
            fast_attn = block.attn(x, mask, caches[0][i])
            with kernels.use_backend("reference"):
                ref_attn = block.attn(x, mask, caches[1][i])
            worst["attention"] = max(worst["attention"], rel(fast_attn, ref_attn, x))
            mlp, H = block.mlp, ref_attn.shape[-1]
            fast_moe = mlp(ref_attn)
            with kernels.use_backend("reference"):
                ref_moe = mlp(ref_attn)
                h = mlp.norm(ref_attn).reshape(-1, H)
                ref_w, ref_ids = mlp.router(h)
                logits = mx.addmm(mlp.router.bias, h, mlp.router.weight.T)
            _, fast_ids = mlp.router(h)
            if set(np.array(fast_ids).ravel().tolist()) == set(np.array(ref_ids).ravel().tolist()):
                worst["moe"] = max(worst["moe"], rel(fast_moe, ref_moe, ref_attn))
            else:
                top = np.sort(np.array(logits.astype(mx.float32)).ravel())[::-1]
                k = mlp.router.top_k
                ulp = 2.0 ** (np.floor(np.log2(max(abs(top[k - 1]), 1e-30))) - 7)  # bf16: 8 significant bits
                disagreements.append(float((top[k - 1] - top[k]) / ulp))
            experts = mxfp4_weights(mlp.experts)
            if decode_moe.moe_decode_ok(experts, h, ref_ids):
                fused = decode_moe.moe_decode(experts, h, ref_w, ref_ids, ref_attn.reshape(-1, H))
                worst["moe_experts"] = max(
                    worst["moe_experts"], rel(fused.reshape(ref_moe.shape), ref_moe, ref_attn)
                )
            x = ref_moe
        with kernels.use_backend("reference"):
            token = mx.argmax(model.unembedding(model.norm(x)), axis=-1)
    return {
        "prompt": n,
        "steps": steps,
        "max_rel_rms": worst,
        "router_disagreements": len(disagreements),
        "of": steps * len(model.blocks),
        "disagreement_gaps_in_bf16_ulps": [round(g, 2) for g in disagreements],
        "backend": kernels.backend(),
    }
