"""Synthetic anomalies for benchmark images: each generator takes an `Image`, returns the changed image on the same
grid (same shape, same geometry) and the anomaly's exact mask. 2D radiographs and 3D volumes alike, unless said.

Conventions (those of ra_engine.image): arrays are (z, y, x) or (y, x), float32, raw intensities; geometry is LPS
with spacing, origin and direction listed (x, y[, z]); points are LPS mm. A displacement field is an array
(*shape, D) of LPS vectors in mm with components (x, y[, z]), used the way ITK transforms are: the output at point p
takes the input's value at p + d(p). Shapes are drawn in the image's own axes scaled to mm, so they are round in
physical space whatever the direction matrix. Every random draw comes from the `numpy.random.Generator` passed in, in
a fixed order: the same generator state gives the same anomaly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from ra_engine.core.image import Geometry, Image

# Partial-volume weights below this are dropped, so that every voxel of a mask is visibly changed.
MIN_WEIGHT = 0.05


@dataclass
class Anomaly:
    """An image with one anomaly. `mask`: uint8 (1 = anomaly) on the image's grid, defined by each generator.
    `info`: the parameters used (JSON-serialisable). `displacement`: the field of a deformation, (*shape, D) LPS mm
    (None when nothing moved)."""

    image: Image
    mask: np.ndarray
    info: dict = field(default_factory=dict)
    displacement: np.ndarray | None = None


# --- geometry helpers ------------------------------------------------------------------------------------------

def array_spacing(geometry: Geometry) -> np.ndarray:
    """Spacing in array axis order ((z, y, x) or (y, x)), mm."""
    return np.asarray(geometry.spacing, dtype=float)[::-1]


def _direction(geometry: Geometry) -> np.ndarray:
    d = geometry.dimension
    return np.asarray(geometry.direction, dtype=float).reshape(d, d)


def index_of(geometry: Geometry, point_lps) -> np.ndarray:
    """Continuous array index (array order) of an LPS point (mm)."""
    offset = np.asarray(point_lps, dtype=float) - np.asarray(geometry.origin, dtype=float)
    xyz = np.linalg.solve(_direction(geometry), offset) / np.asarray(geometry.spacing, dtype=float)
    return xyz[::-1]


def point_of(geometry: Geometry, index) -> np.ndarray:
    """LPS points (mm, (..., D)) of (continuous) array indices (array order, (..., D))."""
    xyz = np.asarray(index, dtype=float)[..., ::-1] * np.asarray(geometry.spacing, dtype=float)
    return np.asarray(geometry.origin, dtype=float) + xyz @ _direction(geometry).T


def to_lps(geometry: Geometry, vectors: np.ndarray) -> np.ndarray:
    """Vectors (..., D) in mm along the array axes (array order) -> LPS vectors (..., D), x-y-z components."""
    return vectors[..., ::-1] @ _direction(geometry).T


def _box(shape, centre, reach_vox) -> tuple[slice, ...]:
    """The slices of the box of half-width `reach_vox` (per axis) around `centre` (array index), clipped."""
    lo = np.maximum(np.floor(centre - reach_vox).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach_vox).astype(int) + 1, shape)
    if np.any(lo >= hi):
        raise ValueError(f"the anomaly centre (index {np.round(centre, 1)}) lies outside the image {shape}")
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _offsets_mm(box: tuple[slice, ...], centre, spacing) -> np.ndarray:
    """(*box shape, D) mm offsets from `centre` along the array axes."""
    axes = [(np.arange(s.start, s.stop) - c) * h for s, c, h in zip(box, centre, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def _crop_geometry(geometry: Geometry, box: tuple[slice, ...]) -> Geometry:
    """The geometry of the sub-grid `box` of a grid."""
    origin = point_of(geometry, [s.start for s in box])
    return Geometry(geometry.spacing, tuple(float(v) for v in origin), geometry.direction)


def _bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    where = np.argwhere(mask)
    lo = np.maximum(where.min(0) - margin, 0)
    hi = np.minimum(where.max(0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def drop_small_pieces(mask: np.ndarray, geometry: Geometry, min_ml: float) -> np.ndarray:
    """`mask` (bool) without its connected pieces (26/8-connected, as ra_engine.evaluation counts lesions) smaller
    than `min_ml` millilitres (mm^2 / 1000 in 2D)."""
    if min_ml <= 0 or not mask.any():
        return mask
    labels, _ = ndi.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    sizes = np.bincount(labels.ravel()) * float(np.prod(geometry.spacing)) / 1000.0
    keep = sizes >= min_ml
    keep[0] = False
    return keep[labels]


# --- random fields ---------------------------------------------------------------------------------------------

def smooth_noise(shape, sigma_vox, rng: np.random.Generator) -> np.ndarray:
    """Gaussian white noise smoothed with `sigma_vox` (voxels, scalar or per axis), rescaled to mean 0, std 1;
    float32. The texture and shape irregularity of every lesion here."""
    noise = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox, mode="reflect")
    return ((noise - noise.mean()) / max(float(noise.std()), 1e-12)).astype(np.float32)


def random_rotation(dimension: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (determinant +1)."""
    q, r = np.linalg.qr(rng.standard_normal((dimension, dimension)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def blob(shape, geometry: Geometry, centre_lps, radii_mm, rng: np.random.Generator, *, roughness: float = 0.3,
         edge_mm: float | None = None) -> np.ndarray:
    """An irregular lesion shape: a randomly rotated ellipsoid (ellipse in 2D) with semi-axes `radii_mm`, its surface
    pushed in and out by smoothed noise of relative amplitude `roughness` (lobulated at about a third of the radius),
    with a linear partial-volume edge `edge_mm` wide (default one mean voxel). Returns the weight in [0, 1] on the
    whole grid (array order, float32): 1 inside, 0 outside, weights below MIN_WEIGHT set to 0; the largest connected
    piece only."""
    spacing = array_spacing(geometry)
    radii = np.asarray(radii_mm, dtype=float)
    centre = index_of(geometry, centre_lps)
    edge = float(edge_mm if edge_mm is not None else spacing.mean())
    reach = radii.max() * (1.0 + 2.0 * roughness) + edge + 2.0 * spacing.max()
    box = _box(np.asarray(shape), centre, reach / spacing)
    offsets = _offsets_mm(box, centre, spacing)
    rotation = random_rotation(len(shape), rng)
    scaled = np.sqrt((((offsets @ rotation) / radii) ** 2).sum(-1))  # 1 on the ellipsoid's surface
    lobes = smooth_noise(scaled.shape, 0.35 * radii.mean() / spacing, rng)
    level = scaled - roughness * lobes
    weight = np.clip(0.5 + (1.0 - level) * radii.mean() / edge, 0.0, 1.0).astype(np.float32)
    weight[weight < MIN_WEIGHT] = 0.0
    labels, count = ndi.label(weight > 0)
    if count > 1:
        weight[labels != 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))] = 0.0
    out = np.zeros(shape, np.float32)
    out[box] = weight
    return out


