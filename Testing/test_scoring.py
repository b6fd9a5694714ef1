"""The anomaly score against a straightforward per-image reading of docs/METHOD.md (skimage CLAHE and blur, lpips per
image), with the real LPIPS-alex weights; its blur against skimage; and what the maps must show."""
import copy

import numpy as np
import pytest
import torch
from skimage import data, exposure, transform
from skimage.filters import gaussian

from ra_engine.core.errors import DataError
from ra_engine.scoring.scorer import AnomalyScorer, gaussian_blur, image_score, ScoreMaps


def slices(n: int, size=(128, 128), seed=0) -> torch.Tensor:
    """(n, 1, H, W) float32 in [0, 1]: crops of a real photograph at different places and scales."""
    rng = np.random.default_rng(seed)
    camera = data.camera().astype(np.float32) / 255
    out = []
    for _ in range(n):
        side = int(rng.integers(200, 512))
        y, x = rng.integers(0, 512 - side + 1, size=2)
        out.append(transform.resize(camera[y:y + side, x:x + side], size, anti_aliasing=True))
    return torch.from_numpy(np.stack(out).astype(np.float32))[:, None]


def reconstructions(x: torch.Tensor, seed=1) -> torch.Tensor:
    """A stand-in for x_ph: smoother than x, with some noise, slightly outside [0, 1] in places."""
    smooth = np.stack([gaussian(img, sigma=1.5) for img in x[:, 0].numpy()])
    noise = np.random.default_rng(seed).normal(0, 0.03, smooth.shape)
    return torch.from_numpy((smooth + noise).astype(np.float32))[:, None]


def reference_score(lpips_model, x: np.ndarray, x_ph: np.ndarray):
    """docs/METHOD.md for one (H, W) image, step by step."""
    x, x_ph = np.clip(x, 0, 1), np.clip(x_ph, 0, 1)

    def lpips_map(a, b):
        to3 = lambda img: torch.from_numpy(img)[None, None].repeat(1, 3, 1, 1)
        with torch.no_grad():
            return lpips_model(to3(a), to3(b), normalize=True)[0, 0].numpy()

    blur = lambda m: gaussian(m, sigma=2, mode="reflect", preserve_range=True)
    clahe_x, clahe_ph = exposure.equalize_adapthist(x), exposure.equalize_adapthist(x_ph)
    s1 = blur(lpips_map(x, x_ph))
    s2 = blur(lpips_map(clahe_x, clahe_ph))
    return np.abs(clahe_ph - clahe_x) * s1 * s2, s1, s2


@pytest.mark.parametrize("shape", [(128, 128), (37, 53), (5, 4), (1, 9)])
@pytest.mark.parametrize("sigma", [2.0, 0.7])
def test_blur_equals_skimage_reflect(shape, sigma):
    maps = np.random.default_rng(0).random((3, 2) + shape).astype(np.float32)
    expected = np.stack([[gaussian(m, sigma=sigma, mode="reflect", preserve_range=True) for m in pair] for pair in maps])
    got = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_batched_scorer_equals_per_image_reference(scorer, lpips_alex):
    x = slices(4)
    x_ph = reconstructions(x)
    maps = scorer.score(x, x_ph)
    for i in range(len(x)):
        anomaly, s1, s2 = reference_score(lpips_alex, x[i, 0].numpy(), x_ph[i, 0].numpy())
        np.testing.assert_allclose(maps.s1[i], s1, rtol=0, atol=1e-5)
        np.testing.assert_allclose(maps.s2[i], s2, rtol=0, atol=1e-5)
        np.testing.assert_allclose(maps.anomaly[i], anomaly, rtol=0, atol=1e-5)
    assert maps.anomaly.max() > 1e-3  # the comparison is not between two empty maps


def test_maps_have_the_documented_shapes_and_types(scorer):
    x = slices(2, size=(64, 96))
    maps = scorer.score(x, reconstructions(x))
    assert isinstance(maps, ScoreMaps)
    for name in ("anomaly", "s1", "s2", "clahe_x", "clahe_ph"):
        value = getattr(maps, name)
        assert isinstance(value, np.ndarray) and value.dtype == np.float32 and value.shape == (2, 64, 96), name
    assert maps.anomaly.min() >= 0
    assert maps.clahe_x.min() >= 0 and maps.clahe_x.max() <= 1


def test_inputs_are_clamped_to_the_unit_range(scorer):
    x = slices(2, size=(64, 64))
    x_ph = reconstructions(x)
    stretched = scorer.score(x * 1.5 - 0.25, x_ph * 1.5 - 0.25)
    clamped = scorer.score((x * 1.5 - 0.25).clamp(0, 1), (x_ph * 1.5 - 0.25).clamp(0, 1))
    np.testing.assert_array_equal(stretched.anomaly, clamped.anomaly)


def test_identical_images_score_zero(scorer):
    x = slices(3)
    maps = scorer.score(x, x.clone())
    assert maps.anomaly.max() == 0
    assert np.abs(maps.s1).max() < 1e-6 and np.abs(maps.s2).max() < 1e-6


def test_local_change_peaks_at_the_change(scorer):
    x_ph = slices(2, seed=5)
    x = x_ph.clone()
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    centres = [(40, 90), (96, 30)]
    for i, (cy, cx) in enumerate(centres):
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 6 ** 2).float()
        x[i, 0] = torch.maximum(x[i, 0], blob)  # a bright lesion
    maps = scorer.score(x, x_ph)
    for i, (cy, cx) in enumerate(centres):
        py, px = np.unravel_index(np.argmax(maps.anomaly[i]), maps.anomaly[i].shape)
        assert np.hypot(py - cy, px - cx) <= 8, (i, (py, px))
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 10 ** 2).numpy()
        assert image_score(maps.anomaly[i], inside) > 10 * image_score(maps.anomaly[i], ~inside)


def test_image_score_is_the_mean_inside_the_mask():
    anomaly = np.arange(12, dtype=np.float32).reshape(3, 4)
    mask = np.zeros((3, 4), bool)
    mask[1, 1:3] = True
    assert image_score(anomaly) == pytest.approx(5.5)
    assert image_score(anomaly, mask) == pytest.approx(5.5)
    mask[2, 3] = True
    assert image_score(anomaly, mask) == pytest.approx((5 + 6 + 11) / 3)
    assert image_score(np.stack([anomaly, anomaly]), np.stack([mask, np.zeros_like(mask)])) == pytest.approx(22 / 3)
    with pytest.raises(DataError, match="empty"):
        image_score(anomaly, np.zeros((3, 4), bool))
    with pytest.raises(DataError, match="shape"):
        image_score(anomaly, mask[:2])


def test_bad_inputs_are_refused(scorer, lpips_alex):
    x = slices(2, size=(64, 64))
    with pytest.raises(DataError, match=r"\(N, 1, H, W\)"):
        scorer.score(x, x[:1])
    with pytest.raises(DataError):
        scorer.score(x[:, 0], x[:, 0])
    flat = copy.deepcopy(lpips_alex)
    flat.spatial = False
    with pytest.raises(ValueError, match="spatial=True"):
        AnomalyScorer(flat)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_scores_match_cpu(scorer, lpips_alex):
    x = slices(4)
    x_ph = reconstructions(x)
    on_gpu = AnomalyScorer(copy.deepcopy(lpips_alex).cuda()).score(x.cuda(), x_ph.cuda())
    on_cpu = scorer.score(x, x_ph)
    np.testing.assert_allclose(on_gpu.anomaly, on_cpu.anomaly, rtol=0, atol=1e-4)
