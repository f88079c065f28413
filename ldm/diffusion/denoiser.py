"""The denoiser: a network and its parameterisation (eps, v or x0), seen by samplers as one interface.

A network predicts ε, v or x_0 from the noisy x_t; a sampler wants x_0 and ε. Only this class knows
which the network predicts (sgm's `Denoiser`, k-diffusion's `VDenoiser`/`CompVisDenoiser`), so
samplers carry no `prediction` setting and guidance wraps the network below it.

Two forms of the same map, each written as the samplers' arithmetic has always been, so results do
not move by a rounding:
  * `predict(x_t, t, alpha_bar)` for a variance-preserving x_t = sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε;
  * `denoise(x, t, sigma)` for the k-diffusion state x = x_0 + sigma ε with sigma² = (1 - ᾱ) / ᾱ,
    i.e. Karras et al.'s preconditioning x_0 = c_skip x + c_out F(c_in x).
"""

from __future__ import annotations

import math
from typing import Callable

from torch import Tensor

PREDICTIONS = ("eps", "v", "x0")

Network = Callable[[Tensor, Tensor], Tensor]
"""network(x_t, t) -> the raw prediction, with x_t variance-preserving and t float DDPM timesteps (B,)."""


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"Unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    return prediction


class Denoiser:
    """`network` (a UNet with its conditioning bound, or a guided one) and what it predicts."""

    def __init__(self, network: Network, prediction: str) -> None:
        self.network = network
        self.prediction = check_prediction(prediction)

    def __repr__(self) -> str:
        return f"Denoiser(prediction={self.prediction!r})"

    def predict(self, x: Tensor, t: Tensor, alpha_bar: float) -> tuple[Tensor, Tensor]:
        """(x_0, ε) estimated at a variance-preserving x with noise level ᾱ (a host float)."""
        alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
        if self.prediction == "eps" and alpha == 0.0:
            raise ValueError("An ε-prediction model cannot denoise at zero SNR (ᾱ = 0): its ε is the input itself; use prediction='v'")
        if self.prediction == "x0" and sigma == 0.0:
            raise ValueError("An x0-prediction model's ε is undefined at ᾱ = 1 (no noise)")
        out = self.network(x, t)
        if self.prediction == "eps":
            return (x - sigma * out) / alpha, out
        if self.prediction == "v":
            return alpha * x - sigma * out, alpha * out + sigma * x
        return out, (x - alpha * out) / sigma

    def denoise(self, x: Tensor, t: Tensor, sigma: float) -> Tensor:
        """The x_0 estimate at the k-diffusion state x = x_0 + sigma ε (sigma a host float)."""
        out = self.network(x * (1 / math.sqrt(sigma**2 + 1)), t)
        if self.prediction == "eps":
            return x - sigma * out
        if self.prediction == "v":
            return out * (-sigma / math.sqrt(sigma**2 + 1)) + x * (1 / (sigma**2 + 1))
        return out
