"""`RALogic`: anomaly detection on a volume node of an MRML scene, usable from the Python console and from tests
without the Slicer application (no Qt).

    logic = RALogic()                               # slicer.mrmlScene, or RALogic(scene)
    result = logic.detect(volumeNode, model="brain-t1-demo")   # blocks; returns the output nodes
    task = logic.startDetection(volumeNode, model="brain-t1-demo")   # or: returns at once; poll() from a timer
    logic.showResults()
    logic.setFlagRate(0.01)                         # new detections, without running the network again

The network never runs in this process: each detection is a child process (`launcher.DetectionProcess`, running
`detectjob`) that loads PyTorch, the model and LPIPS, reports progress from its first second and stops at its next
batch when cancelled. The logic hands it the node's voxels and geometry, and writes its results into the scene, on
the thread that polls, only once it has ended well: on the input's exact grid, or not at all.

Errors a user can fix are `RAError`s (re-exported by the package) with a message saying what to do: `DataError`
(also a ValueError) for an unusable input node, `ModelError` for a missing, corrupt, uncalibrated or unfitting model,
`Cancelled` when the detection was cancelled, `SceneClosed` when the scene was closed (or the input removed) during
or after the job. Parameter values out of range are ValueErrors. In every one of these cases the scene is left as it
was. Importing this module imports neither torch nor Qt.
"""
from __future__ import annotations

import pickle
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import ra_engine
from ra_engine import Cancelled, DataError, ModelError, ProgressFn, RAError

from . import display, outputs
from .detectjob import CANCELLED_RETURNCODE, INPUT_FILE, REFUSED_RETURNCODE, RESULT_FILE
from .geometry import array_ijk_to_ras, image_from_volume
from .launcher import DetectionProcess
from .mrml import modifying, nodes_of_class
from .parameters import (
    RAParameters,
    parameter_node,
    validate_device,
    validate_flag_rate,
)

# The errors a detection job reports by class name (its "error" event), raised again here under the same class.
JOB_ERRORS = {error.__name__: error for error in (DataError, ModelError)}
POLL_INTERVAL_S = 0.05  # how often the blocking `detect` looks at its job


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
class _Kept:
    """The last detection, kept (arrays on the input's grid) so that the flag rate can change without the network."""

    inputNode: object
    detection: object  # ra_engine's Detection
    matrix: object  # IJK-to-RAS (4, 4) of the outputs
    extra: dict  # report entries added by the logic


