"""Gradients of the LoRA parameters for one batch equal torch autograd through transformers + peft
(float32, float experts on both sides, so both are exact), with and without gradient checkpointing."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import rel_err
from hf_reference import EXPERTS, add_lora, clear_routing_tokens, random_base
from mlx.utils import tree_flatten

from oss_mlx.adapters import PEFT_PREFIX, load_adapter, peft_expert_to_ours
from oss_mlx.finetune.data import TrainSequence, make_batch
from oss_mlx.finetune.loss import loss_sum, value_and_grad
from oss_mlx.loader import load_model
from oss_mlx.lora import freeze_base

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4
E = 8


def batch_of(pm, seed: int = 0):
    """Two rows of different lengths (one padded), about a third of the positions scored; tokens the
    reference `pm` routes with no near tie (hf_reference)."""
    rng = np.random.default_rng(seed)
    seqs = []
    for i, n in enumerate((70, 41)):
        scored = list(rng.random(n) < 0.35)
        scored[0] = False
        ids = clear_routing_tokens(torch, pm, (1, n), seed=seed + i)[0]
        seqs.append(TrainSequence([int(t) for t in ids], scored, 0))
    return seqs, make_batch(seqs)


def torch_grads(pm, seqs):
    """Mean CE over the scored tokens and d(loss)/d(each LoRA tensor), by torch autograd."""
    pm.train()  # dropout is 0: train mode only enables autograd bookkeeping of peft
    for name, p in pm.named_parameters():
        p.requires_grad_("lora_" in name)
    total, n = 0.0, 0
    for s in seqs:
        ids = torch.tensor([s.tokens])
        logits = pm(ids[:, :-1]).logits[0]
        pos = torch.tensor([j - 1 for j in range(1, len(s.tokens)) if s.scored[j]])
        total = total + torch.nn.functional.cross_entropy(logits[pos], ids[0, 1:][pos], reduction="sum")
        n += len(pos)
    loss = total / n
    loss.backward()
    grads = {
        n.removeprefix(PEFT_PREFIX): p.grad.numpy() for n, p in pm.named_parameters() if p.grad is not None
    }
    return float(loss), grads


def to_ours(grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PEFT names and layouts -> ours (the loader's mapping: a pure rearrangement, so it maps gradients)."""
    out, experts = {}, {}
    for name, g in grads.items():
        name = name.replace(".default.", ".")  # the adapter's name, in torch's parameter names only
        parts = name.split(".")
        layer, ab = int(parts[2]), parts[-2][-1]
        if "self_attn" in name:
            proj = parts[4][0]
            module = "out" if proj == "o" else "qkv"
            out[f"blocks.{layer}.attn.{module}.lora_{ab.lower()}.{proj}"] = g
        elif "router" in name:
            out[f"blocks.{layer}.mlp.router.lora_{ab.lower()}.router"] = g
        else:
            key = (layer, name.count("base_layer"))
            experts.setdefault(key, {})[ab] = g
    for (layer, depth), ab in experts.items():
        target = "gate_up" if depth == 1 else "down"  # gate_up is wrapped first: one level deeper
        a, b = peft_expert_to_ours(mx.array(ab["A"]), mx.array(ab["B"]), E, swapped=False)
        out[f"blocks.{layer}.mlp.experts.lora_a.{target}"] = np.array(a)
        out[f"blocks.{layer}.mlp.experts.lora_b.{target}"] = np.array(b)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grad")
    random_base(torch, transformers, root / "base")
    hf = transformers.GptOssForCausalLM.from_pretrained(
        root / "base", dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    pm = add_lora(torch, peft, hf, parameters=[*EXPERTS, "mlp.router.weight"], seed=2)
    pm.save_pretrained(root / "peft")
    seqs, batch = batch_of(pm)
    loss, grads = torch_grads(pm, seqs)
    return root, batch, loss, to_ours(grads)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_lora_gradients_match_torch(setup, checkpoint):
    root, batch, ref_loss, ref = setup
    model, _ = load_model(root / "base", dtype=mx.float32, quantize_experts=False)
    load_adapter(model, root / "peft")
    freeze_base(model)
    n = len(batch.labels)
    loss, grads = value_and_grad(model, batch, checkpoint)
    loss = loss / n
    grads = {k: v / n for k, v in tree_flatten(grads)}
    assert abs(loss.item() - ref_loss) <= TOL * abs(ref_loss)
    assert abs(loss_sum(model, batch).item() / n - ref_loss) <= TOL * abs(ref_loss)
    assert set(grads) == set(ref), sorted(set(grads) ^ set(ref))  # exactly the LoRA tensors train
    assert len(ref) == 3 * (4 * 2 + 2 * 2 + 2)  # 3 layers x (q, k, v, o, gate_up, down, router) x (A, B)
    worst = max(rel_err(np.array(grads[k]), ref[k]) for k in ref)
    assert worst <= TOL, worst
    assert all(np.abs(ref[k]).max() > 0 for k in ref)  # every tensor really gets a gradient


def test_gradients_with_the_gpu_kernel_layer_on(setup, monkeypatch):
    """On a GPU the model's forward takes fused kernels (the router's among them) that have no VJP;
    training must build its graph from the reference ops there too. The kernel layer is made to
    believe this CPU is a Metal GPU (tests/metal_emulator) and the gradients must not change."""
    from metal_emulator import EMULATOR, unavailable

    from oss_mlx import kernels

    if unavailable() is not None:
        pytest.skip(f"Metal emulator: {unavailable()}")
    monkeypatch.delenv(kernels.ENV, raising=False)
    root, batch, _, ref = setup
    model, _ = load_model(root / "base", dtype=mx.float32, quantize_experts=False)
    load_adapter(model, root / "peft")
    freeze_base(model)
    n = len(batch.labels)
    with kernels.emulated("metal", EMULATOR.metal_kernel):
        assert kernels.routing.route_ok(mx.zeros((4, 64)), mx.zeros((E, 64)), 4)  # the fused router is on
        _, grads = value_and_grad(model, batch, checkpoint=True)
        grads = {k: np.array(v) / n for k, v in tree_flatten(grads)}
    assert max(rel_err(grads[k], ref[k]) for k in ref) <= TOL
