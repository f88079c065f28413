"""The discrete variance-preserving noise schedule: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε."""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")


def _betas(kind: str, num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "cosine":
        return _cosine_betas(num_timesteps)
    raise ValueError(f"Unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")


def cosine_alpha_bar(u: float, s: float = 0.008) -> float:
    """Nichol & Dhariwal's ᾱ(u) for continuous time u in [0, 1], before normalising by ᾱ(0)."""
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def _cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> Tensor:
    betas = [
        min(1 - cosine_alpha_bar((i + 1) / num_timesteps) / cosine_alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(ᾱ) so that ᾱ_{T-1} = 0 while ᾱ_0 is unchanged."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def _gather(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """table[t] reshaped to broadcast against a tensor of `ndim` dimensions with batch first."""
    values = table.to(t.device)[t.long()]
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


class NoiseSchedule:
    """Betas and ᾱ for `num_timesteps` discrete steps.

    The tables are computed in float64 (kept as `*_f64` on the host for samplers, whose step
    coefficients lose precision in float32 at small t) and exposed as float32 tensors for training.
    """

    def __init__(
        self,
        kind: str = "scaled_linear",
        num_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ) -> None:
        self.kind = kind
        self.num_timesteps = num_timesteps
        self.zero_terminal_snr = zero_terminal_snr
        betas = _betas(kind, num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas_f64 = betas
        self.alphas_cumprod_f64 = torch.cumprod(1 - betas, dim=0)
        if zero_terminal_snr:
            self.alphas_cumprod_f64[-1] = 0.0
        self.betas = betas.float()
        self.alphas_cumprod = self.alphas_cumprod_f64.float()
        self.sigmas = ((1 - self.alphas_cumprod_f64) / self.alphas_cumprod_f64).sqrt().float()

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, num_timesteps={self.num_timesteps}, zero_terminal_snr={self.zero_terminal_snr})"

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Moves the float32 tables; the float64 host tables stay on the CPU."""
        self.betas = self.betas.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        self.sigmas = self.sigmas.to(device)
        return self

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t ~ q(x_t | x_0) for integer timesteps t of shape (B,)."""
        alpha_bar = _gather(self.alphas_cumprod, t, x0.ndim).to(x0.dtype)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def snr(self, t: Tensor) -> Tensor:
        """ᾱ_t / (1 - ᾱ_t), shape (B,); 0 at a zero-SNR terminal step."""
        alpha_bar = self.alphas_cumprod.to(t.device)[t.long()]
        return alpha_bar / (1 - alpha_bar)

    def alpha_bar(self, t: Tensor, ndim: int = 1) -> Tensor:
        """ᾱ_t for integer t, shaped to broadcast against an `ndim`-dimensional batch."""
        return _gather(self.alphas_cumprod, t, ndim)
