"""Memory planning: will a gpt-oss model fit this machine, with which preset and how much context?

Everything is arithmetic on the config (docs/MEMORY.md shows it worked out for 20b and 120b):

weights   per component, in the bytes the converter writes (`oss-mlx convert`), for a quality preset:
          experts  MXFP4: per expert 2I*H/2 + H*I/2 bytes of 4-bit values, one uint8 scale per 32
                   values, float biases (2I + H)
          attention  qkv [(Hq + 2 Hkv) D, H] and out [H, Hq D] (+ biases, sinks): float, or affine
                   b-bit with group g: rows*cols*b/8 bytes + 2 float values (scale, bias) per group
          embedding, unembedding  [V, H] each: float or affine as above
          other    norms and routers (never quantized)
kv cache  bfloat16 keys + values: 2 * Hkv * D * 2 bytes per layer per token; full-attention layers keep
          every token, sliding layers at most `sliding_window` tokens.
activations  one prefill chunk (default 512 tokens) of hidden states, attention and MoE intermediates
          (float32, worst case) plus the last token's logits; attention itself fused (no score matrix).
training  `TrainingPlan`: the weights as above + a LoRA adapter with its gradient and AdamW's moments
          (float32) + a training step's activations, with or without gradient checkpointing
          (docs/FINETUNE.md).

The machine's budget is `machine.py`'s; `oss-mlx plan` and the fit checks before a load are in
`plan_cli.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import mxfp4
from .config import FULL, ModelConfig
from .machine import GiB, Machine, MiB, wired_limit_cap

COMPONENTS = ("experts", "attention", "embedding", "unembedding", "other")
DEFAULT_CONTEXT = 8192
PREFILL_CHUNK = 512
KV_BYTES = 2  # bfloat16 cache


def presets():
    from .convert.presets import PRESETS

    return PRESETS


def dense_bytes(rows: int, cols: int, quant: dict | None, dtype_bytes: int) -> int:
    """Bytes of a [rows, cols] weight, float or quantized as MLX stores it (weight + scales (+ biases))."""
    if not quant:
        return rows * cols * dtype_bytes
    bits, group = quant["bits"], quant["group_size"]
    mode = quant.get("mode", "affine")
    packed = rows * cols * bits // 8
    groups = rows * (cols // group)
    if mode == "affine":
        return packed + 2 * groups * dtype_bytes  # scales and biases in the float dtype
    return packed + groups  # mxfp4 / mxfp8 / nvfp4: one uint8 scale per group, no biases


def expert_bytes(config: ModelConfig, dtype_bytes: int = 2) -> int:
    """One expert (gate_up + down), MXFP4 values + uint8 scales + float biases."""
    H, I = config.hidden_size, config.intermediate_size
    gate_up = dense_bytes(2 * I, H, mxfp4.MLX_MODE, dtype_bytes) + 2 * I * dtype_bytes
    down = dense_bytes(H, I, mxfp4.MLX_MODE, dtype_bytes) + H * dtype_bytes
    return gate_up + down


def weight_bytes(
    config: ModelConfig, quantization: dict | None = None, dtype_bytes: int = 2
) -> dict[str, int]:
    """Bytes per component (see the module docstring) for a preset's quantization spec."""
    q = quantization or {}
    H, E, V, L = config.hidden_size, config.num_experts, config.vocab_size, config.num_layers
    hq_d = config.num_attention_heads * config.head_dim
    attention = (
        dense_bytes(config.qkv_dim, H, q.get("attention"), dtype_bytes)
        + config.qkv_dim * dtype_bytes
        + dense_bytes(H, hq_d, q.get("attention"), dtype_bytes)
        + H * dtype_bytes
        + config.num_attention_heads * dtype_bytes
    )
    other = 2 * H * dtype_bytes + E * H * dtype_bytes + E * dtype_bytes  # norms, router
    return {
        "experts": L * E * expert_bytes(config, dtype_bytes),
        "attention": L * attention,
        "embedding": dense_bytes(V, H, q.get("embedding"), dtype_bytes),
        "unembedding": dense_bytes(V, H, q.get("unembedding"), dtype_bytes),
        "other": L * other + H * dtype_bytes,
    }


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int = KV_BYTES) -> int:
    """Keys + values of one token in one layer."""
    return 2 * config.num_key_value_heads * config.head_dim * dtype_bytes


