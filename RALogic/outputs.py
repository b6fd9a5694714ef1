"""Output nodes of one input volume, created on the first run and updated in place by later runs.

Per input: `<input> pseudo-healthy` (scalar volume, scan intensities), `<input> anomaly map` (scalar volume, float,
heat colours), `<input> detections` (label map volume, 1 = flagged, named "anomaly" in its colour table) and
`<input> detections segmentation` (segmentation with one segment "Anomaly" made from the label map). All carry the
input's exact IJK-to-RAS matrix and dimensions and sit under the input's parent transform, so they align voxel for
voxel. The input node itself is never modified: each output points back to it through its own node reference
"RA.input" and says what it is in the attribute "RA.output"; both survive saving and importing the scene.
"""
from __future__ import annotations

import numpy as np
import slicer
import vtk

from ra_engine import Image
from ra_engine.models.card import NOTICE

from .geometry import set_volume_from_image
from .mrml import nodes_of_class

NOTICE_ATTRIBUTE = "RA.notice"
KIND_ATTRIBUTE = "RA.output"
INPUT_ROLE = "RA.input"
RESULTS_FOLDER = "RA results"
HEAT_TABLE = "RA Anomaly Heat"
DETECTIONS_TABLE = "RA Detections"
SEGMENT_ID = SEGMENT_NAME = "Anomaly"
DETECTION_COLOUR = (0.1, 0.9, 0.2)  # green, as in the engine's overlay PNG; never a heat colour (those have r >= g)
# Upper end of the anomaly map's display window: this percentile of A inside the brain/body mask.
WINDOW_PERCENTILE = 99.5

# kind -> (MRML class, name suffix); the kinds are also the parameter node's output roles.
KINDS = {
    "pseudoHealthy": ("vtkMRMLScalarVolumeNode", "pseudo-healthy"),
    "anomalyMap": ("vtkMRMLScalarVolumeNode", "anomaly map"),
    "detections": ("vtkMRMLLabelMapVolumeNode", "detections"),
    "segmentation": ("vtkMRMLSegmentationNode", "detections segmentation"),
}


def find_outputs(scene, input_node) -> dict:
    """{kind: node} of the outputs in `scene` made from `input_node` (those whose "RA.input" reference names it);
    kinds without a node are absent."""
    found = {}
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        kind = node.GetAttribute(KIND_ATTRIBUTE)
        if kind in KINDS and node.GetNodeReferenceID(INPUT_ROLE) == input_node.GetID() and kind not in found:
            found[kind] = node
    return found


def write_outputs(scene, input_node, matrix: np.ndarray, pseudo_healthy: Image, anomaly: Image, mask: Image,
                  detections: Image) -> dict:
    """Creates or updates the four outputs of `input_node` from the engine's results (arrays (z, y, x) on the
    input's grid, LPS geometry) and returns {kind: node}. matrix: the input's IJK-to-RAS (4, 4), set exactly on
    every output. New outputs go under the input's parent in the subject hierarchy (or the "RA results" folder).
    On an error, every node added here (outputs, their display nodes, colour tables) is removed again."""
    existing = find_outputs(scene, input_node)
    # Not input_node.GetTransformNodeID(): that getter marks the input node modified (its MTime changes).
    parent_transform = input_node.GetParentTransformNode()
    before = {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}
    created = []
    scene.StartState(scene.BatchProcessState)
    try:
        nodes = {}
        for kind, (class_name, suffix) in KINDS.items():
            node = existing.get(kind)
            if node is None:
                node = scene.AddNewNodeByClass(class_name, f"{input_node.GetName()} {suffix}")
                created.append(node)
                node.SetNodeReferenceID(INPUT_ROLE, input_node.GetID())
                node.SetAttribute(KIND_ATTRIBUTE, kind)
                node.SetAttribute(NOTICE_ATTRIBUTE, NOTICE)
            node.SetAndObserveTransformNodeID(parent_transform.GetID() if parent_transform is not None else None)
            nodes[kind] = node
        set_volume_from_image(nodes["pseudoHealthy"], pseudo_healthy, matrix)
        set_volume_from_image(nodes["anomalyMap"], anomaly, matrix)
        _show_pseudo_healthy(nodes["pseudoHealthy"], input_node)
        _show_anomaly(scene, nodes["anomalyMap"], anomaly, mask)
        write_detections(scene, input_node, nodes, matrix, detections)
        _place_in_hierarchy(scene, input_node, created)
    except BaseException:
        added = [scene.GetNthNode(index) for index in range(scene.GetNumberOfNodes())]
        for node in reversed([n for n in added if n.GetID() not in before]):  # outputs, displays, colour tables
            scene.RemoveNode(node)
        raise
    finally:
        scene.EndState(scene.BatchProcessState)
    return nodes


