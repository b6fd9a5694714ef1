"""`RALogic`: anomaly detection on a volume node of an MRML scene, usable from the Python console and from tests
without the Slicer application (no Qt).

    logic = RALogic()                               # slicer.mrmlScene, or RALogic(scene)
    result = logic.detect(volumeNode, model="brain-t1-demo")
    logic.showResults()
    logic.setFlagRate(0.01)                         # new detections, without running the network again

Errors a user can fix are `ra_engine.errors.RAError`s with a message saying what to do: `DataError` (also a
ValueError) for an unusable input node, `ModelError` for a missing, corrupt, uncalibrated or unfitting model,
`Cancelled` when the progress callback returned False, `SceneClosed` when the scene was closed (or the input
removed) during or after the job. Parameter values out of range are ValueErrors. In every one of these cases the
scene is left as it was.

torch is imported on first use (`loadModel`, `detect`), never when this module is imported.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import ra_engine
from ra_engine import Cancelled, DataError, ModelError, ProgressFn, RAError
from ra_engine.models.card import CARD_FILE, WEIGHTS_FILE

from . import display, outputs
from .geometry import array_ijk_to_ras, image_from_volume, modifying
from .parameters import (
    RAParameters,
    parameter_node,
    validate_device,
    validate_flag_rate,
)


class SceneClosed(RAError):
    """The scene was closed, or a node the job needs was removed from it, during or after the job: nothing was (or
    will be) written into it."""


@dataclass
class RAResult:
    """The output nodes of one detection (all on the input's grid) and its report (the scores: `Detection.report`,
    plus "input", "model" and "device")."""

    inputNode: object
    pseudoHealthyNode: object
    anomalyMapNode: object
    detectionsNode: object  # vtkMRMLLabelMapVolumeNode, 1 = flagged
    segmentationNode: object  # vtkMRMLSegmentationNode, segment "Anomaly"
    report: dict


@dataclass
class _Job:
    """The last detection, kept (arrays on the input's grid) so that the flag rate can change without the network."""

    inputNode: object
    detection: object  # ra_engine's Detection
    matrix: object  # IJK-to-RAS (4, 4) of the outputs
    extra: dict  # report entries added by the logic


class RALogic:
    """Detection on volume nodes of one MRML scene; see the module docstring."""

    def __init__(self, scene=None):
        if scene is None:
            import slicer

            scene = getattr(slicer, "mrmlScene", None)
            if scene is None:
                raise RuntimeError("no MRML scene: pass one (RALogic(scene)) or set slicer.mrmlScene")
        self.scene = scene
        self._models: dict = {}  # (model directory, device) -> (file stamp, RAModel)
        self._scorers: dict = {}  # (LPIPS backbone, device) -> AnomalyScorer
        self._last: _Job | None = None
        self._closes = 0  # scene closings seen; a job started before one must not write
        method = weakref.WeakMethod(self._onSceneStartClose)
        self._observer = scene.AddObserver(scene.StartCloseEvent, lambda caller, event: (method() or _ignore)())

    def cleanup(self) -> None:
        """Stops observing the scene and drops the kept detection and models (call when the module is closed)."""
        if self._observer is not None:
            self.scene.RemoveObserver(self._observer)
            self._observer = None
        self._last = None
        self._models.clear()
        self._scorers.clear()

    def _onSceneStartClose(self) -> None:
        self._closes += 1
        self._last = None

    # ---- parameters ---------------------------------------------------------------------------------------------

    def getParameterNode(self):
        """The scene's parameter node (`vtkMRMLScriptedModuleNode`, singleton tag "RAModule"; created when absent)."""
        return parameter_node(self.scene)

    @property
    def parameters(self) -> RAParameters:
        """Typed access to the parameter node (`RAParameters`)."""
        return RAParameters(self.getParameterNode())

    # ---- models -------------------------------------------------------------------------------------------------

    def loadModel(self, nameOrPath: str | Path, device: str = "auto"):
        """The `RAModel` named by a registered or bundled model name, a model directory or a run folder, on `device`
        ("auto": CUDA, then MPS, then the CPU). Kept: a second call with the same model and device returns the same
        object, unless the model's files changed since."""
        path = ra_engine.resolve_model(nameOrPath).resolve()
        key = (str(path), validate_device(device))
        stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None
                      for f in (path / CARD_FILE, path / WEIGHTS_FILE))
        kept = self._models.get(key)
        if kept is None or kept[0] != stamp:
            self._models[key] = (stamp, ra_engine.load_model(path, device))
        return self._models[key][1]

    def _scorer(self, model):
        key = (model.card.lpips_backbone, str(model.device))
        if key not in self._scorers:
            self._scorers[key] = ra_engine.make_scorer(model)
        return self._scorers[key]

    # ---- detection ----------------------------------------------------------------------------------------------

    def detect(self, inputVolumeNode=None, model=None, flagRate: float | None = None, device: str | None = None,
               progress: ProgressFn | None = None, force: bool = False) -> RAResult:
        """Runs the model on a scalar volume node and creates (first run) or updates (later runs on the same input)
        its output nodes; records inputs, outputs and report on the parameter node.

        inputVolumeNode: None: the parameter node's. model: a model name or directory, or a loaded RAModel; None:
        the parameter node's. flagRate: share of normal voxels to flag (0.001 to 0.2); None: the parameter node's,
        else the model card's default. device: "auto", "cpu", "cuda" or "mps"; None: the parameter node's.
        progress(done, total) after each batch of slices; returning False cancels (`Cancelled`). force: run although
        the input's DICOM modality (subject hierarchy attribute) is not the model's.
        The engine sees the node's voxels as (z, y, x) with LPS geometry (`geometry`); the input node, its voxels,
        name and attributes are never modified."""
        existing = parameter_node(self.scene, create=False)  # read only: the scene stays as it is until the end
        params = RAParameters(existing) if existing is not None else None
        node = inputVolumeNode if inputVolumeNode is not None or params is None else params.inputVolume
        self._checkInput(node)
        chosen = model if model is not None or params is None else params.model
        if chosen is None:
            raise ModelError("no model chosen: give a registered model's name (`ra models list`) or a model "
                             "directory")
        rate = validate_flag_rate(flagRate) if flagRate is not None else params.flagRate if params else None
        device = validate_device(device) if device is not None else params.device if params else "auto"
        loaded = chosen if hasattr(chosen, "card") and hasattr(chosen, "network") else self.loadModel(chosen, device)
        threshold, used_rate = ra_engine.resolve_threshold(loaded.card.calibration, rate, model=str(loaded.path))

        image = image_from_volume(node)
        modality = self._modality(node)
        if modality:
            image.metadata["modality"] = modality
        matrix = array_ijk_to_ras(node)
        found = self._run(loaded, image, progress, force, node)
        detections = found.detections_at(threshold)
        extra = {"input": node.GetName(), "model": str(loaded.path), "device": str(loaded.device)}
        report = {**found.report(detections, threshold, used_rate), **extra}
        nodes = outputs.write_outputs(self.scene, node, matrix, found.pseudo_healthy, found.anomaly, found.mask,
                                      detections)
        params = self.parameters
        with modifying(params.node):
            params.inputVolume = node
            params.outputs = nodes
            params.report = report
            params.model = str(chosen) if isinstance(chosen, (str, Path)) else str(loaded.path)
            if flagRate is not None:
                params.flagRate = rate
            params.device = device
        self._last = _Job(node, found, matrix, extra)
        return self._result(node, nodes, report)

    def _run(self, model, image, progress: ProgressFn | None, force: bool, node):
        """The engine's detection; cancelled (`SceneClosed`) as soon as the scene is closed, and refused afterwards
        when the scene was closed or `node` removed meanwhile."""
        closes = self._closes

        def engine_progress(done: int, total: int):
            if self._closes != closes:
                return False
            return progress(done, total) if progress is not None else None

        try:
            found = ra_engine.detect(model, image, scorer=self._scorer(model), progress=engine_progress, force=force)
        except Cancelled:
            self._checkScene(closes, node)
            raise
        self._checkScene(closes, node)
        return found

    def _checkScene(self, closes: int, *nodes) -> None:
        if self._closes != closes:
            raise SceneClosed("the scene was closed while detection ran: nothing was written; load the volume "
                              "again and run detection again")
        for node in nodes:
            if node is None or node.GetScene() is not self.scene:
                name = node.GetName() if node is not None else "a result"
                raise SceneClosed(f"{name!r} was removed from the scene: nothing was written; run detection again")

    def _checkInput(self, node) -> None:
        """DataError unless `node` is a 3D scalar volume of this scene with voxels."""
        if node is None:
            raise DataError("no input volume: choose a scalar volume (e.g. a T1-weighted MRI) as input")
        name = repr(node.GetName())
        if node.GetScene() is not self.scene or self.scene.GetNodeByID(node.GetID()) is not node:
            raise DataError(f"the volume {name} is not in this logic's scene: load it into the scene first")
        if not node.IsA("vtkMRMLVolumeNode"):
            raise DataError(f"{name} is a {node.GetClassName()}, not a volume: choose a scalar volume as input")
        if node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise DataError(f"the volume {name} is a label map (regions, not intensities): choose the scan itself, a "
                            "scalar volume, as input")
        image = node.GetImageData()
        components = image.GetNumberOfScalarComponents() if image is not None else 1
        if "MultiVolume" in node.GetClassName():
            raise DataError(f"the volume {name} is a 4D multi-volume series: detection runs on one 3D volume; "
                            "extract one frame as a scalar volume")
        if node.IsA("vtkMRMLVectorVolumeNode") or node.IsA("vtkMRMLTensorVolumeNode") or components > 1:
            raise DataError(f"the volume {name} has {components} components per voxel (a colour, vector or tensor "
                            "volume): choose a scalar (greyscale) volume; convert colour images with the Vector to "
                            "Scalar Volume module")
        browser = self._sequenceBrowser(node)
        if browser is not None:
            raise DataError(f"the volume {name} is the current frame of the 4D sequence {browser.GetName()!r}: "
                            "detection runs on one 3D volume; clone this frame (Data module) and run on the copy")
        if image is None or image.GetPointData().GetScalars() is None:
            raise DataError(f"the volume {name} holds no voxels: load it again")

    def _sequenceBrowser(self, node):
        browsers = self.scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
        for index in range(browsers.GetNumberOfItems()):
            browser = browsers.GetItemAsObject(index)
            if browser.IsProxyNodeID(node.GetID()):
                return browser
        return None

    def _modality(self, node) -> str:
        """The DICOM Modality the subject hierarchy records for the node's series ("" when none)."""
        import slicer

        hierarchy = self.scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")  # read only: never creates one
        if hierarchy is None:
            return ""
        item = hierarchy.GetItemByDataNode(node)
        name = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
        return (hierarchy.GetItemAttribute(item, name) or "") if item else ""

    # ---- after detection ----------------------------------------------------------------------------------------

    def setFlagRate(self, rate: float) -> RAResult:
        """New detections (label map and segment) of the last detection at flag rate `rate` (0.001 to 0.2), from the
        kept anomaly map: the network does not run. Updates the report and flag rate on the parameter node."""
        rate = validate_flag_rate(rate)
        job = self._last
        if job is None:
            raise RAError("no detection to change: run detection first (the anomaly map of the last run is kept only "
                          "until the scene is closed)")
        self._checkScene(self._closes, job.inputNode)
        detection = job.detection
        threshold = detection.threshold_at(rate)
        detections = detection.detections_at(threshold)
        report = {**detection.report(detections, threshold, rate), **job.extra}
        nodes = outputs.find_outputs(self.scene, job.inputNode)
        if "detections" in nodes and "segmentation" in nodes:
            outputs.write_detections(self.scene, job.inputNode, nodes, job.matrix, detections)
        else:  # the user deleted a detection node: make all outputs again from the kept results
            nodes = outputs.write_outputs(self.scene, job.inputNode, job.matrix, detection.pseudo_healthy,
                                          detection.anomaly, detection.mask, detections)
        params = self.parameters
        with modifying(params.node):
            params.flagRate = rate
            params.report = report
            params.outputs = nodes
        return self._result(job.inputNode, nodes, report)

    def setOpacity(self, opacity: float) -> None:
        """Anomaly-map overlay opacity, 0 (transparent) to 1 (opaque): stored and applied to the slice views that
        show the last anomaly map."""
        params = self.parameters
        params.opacity = opacity
        display.set_opacity(self.scene, params.output("anomalyMap"), params.opacity)

    def showResults(self) -> None:
        """Shows the last results (parameter node) in every slice view: background = input, foreground = anomaly
        map at the stored opacity, label = detections."""
        params = self.parameters
        anomaly = params.output("anomalyMap")
        if params.inputVolume is None or anomaly is None:
            raise RAError("no results to show: run detection first")
        display.show_results(self.scene, params.inputVolume, anomaly, params.output("detections"), params.opacity)

    def _result(self, node, nodes: dict, report: dict) -> RAResult:
        return RAResult(node, nodes["pseudoHealthy"], nodes["anomalyMap"], nodes["detections"], nodes["segmentation"],
                        report)


def _ignore() -> None:
    """Stands in for an observer whose logic was garbage-collected."""
