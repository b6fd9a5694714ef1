"""Small MRML helpers the logic shares: batched Modified events, and the nodes of a class without leaking a
collection (vtkMRMLScene.GetNodesByClass hands its caller a new vtkCollection to release, which Python code easily
forgets: one leaked collection per call)."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def modifying(node):
    """Batches an MRML node's Modified events: one event after several changes (StartModify/EndModify), also
    when a change raises."""
    was = node.StartModify()
    try:
        yield
    finally:
        node.EndModify(was)


def nodes_of_class(scene, class_name: str) -> list:
    """The scene's nodes of `class_name` (subclasses included), in scene order; no collection is created."""
    return [scene.GetNthNodeByClass(index, class_name) for index in range(scene.GetNumberOfNodesByClass(class_name))]