def kv_bytes_per_layer(config: ModelConfig, context: int, dtype_bytes: int = KV_BYTES) -> list[int]:
    """Each layer's KV cache at `context` tokens: full-attention layers hold all, sliding ones a window."""
    per = kv_bytes_per_token(config, dtype_bytes)
    return [per * (context if t == FULL else min(context, config.sliding_window)) for t in config.layer_types]


def kv_bytes(config: ModelConfig, context: int, dtype_bytes: int = KV_BYTES) -> int:
    """The KV cache of `context` tokens (all layers)."""
    return sum(kv_bytes_per_layer(config, context, dtype_bytes))


def activation_bytes(config: ModelConfig, chunk: int = PREFILL_CHUNK) -> int:
    H, I, k = config.hidden_size, config.intermediate_size, config.experts_per_token
    per_token = 4 * H + config.qkv_dim + config.num_attention_heads * config.head_dim
    per_token += k * (3 * I + H) + config.num_experts
    return chunk * per_token * 4 + 2 * config.vocab_size * 4


# ---- expert streaming (streaming.py plans with these) -------------------------------------------------

# Activations, logits, MLX's scratch buffers and the Python runtime, beyond the KV cache.
ACTIVATION_ALLOWANCE = 512 * 2**20


def min_budget(resident: int, allowance: int, expert_bytes: int, layers: int, top_k: int) -> int:
    """The least budget expert streaming accepts: what stays resident, the KV/activation allowance, and
    top-k experts per layer, plus one layer's transient compact stack (layers + 1)."""
    return resident + allowance + top_k * (layers + 1) * expert_bytes


