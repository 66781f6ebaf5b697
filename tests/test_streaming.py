"""Expert streaming: a memory budget changes where experts live, never a single bit of the output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from oss_mlx.host_head import model_copy_bytes
from oss_mlx.loader import load_model
from oss_mlx.runtime import runtime_of
from oss_mlx.streaming import (
    MemoryBudgetError,
    StreamingExperts,
    min_budget,
    model_streaming_stats,
    parse_budget,
    plan_streaming,
    reset_streaming_stats,
)
from oss_mlx.synthetic import SyntheticSpec, write_checkpoint

SPEC = SyntheticSpec.tiny(num_layers=3, num_experts=8, experts_per_token=2, vocab_size=512, sliding_window=8)
PROMPT = np.random.default_rng(5).integers(0, SPEC.vocab_size, size=40)


@pytest.fixture(scope="module", params=["hf-mxfp4", "original"])
def checkpoint(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(f"stream-{request.param}")
    write_checkpoint(folder, SPEC, layout=request.param, seed=11)
    return folder


@pytest.fixture(scope="module")
def hub_checkpoint(tmp_path_factory) -> Path:
    """The hub layout only, for tests whose source layout does not matter."""
    folder = tmp_path_factory.mktemp("stream-hub")
    write_checkpoint(folder, SPEC, layout="hf-mxfp4", seed=11)
    return folder


@pytest.fixture(scope="module")
def resident(checkpoint):
    model, _ = load_model(checkpoint)
    return model


def budget_for(resident_model, slots: int) -> int:
    """The smallest budget that gives `slots` experts per layer."""
    plan = plan_streaming(resident_model, 10**12)
    resident = plan.resident_bytes
    if isinstance(resident_model.embedding, nn.Embedding):  # a plain table is streamed too, by rows
        resident -= resident_model.embedding.weight.nbytes
    return min_budget(resident, plan.allowance_bytes, plan.expert_bytes, plan.layers, slots)


def as_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))  # exact: bfloat16 -> float32 widens


def greedy(model, prompt: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Prefill the prompt, then decode one token at a time; every step's logits are kept."""
    cache = model.make_cache()
    logits = model(mx.array(prompt[None]), cache=cache)
    outs, tokens = [np.array(logits.astype(mx.float32))], []
    for _ in range(steps):
        tokens.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)
        outs.append(np.array(logits.astype(mx.float32)))
    return tokens, outs


@pytest.fixture(scope="module")
def reference(resident):
    return greedy(resident, PROMPT, 12)


@pytest.mark.parametrize("slots", [2, 5])
def test_greedy_decoding_is_bit_identical(checkpoint, resident, reference, slots):
    model, _ = load_model(checkpoint, memory_budget=budget_for(resident, slots))
    assert runtime_of(model).streaming.slots == slots
    assert all(isinstance(b.mlp.experts, StreamingExperts) for b in model.blocks)
    tokens, outs = greedy(model, PROMPT, 12)
    assert tokens == reference[0]
    for got, want in zip(outs, reference[1]):
        np.testing.assert_array_equal(got, want)
    stats = model_streaming_stats(model)
    assert all(len(b.mlp.experts.cached_experts()) <= slots for b in model.blocks)
    assert stats.evictions > 0 and stats.experts_read > SPEC.num_experts  # read again after eviction
    if slots > SPEC.experts_per_token:
        assert 0 < stats.hit_rate < 1


def test_gpu_kernel_predicates_leave_streamed_layers_to_the_reference(hub_checkpoint, monkeypatch):
    """On a GPU the fused MoE kernels index whole expert tensors, which a streamed layer does not
    have: the predicate must say no (it raised AttributeError on the H200 before), so the block
    takes its own path."""
    from oss_mlx import kernels
    from oss_mlx.kernels import decode_moe, routing
    from oss_mlx.moe import mxfp4_weights

    resident_model, _ = load_model(hub_checkpoint)
    model, _ = load_model(hub_checkpoint, memory_budget=budget_for(resident_model, 2))
    block = model.blocks[0].mlp
    x = mx.random.normal((1, 1, SPEC.hidden_size)).astype(mx.bfloat16)
    k = block.router.top_k
    resident = mxfp4_weights(resident_model.blocks[0].mlp.experts)
    with kernels.emulated("cuda", lambda **kw: None):  # the GPU believed, no kernel launched
        assert routing.route_ok(x, block.router.weight, k)  # the GPU path is asked
        assert mxfp4_weights(block.experts) is None
        assert not decode_moe.moe_block_ok(x, block.router.weight, k, mxfp4_weights(block.experts))
        assert decode_moe.moe_block_ok(x, block.router.weight, k, resident)  # resident: yes