def write_detections(scene, input_node, nodes: dict, matrix: np.ndarray, detections: Image) -> None:
    """Sets the detections (uint8 (z, y, x), 1 = flagged) into the label map node and the segment "Anomaly" of the
    segmentation node, both on the input's grid (`matrix`, IJK-to-RAS)."""
    labelmap, segmentation = nodes["detections"], nodes["segmentation"]
    set_volume_from_image(labelmap, detections, matrix, dtype=np.uint8)
    if labelmap.GetDisplayNode() is None:
        labelmap.CreateDefaultDisplayNodes()
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(detections_color_table(scene).GetID())
    _set_segment(segmentation, input_node, labelmap)


def heat_color_table(scene):
    """The scene's "RA Anomaly Heat" colour table (created once per scene): 256 colours through dark red, red and
    yellow to white; the first transparent, so that the map shows nothing at or below the window's lower end (0, as
    outside the brain/body). Slicer treats a volume colour's alpha as on/off, so the table has no alpha ramp: the
    layer's opacity fades the overlay."""
    node = _own_color_table(scene, HEAT_TABLE)
    if node is None:
        ramp = np.linspace(0.0, 1.0, 256)
        colours = np.stack([np.clip(0.5 + 1.5 * ramp, 0, 1), np.clip(3.0 * ramp - 1.0, 0, 1),
                            np.clip(3.0 * ramp - 2.0, 0, 1)], 1)
        node = _new_color_table(scene, HEAT_TABLE, [(f"A{i}", tuple(c), 1.0 if i else 0.0)
                                                    for i, c in enumerate(colours)])
    return node


def detections_color_table(scene):
    """The scene's "RA Detections" colour table (created once per scene): 0 "background" (transparent),
    1 "anomaly" (green)."""
    node = _own_color_table(scene, DETECTIONS_TABLE)
    if node is None:
        node = _new_color_table(scene, DETECTIONS_TABLE, [("background", (0.0, 0.0, 0.0), 0.0),
                                                          ("anomaly", DETECTION_COLOUR, 1.0)])
    return node


def _own_color_table(scene, name: str):
    for node in nodes_of_class(scene, "vtkMRMLColorTableNode"):
        if node.GetName() == name and node.GetAttribute(KIND_ATTRIBUTE) == "colorTable":
            return node
    return None


def _new_color_table(scene, name: str, entries: list):
    node = slicer.vtkMRMLColorTableNode()
    node.SetTypeToUser()
    node.SetNumberOfColors(len(entries))
    node.SetName(name)
    node.SetAttribute(KIND_ATTRIBUTE, "colorTable")
    node.SetAttribute(NOTICE_ATTRIBUTE, NOTICE)
    for index, (label, (r, g, b), alpha) in enumerate(entries):
        node.SetColor(index, label, r, g, b, alpha)
    return scene.AddNode(node)


