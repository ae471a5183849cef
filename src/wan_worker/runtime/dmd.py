"""The DMD few-step sampler, built from diffusers' own flow-match Euler scheduler.

A DMD-distilled model is trained to predict the clean latent from a few fixed timesteps. At
each one: ``x0 = x - sigma * v`` (from the flow prediction ``v``), then re-noise to the next
timestep with fresh noise, ``x = (1 - sigma_next) * x0 + sigma_next * noise``; the last step
returns ``x0``. ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` is exactly this
update. Two things ``WanPipeline`` doesn't do for it, so this subclass does:

* the pipeline calls ``set_timesteps(num_inference_steps, device)`` only, so the fixed
  schedule is kept on the scheduler and applied there;
* the pipeline calls ``step`` without a generator, so the re-noise would draw from torch's
  global RNG; the job's seeded generator is kept here and passed on, so a seed reproduces
  the output exactly.

The schedule is data (timesteps and a grid shift), so the sampler runs any Wan transformer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

NUM_TRAIN_TIMESTEPS = 1000


def dmd_sigmas(timesteps: Sequence[float], grid_shift: float) -> list[float]:
    """The sigma of each timestep, looked up on the shifted 1000-step training grid.

    This is FastVideo's nearest-timestep lookup (``pred_noise_to_pred_video`` and
    ``add_noise`` on ``FlowMatchEulerDiscreteScheduler(shift=8.0)``): timestep 757 gets the
    grid sigma nearest to 0.757, not a re-shifted one.
    """
    grid = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=grid_shift)
    return [float(grid.sigmas[int(torch.argmin((grid.timesteps - float(t)).abs()))]) for t in timesteps]


class DMDScheduler(FlowMatchEulerDiscreteScheduler):
    """Stochastic flow-match Euler on a fixed schedule, re-noising from the job's generator."""

    fixed_timesteps: list[float]
    _fixed_sigmas: list[float]
    _generator: torch.Generator | None

    @classmethod
    def for_schedule(
        cls, timesteps: Sequence[float], grid_shift: float, generator: torch.Generator | None
    ) -> DMDScheduler:
        # shift=1.0: the sigmas are already on the shifted grid and must not be shifted again.
        scheduler = cls(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0, stochastic_sampling=True)
        scheduler.fixed_timesteps = [float(t) for t in timesteps]
        scheduler._fixed_sigmas = dmd_sigmas(timesteps, grid_shift)
        scheduler._generator = generator
        return scheduler

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, **_: Any) -> None:
        """The fixed schedule; diffusers checks that ``num_inference_steps`` matches its length."""
        super().set_timesteps(
            num_inference_steps, device=device, sigmas=self._fixed_sigmas, timesteps=self.fixed_timesteps
        )

    def step(self, *args: Any, generator: torch.Generator | None = None, **kwargs: Any):
        return super().step(*args, generator=generator or self._generator, **kwargs)
