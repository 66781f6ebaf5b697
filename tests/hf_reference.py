"""Random transformers GptOssForCausalLM models (the reference), and adapters made on them by peft."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
VOCAB = 1024
# A top-k choice closer than this (in logits) is a near tie: see clear_routing_tokens.
ROUTING_MARGIN = 1e-3


def tiny_config(
    transformers, layers: int = 3, hidden: int = 64, intermediate: int = 96, truncate: bool = False
):
    return transformers.GptOssConfig(
        num_hidden_layers=layers,
        num_local_experts=8,
        num_experts_per_tok=4,
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        head_dim=16,
        num_attention_heads=8,
        num_key_value_heads=2,
        sliding_window=16,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": truncate,
            "original_max_position_embeddings": 4096,
            "rope_theta": 150000.0,
        },
        attn_implementation="eager",
    )


def random_base(torch, transformers, folder: Path | None, seed: int = 0, **config):
    """A random float32 GptOssForCausalLM (weights scaled so activations stay O(1)), saved to `folder`."""
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(tiny_config(transformers, **config)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "sinks" in name or "embed" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    if folder is not None:
        model.save_pretrained(folder)
    return model


def add_lora(
    torch,
    peft,
    model,
    *,
    r: int = 4,
    alpha: float = 8.0,
    modules=ATTENTION,
    parameters=EXPERTS,
    seed: int = 1,
    transposed: bool = True,
    **extra,
):
    """peft's LoRA on `model` with random non-zero A and B (so the delta matters).

    transposed=False marks the experts as transformers 4.x did (no `is_transposed`), which makes peft
    >= 0.19 swap its in/out features for them: the other expert layout in the wild (the model must run
    transformers' eager experts, which read the weights [E, in, out] whatever the flag says)."""
    if not transposed:
        for layer in model.model.layers:
            layer.mlp.experts.is_transposed = False
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(modules) or None,
        target_parameters=list(parameters) or None,
        lora_dropout=0.0,
        **extra,
    )
    pm = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return pm.eval()


def torch_logits(torch, model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def routing_gaps(torch, model, tokens: np.ndarray) -> np.ndarray:
    """[rows, positions]: each token's smallest gap, over the layers, between its k-th and (k+1)-th
    router logit in the transformers (or peft) `model`."""
    found = []

    def hook(module, args, out):
        # transformers 5 returns (logits, scores, indices); 4.x the scores only, so recompute there.
        if isinstance(out, tuple) and len(out) == 3:
            logits = out[0]
        else:
            logits = torch.nn.functional.linear(args[0], module.weight, module.bias)
        top = logits.float().topk(module.top_k + 1, dim=-1).values
        found.append((top[..., -2] - top[..., -1]).reshape(tokens.shape))

    routers = [m for m in model.modules() if type(m).__name__ == "GptOssTopKRouter"]
    assert routers, "no GptOssTopKRouter in the reference model"
    handles = [m.register_forward_hook(hook) for m in routers]
    try:
        with torch.no_grad():
            model(torch.from_numpy(tokens))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(found).amin(0).numpy()


def clear_routing_tokens(
    torch, model, shape: tuple[int, int], *, vocab: int = VOCAB, seed: int = 0, margin: float = ROUTING_MARGIN
) -> np.ndarray:
    """Random tokens of `shape` on which the reference `model` routes no token by a near tie.

    Where a token's k-th and (k+1)-th router logits are closer than float32's noise, another correct
    implementation, or the same one on another CPU, may pick the other expert, and that token's
    logits then differ by a whole expert's output (seen in CI: a 6e-5 gap flipped on one machine and
    not on another). Such a token is drawn again until none is left; the tokens before it keep their
    routing, since attention is causal, so the loop ends after about as many passes as ties."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=shape)
    for _ in range(1000):
        near = routing_gaps(torch, model, tokens) < margin
        if not near.any():
            return tokens
        for row in np.flatnonzero(near.any(axis=1)):
            tokens[row, np.argmax(near[row])] = rng.integers(0, vocab)
    raise AssertionError(f"no tokens of shape {shape} route without a near tie (margin {margin})")