def _show_pseudo_healthy(node, input_node) -> None:
    """Greyscale like the input: its colour table and window/level (the reconstruction is in the input's units)."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display, shown = node.GetDisplayNode(), input_node.GetDisplayNode()
    if shown is not None and shown.IsA("vtkMRMLScalarVolumeDisplayNode"):
        if shown.GetColorNodeID():
            display.SetAndObserveColorNodeID(shown.GetColorNodeID())
        display.SetAutoWindowLevel(shown.GetAutoWindowLevel())
        if not shown.GetAutoWindowLevel():
            display.SetWindowLevel(shown.GetWindow(), shown.GetLevel())


def anomaly_window(anomaly: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Display range (min, max) of an anomaly map: 0 to its WINDOW_PERCENTILE percentile inside `mask` (arrays
    (z, y, x) on the same grid); (0, 1) when nothing in the mask is above 0."""
    inside = anomaly[mask > 0]
    top = float(np.percentile(inside, WINDOW_PERCENTILE)) if inside.size else 0.0
    if not top > 0.0:
        top = float(inside.max()) if inside.size and inside.max() > 0 else 1.0
    return 0.0, top


def _show_anomaly(scene, node, anomaly: Image, mask: Image) -> None:
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(heat_color_table(scene).GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(*anomaly_window(anomaly.array, mask.array))
    display.SetApplyThreshold(False)


def _set_segment(segmentation, input_node, labelmap) -> None:
    """The segment "Anomaly" of `segmentation` := the label map's voxels equal to 1 (same grid)."""
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(input_node)
    oriented = slicer.vtkOrientedImageData()
    oriented.DeepCopy(labelmap.GetImageData())
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(matrix)
    oriented.SetImageToWorldMatrix(matrix)
    content = segmentation.GetSegmentation()
    if content.GetSegment(SEGMENT_ID) is None:
        # A new segment gets its labelmap at once: an empty one needs the converter rules that only the Slicer
        # application registers.
        segment = slicer.vtkSegment()
        segment.SetName(SEGMENT_NAME)
        segment.SetColor(*DETECTION_COLOUR)
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), oriented)
        content.AddSegment(segment, SEGMENT_ID)
    else:
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(oriented, segmentation, SEGMENT_ID, logic.MODE_REPLACE,
                                                oriented.GetExtent()):
            raise RuntimeError(f"could not write the detections into the segmentation {segmentation.GetName()!r}")
    if segmentation.GetDisplayNode() is None:
        segmentation.CreateDefaultDisplayNodes()
    # The label map layer fills the detections in slice views; the segmentation adds their outline (and 3D).
    segmentation.GetDisplayNode().SetVisibility2DFill(False)
    segmentation.GetDisplayNode().SetVisibility2DOutline(True)


def _place_in_hierarchy(scene, input_node, nodes: list) -> None:
    """Puts new output nodes beside the input in the subject hierarchy (under its study, patient or folder); when
    the input sits at the top (or has no item), under the folder "RA results"."""
    if not nodes:
        return
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    top = hierarchy.GetSceneItemID()
    input_item = hierarchy.GetItemByDataNode(input_node)
    parent = hierarchy.GetItemParent(input_item) if input_item else 0
    if not parent or parent == top:
        parent = _results_folder(hierarchy)
    for node in nodes:
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent)
        else:
            hierarchy.CreateItem(parent, node)


def _results_folder(hierarchy) -> int:
    top = hierarchy.GetSceneItemID()
    children = vtk.vtkIdList()
    hierarchy.GetItemChildren(top, children)
    for index in range(children.GetNumberOfIds()):
        item = children.GetId(index)
        if hierarchy.GetItemAttribute(item, KIND_ATTRIBUTE) == "folder":
            return item
    folder = hierarchy.CreateFolderItem(top, RESULTS_FOLDER)
    hierarchy.SetItemAttribute(folder, KIND_ATTRIBUTE, "folder")
    hierarchy.SetItemAttribute(folder, NOTICE_ATTRIBUTE, NOTICE)
    return folder
