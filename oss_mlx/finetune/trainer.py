"""The training loop: LoRA on a frozen base, AdamW, warmup + cosine, accumulation, eval, checkpoints.

From mlx and mlx-lm: the optimizer (mlx.optimizers.AdamW), gradient clipping (clip_grad_norm) and the
schedule (mlx_lm.tuner.utils.build_schedule: linear warmup joined to cosine decay). Not mlx-lm's
`trainer.train`: its loss unembeds every position (1.6 GB of float32 logits per 2k-token row at this
vocabulary), its masks are a prompt offset (a turn's tool results inside the answer cannot be left
out), and its checkpoints hold the adapter only, so a run cannot resume with its optimizer state and
data position; nor its grad_checkpoint, which patches the block class for every model in the process.

Every step is a pure function of (seed, step, data position, adapter, optimizer state): dropout draws
from a key derived from (seed, step, micro-batch) and the data order from (seed, epoch), so a run
resumed from a checkpoint continues exactly as the uninterrupted run would.

A step's loss is the mean cross-entropy over all scored tokens of its `grad_accum` micro-batches
(each micro-batch's gradient is of its summed loss; the sum is divided by the step's token count),
so accumulation changes memory, not the result.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ..adapters import (
    CONFIG_FILE,
    OURS_FILE,
    AdapterError,
    atomic_save_safetensors,
    load_tensors,
    save_adapter,
)
from ..atomic import write_text
from ..convert.folder import WORKING, atomic_folder, clean_stale
from ..lora import LoRAConfig, adapter_weights, attach, freeze_base, lora_modules
from ..runtime import runtime_of
from .data import BatchOrder, DataPosition, Dataset, eval_batches, make_batch
from .errors import TrainError
from .loss import loss_sum, value_and_grad

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
LOG_FILE = "train_log.jsonl"
CHECKPOINTS = "checkpoints"


@dataclass
class TrainConfig:
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    steps: int = 100
    learning_rate: float = 1e-4
    min_learning_rate: float = 0.0
    warmup: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    checkpointing: bool = True
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{**d, "lora": LoRAConfig.from_dict(d["lora"])})


@dataclass
class PendingStep:
    """A computed step not yet applied (Trainer.compute_step, then Trainer.commit)."""

    grads: dict
    position: DataPosition  # where the data continues once it is applied
    loss: float
    tokens: int
    targets: int
    start: float


@dataclass
class StepResult:
    step: int
    loss: float
    learning_rate: float
    tokens: int  # tokens fed (the step's micro-batches)
    targets: int  # tokens scored
    seconds: float


def schedule(config: TrainConfig):
    from mlx_lm.tuner.utils import build_schedule

    decay = max(1, config.steps - config.warmup)
    return build_schedule(
        {
            "name": "cosine_decay",
            "arguments": [config.learning_rate, decay, config.min_learning_rate],
            "warmup": config.warmup,
        }
    )


class Trainer:
    """Owns the model's adapter, the optimizer and the data position of one run."""

    def __init__(self, model: nn.Module, config: TrainConfig, train: Dataset, valid: Dataset | None = None):
        self.model, self.config, self.train, self.valid = model, config, train, valid
        if not any(True for _ in lora_modules(model)):
            sites = config.lora.sites(model.config.num_layers)
            attach(model, sites, dropout=config.lora.dropout, seed=config.seed)
        freeze_base(model)
        self.optimizer = optim.AdamW(learning_rate=schedule(config), weight_decay=config.weight_decay)
        self.optimizer.init(model.trainable_parameters())
        self.order = BatchOrder(len(train), config.batch_size, config.seed)
        self.step = 0
        self.tokens_seen = 0

    # ---- steps --------------------------------------------------------------------------------

    def train_step(self) -> StepResult:
        return self.commit(self.compute_step())

    def compute_step(self) -> PendingStep:
        """The next step's loss and gradients; changes nothing, so an interrupt here loses only the
        step's work (the data position and the adapter stay those of the last step)."""
        start = time.perf_counter()
        self.model.train()
        c = self.config
        chosen, position = self.order.peek(c.grad_accum)
        batches = [make_batch([self.train.sequences[i] for i in ids]) for ids in chosen]
        targets = sum(len(b.labels) for b in batches)
        total, grads = mx.array(0.0), None
        for m, batch in enumerate(batches):
            seed = (c.seed * 1_000_003 + self.step * 1_009 + m) % (1 << 31)  # dropout masks
            loss, g = value_and_grad(self.model, batch, c.checkpointing, seed)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            total = total + loss
            mx.eval(total, grads)
        grads = tree_map(lambda x: x / targets, grads)
        norm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)))
        loss, norm = total.item() / targets, norm.item()
        if not (math.isfinite(loss) and math.isfinite(norm)):  # an update would make the adapter NaN
            what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient's norm is {norm}"
            raise TrainError(
                f"step {self.step + 1}: {what} (training diverged; the adapter is left as it was)"
            )
        if c.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, c.grad_clip)
        fed = sum(b.tokens for b in batches)
        return PendingStep(grads, position, loss, fed, targets, start)

    def commit(self, pending: PendingStep) -> StepResult:
        """Apply a computed step: the optimizer update, then the step count and the data position (run
        it with interrupts held, so a checkpoint never mixes one step's adapter with another's)."""
        lr = self.learning_rate()
        self.optimizer.update(self.model, pending.grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        runtime_of(self.model).model_changed()  # new adapter weights: decode traces are stale
        self.step += 1
        self.order.position = pending.position
        self.tokens_seen += pending.tokens
        seconds = time.perf_counter() - pending.start
        return StepResult(self.step, pending.loss, lr, pending.tokens, pending.targets, seconds)

    def learning_rate(self) -> float:
        return float(schedule(self.config)(self.optimizer.step))

    def evaluate(self, data: Dataset | None = None, batch_size: int | None = None) -> float:
        """Mean cross-entropy over every scored token of `data` (default: the validation set)."""
        data = data or self.valid
        if data is None:
            raise TrainError("no validation data")
        self.model.eval()
        total, n = 0.0, 0
        for batch in eval_batches(data, batch_size or self.config.batch_size):
            loss = loss_sum(self.model, batch)
            total += loss.item()
            n += len(batch.labels)
        return total / n

    # ---- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, out: Path, keep: int = 3, extra: dict | None = None) -> Path:
        """OUT/checkpoints/step-N: the adapter (usable as it is), the optimizer state, the data position
        and the step; written into a temporary folder renamed into place, so a kill leaves either the
        old set of checkpoints or the new one, never half of one."""
        root = Path(out) / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:06d}"
        # The converter's atomic folder: written as step-N.partial-<pid>, renamed once complete; the same
        # step saved again (a resumed run) is replaced whole.
        with atomic_folder(final, force=True, ours=None) as tmp:
            save_adapter(self.model, tmp, lora=self.config.lora)
            atomic_save_safetensors(dict(tree_flatten(self.optimizer.state)), tmp / OPTIMIZER_FILE)
            state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "position": asdict(self.order.position),
                "config": self.config.to_dict(),
                "train_sha256": self.train.sha256,
                "valid_sha256": self.valid.sha256 if self.valid is not None else None,
                **(extra or {}),
            }
            write_text(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")
        for stale in complete_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def load_checkpoint(self, folder: Path) -> dict:
        """Restore the adapter, optimizer state, step and data position saved in `folder`."""
        state = read_state(folder)
        try:
            weights, saved = load_tensors(folder / OURS_FILE), load_tensors(folder / OPTIMIZER_FILE)
        except AdapterError as e:
            raise TrainError(str(e)) from None
        expected = adapter_weights(self.model)
        if set(weights) != set(expected):
            raise TrainError(f"{folder}: the checkpoint's adapter does not match this run's LoRA settings")
        self.model.load_weights([(k, v.astype(expected[k].dtype)) for k, v in weights.items()], strict=False)
        runtime_of(self.model).model_changed()
        current = dict(tree_flatten(self.optimizer.state))
        if set(saved) != set(current):
            raise TrainError(f"{folder}: the optimizer state does not match this run's adapter")
        _fill(self.optimizer.state, saved)
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.order.position = DataPosition(state["position"]["epoch"], state["position"]["index"])
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        return state


def read_state(folder: Path) -> dict:
    """A checkpoint's trainer_state.json, its step and data position checked (a damaged file is a
    TrainError, not a wrong resume)."""
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainError(f"{path} cannot be read ({e})") from None
    position = state.get("position") if isinstance(state, dict) else None
    whole = [state.get("step") if isinstance(state, dict) else None]
    whole += [position.get(k) for k in ("epoch", "index")] if isinstance(position, dict) else [None]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in whole):
        raise TrainError(f"{path} is damaged: its step and data position must be whole numbers")
    return state