# ---- the plan -------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """Bytes a model needs: weights per component, KV cache for `context` tokens, activations."""

    config: ModelConfig
    preset: str = "reference"
    context: int = DEFAULT_CONTEXT
    quantization: dict | None = None
    dtype_bytes: int = 2
    prefill_chunk: int = PREFILL_CHUNK
    # The CPU's host unembedding copy (host_head.py) is counted: None = where this process runs on the
    # CPU backend; False plans for another machine (a Mac's GPU, a GPU box).
    host_head: bool | None = None
    weights: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        if self.host_head is None:
            from .kernels.dispatch import on_gpu

            self.host_head = not on_gpu()
        if self.quantization is None and self.preset in presets():
            self.quantization = presets()[self.preset].spec()
        elif self.quantization is None:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(presets())}")
        self.weights = weight_bytes(self.config, self.quantization, self.dtype_bytes)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def host_head_bytes(self) -> int:
        """The float32 copy of a float unembedding the CPU's decode step makes (host_head.py)."""
        if not self.host_head or (self.quantization or {}).get("unembedding"):
            return 0
        from .host_head import copy_bytes

        return copy_bytes(self.config.vocab_size, self.config.hidden_size)

    @property
    def resident_bytes(self) -> int:
        """Weights and what stays beside them whatever the context (the host head's copy)."""
        return self.weights_total + self.host_head_bytes

    @property
    def kv_bytes(self) -> int:
        return kv_bytes(self.config, self.context)

    def kv_bytes_per_1k(self) -> tuple[int, int]:
        """(growth per 1024 tokens from full-attention layers, the sliding layers' bounded total)."""
        per = kv_bytes_per_token(self.config)
        full = sum(t == FULL for t in self.config.layer_types)
        sliding = self.config.num_layers - full
        return full * per * 1024, sliding * per * self.config.sliding_window

    @property
    def activation_bytes(self) -> int:
        return activation_bytes(self.config, self.prefill_chunk)

    @property
    def total(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.activation_bytes

    def fits(self, working_set_bytes: int) -> bool:
        return self.total <= working_set_bytes

    def with_context(self, context: int) -> MemoryPlan:
        return MemoryPlan(
            self.config,
            self.preset,
            context,
            self.quantization,
            self.dtype_bytes,
            self.prefill_chunk,
            self.host_head,
        )

    def max_context(self, working_set_bytes: int) -> int:
        """The longest context that fits (0: not even the weights fit), at most max_position_embeddings."""
        fixed = self.resident_bytes + self.activation_bytes
        if fixed + kv_bytes(self.config, 1) > working_set_bytes:
            return 0
        lo, hi = 1, self.config.max_position_embeddings
        if fixed + kv_bytes(self.config, hi) <= working_set_bytes:
            return hi
        while lo < hi:  # kv_bytes is monotonic in the context
            mid = (lo + hi + 1) // 2
            if fixed + kv_bytes(self.config, mid) <= working_set_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def streaming_minimum(self) -> int:
        """The least `memory_budget` expert streaming accepts (see streaming.plan_streaming): the
        non-expert weights, the KV cache and activations, and top-k experts per layer (+1 in flight)."""
        c = self.config
        biases = (2 * c.intermediate_size + c.hidden_size) * self.dtype_bytes  # stay resident
        per_expert = expert_bytes(c, self.dtype_bytes) - biases
        resident = self.resident_bytes - per_expert * c.num_experts * c.num_layers
        if not (self.quantization or {}).get("embedding"):
            resident -= self.weights["embedding"]  # a float table is read by rows, not kept
        allowance = self.kv_bytes + ACTIVATION_ALLOWANCE
        return min_budget(resident, allowance, per_expert, c.num_layers, c.experts_per_token)

    def streaming_budget(self, working_set: int) -> int | None:
        """A --memory-budget for expert streaming that fits `working_set` (90% of it), or None."""
        budget = int(working_set * 0.9) // 10**8 * 10**8
        return budget if budget >= self.streaming_minimum() else None

    def advice(self, machine: Machine | None = None) -> list[str]:
        """Concrete steps: what fits, or which preset / context / wired limit makes it fit (on
        `machine`, default this one)."""
        machine = machine or Machine.detect()
        ws = machine.working_set_bytes
        out: list[str] = []
        if self.fits(ws):
            out.append(
                f"fits: {gib(self.total)} of {gib(ws)} ({gib(ws - self.total)} to spare); "
                f"context up to {self.max_context(ws):,} tokens fits with this preset"
            )
            return out
        options: list[str] = []
        smaller = [
            p
            for name in presets()
            if name != self.preset
            and (
                p := MemoryPlan(
                    self.config, name, self.context, dtype_bytes=self.dtype_bytes, host_head=self.host_head
                )
            ).total
            < self.total
        ]
        for p in sorted(smaller, key=lambda p: p.total):
            if p.fits(ws):
                options.append(
                    f"use --quality {p.preset}: {gib(p.total)} at {self.context:,} tokens of context"
                )
                break
        ctx = self.max_context(ws)
        if ctx >= 1024:
            options.append(f"limit the context to {ctx:,} tokens (--context {ctx})")
        if machine.platform == "mac":
            # the best preset (this one first, then smaller) that fits once the GPU limit is raised
            for p in [self, *sorted(smaller, key=lambda p: -p.total)]:
                need_mb = math.ceil((p.total + GiB) / MiB / 1024) * 1024
                if need_mb * MiB <= wired_limit_cap(machine.ram_bytes):
                    also = "" if p is self else f"use --quality {p.preset} ({gib(p.total)}) and "
                    options.append(
                        f"{also}raise the GPU memory limit (until reboot): "
                        f"sudo sysctl iogpu.wired_limit_mb={need_mb}"
                    )
                    break
        stream = self.streaming_budget(ws)
        if stream is not None:
            options.append(
                f"keep only the hot experts in memory, reading the others from disk (slower): "
                f"--memory-budget {stream / 1e9:.1f}GB (the least that works is "
                f"{self.streaming_minimum() / 1e9:.1f}GB)"
            )
        head = f"does not fit: needs {gib(self.total)}, the budget is {gib(ws)} ({machine.how})"
        if options:
            out.append(head + "; any one of these makes it fit:")
            out += options
        else:
            cap = wired_limit_cap(machine.ram_bytes)
            limit = ""
            if machine.platform == "mac" and cap > 0:
                limit = f" even with the GPU limit raised to {gib(cap)}"
            elif machine.platform == "mac":  # no limit to raise: macOS keeps all of it
                limit = f" ({gib(machine.ram_bytes)} of memory is below what macOS itself needs)"
            out.append(
                f"{head}; no preset or context makes it fit{limit}: "
                "use a smaller model or a machine with more memory"
            )
        return out


# ---- fine-tuning --------------------------------------------------------------------------------

# Activation bytes per token and layer of a training step, fitted to peaks measured on MLX's CPU backend
# (docs/FINETUNE.md, "Memory"): what one block keeps for its backward pass, S = k (8 I b + 11 H) + 8 H +
# (Q + A) b (b: activation bytes, Q: qkv rows, A: heads x head_dim; the experts' SwiGLU rows dominate).
# Unfused attention also holds score-sized arrays (heads x queries x keys, in the activations' dtype):
# ~1.25 of them kept per layer, ~5.5 at once in one layer's backward. MLX (0.32) trains with the unfused
# attention on the CPU and on Metal (both ways: its Metal ScaledDotProductAttention falls back whenever
# gradients are traced); only on CUDA do the fused attention and its cuDNN backward
# (ScaledDotProductAttentionVJP) hold none, and there only for query counts that are a multiple of
# CUDA_FUSED_VJP_QUERIES: for others the forward is fused and the backward recomputes the scores.
ATTENTION_SAVED_SCORES = 1.25
ATTENTION_BACKWARD_SCORES = 5.5
# Rows longer than attention.FULL_TRAIN_TILE attend in query tiles there: a layer's backward then held
# ~9.75 times the largest tile's scores (heads x tile x keys) at tiles of 128 and 256 over 1,024 keys
# on the CPU (untiled: the 5.5 full-score arrays above), and more at 2,048 keys (the recomputed forward
# keeps every tile's scores for the backward): counted as 10 largest tiles + 1.25 x all the tiles'.
ATTENTION_TILED_BACKWARD_SCORES = 10
CUDA_FUSED_VJP_QUERIES = 128
ACTIVATION_MARGIN = 1.1  # the fit's worst under-estimate was 7%
# MLX-CUDA holds more than that fit for the same graph (measured on an H200 at 20b shapes, 2,048 tokens,
# benchmarks/probes/train_phase_memory_probe.py and finetune_bench.py; docs/FINETUNE.md): a block's
# forward and backward ~2x, checkpointing off 2.4-2.6x of the fit's blocks, and ~36 KB per token and
# layer more at 24 layers than at 2 (not yet attributed). The plan scales by these there.
CUDA_ACTIVATION_FACTOR = 2.6
CUDA_LAYER_TOKEN_BYTES = 40_000
ADAM_STATES = 2
# Scored rows the loss unembeds at once (finetune/loss.py): 512 x 201,088 float32 logits = 0.41 GB.
LOSS_CHUNK = 512
# Bytes per logit when every chunk's logits live at once: without checkpointing the loss is part of one
# graph, and MLX held them all (12.6 per logit measured on CUDA, 8 on the CPU in float32), + b.
ONE_GRAPH_LOSS_BYTES = 12


def training_block_bytes(config: ModelConfig, dtype_bytes: int) -> int:
    """Bytes one block keeps per token for its backward pass (attention scores aside)."""
    H, I, k = config.hidden_size, config.intermediate_size, config.experts_per_token
    q, a = config.qkv_dim, config.num_attention_heads * config.head_dim
    return k * (8 * I * dtype_bytes + 11 * H) + 8 * H + (q + a) * dtype_bytes


def attention_score_bytes(config: ModelConfig, tokens: int, batch: int, dtype_bytes: int) -> tuple[int, int]:
    """(score bytes of a full-attention layer, of a sliding one) for rows of `tokens` queries, in the
    activations' dtype (the unfused attention's): a sliding layer's prefill goes in tiles of WINDOW_TILE
    queries over their window (attention.py)."""
    from .attention import WINDOW_TILE, window_tile_keys

    heads = batch * config.num_attention_heads * dtype_bytes
    full = heads * tokens * tokens
    if tokens <= WINDOW_TILE:
        return full, full
    tiles = -(-tokens // WINDOW_TILE)
    return full, heads * tiles * WINDOW_TILE * window_tile_keys(config.sliding_window)


@dataclass
class TrainingPlan:
    """Bytes a LoRA training step needs: the base weights (as loaded: MXFP4 experts), the adapter with
    its gradient and AdamW's two moments (float32), and the activations of `batch` rows of `length`
    tokens, with or without gradient checkpointing."""

    config: ModelConfig
    adapter_parameters: int
    length: int
    batch: int = 1
    checkpointing: bool = True
    quantization: dict | None = None
    dtype_bytes: int = 2
    grad_accum: int = 1
    scored: int | None = None  # scored tokens per row (default: all of them, the worst case)
    fused_attention: bool | None = None  # None: as this machine trains (fused on CUDA only)
    cuda: bool | None = None  # None: whether this machine trains on MLX-CUDA (CUDA_ACTIVATION_FACTOR)

    def __post_init__(self) -> None:
        if self.cuda is None:
            import mlx.core as mx

            cuda = getattr(mx, "cuda", None)
            self.cuda = bool(cuda and cuda.is_available())
        if self.fused_attention is None:
            from .attention import fused_attention_backward

            self.fused_attention = self.cuda and fused_attention_backward()

    @property
    def weights(self) -> int:
        return sum(weight_bytes(self.config, self.quantization, self.dtype_bytes).values())

    @property
    def adapter_bytes(self) -> int:
        """The adapter, its gradient, AdamW's moments (+ the accumulated gradient with grad_accum > 1)."""
        copies = 2 + ADAM_STATES + (self.grad_accum > 1)
        return self.adapter_parameters * 4 * copies

    def _scores(self) -> tuple[int, int, int]:
        """(score bytes saved per full layer, per sliding layer, what one layer's backward builds at
        once)."""
        from .attention import FULL_TRAIN_TILE

        T = self.length
        full, sliding = attention_score_bytes(self.config, T, self.batch, self.dtype_bytes)
        if self.fused_attention:
            # The fused forward saves none; a full layer's backward recomputes its scores unless its
            # queries (the whole row) fit the cuDNN backward. Window tiles (WINDOW_TILE queries) do.
            return 0, 0, (0 if T % CUDA_FUSED_VJP_QUERIES == 0 else int(ATTENTION_BACKWARD_SCORES * full))
        if T <= FULL_TRAIN_TILE:
            return full, sliding, int(ATTENTION_BACKWARD_SCORES * full)
        # Query tiles (attention.causal_tiles_sdpa): tile i's queries over the keys up to its end.
        per_key = full // (T * T)
        saved = per_key * sum(
            (min(s + FULL_TRAIN_TILE, T) - s) * min(s + FULL_TRAIN_TILE, T)
            for s in range(0, T, FULL_TRAIN_TILE)
        )
        largest = per_key * FULL_TRAIN_TILE * T
        return saved, sliding, int(ATTENTION_TILED_BACKWARD_SCORES * largest + ATTENTION_SAVED_SCORES * saved)

    @property
    def activation_parts(self) -> dict[str, int]:
        c, b, N = self.config, self.dtype_bytes, self.batch * self.length
        S = training_block_bytes(c, b)
        S_f32 = training_block_bytes(c, 4)  # a block's backward works largely in float32
        full, sliding, backward = self._scores()
        n_full = sum(t == FULL for t in c.layer_types)
        f = CUDA_ACTIVATION_FACTOR if self.cuda else 1.0
        extra = CUDA_LAYER_TOKEN_BYTES * c.num_layers * N if self.cuda else 0
        scored = self.batch * (self.scored if self.scored is not None else self.length)
        rows = scored * c.hidden_size * (b + 4)  # the scored rows, normed, and their gradient
        # One chunk: its logits (b bytes) and four float32 arrays of their size (cast, exp, softmax,
        # gradient); with checkpointing one chunk is evaluated at a time.
        chunk = min(scored, LOSS_CHUNK) * c.vocab_size * (b + 16)
        if self.checkpointing:
            kept = c.num_layers * N * c.hidden_size * b + extra  # the blocks' inputs
            block = f * N * (S + S_f32) + backward
            loss = chunk + rows
            return {"kept": int(kept), "block": int(max(block, loss)), "loss": int(loss)}
        saved_scores = ATTENTION_SAVED_SCORES * (n_full * full + (c.num_layers - n_full) * sliding)
        kept = f * c.num_layers * N * S + int(saved_scores) + extra
        block = f * N * S_f32 + backward
        # One graph: every chunk's logits at once, while the kept activations and a block's backward
        # wait for them (measured on CUDA: the sum, not the larger).
        loss = max(chunk, scored * c.vocab_size * (b + ONE_GRAPH_LOSS_BYTES)) + rows
        return {"kept": int(kept), "block": int(block + loss), "loss": int(loss)}

    @property
    def activation_bytes(self) -> int:
        p = self.activation_parts
        return int(ACTIVATION_MARGIN * (p["kept"] + p["block"]))

    @property
    def total(self) -> int:
        return self.weights + self.adapter_bytes + self.activation_bytes

    def fits(self, working_set_bytes: int) -> bool:
        return self.total <= working_set_bytes

    def replace(self, **changes) -> TrainingPlan:
        from dataclasses import replace

        return replace(self, **changes)

    def max_length(self, working_set_bytes: int, limit: int = 131072) -> int:
        """The longest rows (with this plan's batch and checkpointing) that fit; 0: none."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.replace(length=mid).fits(working_set_bytes):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def summary(self) -> str:
        ck = "on" if self.checkpointing else "off"
        p = self.activation_parts
        block = "one block or the loss" if self.checkpointing else "a block and the loss"
        return (
            f"base weights {gib(self.weights)} + adapter, gradient and AdamW state {gib(self.adapter_bytes)} "
            f"+ activations {gib(self.activation_bytes)} (batch {self.batch} x {self.length:,} tokens, "
            f"checkpointing {ck}: kept {gib(p['kept'])}, {block} {gib(p['block'])}, "
            f"+{ACTIVATION_MARGIN - 1:.0%}) = {gib(self.total)}"
        )


def choose_checkpointing(
    plan: TrainingPlan, working_set: int, wanted: str = "auto"
) -> tuple[TrainingPlan, str]:
    """The plan to run and why, for --checkpointing auto|on|off: off when it fits (faster), else on;
    raises MemoryError with the way out when nothing fits."""
    on, off = plan.replace(checkpointing=True), plan.replace(checkpointing=False)
    if wanted == "off" or (wanted == "auto" and off.fits(working_set)):
        chosen, why = off, "gradient checkpointing off"
    else:
        chosen = on
        why = "gradient checkpointing on" + (
            f" (without it the step needs {gib(off.total)}, over the {gib(working_set)} budget)"
            if wanted == "auto"
            else ""
        )
    if chosen.fits(working_set):
        return chosen, why
    fixed = plan.weights + plan.adapter_bytes
    if fixed > working_set:
        raise MemoryError(
            f"training does not fit: the base weights and the adapter's training state alone need "
            f"{gib(fixed)}, the budget is {gib(working_set)}: use a machine with more memory or a smaller "
            "quality preset of the model (oss-mlx convert --quality small)"
        )
    options = []
    longest = on.max_length(working_set)
    if longest >= 64:
        options.append(f"--max-length {longest} (with checkpointing, batch {plan.batch})")
    if plan.batch > 1 and on.replace(batch=1).fits(working_set):
        options.append(f"--batch-size 1 --grad-accum {plan.batch * plan.grad_accum} (same effective batch)")
    if not chosen.checkpointing and on.fits(working_set):
        options.append("--checkpointing auto (or on)")
    options.append("fewer adapted layers or targets (--layers, --targets), or a smaller --rank")
    raise MemoryError(
        f"training does not fit: {chosen.summary()}, the budget is {gib(working_set)}. "
        "Any one of these may make it fit: " + "; ".join(options)
    )


def gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"