# --- intensity anomalies ---------------------------------------------------------------------------------------

def textured_lesion(image: Image, centre_lps, radius_mm: float, intensity: float, rng: np.random.Generator, *,
                    within: np.ndarray | None = None, texture: float = 0.1, roughness: float = 0.3,
                    aspect: tuple[float, float] = (0.6, 1.0), edge_mm: float | None = None,
                    texture_mm: float = 1.5) -> Anomaly:
    """A lesion of irregular shape (`blob`: longest semi-axis `radius_mm`, the others `aspect` times it) whose voxels
    become `intensity` (raw units) times a texture 1 + `texture` * smooth noise (correlation `texture_mm`), mixed
    with the original at the partial-volume edge: out = (1 - w) * image + w * intensity * texture. Restricted to
    `within` (non-zero = allowed, e.g. the brain). Hyper- and hypointense lesions and CSF-filled cavities alike.
    Mask: every voxel with w > 0, i.e. exactly the voxels whose value changed."""
    d = image.array.ndim
    radii = radius_mm * np.concatenate([[1.0], rng.uniform(aspect[0], aspect[1], d - 1)])
    weight = blob(image.array.shape, image.geometry, centre_lps, radii, rng, roughness=roughness, edge_mm=edge_mm)
    if within is not None:
        weight *= within > 0
    if not weight.any():
        raise ValueError(f"the lesion at {np.round(centre_lps, 1)} mm lies outside the allowed region")
    box = _bounding_box(weight > 0)
    w = weight[box]
    grain = smooth_noise(w.shape, texture_mm / array_spacing(image.geometry), rng)
    target = intensity * np.clip(1.0 + texture * grain, 0.0, None)
    out = image.array.astype(np.float32, copy=True)
    out[box] = (1.0 - w) * out[box] + w * target
    mask = (weight > 0).astype(np.uint8)
    voxel_ml = float(np.prod(image.geometry.spacing)) / 1000.0
    info = {"centre_lps": [round(float(v), 2) for v in centre_lps], "radii_mm": [round(float(r), 2) for r in radii],
            "intensity": round(float(intensity), 3), "texture": texture, "roughness": roughness,
            "volume_ml": round(float(mask.sum()) * voxel_ml, 3)}
    return Anomaly(Image(out, image.geometry, image.source), mask, info)


