"""Digitally reconstructed radiographs (DRR): line integrals of a CT's attenuation along the rays of a cone-beam
(or parallel-beam) projection, and the attenuation map from Hounsfield units.

Coordinates: volumes are arrays (z, y, x) on a grid with identity direction in ITK's LPS convention (x towards the
patient's left, y posterior, z superior), spacing and origin listed (x, y, z) in mm. The projection is
posterior-anterior (PA): the source lies posterior to the patient (+y), the detector anterior (-y), the beam runs
along -y. A detector image is (rows, columns): column 0 is the patient's right (x grows along a row) and row 0 is
superior (z falls down a column), as a PA chest radiograph is viewed.

The sampler is trilinear (torch's `grid_sample`, CPU) on planes of constant depth, one ray per detector pixel; the
sums over depth are taken in float64 by numpy, so a projection is the same whatever the thread count.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

# Linear attenuation coefficient of water at 70 keV, the effective energy of a 120 kVp beam (NIST XCOM: mass
# attenuation 0.194 cm^2/g at 70 keV, density 1 g/cm^3), in 1/mm.
MU_WATER_PER_MM = 0.0194
# Depth planes handed to the sampler at once: bounds the memory of one call (planes x rows x columns x 3 floats).
PLANES_PER_CALL = 24


@dataclass(frozen=True)
class Grid:
    """Placement of a (z, y, x) voxel array with identity direction: `spacing` and `origin` (x, y, z) in mm, LPS;
    `origin` is the centre of voxel (0, 0, 0)."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def centre(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The physical centre (x, y, z) mm of an array of `shape` (z, y, x) on this grid."""
        size = np.array(shape[::-1], dtype=float)
        return np.asarray(self.origin) + np.asarray(self.spacing) * (size - 1) / 2.0


@dataclass(frozen=True)
class Beam:
    """Projection geometry, relative to the isocentre (the patient point aimed at, on the central ray).

    kind: "cone" (a point source) or "parallel" (rays along -y, no magnification).
    source_to_detector_mm: SID, cone only. object_to_detector_mm: distance from the isocentre to the detector
        plane (OID); the magnification of the isocentre's plane is SID / (SID - OID).
    rows, columns: detector pixels. pixel_mm: detector pixel size (mm at the detector, square pixels).
    """

    kind: str = "cone"
    source_to_detector_mm: float = 1800.0
    object_to_detector_mm: float = 200.0
    rows: int = 256
    columns: int = 256
    pixel_mm: float = 400.0 / 256

    def __post_init__(self) -> None:
        if self.kind not in ("cone", "parallel"):
            raise ValueError(f"beam kind must be 'cone' or 'parallel', got {self.kind!r}")
        if self.kind == "cone" and not 0 <= self.object_to_detector_mm < self.source_to_detector_mm:
            raise ValueError("the isocentre must lie between the source and the detector")

    @property
    def magnification(self) -> float:
        """Magnification of the isocentre's plane (1 for a parallel beam)."""
        if self.kind == "parallel":
            return 1.0
        return self.source_to_detector_mm / (self.source_to_detector_mm - self.object_to_detector_mm)


@dataclass(frozen=True)
class Pose:
    """Where the patient stands relative to the nominal pose: a point q of the volume goes to
    isocentre + translation + R @ S @ (q - isocentre), R = Rz @ Ry @ Rx (rotations about the LPS axes through the
    isocentre, degrees; z: turning about the body axis, x: leaning forward/back, y: tilting in the image plane), S =
    diag(scale) (x, y, z). Translation (x, y, z) in mm."""

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def matrix(self) -> np.ndarray:
        """R @ S (3x3)."""
        ax, ay, az = (math.radians(a) for a in self.rotation_deg)
        rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
        ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
        rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx @ np.diag(self.scale)


@dataclass
class Rays:
    """Where the rays of one projection sample the volume: sample k of pixel (i, j) lies at the continuous voxel
    index base[i, j] + depth[k] * step[i, j] (x, y, z order); each sample stands for `length[i, j]` mm of its ray."""

    base: np.ndarray
    step: np.ndarray
    depth: np.ndarray
    length: np.ndarray


