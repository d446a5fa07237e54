"""An exponential moving average of the weights, with timm's ModelEmaV3 semantics.

timm is a test dependency only, so the few lines are ours; they mirror
timm.utils.model_ema.ModelEmaV3 (timm 1.0): a copy of the model whose every floating-point
state entry (parameters and buffers, BN statistics included) moves as
    ema <- decay * ema + (1 - decay) * model        (torch.lerp with weight 1 - decay)
after each optimizer step, integer entries (BN's num_batches_tracked) copied; decay 0 at the
first update (the average starts as the weights), then with warm-up
    decay(t) = min(1 - (1 + t)^(-2/3), decay),  t = update number - 1
(ModelEmaV3.get_decay with warmup_gamma 1, warmup_power 2/3, min_decay 0, update_after_step 0).
The copy is kept in FP32 whatever the autocast dtype, in eval mode, and never trained.

The average depends only on the weights after each step and the step's number, so the resume
state (its tensors and nothing else) resumes it exactly.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

WARMUP_POWER = 2 / 3  # timm's default warmup_power (inv_gamma 1): decay 0.999 after ~31.6k steps


class WeightEma:
    """The FP32 moving average of `model`'s state; `module` is a model to evaluate and save."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool) -> None:
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).float().eval()
        self.module.requires_grad_(False)

    def decay_at(self, update: int) -> float:
        """The decay of the `update`-th update (1-based), as ModelEmaV3.get_decay(step=update)."""
        t = update - 1
        if t <= 0:
            return 0.0
        if not self.warmup:
            return self.decay
        return min(1.0 - (1.0 + t) ** -WARMUP_POWER, self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module, update: int) -> None:
        """Move the average towards `model`'s current state; `update` counts from 1 (the global step)."""
        weight = 1.0 - self.decay_at(update)
        for ema_value, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_value.is_floating_point():
                ema_value.lerp_(value.detach().to(ema_value.dtype), weight)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
