"""Showing results in the slice views: every slice composite node of the scene gets background = the input,
foreground = the anomaly map (heat colours, partly transparent), label = the detections label map."""
from __future__ import annotations

from .mrml import modifying, nodes_of_class
from .parameters import validate_opacity


def _composite_nodes(scene) -> list:
    return nodes_of_class(scene, "vtkMRMLSliceCompositeNode")


def show_results(scene, input_node, anomaly_node, detections_node, opacity: float) -> int:
    """Sets the layers of every slice view (slice composite node) in `scene`; returns how many views were set (0 in
    a scene without views). Nodes may be None to clear that layer."""
    opacity = validate_opacity(opacity)
    node_id = lambda node: node.GetID() if node is not None else None
    views = _composite_nodes(scene)
    for composite in views:
        with modifying(composite):
            composite.SetBackgroundVolumeID(node_id(input_node))
            composite.SetForegroundVolumeID(node_id(anomaly_node))
            composite.SetForegroundOpacity(opacity)
            composite.SetLabelVolumeID(node_id(detections_node))
            composite.SetLabelOpacity(1.0)
    return len(views)


def set_opacity(scene, anomaly_node, opacity: float) -> int:
    """Sets the foreground opacity (0 transparent .. 1 opaque) of the slice views that show `anomaly_node` as their
    foreground (all views when it is None); returns how many were set."""
    opacity = validate_opacity(opacity)
    views = [c for c in _composite_nodes(scene)
             if anomaly_node is None or c.GetForegroundVolumeID() == anomaly_node.GetID()]
    for composite in views:
        composite.SetForegroundOpacity(opacity)
    return len(views)
