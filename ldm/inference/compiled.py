"""`torch.compile` of the UNet for sampling, for the small-batch GPU case where a step is bound by the host's
kernel launches: `mode="reduce-overhead"` records the UNet once as CUDA graphs and replays them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ldm.inference.model import LatentDiffusionModel

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class CompiledUNet(nn.Module):
    """The UNet under `torch.compile(**options)`, called as the UNet is.

    Under CUDA graphs a call's output lives in the graph's own memory, which the next replay overwrites,
    and samplers keep estimates across steps (DPM-Solver's previous x_0, a conditional-only step's ε):
    each call starts a new graph step and returns a copy. The compiled code is built at the first call
    (minutes) and again for a new batch size or resolution.
    """

    def __init__(self, unet: nn.Module, **options: Any) -> None:
        super().__init__()
        self.unet = unet
        self.options = dict(options)
        self.graphs = options.get("mode") in CUDA_GRAPH_MODES
        self.compiled = torch.compile(unet.forward, **options)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, **kwargs: Tensor) -> Tensor:
        """`kwargs`: the UNet's other inputs (`y`, a class-conditional UNet's class ids)."""
        if not self.graphs:
            return self.compiled(x, t, context, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(x, t, context, **kwargs).clone()


def compile_for_sampling(model: LatentDiffusionModel, **options: Any) -> LatentDiffusionModel:
    """`model` with its UNet compiled in place for generation (its weights are the same tensors)."""
    model.unet = CompiledUNet(model.unet, **options)
    return model
