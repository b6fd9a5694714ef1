"""The module's parameters, kept on a `vtkMRMLScriptedModuleNode` (singleton tag and "ModuleName" attribute
"RAModule") so that a saved scene restores the panel: the input volume, model, flag rate, overlay opacity and
device, and the last outputs and report.

Values are stored as MRML string parameters, nodes as node references (so they survive the renumbering of node IDs
when a scene is imported). Setters validate and raise ValueError with a message a user can act on.
"""
from __future__ import annotations

import json
import math

from ra_engine import FLAG_RATES

from .mrml import modifying

MODULE_NAME = "RAModule"
MODULE_NAME_ATTRIBUTE = "ModuleName"  # how Slicer's node selectors and ScriptedLoadableModuleLogic find it
DEVICES = ("auto", "cpu", "cuda", "mps")
FLAG_RATE_RANGE = (FLAG_RATES[0], FLAG_RATES[-1])  # the calibrated range of every model card: 0.001 to 0.2
DEFAULT_OPACITY = 0.5
DEFAULT_DEVICE = "auto"
# Node reference roles of the last run's outputs (outputs.KINDS), besides "inputVolume".
OUTPUT_ROLES = ("pseudoHealthy", "anomalyMap", "detections", "segmentation")


def parameter_node(scene, create: bool = True):
    """The scene's RA parameter node (`vtkMRMLScriptedModuleNode`, singleton tag "RAModule", attribute
    "ModuleName" = "RAModule", as Slicer's ScriptedLoadableModuleLogic tags them); created and added when absent and
    `create`, else None. Closing the scene keeps a singleton node but resets it, attributes included: the attribute
    is restored here, as Slicer does."""
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is not None:
        if create and node.GetAttribute(MODULE_NAME_ATTRIBUTE) != MODULE_NAME:
            node.SetAttribute(MODULE_NAME_ATTRIBUTE, MODULE_NAME)
        return node
    if not create:
        return None
    node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
    node.UnRegister(None)  # CreateNodeByClass hands over a reference; the scene keeps its own
    node.SetSingletonTag(MODULE_NAME)
    node.SetAttribute(MODULE_NAME_ATTRIBUTE, MODULE_NAME)
    node.SetName(scene.GenerateUniqueName(MODULE_NAME))
    return scene.AddNode(node)


class RAParameters:
    """Typed access to the parameter node. Attributes (camelCase, as Slicer's parameter wrappers):

    inputVolume: vtkMRMLScalarVolumeNode | None; model: str | None (a registered name or a model directory);
    flagRate: float | None (share of normal foreground voxels flagged, 0.001 to 0.2; None: the model card's default);
    opacity: float (0 to 1, anomaly-map overlay); device: "auto" | "cpu" | "cuda" | "mps"; report: dict | None (the
    last scores, stored as JSON); outputs: {role: node} of the last run (OUTPUT_ROLES)."""

    def __init__(self, node):
        self.node = node

    @classmethod
    def of(cls, scene) -> "RAParameters":
        """The wrapper of the scene's parameter node (created when absent)."""
        return cls(parameter_node(scene))

    # ---- nodes --------------------------------------------------------------------------------------------------

    @property
    def inputVolume(self):
        return self.node.GetNodeReference("inputVolume")

    @inputVolume.setter
    def inputVolume(self, volume) -> None:
        if volume is not None and not volume.IsA("vtkMRMLScalarVolumeNode"):
            raise ValueError(f"the input must be a scalar volume node, got a {volume.GetClassName()}")
        self.node.SetNodeReferenceID("inputVolume", volume.GetID() if volume is not None else None)

    def output(self, role: str):
        """The last run's output node of `role` (OUTPUT_ROLES), or None."""
        if role not in OUTPUT_ROLES:
            raise ValueError(f"unknown output {role!r}: one of {', '.join(OUTPUT_ROLES)}")
        return self.node.GetNodeReference(role)

    @property
    def outputs(self) -> dict:
        return {role: self.output(role) for role in OUTPUT_ROLES}

    @outputs.setter
    def outputs(self, nodes: dict) -> None:
        unknown = set(nodes) - set(OUTPUT_ROLES)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}: use {', '.join(OUTPUT_ROLES)}")
        with modifying(self.node):
            for role in OUTPUT_ROLES:
                node = nodes.get(role)
                self.node.SetNodeReferenceID(role, node.GetID() if node is not None else None)

    # ---- values -------------------------------------------------------------------------------------------------

    @property
    def model(self) -> str | None:
        return self._get("model") or None

    @model.setter
    def model(self, name_or_path) -> None:
        if name_or_path is not None and not str(name_or_path).strip():
            raise ValueError("the model must be a registered model's name or a model directory, not empty")
        self._set("model", None if name_or_path is None else str(name_or_path))

    @property
    def flagRate(self) -> float | None:
        text = self._get("flagRate")
        return float(text) if text else None

    @flagRate.setter
    def flagRate(self, rate) -> None:
        self._set("flagRate", None if rate is None else repr(validate_flag_rate(rate)))

    @property
    def opacity(self) -> float:
        text = self._get("opacity")
        return float(text) if text else DEFAULT_OPACITY

    @opacity.setter
    def opacity(self, value) -> None:
        self._set("opacity", repr(validate_opacity(value)))

    @property
    def device(self) -> str:
        return self._get("device") or DEFAULT_DEVICE

    @device.setter
    def device(self, name) -> None:
        self._set("device", validate_device(name))

    @property
    def report(self) -> dict | None:
        text = self._get("report")
        return json.loads(text) if text else None

    @report.setter
    def report(self, value: dict | None) -> None:
        self._set("report", None if value is None else json.dumps(value))

    def _get(self, name: str) -> str:
        return self.node.GetParameter(name) or ""

    def _set(self, name: str, text: str | None) -> None:
        if text is None:
            self.node.UnsetParameter(name)
        else:
            self.node.SetParameter(name, text)


def validate_flag_rate(rate) -> float:
    """`rate` as a float in 0.001..0.2 (the share of normal foreground voxels to flag), else ValueError."""
    low, high = FLAG_RATE_RANGE
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise ValueError(f"flag rate {rate!r} is not a number: give the share of normal voxels to flag, e.g. "
                         f"0.05 for 5%") from None
    if not (math.isfinite(value) and low <= value <= high):
        hint = f" (did you mean {value / 100:g}, i.e. {value:g}%?)" if low <= value / 100 <= high else ""
        raise ValueError(f"flag rate {value:g} is outside {low:g} to {high:g} ({low:.1%} to {high:.0%}): it is the "
                         f"share of normal voxels to flag, e.g. 0.05 for 5%{hint}")
    return value


def validate_opacity(value) -> float:
    """`value` as a float in 0..1 (0 transparent, 1 opaque), else ValueError."""
    try:
        opacity = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"opacity {value!r} is not a number from 0 (transparent) to 1 (opaque)") from None
    if not 0.0 <= opacity <= 1.0:  # also refuses NaN
        raise ValueError(f"opacity {opacity:g} is outside 0 (transparent) to 1 (opaque)")
    return opacity


def validate_device(name) -> str:
    """`name` if it is one of DEVICES (or "cuda:N"), else ValueError."""
    if not isinstance(name, str) or not (name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ValueError(f"device {name!r} is not one of {', '.join(DEVICES)} (or cuda:N)")
    return name
