"""The one place that converts between a Slicer volume node and the engine's image contract.

Slicer: a volume node holds a vtkImageData (voxels indexed i, j, k = x, y, z, its own origin and spacing unused) and
an IJK-to-RAS 4x4 matrix (RAS: x = Right, y = Anterior, z = Superior, mm). The engine (`ra_engine.image`): a numpy
array (z, y, x) and a `Geometry` in ITK's LPS convention (x = Left, y = Posterior, z = Superior), spacing and origin
listed (x, y, z), direction the row-major 3x3 matrix whose columns are the i, j, k axes' unit directions.
LPS = diag(-1, -1, 1) RAS, so IJK-to-LPS = diag(-1, -1, 1, 1) @ IJK-to-RAS.

Every array handed across is a copy: the engine never sees a view of a node's voxels (it cannot change the input),
and a node never holds a view of engine memory (which may be freed or reused).
"""
from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

from ra_engine import DataError, Geometry, Image

from .mrml import modifying

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Voxel types of the outputs: the engine's results are float32, detections uint8.
VTK_TYPES = {np.dtype(np.float32): vtk.VTK_FLOAT, np.dtype(np.uint8): vtk.VTK_UNSIGNED_CHAR}


def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """A vtkMatrix4x4 as a (4, 4) float64 array (row-major, rows first)."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """A (4, 4) array as a new vtkMatrix4x4."""
    matrix = vtk.vtkMatrix4x4()
    matrix.DeepCopy([float(v) for v in np.asarray(array, dtype=np.float64).ravel()])
    return matrix


def ijk_to_ras(node) -> np.ndarray:
    """The volume node's IJK-to-RAS matrix (4, 4): voxel index (i, j, k, 1) -> RAS point (mm, 1). Its own, not
    including any parent transform."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix_to_numpy(matrix)


def array_ijk_to_ras(node) -> np.ndarray:
    """The matrix (4, 4) taking the index (i, j, k) of array element [k, j, i] of `array_from_volume(node)` to RAS:
    the node's IJK-to-RAS itself, shifted when its image data's extent does not start at 0 (rare)."""
    matrix = ijk_to_ras(node)
    image = node.GetImageData()
    start = np.asarray(image.GetExtent()[0::2] if image is not None else (0, 0, 0), dtype=np.float64)
    if start.any():
        matrix[:3, 3] += matrix[:3, :3] @ start
    return matrix


def geometry_from_ijk_to_ras(matrix: np.ndarray) -> Geometry:
    """The LPS `Geometry` (x-y-z order) of a grid whose voxel (i, j, k) lies at `matrix` @ (i, j, k, 1) in RAS.
    Raises DataError for a degenerate matrix."""
    lps = RAS_TO_LPS @ np.asarray(matrix, dtype=np.float64)
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if not np.all(spacing > 0) or abs(np.linalg.det(axes)) < 1e-12 * float(np.prod(spacing)):
        raise DataError(f"the volume's IJK-to-RAS matrix is degenerate (voxel spacing {spacing.tolist()} mm): fix "
                        "its geometry (Volumes module, Volume Information) before running detection")
    origin = lps[:3, 3]
    direction = axes / spacing
    return Geometry(tuple(float(v) for v in spacing), tuple(float(v) for v in origin),
                    tuple(float(v) for v in direction.ravel()))


def ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    """The IJK-to-RAS matrix (4, 4) of a 3D LPS `Geometry`: inverse of `geometry_from_ijk_to_ras` (extent at 0)."""
    if geometry.dimension != 3:
        raise ValueError(f"a volume node needs a 3D geometry, got {geometry.dimension}D")
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3) * np.asarray(geometry.spacing)
    lps[:3, 3] = geometry.origin
    return RAS_TO_LPS @ lps  # RAS_TO_LPS is its own inverse