def test_more_experts_than_slots_in_one_call(checkpoint, resident):
    """Prompts whose tokens need more distinct experts than the slots: both of Experts' paths
    (token order below 64 (token, expert) pairs, sorted by expert above) are computed group by group."""
    model, _ = load_model(checkpoint, memory_budget=budget_for(resident, 2))
    for n in (5, 31, 40):  # 10, 62 and 80 pairs
        tokens = mx.array(PROMPT[None, :n])
        np.testing.assert_array_equal(as_np(model(tokens)), as_np(resident(tokens)))
        assert model_streaming_stats(model).evictions > 0


def test_a_call_with_more_experts_than_slots_starts_from_the_cached_ones(checkpoint, resident):
    """Prefill chunks each need more experts than fit: the ones left cached by the previous chunk are
    used first (all hits), so a chunk reads only what does not fit. Output unchanged."""
    slots = 2
    model, _ = load_model(checkpoint, memory_budget=budget_for(resident, slots))
    tokens = mx.array(PROMPT[None, :40])
    first = as_np(model(tokens))
    reset_streaming_stats(model)
    np.testing.assert_array_equal(as_np(model(tokens)), first)
    np.testing.assert_array_equal(first, as_np(resident(tokens)))
    stats = model_streaming_stats(model)
    assert stats.hits == slots * SPEC.num_layers  # each layer's first group: the cached experts
    assert stats.experts_read == stats.lookups - stats.hits


def test_bytes_read_and_hit_rate_accounting(checkpoint, resident):
    """Every expert read is its values + scales of both projections, once per miss."""
    E = SPEC.num_experts
    model, _ = load_model(checkpoint, memory_budget=budget_for(resident, E))  # everything fits
    experts = resident.blocks[0].mlp.experts
    per_expert = sum(
        getattr(experts, n).nbytes // E
        for n in ("gate_up_weight", "gate_up_scales", "down_weight", "down_scales")
    )
    assert runtime_of(model).streaming.expert_bytes == per_expert
    greedy(model, PROMPT, 4)
    stats = model_streaming_stats(model)
    assert stats.bytes_read == stats.experts_read * per_expert
    assert stats.experts_read == stats.misses <= SPEC.num_layers * E  # all fit: each read at most once
    assert stats.hits == stats.lookups - stats.experts_read > 0 and stats.evictions == 0
    # The same tokens again: all hits, nothing read.
    reset_streaming_stats(model)
    greedy(model, PROMPT, 4)
    stats = model_streaming_stats(model)
    assert stats.hit_rate == 1.0 and stats.bytes_read == 0 and "100.0%" in stats.summary()


def test_expert_weights_are_not_parameters(checkpoint, resident):
    """Only the resident part counts as parameters (the caches are not part of the model tree)."""
    model, _ = load_model(checkpoint, memory_budget=budget_for(resident, 3))
    greedy(model, PROMPT[:8], 2)
    names = [n for n, _ in tree_flatten(model.parameters())]
    assert not [n for n in names if n.endswith(("experts.gate_up_weight", "experts.down_scales"))]
    assert "blocks.0.mlp.experts.gate_up_bias" in names
    # Resident: the parameters, and on the CPU the decode step's float32 copy of the unembedding.
    assert (
        sum(p.nbytes for _, p in tree_flatten(model.parameters())) + model_copy_bytes(model)
        == runtime_of(model).streaming.resident_bytes
    )


def test_budget_too_small_names_the_minimum(checkpoint, resident):
    need = budget_for(resident, SPEC.experts_per_token)
    with pytest.raises(MemoryBudgetError, match=r"too small.*needs at least .* GB.*Use memory_budget='"):
        load_model(checkpoint, memory_budget=need - 1)
    model, _ = load_model(checkpoint, memory_budget=need)
    assert runtime_of(model).streaming.slots == SPEC.experts_per_token
    assert runtime_of(model).streaming.minimum_budget == need
    with pytest.raises(MemoryBudgetError, match="'0.6GB'"):
        load_model(checkpoint, memory_budget="100MB")
    with pytest.raises(MemoryBudgetError, match=r"\(--memory-budget 0.6GB\)"):  # the CLI's spelling too
        load_model(checkpoint, memory_budget="100MB")


def test_float_experts_ask_for_conversion(tmp_path):
    write_checkpoint(tmp_path, SPEC, layout="hf-float", seed=1)
    with pytest.raises(MemoryBudgetError, match=r"float experts.*oss-mlx convert"):
        load_model(tmp_path, memory_budget="6GB")


