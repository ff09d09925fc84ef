"""Optimiser, learning-rate schedules and resumable training state, shared by fine-tuning and distillation.

Why one module: a resumed run must reach bit-identical weights, which needs the optimiser, the
schedule and every random-number state to be saved and restored together, the same way for both
training commands.
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

NORM_TYPES = (nn.LayerNorm, LayerNorm2d, nn.GroupNorm, nn.BatchNorm2d)


def no_decay_norm_bias_embedding(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """CLIP2SAM rule: norms, biases and embeddings (tokens) get no weight decay."""
    return isinstance(module, (*NORM_TYPES, nn.Embedding)) or name.endswith("bias") or param.ndim <= 1


def no_decay_reference_norms(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """The reference's rule (mmengine `norm_decay_mult=0`): parameters of LayerNorm, BatchNorm,
    GroupNorm and InstanceNorm modules get no weight decay; biases, tokens, other 1-D parameters and SAM's
    LayerNorm2d (not an nn.LayerNorm) keep it."""
    return isinstance(module, REFERENCE_NORM_TYPES)


REFERENCE_NORM_TYPES = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def no_decay_layernorm(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """SAM2CLIP rule: only nn.LayerNorm is exempt; SAM's LayerNorm2d keeps its decay."""
    return isinstance(module, nn.LayerNorm)


# `FinetuneConfig.weight_decay_groups`: the reference's exemptions (default) or ours, which also spare biases,
# tokens, every 1-D parameter and LayerNorm2d.
NO_DECAY_RULES: Dict[str, Callable[[nn.Module, str, nn.Parameter], bool]] = {
    "reference": no_decay_reference_norms,
    "extended": no_decay_norm_bias_embedding,
}


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay: Callable[[nn.Module, str, nn.Parameter], bool] = no_decay_reference_norms,
) -> List[Dict[str, Any]]:
    """Trainable parameters split into a decayed and a non-decayed group (frozen ones are left out)."""
    decay, plain, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (plain if no_decay(module, name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(groups: List[Dict[str, Any]], lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def default_warmup(total_steps: int, requested: Optional[int] = None) -> int:
    """The reference's 500 warm-up iterations, shortened to a tenth of short runs so they still train."""
    if requested is not None:
        return max(0, int(requested))
    return min(500, max(1, math.ceil(0.1 * total_steps)))


def warmup_multistep(
    total_steps: int, warmup_steps: int, milestones: Sequence[float] = (8 / 12, 11 / 12),
    gamma: float = 0.1, warmup_factor: float = 0.001,
) -> Callable[[int], float]:
    """LR factor per optimiser step: linear warm-up from `warmup_factor`, then x`gamma` at each milestone.

    Milestones are fractions of the run (the reference decays at epochs 8 and 11 of 12).
    """
    marks = sorted(int(round(m * total_steps)) for m in milestones)

    def factor(step: int) -> float:
        warm = 1.0
        if warmup_steps > 0 and step < warmup_steps:
            warm = warmup_factor + (1 - warmup_factor) * step / warmup_steps
        return warm * gamma ** sum(step >= m for m in marks)

    return factor


def warmup_cosine(
    total_steps: int, warmup_steps: int, final_factor: float = 0.01, warmup_factor: float = 0.001
) -> Callable[[int], float]:
    """Linear warm-up, then cosine annealing per step down to `final_factor` (SAM2CLIP)."""

    def factor(step: int) -> float:
        warm = 1.0
        if warmup_steps > 0 and step < warmup_steps:
            warm = warmup_factor + (1 - warmup_factor) * step / warmup_steps
        t = min(1.0, step / max(1, total_steps))
        return warm * (final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * t)))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> Dict[str, Any]:
    states: Dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(path: Path, state: Dict[str, Any]) -> None:
    """torch.save through a temporary file and rename: a crash mid-write leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_training_state(path: Path) -> Dict[str, Any]:
    # Our own checkpoints hold RNG states (numpy arrays, tuples), so full unpickling is needed.
    return torch.load(path, map_location="cpu", weights_only=False)


def trainable_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict entries of trainable parameters and all buffers of modules that have them."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k in names}


def parameters_with_grad(params: Iterable[nn.Parameter]) -> List[nn.Parameter]:
    return [p for p in params if p.requires_grad]
