"""The batched torch CLAHE against skimage's `equalize_adapthist` with its defaults, image by image: identical results
(max difference 0) on real T1 slices, noise, constant and low-range images, sizes that are not multiples of the
kernel, a radiograph-sized image; the histogram clipping against skimage's `clip_histogram` on random and adversarial
histograms (many passes of its loop, a stall); and the float32-only path (for devices without float64)."""
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import exposure
from skimage.exposure._adapthist import clip_histogram

from ra_engine.scoring.clahe import _clip_histograms, clahe_torch, kernel_size_for, NBINS
from ra_engine.io.images import read_image

RESOURCES = Path(__file__).resolve().parents[1] / "ra_engine" / "resources"
SCANS = ["samples/mni152_2009a_t1.nii.gz", "samples/itk_subject_t1.nii.gz", "samples/fsl_mni152_t1_brain.nii.gz",
         "reference/head.nii.gz"]


def skimage_clahe(images: np.ndarray) -> np.ndarray:
    return np.stack([exposure.equalize_adapthist(image).astype(np.float32) for image in images])


def assert_same(images: np.ndarray, **kwargs) -> None:
    images = np.ascontiguousarray(images)
    expected = skimage_clahe(images)
    got = clahe_torch(torch.from_numpy(images), **kwargs)
    assert got.dtype == torch.float32 and got.shape == images.shape
    got = got.numpy()
    diff = np.abs(got.astype(np.float64) - expected)
    assert diff.max() == 0, f"max difference {diff.max()} in {(diff > 0).sum()} pixels"


@functools.lru_cache(maxsize=None)
def scan(name: str) -> np.ndarray:
    """A bundled T1 scaled to [0, 1] by its range (read-only)."""
    volume = read_image(RESOURCES / name).array.astype(np.float32)
    volume = (volume - volume.min()) / (volume.max() - volume.min())
    volume.setflags(write=False)
    return volume