def test_canonical_layout_is_streamed(tmp_path, hub_checkpoint):
    """A checkpoint stored under the canonical names (the converted layout): experts on axis 0."""
    resident, _ = load_model(hub_checkpoint)
    flat = dict(tree_flatten(resident.parameters()))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), flat)
    config = json.loads((hub_checkpoint / "config.json").read_text())
    config["oss_mlx"] = {"experts_mxfp4": True}
    config.pop("quantization_config", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, info = load_model(tmp_path, memory_budget=budget_for(resident, 3))
    assert info.layout == "oss-mlx"
    tokens = mx.array(PROMPT[None, :12])
    np.testing.assert_array_equal(as_np(model(tokens)), as_np(resident(tokens)))


@pytest.mark.parametrize("quality", ["reference", "balanced"])
def test_converted_checkpoint_is_streamed(tmp_path, hub_checkpoint, quality, vocab_dir):
    """`oss-mlx convert` output (canonical names, experts first in each layer shard, U32 values),
    with its dense layers resident and quantized when the preset says so."""
    from oss_mlx.convert.cli import main

    dest = tmp_path / quality
    assert main([str(hub_checkpoint), str(dest), "--quality", quality]) == 0
    converted, _ = load_model(dest)
    model, info = load_model(dest, memory_budget=budget_for(converted, 2))
    assert info.layout == "oss-mlx" and runtime_of(model).streaming.slots == 2
    tokens, outs = greedy(model, PROMPT[:24], 6)
    want_tokens, want_outs = greedy(converted, PROMPT[:24], 6)
    assert tokens == want_tokens
    for got, want in zip(outs, want_outs):
        np.testing.assert_array_equal(got, want)


def test_file_shrunk_after_loading_is_reported(tmp_path, checkpoint, resident):
    for f in checkpoint.iterdir():
        shutil.copy(f, tmp_path / f.name)
    model, _ = load_model(tmp_path, memory_budget=budget_for(resident, 2))
    for f in tmp_path.glob("*.safetensors"):
        with open(f, "r+b") as fh:
            fh.truncate(4096)
    with pytest.raises(OSError, match="unexpected end of file reading expert"):
        model(mx.array(PROMPT[None, :4]))


@pytest.mark.parametrize(
    "text, value",
    [
        ("6GB", 6 * 10**9),
        ("6.5GiB", int(6.5 * 2**30)),
        ("800MB", 800 * 10**6),
        ("512 MiB", 2**29),
        (12345, 12345),
    ],
)
def test_parse_budget(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("bad", ["six GB", "6XB", "-1GB", 0, True])
def test_parse_budget_rejects(bad):
    with pytest.raises(ValueError, match="memory_budget"):
        parse_budget(bad)


def test_the_embedding_table_is_read_by_rows(hub_checkpoint):
    """A float embedding table is not kept: a step reads its tokens' rows (bit-identical values)."""
    from oss_mlx.streaming import StreamingEmbedding

    resident, _ = load_model(hub_checkpoint)
    model, _ = load_model(hub_checkpoint, memory_budget=budget_for(resident, 3))
    assert isinstance(model.embedding, StreamingEmbedding) and model.dtype == resident.dtype
    weights = dict(tree_flatten(model.parameters()))
    assert not any(name.startswith("embedding") for name in weights)
    tokens = mx.array([[5, 7, 5, 300]])
    np.testing.assert_array_equal(as_np(model.embedding(tokens)), as_np(resident.embedding(tokens)))
    assert model.embedding.rows_read == 3  # unique rows only


@pytest.mark.parametrize("change", ["replaced", "deleted"])
def test_files_replaced_or_deleted_after_the_load_are_not_read(change, hub_checkpoint, tmp_path):
    """The files are opened at load: a re-conversion into the same folder (files replaced) or a
    removed folder changes nothing for a model already loaded."""
    folder = tmp_path / "ckpt"
    shutil.copytree(hub_checkpoint, folder)
    before, _ = greedy(load_model(hub_checkpoint, memory_budget=10**10)[0], PROMPT[:8], 3)
    model, _ = load_model(folder, memory_budget=budget_for(load_model(folder)[0], 2))
    if change == "replaced":
        other = tmp_path / "other"
        write_checkpoint(other, SPEC, layout="hf-mxfp4", seed=12)
        for f in other.glob("*.safetensors"):
            f.replace(folder / f.name)
    else:
        shutil.rmtree(folder)
    assert greedy(model, PROMPT[:8], 3)[0] == before


def test_a_file_cut_short_after_the_load_is_named(hub_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(hub_checkpoint, folder)
    model, _ = load_model(folder, memory_budget=budget_for(load_model(folder)[0], 2))
    for f in folder.glob("*.safetensors"):
        with open(f, "r+b") as fh:
            fh.truncate(4096)
    with pytest.raises(OSError, match="the checkpoint changed after it was loaded"):
        greedy(model, PROMPT[:8], 1)