class DetectionTask:
    """One detection started by `RALogic.startDetection`, running in a child process.

    `poll()` (from a timer: it never blocks) hands out the job's progress events (`ra_engine.Progress` events:
    "start" with a `message` for each phase, "step" with step/total_steps after each batch, "done", "error") and,
    once the job has ended, writes its outputs into the scene on the calling thread and sets `result` (an RAResult),
    or sets `error` (Cancelled, SceneClosed, DataError, ModelError, another RAError, or the exception that writing
    raised) with the scene left as it was. `running` is True until then. `cancel()` asks the job to stop at its next
    batch (it is killed if it has not within `launcher.DetectionProcess.killAfter`). `wait()` blocks until the end.
    """

    result: RAResult | None = None  # the outputs, once the job has ended well
    error: BaseException | None = None  # why there are none, once it has ended otherwise
    message: str = "Starting the detection process."  # the job's latest phase, for a status line
    progress: tuple[int, int] | None = None  # (slices scored, slices in all), once the network runs

    def __init__(self, logic: RALogic, node, image, modelPath: Path, modelParameter: str, flagRate: float | None,
                 threshold: float, usedRate: float | None, device: str, force: bool):
        self.inputNode = node
        self._logic = weakref.ref(logic)  # the logic holds its task: no reference cycle through the scene
        self._closes = logic._closes
        self._matrix = array_ijk_to_ras(node)
        self._modelParameter, self._flagRate, self._device = modelParameter, flagRate, device
        self._threshold, self._usedRate = threshold, usedRate
        self._errorEvent: dict | None = None
        self._done = False
        self._folder = Path(tempfile.mkdtemp(prefix="ra-detect-"))
        # Removed when the task has ended, and at the latest with the task object (one dropped while it runs).
        self._removeFolder = weakref.finalize(self, shutil.rmtree, self._folder, True)
        with open(self._folder / INPUT_FILE, "wb") as file:
            pickle.dump(image, file, protocol=pickle.HIGHEST_PROTOCOL)
        self._process = DetectionProcess(self._folder, modelPath, device, force, python=logic.python)

    def start(self) -> DetectionTask:
        """Starts the job's process (RALogic.startDetection does); returns self."""
        try:
            self._process.start()
        except BaseException:
            self._removeFolder()
            raise
        return self

    @property
    def running(self) -> bool:
        """True until `poll()` has seen the job end and written (or refused to write) its results."""
        return not self._done

    @property
    def log(self) -> str:
        """The job's command line and its stderr (the latest lines)."""
        return self._process.log

    @property
    def returncode(self) -> int | None:
        """The job's exit status once it has ended, the engine's own (0 done, 130 cancelled, 2 refused); None
        before."""
        return self._process.returncode

    @property
    def pid(self) -> int | None:
        """The child process's pid (inside Slicer: the launcher's; it leads the job's process group)."""
        return self._process.pid

    @property
    def enginePid(self) -> int | None:
        """The pid of the Python that runs the engine, once it has started (None before)."""
        return self._process.enginePid

    def poll(self) -> list[dict]:
        """The job's events since the last call; finishes the task once the job has ended (see the class)."""
        if self._done:
            return []
        ended = not self._process.running  # before reading: then every event of the job is in this batch
        events = self._process.poll()
        for event in events:
            if event.get("message"):
                self.message = event["message"]
            if event.get("total_steps") and event.get("step") is not None:
                self.progress = (int(event["step"]), int(event["total_steps"]))
            if event.get("event") == "error" and "error" in event:
                self._errorEvent = event
        if ended:
            self._finish()
        return events

    def cancel(self) -> None:
        """Asks the job to stop at its next batch; the task then ends with `Cancelled` and the scene unchanged."""
        self._process.cancel()

    def wait(self, progress: ProgressFn | None = None) -> RAResult:
        """Polls until the task has ended; returns `result` or raises `error`. progress(done, total) is called as
        slices are scored (done = 0 when the network starts); returning False cancels the job."""
        listening = progress is not None
        while self.running:
            for event in self.poll():
                if listening and event.get("total_steps") and event.get("step") is not None:
                    if progress(int(event["step"]), int(event["total_steps"])) is False:
                        listening = False
                        self.cancel()
            if self.running:
                time.sleep(POLL_INTERVAL_S)
        if self.error is not None:
            raise self.error
        return self.result

    def abandon(self) -> None:
        """Kills the job and forgets it (the module is closing): nothing is written."""
        if not self._done:
            self._process.kill()
            self._process.wait(10)
            self._done = True
            self.error = Cancelled("the detection was stopped because the module was closed")
            self._removeFolder()

    def _finish(self) -> None:
        try:
            logic = self._logic()
            if logic is None:
                raise RAError("the logic that started this detection is gone: nothing was written")
            found = self._outcome(logic)
            self.result = logic._writeResults(self.inputNode, found["detection"], self._matrix, self._threshold,
                                              self._usedRate, self._modelParameter, self._flagRate, self._device,
                                              {"model": found["model"], "device": found["device"]}, self._closes)
        except Exception as error:  # an RAError, or a failure while writing (which removed what it had added)
            self.error = error
        finally:
            self._done = True
            self._removeFolder()

    def _outcome(self, logic: RALogic) -> dict:
        """The job's result file, or the error that says why there is none."""
        returncode = self._process.returncode
        logic._checkScene(self._closes)
        if returncode == 0:
            with open(self._folder / RESULT_FILE, "rb") as file:
                return pickle.load(file)
        if self._process.cancelled:
            raise Cancelled("the detection was cancelled: nothing was added to the scene")
        if returncode == REFUSED_RETURNCODE and self._errorEvent is not None:
            raise JOB_ERRORS.get(self._errorEvent["error"], RAError)(self._errorEvent["message"])
        if returncode == CANCELLED_RETURNCODE:
            raise Cancelled("the detection process was stopped from outside: nothing was added to the scene")
        tail = "\n".join(self._process.log.splitlines()[-12:])
        raise RAError(f"the detection process failed (exit code {returncode}); its last output:\n{tail}")