def hu_to_mu(hu: np.ndarray, bone_scale: float = 1.0, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    """Linear attenuation (1/mm, float32) from Hounsfield units: a bilinear map.

    HU <= 0 (air-water mixtures: lung, fat, soft tissue below water): mu_water * (1 + HU / 1000), so -1000 HU (air)
    is 0. HU > 0 (tissue-bone mixtures): mu_water * (1 + bone_scale * HU / 1000). bone_scale = 1 keeps CT's own
    effective energy (cortical bone at +1500 HU gets 0.049/mm, NIST's cortical bone at 70 keV is 0.051/mm);
    bone_scale > 1 emulates a softer radiographic beam, where bone's photoelectric absorption raises its contrast
    (the usual bone/soft-tissue slope break of CT-based attenuation maps). Values below -1000 HU count as air.
    """
    hu = np.asarray(hu, dtype=np.float32)
    relative = np.where(hu > 0, bone_scale * hu, np.maximum(hu, -1000.0)) / 1000.0
    return (mu_water * (1.0 + relative)).astype(np.float32)


def rays(shape: tuple[int, int, int], grid: Grid, isocentre: np.ndarray, beam: Beam, pose: Pose = Pose(),
         step_mm: float | None = None) -> Rays:
    """The sample points of every ray of `beam` through a volume of `shape` (z, y, x) on `grid`, the patient placed
    by `pose` about `isocentre` (x, y, z mm, LPS). Depth planes are `step_mm` apart (default: the smallest voxel
    spacing) across the posed volume's extent along the beam."""
    spacing = np.asarray(grid.spacing, dtype=float)
    origin = np.asarray(grid.origin, dtype=float)
    c = np.asarray(isocentre, dtype=float)
    step_mm = float(step_mm or spacing.min())
    forward = pose.matrix()
    inverse = np.linalg.inv(forward)
    shift = c + np.asarray(pose.translation_mm, dtype=float)

    def to_index(world: np.ndarray) -> np.ndarray:
        """World points (..., 3) -> continuous voxel indices (x, y, z) of the posed volume."""
        return ((world - shift) @ inverse.T + c - origin) / spacing

    def direction_to_index(vector: np.ndarray) -> np.ndarray:
        return (vector @ inverse.T) / spacing

    # World extent of the posed volume along y: the planes cover it.
    size = np.array(shape[::-1], dtype=float)
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in size]))) * spacing + origin
    world_y = ((corners - c) @ forward.T + shift)[:, 1]
    planes_y = np.arange(world_y.max() - step_mm / 2, world_y.min(), -step_mm)

    u = (np.arange(beam.columns) - (beam.columns - 1) / 2.0) * beam.pixel_mm  # along +x
    v = (np.arange(beam.rows) - (beam.rows - 1) / 2.0) * beam.pixel_mm  # along -z
    if beam.kind == "cone":
        source = c + np.array([0.0, beam.source_to_detector_mm - beam.object_to_detector_mm, 0.0])
        detector_y = c[1] - beam.object_to_detector_mm
        pixels = np.stack(np.broadcast_arrays(c[0] + u[None, :], detector_y, c[2] - v[:, None]), axis=-1)
        # A ray meets the plane y = Y at source + a * (pixel - source), a = (Y - source_y) / (detector_y - source_y).
        planes_y = planes_y[(planes_y < source[1]) & (planes_y > detector_y)]
        depth = (planes_y - source[1]) / (detector_y - source[1])
        towards = pixels - source
        base = np.broadcast_to(to_index(source), towards.shape)
        step = direction_to_index(towards)
        length = step_mm * np.linalg.norm(towards, axis=-1) / abs(detector_y - source[1])
    else:
        pixels = np.stack(np.broadcast_arrays(c[0] + u[None, :], 0.0, c[2] - v[:, None]), axis=-1)
        depth = planes_y
        base = to_index(pixels)
        step = np.broadcast_to(direction_to_index(np.array([0.0, 1.0, 0.0])), base.shape)
        length = np.full((beam.rows, beam.columns), step_mm)
    return Rays(np.ascontiguousarray(base), np.ascontiguousarray(step), depth, length)


def project(volumes: np.ndarray, grid: Grid, isocentre: np.ndarray, beam: Beam, pose: Pose = Pose(),
            step_mm: float | None = None) -> np.ndarray:
    """Line integrals of each channel of `volumes` ((C, z, y, x) or (z, y, x), values per mm, e.g. mu in 1/mm or an
    occupancy in [0, 1]) along the rays of `beam`: (C, rows, columns) or (rows, columns) float64 in value x mm
    (mu -> the dimensionless attenuation exponent; an occupancy -> the path length in mm through it). Outside the
    volume counts as 0 (air)."""
    import torch
    import torch.nn.functional as F

    single = volumes.ndim == 3
    stack = np.asarray(volumes, dtype=np.float32)[None] if single else np.asarray(volumes, dtype=np.float32)
    channels, nz, ny, nx = stack.shape
    ray = rays((nz, ny, nx), grid, isocentre, beam, pose, step_mm)
    # grid_sample with align_corners=True maps -1 and +1 to the centres of the first and last voxels.
    scale = 2.0 / (np.array([nx, ny, nz], dtype=float) - 1.0)
    base = torch.from_numpy((ray.base * scale - 1.0).astype(np.float32))
    step = torch.from_numpy((ray.step * scale).astype(np.float32))
    depth = torch.from_numpy(ray.depth.astype(np.float32))
    volume = torch.from_numpy(np.ascontiguousarray(stack))[None]
    total = np.zeros((channels, beam.rows, beam.columns))
    with torch.inference_mode():
        for start in range(0, len(depth), PLANES_PER_CALL):
            points = base + depth[start:start + PLANES_PER_CALL, None, None, None] * step
            samples = F.grid_sample(volume, points[None], mode="bilinear", padding_mode="zeros", align_corners=True)
            total += samples[0].numpy().sum(axis=1, dtype=np.float64)
    total *= ray.length[None]
    return total[0] if single else total
