"""Generated bad inputs (hypothesis): `ra_engine.detect` on arrays and `Image`s of every shape (2D, 3D, 4D, one slice,
8 x 8, very thin or elongated, empty), dtype (uint8 to float64, signed, big-endian, non-contiguous), spacing (tiny,
huge, anisotropic), direction (oblique, left-handed, singular), origin, content (noise, smooth blobs, constant, NaN,
inf) and colour (RGB, RGBA) returns outputs on the input's grid or raises one of the engine's documented errors
(`RAError`: DataError, ModelError), never another exception."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import ra_engine
from robust_helpers import scaled
from ra_engine.core.image import Geometry, Image
from ra_engine.io.images import read_image
from test_detect import MNI, rotation

DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32", "float64")
SPACINGS = (1e-6, 1e-3, 0.3, 1.0, 2.9, 1e3, 1e6)
ORIGINS = (-1e6, -120.5, 0.0, 33.3, 1e6)
CONTENTS = ("noise", "blob", "constant", "nan", "inf", "zeros")
SIDES = (1, 2, 3, 8, 17, 64, 301)


def _values(content: str, shape: tuple[int, ...], dtype: np.dtype, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if content in ("constant", "zeros"):
        return np.full(shape, 0 if content == "zeros" else 7, dtype=dtype)
    if content == "blob" and len(shape) >= 2:
        axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        unit = np.exp(-sum(a**2 for a in axes) * 3) + 0.05 * rng.random(shape)
    else:
        unit = rng.random(shape)
    if np.issubdtype(dtype, np.integer):
        low, high = max(np.iinfo(dtype).min, -2**30), min(np.iinfo(dtype).max, 2**30)  # the full range of its bits
        array = (low + unit * (high - low)).astype(dtype)
    else:
        array = (unit * 1000 - 200).astype(dtype)
    if content in ("nan", "inf") and np.issubdtype(dtype, np.floating) and array.size:
        array.flat[rng.integers(array.size)] = np.nan if content == "nan" else -np.inf
    return array


@st.composite
def bad_inputs(draw, usual: str, max_voxels: int = 40_000):
    """(array, spacing, origin, direction, as_image, expected output shape) for one generated input; `usual`, the
    kind the model takes ("2d" or "3d"), is drawn as often as all the others together."""
    others = [k for k in ("2d", "one-slice", "3d", "4d", "rgb", "rgba", "empty") if k != usual]
    kind = draw(st.sampled_from([usual] * len(others) + others))
    if kind == "2d":
        shape = (draw(st.sampled_from(SIDES)), draw(st.sampled_from(SIDES)))
    elif kind == "one-slice":
        shape = (1, draw(st.sampled_from(SIDES)), draw(st.sampled_from(SIDES)))
    elif kind == "3d":
        shape = tuple(draw(st.sampled_from((1, 2, 3, 8, 20, 40))) for _ in range(3))
    elif kind == "4d":
        shape = (2, 3, 8, 8)
    elif kind == "empty":
        shape = draw(st.sampled_from([(0, 8), (8, 0), (0, 0, 0), (4, 0, 6)]))
    else:  # sides of at least 5: smaller (y, x, 3) arrays are taken for volumes (`detect_array`)
        shape = (draw(st.sampled_from(SIDES[3:])), draw(st.sampled_from(SIDES[3:])), 3 if kind == "rgb" else 4)
    while np.prod(shape) > max_voxels:
        shape = tuple(max(1, s // 2) if s > 4 else s for s in shape)
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    if draw(st.booleans()) and dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">")  # big-endian, as NIfTI and DICOM files may store it
    content = draw(st.sampled_from(CONTENTS))
    array = _values(content, shape, dtype.newbyteorder("="), draw(st.integers(0, 2**16)))
    array = array.astype(dtype)
    if draw(st.booleans()) and array.ndim >= 2:
        array = np.asfortranarray(array)  # a non-C-contiguous buffer
    geometric = array.ndim if kind not in ("rgb", "rgba") else 2
    spacing = tuple(draw(st.sampled_from(SPACINGS)) for _ in range(geometric))
    origin = tuple(draw(st.sampled_from(ORIGINS)) for _ in range(geometric))
    turn = draw(st.sampled_from(["identity", "oblique", "left-handed", "oblique-left-handed", "singular"]))
    if geometric in (2, 3):
        angle = draw(st.integers(-180, 180)) / 57.3  # integers: an in-process training leaves denormals flushed
        matrix = rotation((0.3, 1.0, 0.2), np.degrees(angle))[:geometric, :geometric] if geometric == 3 else \
            np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        if turn == "identity":
            matrix = np.eye(geometric)
        elif turn == "left-handed":
            matrix = np.diag([-1.0] + [1.0] * (geometric - 1))
        elif turn == "oblique-left-handed":
            matrix = matrix @ np.diag([-1.0] + [1.0] * (geometric - 1))
        elif turn == "singular":
            matrix = np.zeros((geometric, geometric))
        direction = matrix
    else:
        direction = None
    as_image = kind not in ("rgb", "rgba", "4d") and draw(st.booleans())
    expected = shape[:2] if kind in ("rgb", "rgba") else shape
    event(f"kind {kind}, content {content}, direction {turn}")
    return array, spacing, origin, direction, as_image, expected


def run_detect(model, scorer, array, spacing, origin, direction, as_image, expected, out: Path | None = None) -> str:
    """Detection on one generated input; checks a result's grid (and, with `out`, writes its outputs there as `ra
    detect` does) and returns the outcome's name."""
    geometry = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if as_image:
                geometry = Geometry(tuple(map(float, spacing)), tuple(map(float, origin)),
                                    tuple(float(v) for v in np.asarray(direction).ravel()))
                found = ra_engine.detect(model, Image(np.asarray(array, np.float32), geometry, "generated"),
                                         scorer=scorer)
            else:
                found = ra_engine.detect(model, array, spacing=spacing, origin=origin, direction=direction,
                                         scorer=scorer)
    except ra_engine.RAError as exc:  # DataError, ModelError: the documented refusals, with a message
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return type(exc).__name__
    for result in (found.pseudo_healthy, found.anomaly, found.mask, found.detections_at(threshold=0.5)):
        assert result.array.shape == tuple(expected)
        assert result.geometry.spacing == tuple(float(s) for s in spacing)
        assert result.geometry.origin == tuple(float(o) for o in origin)
        if geometry is not None:
            assert result.geometry == geometry
        assert np.isfinite(result.array).all()
    assert np.isfinite(found.scan_score)
    if out is not None:
        source = Image(np.asarray(array, np.float32), found.anomaly.geometry, "generated.nii.gz")
        report = ra_engine.save_detection(model, source, found, out, threshold=0.5)
        assert report["threshold"] == 0.5 and (out / "generated_anomaly_map.nii.gz").is_file()
    return "result"


@pytest.mark.long
@settings(max_examples=scaled(40, 400), deadline=None)
@given(case=bad_inputs("2d"))
def test_xray_detection_gives_results_on_the_grid_or_a_documented_error(tiny_models, scorer, case):
    event("outcome " + run_detect(tiny_models["xray"], scorer, *case))


@pytest.mark.long
@settings(max_examples=scaled(20, 200), deadline=None)
@given(case=bad_inputs("3d"))
def test_brain_detection_gives_results_on_the_grid_or_a_documented_error(tiny_models, scorer, case):
    event("outcome " + run_detect(tiny_models["brain-mri"], scorer, *case))


@pytest.fixture(scope="module")
def small_head():
    """The bundled MNI head at a third of its resolution (about 66 x 78 x 63 voxels of 3 mm)."""
    image = read_image(MNI)
    array = image.array[::3, ::3, ::3].copy()
    return array, tuple(3 * s for s in image.geometry.spacing)


@pytest.mark.long
@settings(max_examples=scaled(4, 30), deadline=None)
@given(dtype=st.sampled_from(("uint8", "int16", "float32", "float64")), yaw=st.integers(-40, 40),
       flip=st.booleans(), stretch=st.sampled_from((1.0, 0.5, 2.0)), noise=st.sampled_from((0.0, 0.2)))
def test_a_real_head_on_any_grid_gives_results_on_that_grid_or_a_documented_error(tiny_models, scorer, small_head,
                                                                                  dtype, yaw, flip, stretch, noise):
    """Real anatomy, relabelled with an oblique or mirrored direction and an anisotropic spacing (the head is then
    rotated, mirrored or stretched in space): the alignment either finds the brain, and the outputs lie on this grid,
    or refuses with a DataError."""
    array, spacing = small_head
    array = array * (1 + noise * np.random.default_rng(0).standard_normal(array.shape))
    scale = 255 / array.max() if dtype == "uint8" else 1.0
    array = np.clip(array * scale, 0, None).astype(dtype)
    direction = rotation((0.0, 0.0, 1.0), yaw) @ np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    spacing = (spacing[0], spacing[1], spacing[2] * stretch)
    outcome = run_detect(tiny_models["brain-mri"], scorer, array, spacing, (10.0, -20.0, 5.0), direction, False,
                         array.shape)
    event("outcome " + outcome)


# Hand-written cases: each one once broke detection with an exception that was not an RAError (ITK's RuntimeError
# in the brain-mri alignment, a singular direction reaching SimpleITK), or is a boundary the generator may miss.
HAND_WRITTEN = {  # name: (preset, shape, dtype, spacing, origin, direction)
    "brain-two-slices": ("brain-mri", (2, 64, 64), "int16", None, None, None),
    "brain-thin-slice": ("brain-mri", (200, 2), "uint8", None, None, None),
    "brain-thin-volume": ("brain-mri", (8, 8, 8), "float64", None, None, None),
    "brain-tiny-spacing": ("brain-mri", (16, 40, 40), "uint8", (1e-6,) * 3, None, None),
    "brain-singular-direction": ("brain-mri", (12, 30, 30), "float32", (0.5, 0.5, 3.0), None, np.zeros((3, 3))),
    "brain-flat-direction": ("brain-mri", (12, 30, 30), "float32", None, None, np.diag([1.0, 1.0, 1e-12])),
    "brain-nan-spacing": ("brain-mri", (12, 30, 30), "float32", (np.nan, 1.0, 1.0), None, None),
    "brain-inf-origin": ("brain-mri", (12, 30, 30), "float32", None, (np.inf, 0.0, 0.0), None),
    "xray-singular-direction": ("xray", (30, 40), "uint16", None, None, np.zeros((2, 2))),
    "xray-one-pixel-wide": ("xray", (301, 1), "uint16", None, None, None),
    "xray-one-slice-volume": ("xray", (1, 40, 30), "int16", (0.2, 0.2, 1.0), None, None),
    "xray-huge-spacing": ("xray", (40, 30), "float32", (1e6, 1e-6), (1e6, -1e6), None),
}


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_hand_written_bad_inputs_give_results_on_the_grid_or_a_documented_error(tiny_models, scorer, name, tmp_path):
    """As the generated cases, and a result's outputs are written as `ra detect` writes them."""
    preset, shape, dtype, spacing, origin, direction = HAND_WRITTEN[name]
    array = _values("blob", shape, np.dtype(dtype), seed=1)
    spacing = spacing or (1.0,) * len(shape)
    origin = origin or (0.0,) * len(shape)
    run_detect(tiny_models[preset], scorer, array, spacing, origin, direction, False, shape, tmp_path)