def array_from_volume(node) -> np.ndarray:
    """A copy of the volume node's voxels, shape (z, y, x) for one component or (z, y, x, c) for several, in the
    node's own voxel type. DataError when the node holds no image data."""
    image = node.GetImageData() if node is not None else None
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise DataError(f"the volume {_name(node)} holds no voxels (no image data): load or create it again")
    x, y, z = image.GetDimensions()
    components = image.GetNumberOfScalarComponents()
    shape = (z, y, x) if components == 1 else (z, y, x, components)
    return numpy_support.vtk_to_numpy(scalars).reshape(shape).copy()


def image_from_volume(node, dtype=np.float32) -> Image:
    """The volume node as an engine `Image`: array (z, y, x) copied and cast to `dtype` (float32: raw intensities),
    geometry in LPS from the node's IJK-to-RAS (`array_ijk_to_ras`), `source` "the volume '<name>'" (for the
    engine's messages). One scalar component only: DataError for colour or vector volumes."""
    array = array_from_volume(node)
    if array.ndim != 3:
        raise DataError(f"the volume {_name(node)} has {array.shape[-1]} components per voxel (a colour or vector "
                        "volume); detection needs a scalar (greyscale) volume")
    return Image(array.astype(dtype, copy=False), geometry_from_ijk_to_ras(array_ijk_to_ras(node)),
                 f"the volume {_name(node)}")


def set_volume_geometry(node, matrix: np.ndarray) -> None:
    """Sets the node's IJK-to-RAS matrix (4, 4); its image data keeps origin 0 and spacing 1 (MRML's convention)."""
    node.SetIJKToRASMatrix(numpy_to_matrix(matrix))


def set_volume_array(node, array: np.ndarray) -> None:
    """Replaces the node's voxels with a copy of `array` (z, y, x), float32 or uint8, as a new vtkImageData (extent
    from 0, origin 0, spacing 1); the node's geometry is left as it is."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"a volume node takes a (z, y, x) array, got shape {array.shape}")
    if array.dtype not in VTK_TYPES:
        raise ValueError(f"voxel type {array.dtype} is not one of the output types {sorted(map(str, VTK_TYPES))}")
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True,
                                         array_type=VTK_TYPES[array.dtype])
    scalars.SetName("ImageScalars")
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)


def set_volume_from_image(node, image: Image, matrix: np.ndarray | None = None, dtype=np.float32) -> None:
    """Writes an engine `Image` (z, y, x) into the volume node: voxels copied (cast to `dtype`) and geometry.

    matrix: the IJK-to-RAS to set, normally the input's own (copied exactly, so outputs align bit for bit); it must
    agree with `image.geometry` (1e-4 mm / 1e-6 in direction). None: converted from `image.geometry`. A (y, x)
    image becomes one slice (1, y, x)."""
    array = image.array if image.array.ndim == 3 else image.array[None]
    if matrix is None:
        matrix = ijk_to_ras_from_geometry(image.geometry)
    elif image.geometry.dimension == 3:
        expected = geometry_from_ijk_to_ras(matrix)
        if not (np.allclose(expected.spacing, image.geometry.spacing, atol=1e-4)
                and np.allclose(expected.origin, image.geometry.origin, atol=1e-4)
                and np.allclose(expected.direction, image.geometry.direction, atol=1e-6)):
            raise ValueError(f"the result's geometry {image.geometry} does not match the IJK-to-RAS given "
                             f"({expected}): the result does not belong to this volume")
    with modifying(node):
        set_volume_geometry(node, matrix)
        set_volume_array(node, np.asarray(array).astype(dtype, copy=False))


def ras_of_index(matrix: np.ndarray, ijk) -> np.ndarray:
    """RAS point (mm) of voxel index (i, j, k) = array element [k, j, i]."""
    return (np.asarray(matrix, dtype=np.float64) @ np.append(np.asarray(ijk, dtype=np.float64), 1.0))[:3]


def _name(node) -> str:
    return repr(node.GetName()) if node is not None and node.GetName() else "(unnamed)"