def scan_slices(name: str, size: int | None, step: int = 1) -> np.ndarray:
    """Axial slices of a bundled T1, scaled to [0, 1] by the volume's range, resized to size x size (bilinear) or
    at their own size (None)."""
    volume = scan(name)
    stack = torch.from_numpy(volume[::step].copy())
    if size is not None:
        stack = F.interpolate(stack[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return stack.clamp(0, 1).numpy()


@pytest.mark.parametrize("name", SCANS)
@pytest.mark.parametrize("size", [64, 128])
def test_t1_slices_model_grid(name, size):
    assert_same(scan_slices(name, size, step=3))


@pytest.mark.parametrize("name", SCANS)
def test_t1_slices_native_size(name):
    # 129x105, 128x128, 129x104, 152x129: kernels 16x13, 16x16, 16x13, 19x16 (not multiples, not powers of two)
    assert_same(scan_slices(name, None, step=9))


@pytest.mark.parametrize("shape", [(64, 64), (128, 128), (100, 130), (96, 96), (256, 256), (17, 9), (5, 7),
                                   (1, 1), (1, 20), (8, 8), (7, 300)])
def test_noise(shape):
    rng = np.random.default_rng(sum(shape))
    assert_same(rng.random((3, *shape), dtype=np.float32))


@pytest.mark.parametrize("value", [0.0, 1.0, 0.5, 0.3, 1 / 65535, 0.25 / 65535])
def test_constant_images(value):
    images = np.full((2, 64, 64), value, np.float32)
    assert_same(images)
    # skimage's behaviour, for the record: with a kernel whose sides are powers of two, all ones
    assert np.all(clahe_torch(torch.from_numpy(images)).numpy() == 1)
    # with others, the interpolation weights' rounding makes some pixels one level lower: 0s among the 1s
    for shape in ((96, 96), (100, 130)):
        assert_same(np.full((1, *shape), value, np.float32))


@pytest.mark.parametrize("levels", [2, 3, 4, 5, 6, 7, 12, 100])
def test_few_levels_and_ties(levels):
    """Images whose 16-bit values span only a few levels: the 14-bit rescale lands on exact halves (ties). Also with
    exact=False, whose 14-bit rescale is integer arithmetic (64x64: its float32 interpolation is exact)."""
    rng = np.random.default_rng(levels)
    base = rng.integers(0, levels, (3, 64, 64))
    assert_same((base / 65535 + 0.37).astype(np.float32))
    assert_same((base / 65535 + 0.37).astype(np.float32), exact=False)
    assert_same(base / 65535 + 0.6)  # float64 input


@pytest.mark.parametrize("span, level", [(254, 1), (86, 29)])
def test_tie_on_a_bin_boundary(span, level):
    """16383 * level / span is exactly k + 1/2 with k even and k % 65 == 64: skimage's round-half-even keeps k (bin
    k // 65), rounding up would move the pixel to the next bin."""
    rng = np.random.default_rng(span)
    u = 20000 + rng.choice([0, level, span], size=(2, 64, 64), p=[0.3, 0.4, 0.3])
    images = (u / 65535).astype(np.float32)
    assert np.array_equal(np.rint(images * np.float32(65535)), u)
    assert_same(images)
    assert_same(images, exact=False)


def test_small_range_and_sub_quantum_range():
    rng = np.random.default_rng(7)
    assert_same((0.5 + 1e-3 * rng.random((3, 128, 128))).astype(np.float32))
    # values closer than 1/65535 collapse to one or two 16-bit levels, as in skimage
    assert_same((0.5 + 1e-6 * rng.random((3, 64, 64))).astype(np.float32))


def test_structured_images():
    rng = np.random.default_rng(11)
    binary = (rng.random((2, 128, 128)) > 0.5).astype(np.float32)
    half_black = np.pad(rng.random((2, 128, 64), dtype=np.float32), ((0, 0), (0, 0), (64, 0)))
    ramp = np.broadcast_to(np.linspace(0, 1, 130, dtype=np.float32), (2, 100, 130))
    assert_same(np.concatenate([binary, half_black]))
    assert_same(ramp)


def test_non_contiguous_input():
    rng = np.random.default_rng(4)
    images = rng.random((3, 100, 130), dtype=np.float32)
    transposed = torch.from_numpy(images).transpose(1, 2)  # (3, 130, 100), not contiguous
    np.testing.assert_array_equal(clahe_torch(transposed).numpy(),
                                  skimage_clahe(np.ascontiguousarray(images.transpose(0, 2, 1))))


def test_negative_values_count_as_zero():
    rng = np.random.default_rng(3)
    assert_same((rng.random((2, 64, 64)) * 2 - 1).astype(np.float32))


def test_float64_and_float16_inputs():
    rng = np.random.default_rng(5)
    x = rng.random((2, 96, 80))
    assert_same(x)
    half = torch.from_numpy(x).to(torch.float16)
    np.testing.assert_array_equal(clahe_torch(half).numpy(), skimage_clahe(half.float().numpy()))


@pytest.mark.slow
def test_radiograph_size():
    """2048 wide, as a radiograph at full resolution (kernel 192x256; the uniform increment of the clipping runs)."""
    rng = np.random.default_rng(2)
    ramp = np.linspace(0, 1, 2048, dtype=np.float32)[None, :] * np.linspace(0.2, 1, 1536, dtype=np.float32)[:, None]
    image = np.clip(ramp + 0.05 * rng.standard_normal((1536, 2048), dtype=np.float32), 0, 1)
    image[:300, :500] = 0  # a flat background: tiles with one full bin
    assert_same(image[None])


def test_float32_only_path():
    """exact=False (MPS, no float64): identical for power-of-two kernels; close otherwise."""
    slices = scan_slices(SCANS[0], 128, step=4)
    np.testing.assert_array_equal(clahe_torch(torch.from_numpy(slices), exact=False).numpy(), skimage_clahe(slices))
    rng = np.random.default_rng(1)
    noise = rng.random((4, 100, 130), dtype=np.float32)
    diff = np.abs(clahe_torch(torch.from_numpy(noise), exact=False).numpy() - skimage_clahe(noise))
    assert diff.max() <= 2.5 / 16383


def reference_clip(hist: np.ndarray, limit: int) -> np.ndarray:
    """skimage's clip_histogram row by row (on copies: it works in place)."""
    return np.stack([clip_histogram(row.copy(), limit) for row in hist])


@pytest.mark.parametrize("limit", [1, 2, 5, 40])
def test_clip_histograms_against_skimage(limit):
    """Random histograms of every shape (every row the same total, as tiles are), and all in one bin."""
    rng = np.random.default_rng(limit)
    total = 256 * limit // 2 + 37
    rows = []
    for concentration in (0.01, 0.1, 1.0, 10.0):
        for _ in range(40):
            rows.append(rng.multinomial(total, rng.dirichlet(np.full(NBINS, concentration))))
    one_bin = np.zeros(NBINS, np.int64)
    one_bin[3] = total
    rows.append(one_bin)
    hist = np.stack(rows)
    expected = reference_clip(hist, limit)
    got = _clip_histograms(torch.tensor(hist, dtype=torch.int32), limit, total)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_clip_histograms_many_passes():
    """One bin under the limit (deficit 40) and an excess of 50: with the bin at index 0 skimage's loop adds one to it
    per pass over the 256 indices, 40 passes, then a 41st that changes nothing ends the loop with excess left; at
    index 1 two per pass (21 passes), further on 2 passes. All four rows in one batch."""
    limit, excess = 40, 10
    rows = []
    for under_bin in (0, 1, 100, 255):
        row = np.full(NBINS, limit, np.int64)
        row[under_bin] = 0
        row[(under_bin + 1) % NBINS] += excess + limit
        rows.append(row)
    hist = np.stack(rows)
    expected = reference_clip(hist, limit)
    got = _clip_histograms(torch.tensor(hist), limit, int(hist[0].sum()))
    np.testing.assert_array_equal(got.numpy(), expected)
    assert (expected != np.minimum(hist, limit)).any()


def test_clip_histograms_stalls_like_skimage():
    """More excess than the bins can take: skimage stops after a pass that changes nothing."""
    limit, total = 2, 600
    hist = np.zeros((2, NBINS), np.int64)
    hist[0, 0] = total
    hist[1, :] = 2
    hist[1, 5] += total - hist[1].sum()
    expected = reference_clip(hist, limit)
    got = _clip_histograms(torch.tensor(hist), limit, total)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_kernel_size_and_errors():
    assert kernel_size_for(128, 128) == (16, 16)
    assert kernel_size_for(100, 130) == (12, 16)
    assert kernel_size_for(5, 9) == (1, 1)
    assert clahe_torch(torch.zeros(0, 64, 64)).shape == (0, 64, 64)
    with pytest.raises(ValueError, match="between -1 and 1"):
        clahe_torch(torch.full((1, 8, 8), 1.5))
    with pytest.raises(ValueError, match="between -1 and 1"):
        clahe_torch(torch.full((1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        clahe_torch(torch.zeros(8, 8))
    with pytest.raises(TypeError):
        clahe_torch(torch.zeros(1, 8, 8, dtype=torch.int64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_skimage():
    slices = scan_slices(SCANS[0], 128, step=2)
    rng = np.random.default_rng(9)
    noise = rng.random((4, 100, 130), dtype=np.float32)
    for images in (slices, noise):
        got = clahe_torch(torch.from_numpy(images).cuda())
        assert got.device.type == "cuda"
        np.testing.assert_array_equal(got.cpu().numpy(), skimage_clahe(images))