class RALogic:
    """Detection on volume nodes of one MRML scene; see the module docstring. python: the Python executable that
    runs the detection jobs (default `launcher.defaultPython()`: inside Slicer, PythonSlicer)."""

    def __init__(self, scene=None, python: str | None = None):
        if scene is None:
            import slicer

            scene = getattr(slicer, "mrmlScene", None)
            if scene is None:
                raise RuntimeError("no MRML scene: pass one (RALogic(scene)) or set slicer.mrmlScene")
        self.scene = scene
        self.python = python
        self._task: DetectionTask | None = None
        self._last: _Kept | None = None
        self._closes = 0  # scene closings seen; a job started before one must not write
        method = weakref.WeakMethod(self._onSceneStartClose)
        observer = scene.AddObserver(scene.StartCloseEvent, lambda caller, event: (method() or _ignore)())
        # Removed with the logic at the latest: a scene destroyed later (its destructor closes it) must not call
        # back into Python, least of all from within the garbage collector.
        self._unobserve = weakref.finalize(self, scene.RemoveObserver, observer)

    def cleanup(self) -> None:
        """Stops observing the scene, kills a running detection and drops the kept one (call when the module is
        closed)."""
        self._unobserve()
        if self._task is not None:
            self._task.abandon()
        self._last = None

    def _onSceneStartClose(self) -> None:
        self._closes += 1
        self._last = None
        if self._task is not None and self._task.running:
            self._task.cancel()

    # ---- parameters ---------------------------------------------------------------------------------------------

    def getParameterNode(self):
        """The scene's parameter node (`vtkMRMLScriptedModuleNode`, singleton tag and "ModuleName" attribute
        "RAModule"; created when absent)."""
        return parameter_node(self.scene)

    @property
    def parameters(self) -> RAParameters:
        """Typed access to the parameter node (`RAParameters`)."""
        return RAParameters(self.getParameterNode())

    # ---- detection ----------------------------------------------------------------------------------------------

    def startDetection(self, inputVolumeNode=None, model=None, flagRate: float | None = None,
                       device: str | None = None, force: bool = False) -> DetectionTask:
        """Starts detection on a scalar volume node in a child process and returns its `DetectionTask` at once; the
        task's `poll()` writes the outputs when the job has ended: the node's outputs created (first run) or updated
        (later runs on the same input), inputs, outputs and report recorded on the parameter node.

        inputVolumeNode: None: the parameter node's. model: a model name, a model directory (or a loaded model: its
        directory); None: the parameter node's. flagRate: share of normal voxels to flag (0.001 to 0.2); None: the
        parameter node's, else the model card's default. device: "auto", "cpu", "cuda" or "mps"; None: the parameter
        node's. force: run although the input's DICOM modality (subject hierarchy attribute) is not the model's.
        The engine sees the node's voxels as (z, y, x) with LPS geometry (`geometry`); the input node, its voxels,
        name and attributes are never modified. What can be refused before the job starts (input, model, its
        calibration, values) raises here, with the scene unchanged; one detection at a time."""
        if self._task is not None and self._task.running:
            raise RAError("a detection is running in this scene: wait for it to end or cancel it first")
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
        path = ra_engine.resolve_model(getattr(chosen, "path", chosen)).resolve()
        threshold, usedRate = ra_engine.resolve_threshold(ra_engine.read_card(path).calibration, rate,
                                                          model=str(path))
        image = image_from_volume(node)
        modality = self._modality(node)
        if modality:
            image.metadata["modality"] = modality
        parameter = str(chosen) if isinstance(chosen, (str, Path)) else str(path)
        task = DetectionTask(self, node, image, path, parameter, rate if flagRate is not None else None, threshold,
                             usedRate, device, force)
        self._task = task.start()
        return task

    def detect(self, inputVolumeNode=None, model=None, flagRate: float | None = None, device: str | None = None,
               progress: ProgressFn | None = None, force: bool = False) -> RAResult:
        """`startDetection`, then blocks until the outputs are written and returns them (RAResult), or raises the
        task's error. progress(done, total) as slices are scored; returning False cancels (`Cancelled`)."""
        return self.startDetection(inputVolumeNode, model, flagRate, device, force).wait(progress)

    def _writeResults(self, node, found, matrix, threshold: float, usedRate: float | None, modelParameter: str,
                      flagRate: float | None, device: str, extra: dict, closes: int) -> RAResult:
        """Writes a finished job's results (the engine's Detection on the input's grid) into the scene: outputs,
        parameter node, the kept detection. Refused (`SceneClosed`) when the scene was closed or the input removed
        since the job started."""
        self._checkScene(closes, node)
        detections = found.detections_at(threshold)
        extra = {"input": node.GetName(), **extra}
        report = {**found.report(detections, threshold, usedRate), **extra}
        nodes = outputs.write_outputs(self.scene, node, matrix, found.pseudo_healthy, found.anomaly, found.mask,
                                      detections)
        params = self.parameters
        with modifying(params.node):
            params.inputVolume = node
            params.outputs = nodes
            params.report = report
            params.model = modelParameter
            if flagRate is not None:
                params.flagRate = flagRate
            params.device = device
        self._last = _Kept(node, found, matrix, extra)
        return self._result(node, nodes, report)

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
        return next((browser for browser in nodes_of_class(self.scene, "vtkMRMLSequenceBrowserNode")
                     if browser.IsProxyNodeID(node.GetID())), None)

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
        kept = self._last
        if kept is None:
            raise RAError("no detection to change: run detection first (the anomaly map of the last run is kept only "
                          "until the scene is closed)")
        self._checkScene(self._closes, kept.inputNode)
        detection = kept.detection
        threshold = detection.threshold_at(rate)
        detections = detection.detections_at(threshold)
        report = {**detection.report(detections, threshold, rate), **kept.extra}
        nodes = outputs.find_outputs(self.scene, kept.inputNode)
        if "detections" in nodes and "segmentation" in nodes:
            outputs.write_detections(self.scene, kept.inputNode, nodes, kept.matrix, detections)
        else:  # the user deleted a detection node: make all outputs again from the kept results
            nodes = outputs.write_outputs(self.scene, kept.inputNode, kept.matrix, detection.pseudo_healthy,
                                          detection.anomaly, detection.mask, detections)
        params = self.parameters
        with modifying(params.node):
            params.flagRate = rate
            params.report = report
            params.outputs = nodes
        return self._result(kept.inputNode, nodes, report)

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