def _fill(tree, flat: dict[str, mx.array], prefix: str = "") -> None:
    """Put the saved arrays into the optimizer's state tree in place (its nesting of lists and dicts
    is the model's; rebuilding it from flat names would lose the layers without an adapter)."""
    items = enumerate(tree) if isinstance(tree, list) else tree.items()
    for k, v in list(items):
        name = f"{prefix}{k}"
        if isinstance(v, (dict, list)):
            _fill(v, flat, name + ".")
        elif name in flat:
            tree[k] = flat[name].astype(v.dtype) if isinstance(v, mx.array) else flat[name]


def complete_checkpoints(out: Path) -> list[Path]:
    """The finished checkpoints of a run, oldest first (temporary folders of a killed run are not)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.glob("step-*")
        if p.is_dir() and not WORKING.search(p.name) and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def clean_partial(out: Path) -> list[Path]:
    """Remove the half-written checkpoint folders of a killed run (their pid is gone)."""
    root = Path(out) / CHECKPOINTS
    working = {root / WORKING.sub("", p.name) for p in root.glob("step-*") if WORKING.search(p.name)}
    return [removed for dest in sorted(working) for removed in clean_stale(dest)]


def write_final(trainer: Trainer, out: Path, extra: dict | None = None) -> None:
    """The run's adapter in OUT itself (adapter_config.json + adapters.safetensors)."""
    save_adapter(trainer.model, out, lora=trainer.config.lora, extra=extra)


__all__ = [
    "CONFIG_FILE",
    "LOG_FILE",
    "StepResult",
    "TrainConfig",
    "TrainError",
    "Trainer",
    "clean_partial",
    "complete_checkpoints",
    "write_final",
]