def ghosting(image: Image, axis: int, shifts: tuple[float, ...], amplitudes: tuple[float, ...], *,
             threshold: float, within: np.ndarray | None = None, min_piece_ml: float = 0.0) -> Anomaly:
    """An acquisition ghost: copies of the image shifted (circularly, as in the reconstruction's field of view) by
    `shifts` (fractions of the field of view) along the phase-encoding `axis` (array axis) and scaled by
    `amplitudes`, added to the image. A shift of 0.5 is the N/2 (Nyquist) ghost of alternating k-space lines;
    several shifts mimic periodic motion. Mask: the voxels in `within` where the ghost changes the intensity by
    more than `threshold` (raw units), without pieces smaller than `min_piece_ml` (`drop_small_pieces`)."""
    n = image.array.shape[axis]
    ghost = np.zeros_like(image.array, dtype=np.float32)
    for shift, amplitude in zip(shifts, amplitudes):
        ghost += np.float32(amplitude) * np.roll(image.array, int(round(shift * n)), axis=axis)
    mask = np.abs(ghost) > threshold
    if within is not None:
        mask &= within > 0
    mask = drop_small_pieces(mask, image.geometry, min_piece_ml)
    info = {"axis": int(axis), "shifts": [float(s) for s in shifts], "amplitudes": [round(float(a), 3)
                                                                                    for a in amplitudes],
            "threshold": round(float(threshold), 3), "volume_ml": round(float(mask.sum()) * float(
                np.prod(image.geometry.spacing)) / 1000.0, 3)}
    return Anomaly(Image(image.array + ghost, image.geometry, image.source), mask.astype(np.uint8), info)


# --- deformations (3D and 2D) ----------------------------------------------------------------------------------

def warp(image: Image, displacement: np.ndarray, interpolator: int = sitk.sitkLinear) -> np.ndarray:
    """The image resampled through a displacement field (*shape, D) LPS mm on the image's grid: out(p) =
    image(p + d(p)), linear interpolation by SimpleITK's DisplacementFieldTransform. Voxels where the field is zero
    keep their exact values. Returns a float32 array (array order)."""
    moving = np.any(displacement != 0, axis=-1)
    out = image.array.astype(np.float32, copy=True)
    if not moving.any():
        return out
    box = _bounding_box(moving, margin=1)
    crop = _crop_geometry(image.geometry, box)
    field_image = crop.apply_to(sitk.GetImageFromArray(displacement[box].astype(np.float64), isVector=True))
    transform = sitk.DisplacementFieldTransform(field_image)
    reference = crop.apply_to(sitk.Image([s.stop - s.start for s in box][::-1], sitk.sitkFloat32))
    warped = sitk.GetArrayFromImage(sitk.Resample(image.to_sitk(), reference, transform, interpolator, 0.0,
                                                  sitk.sitkFloat32))
    out[box] = np.where(moving[box], warped, out[box])
    return out


