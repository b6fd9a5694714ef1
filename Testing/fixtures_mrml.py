"""Helpers for the RALogic tests on real MRML (slicer-core, headless): scenes set up as the Slicer application sets
them up (colour logic, slice views), volumes loaded and saved through MRML's own storage nodes, snapshots of a scene
to prove that it did not change, and headless slice-view rendering."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support


class ViewScene:
    """An MRML scene with the default colour tables (vtkMRMLColorLogic) and slice views ("Red", ...), each a
    vtkMRMLSliceLogic that renders without OpenGL. Keeps the logics alive as long as the scene is used."""

    def __init__(self, views=("Red",), size=(256, 256)):
        self.scene = slicer.vtkMRMLScene()
        self.colors = slicer.vtkMRMLColorLogic()
        self.colors.SetMRMLScene(self.scene)
        self.slice_logics = {}
        for name in views:
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLScene(self.scene)
            node = logic.AddSliceNode(name)
            node.SetDimensions(size[0], size[1], 1)
            self.slice_logics[name] = logic

    def render(self, view: str, ras_offset: float, png: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The slice view `view` fitted to its volumes at `ras_offset` mm along its normal (axial: S): returns the
        blended RGB(A) pixels (rows top to bottom, (H, W, C) uint8) and the view's XY-to-RAS matrix (4, 4) mapping
        (column, row from the bottom, 0, 1) to RAS. Writes a PNG when `png` is given."""
        logic = self.slice_logics[view]
        logic.FitSliceToAll()
        logic.SetSliceOffset(ras_offset)
        producer = logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        if png is not None:
            writer = vtk.vtkPNGWriter()
            writer.SetFileName(str(png))
            writer.SetInputData(image)
            writer.Write()
        width, height, _ = image.GetDimensions()
        pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1]
        xy_to_ras = vtk.vtkMatrix4x4()
        xy_to_ras.DeepCopy(logic.GetSliceNode().GetXYToRAS())
        return pixels.copy(), np.array([[xy_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)])


def load_volume(scene, path: Path, name: str, labelmap: bool = False):
    """A volume node read from `path` (NRRD, NIfTI, ...) by vtkMRMLVolumeArchetypeStorageNode, as Slicer's "Add
    Data" reads it, with default display nodes."""
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetCenterImage(0)
    if not storage.ReadData(node):
        raise OSError(f"MRML could not read {path}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def save_volume(node, path: Path) -> Path:
    """Writes a volume node to `path` (format by extension) with a vtkMRMLVolumeArchetypeStorageNode not added to
    any scene (the node and its scene are left as they are)."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)
    if not storage.WriteData(node):
        raise OSError(f"MRML could not write {path}")
    return path


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def voxels(node) -> np.ndarray:
    """A copy of a volume node's voxels, (z, y, x)."""
    image = node.GetImageData()
    x, y, z = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(z, y, x).copy()


def segment_array(segmentation_node, segment_id: str, reference_node) -> np.ndarray:
    """The segment's binary labelmap on `reference_node`'s grid, (z, y, x) uint8, read through the segmentation's
    own oriented image data (checked to share the reference's axes and spacing)."""
    oriented = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, oriented)
    matrix = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(matrix)
    world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    reference = ijk_to_ras(reference_node)
    np.testing.assert_allclose(world, reference, atol=1e-6)
    x0, x1, y0, y1, z0, z1 = oriented.GetExtent()
    x, y, z = reference_node.GetImageData().GetDimensions()
    full = np.zeros((z, y, x), np.uint8)
    if x1 >= x0:
        values = numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars())
        full[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] = values.reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1) != 0
    return full


def node_checksum(node) -> dict:
    """What must not change on an input node: its voxels (sha256), IJK-to-RAS, name, attributes, class and MTimes."""
    image = node.GetImageData()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return {"voxels": hashlib.sha256(scalars.tobytes()).hexdigest(), "dimensions": image.GetDimensions(),
            "ijk_to_ras": ijk_to_ras(node).tolist(), "name": node.GetName(), "class": node.GetClassName(),
            "attributes": {a: node.GetAttribute(a) for a in node.GetAttributeNames() or ()},
            "node_mtime": node.GetMTime(), "image_mtime": image.GetMTime(),
            "scalars_mtime": image.GetPointData().GetScalars().GetMTime()}


def scene_snapshot(scene) -> list:
    """Every node of the scene: (ID, class, name, MTime); equal snapshots mean nothing was added, removed or
    modified."""
    return [(n.GetID(), n.GetClassName(), n.GetName(), n.GetMTime())
            for n in (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))]
