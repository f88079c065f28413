"""Exponential moving average of a model's weights (the EMA UNet used for sampling and export)."""

import copy
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def _floating_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]


class EMA(nn.Module):
    """A frozen copy of ``model`` whose parameters track ``shadow <- decay * shadow + (1 - decay) * param``.

    The copy is a full module (``ema.module``), so it can be called directly for sampling or exported;
    buffers (e.g. normalisation statistics) are copied, not averaged. With ``warmup`` the decay of the
    n-th update is ``min(decay, (1 + n) / (10 + n))`` as in CompVis' ``LitEma``, so early weights are not
    dominated by the random initialisation. ``update`` does its arithmetic on the device with foreach
    kernels and never reads a value back to the host.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.grad = None
        self.module.requires_grad_(False)
        self.module.train(False)
        device = next(iter(self.module.parameters()), torch.empty(0)).device
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long, device=device))
        # Buffers are re-walked at each update (`.to()` replaces buffer tensors, not Parameters), unless
        # there are none, as in the UNets: the walk cost more than the update's arithmetic.
        self._has_buffers = any(True for _ in self.module.buffers())
        self._paired: tuple[weakref.ref, list[Tensor], list[Tensor]] | None = None

    def train(self, mode: bool = True) -> "EMA":
        """The averaged copy is only ever evaluated, so it stays in eval mode."""
        return super().train(False)

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """(averaged, live) parameter lists, matched by name on the first call for a given `model` object
        and kept: walking a UNet's modules every optimizer step cost more than the averaging itself.
        Moving a module (`.to`) keeps its Parameter objects, so the kept lists stay valid."""
        if self._paired is not None and self._paired[0]() is model:
            return self._paired[1], self._paired[2]
        shadow = _floating_parameters(self.module)
        live = _floating_parameters(model)
        if [n for n, _ in shadow] != [n for n, _ in live]:
            raise ValueError("The model's parameters do not match the ones this EMA was created from")
        self._paired = (weakref.ref(model), [p for _, p in shadow], [p for _, p in live])
        return self._paired[1], self._paired[2]

    def current_decay(self) -> Tensor:
        """The decay the next update will use, as a device tensor."""
        if not self.warmup:
            return torch.full((), self.decay, device=self.num_updates.device)
        n = (self.num_updates + 1).float()
        return torch.clamp((1.0 + n) / (10.0 + n), max=self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        shadow, live = self._pairs(model)
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(shadow, live, weight)
        self._copy_buffers(src=model, dst=self.module)
        self.num_updates.add_(1)

    def _copy_buffers(self, src: nn.Module, dst: nn.Module) -> None:
        if not self._has_buffers:
            return
        dst_buffers = list(dst.buffers())
        if dst_buffers:
            torch._foreach_copy_(dst_buffers, list(src.buffers()))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the averaged ones."""
        shadow, live = self._pairs(model)
        torch._foreach_copy_(live, shadow)
        self._copy_buffers(src=self.module, dst=model)

    @contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``model``; its own weights come back exactly on exit."""
        with torch.no_grad():
            _, live = self._pairs(model)
            saved_params = [p.detach().clone() for p in live]
            saved_buffers = [b.detach().clone() for b in model.buffers()]
            self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, saved_params)
                if saved_buffers:
                    torch._foreach_copy_(list(model.buffers()), saved_buffers)

    swap = average_parameters