def jacobian_determinant(displacement_axes: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """det(I + grad d) of the map p -> p + d(p), d given along the array axes in mm (array order); > 0 everywhere
    means the deformation folds nothing."""
    d = displacement_axes.shape[-1]
    grads = np.stack([np.stack(np.gradient(displacement_axes[..., i], *spacing), axis=-1) for i in range(d)], -2)
    return np.linalg.det(grads + np.eye(d))


def _taper(within: np.ndarray | None, spacing: np.ndarray, ramp_mm: float, box: tuple[slice, ...]) -> np.ndarray:
    """On `box`: 1 deeper than `ramp_mm` inside `within`, falling linearly to 0 at its edge (a boundary that does
    not move); 1 everywhere when `within` is None."""
    if within is None:
        return np.ones([s.stop - s.start for s in box], np.float32)
    depth = ndi.distance_transform_edt(within > 0, sampling=spacing)[box]
    return np.clip(depth / ramp_mm, 0.0, 1.0).astype(np.float32)


def mass_effect(image: Image, centre_lps, radius_mm: float, displacement_mm: float, intensity: float,
                rng: np.random.Generator, *, within: np.ndarray | None = None, core_intensity: float | None = None,
                texture: float = 0.12, roughness: float = 0.15, reach: float = 4.0, ramp_mm: float = 8.0) -> Anomaly:
    """A space-occupying mass: the surrounding anatomy is pushed radially away from `centre_lps` by a field whose
    magnitude is `displacement_mm` at the mass's radius R and decays as (R/r)^2 (the far field of an incompressible
    expansion), reaching 0 at r = `reach` * R and at the edge of `within` (linear over `ramp_mm`: the skull does not
    move); then the mass itself (a `textured_lesion` of radius R, near-spherical, `intensity`, with a necrotic core of
    radius R/2 at `core_intensity` if given) is drawn over the warped image. Mask: the mass (core included); the
    displaced tissue around it is not in the mask (`info`: the largest displacement, and the volume outside the
    mass moved by 0.5 mm or more)."""
    if not 0 < displacement_mm < radius_mm:
        raise ValueError(f"the displacement ({displacement_mm} mm) must be positive and below the radius "
                         f"({radius_mm} mm) for the mapping to stay one-to-one")
    spacing = array_spacing(image.geometry)
    centre = index_of(image.geometry, centre_lps)
    r_max = reach * radius_mm
    box = _box(np.asarray(image.array.shape), centre, r_max / spacing)
    offsets = _offsets_mm(box, centre, spacing)
    r = np.sqrt((offsets**2).sum(-1))
    floor = (radius_mm / r_max) ** 2
    with np.errstate(divide="ignore"):
        outside = displacement_mm * ((radius_mm / np.maximum(r, radius_mm)) ** 2 - floor) / (1.0 - floor)
    magnitude = np.where(r < radius_mm, displacement_mm * r / radius_mm, np.clip(outside, 0.0, None))
    magnitude = magnitude * _taper(within, spacing, ramp_mm, box)
    with np.errstate(invalid="ignore", divide="ignore"):
        axes = -np.where(r[..., None] > 0, offsets / r[..., None], 0.0) * magnitude[..., None]
    axes[magnitude < 1e-3] = 0.0  # a field of micrometres changes nothing but rounding
    _check_folding(axes, spacing)
    displacement = np.zeros(image.array.shape + (image.array.ndim,), np.float32)
    displacement[box] = to_lps(image.geometry, axes)
    warped = Image(warp(image, displacement), image.geometry, image.source)
    mass = textured_lesion(warped, centre_lps, radius_mm, intensity, rng, within=within, texture=texture,
                           roughness=roughness, aspect=(0.85, 1.0))
    mask = mass.mask
    result = mass.image
    if core_intensity is not None:
        core = textured_lesion(result, centre_lps, 0.5 * radius_mm, core_intensity, rng, within=mass.mask,
                               texture=texture, roughness=0.3)
        result, mask = core.image, mask | core.mask
    length = np.sqrt((displacement**2).sum(-1))
    voxel_ml = float(np.prod(image.geometry.spacing)) / 1000.0
    info = {"centre_lps": mass.info["centre_lps"], "radius_mm": round(float(radius_mm), 2),
            "displacement_mm": round(float(displacement_mm), 2),
            "max_displacement_mm": round(float(length.max()), 2),
            "intensity": round(float(intensity), 3),
            "core_intensity": None if core_intensity is None else round(float(core_intensity), 3),
            "volume_ml": round(float(mask.sum()) * voxel_ml, 3),
            "displaced_ml": round(float(((length >= 0.5) & (mask == 0)).sum()) * voxel_ml, 3)}
    return Anomaly(result, mask.astype(np.uint8), info, displacement)


def enlarge_region(image: Image, region: np.ndarray, displacement_mm: float, *, sigma_mm: float, steps: int = 3,
                   within: np.ndarray | None = None, ramp_mm: float = 8.0, min_jacobian: float = 0.5,
                   min_piece_ml: float = 0.0) -> Anomaly:
    """Enlarges a structure (e.g. the ventricles) by deformation alone; no intensity is invented. The structure is
    inflated in `steps` steps; each step's field is the gradient of the (current, already inflated) structure smoothed
    with a Gaussian of `sigma_mm`, pointing into it, so that each point near it takes its value from closer in and the
    structure's content spreads outwards; its largest magnitude is `displacement_mm` / `steps`, lowered where needed
    so that the step's det(Jacobian) >= `min_jacobian` (no folding), and it is tapered to 0 at the edge of `within`.
    The steps are composed into one field and the image is interpolated once. `region`: > 0 inside the structure, the
    value being the relative push of that part (e.g. 1 on one side, 0.6 on the other). Mask: the enlarged part, i.e.
    the voxels that the warped structure (its indicator warped linearly, > 0.5) covers and the original did not,
    without pieces smaller than `min_piece_ml` (`drop_small_pieces`)."""
    spacing = array_spacing(image.geometry)
    inside = region > 0
    if not inside.any():
        raise ValueError("the region to enlarge is empty")
    box = _bounding_box(inside, margin=int(np.ceil((4.0 * sigma_mm + displacement_mm) / spacing.min())))
    crop = _crop_geometry(image.geometry, box)
    taper = _taper(within, spacing, ramp_mm, box)[..., None]
    current = region[box].astype(np.float32)
    total = np.zeros(current.shape + (current.ndim,), np.float32)
    scales = []
    for _ in range(steps):
        smooth = ndi.gaussian_filter(current, sigma_mm / spacing, mode="constant")
        step = np.stack(np.gradient(smooth, *spacing), axis=-1) * taper
        step *= displacement_mm / steps / float(np.sqrt((step**2).sum(-1)).max())
        scale = 1.0
        while jacobian_determinant(step * scale, spacing).min() < min_jacobian:
            scale *= 0.85
        step *= scale
        step[np.sqrt((step**2).sum(-1)) < 1e-3] = 0.0  # a field of micrometres changes nothing but rounding
        scales.append(scale)
        moved = to_lps(crop, step)
        # Composition: the image after this step is I(p + step(p) + total(p + step(p))).
        total = step + np.stack([warp(Image(total[..., i], crop), moved) for i in range(total.shape[-1])], axis=-1)
        current = warp(Image(current, crop), moved)
    _check_folding(total, spacing)
    displacement = np.zeros(image.array.shape + (image.array.ndim,), np.float32)
    displacement[box] = to_lps(crop, total)
    warped = warp(image, displacement)
    grown = warp(Image(inside.astype(np.float32), image.geometry), displacement) > 0.5
    mask = drop_small_pieces(grown & ~inside, image.geometry, min_piece_ml)
    voxel_ml = float(np.prod(image.geometry.spacing)) / 1000.0
    info = {"displacement_mm": round(float(displacement_mm), 2),
            "max_displacement_mm": round(float(np.sqrt((total**2).sum(-1)).max()), 2), "sigma_mm": sigma_mm,
            "steps": steps, "step_scales": [round(s, 3) for s in scales],
            "region_ml": round(float(inside.sum()) * voxel_ml, 3),
            "enlarged_region_ml": round(float(grown.sum()) * voxel_ml, 3),
            "volume_ml": round(float(mask.sum()) * voxel_ml, 3)}
    return Anomaly(Image(warped, image.geometry, image.source), mask.astype(np.uint8), info, displacement)


def _check_folding(axes: np.ndarray, spacing: np.ndarray) -> None:
    worst = float(jacobian_determinant(axes, spacing).min())
    if worst <= 0:
        raise ValueError(f"the deformation folds (det(Jacobian) = {worst:.2f}): lower the displacement")
