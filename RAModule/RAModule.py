"""3D Slicer module "Anomaly Detection (RA)": the panel that wires Slicer's widgets to RALogic.

No computation lives here: detection, thresholds, display, training and the model registry are RALogic's (no Qt)
and ra_engine's (no Slicer). Slicer imports this file at start-up, before PyTorch may be installed, so torch and
ra_engine's torch-using modules are never imported at module level; RALogic is imported when the panel is first
opened.
"""
import logging
import re
import time
from pathlib import Path

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

NOTICE = "Research use only, not for diagnosis."

# The sample scan (Sample Data module, category "RA"): ra_engine's bundled Colin27 head, copied by Sample Data from
# its installed file (a file:// URI, no network) and checked against this digest.
SAMPLE_NAME = "RAColin27Head"
SAMPLE_FILE_NAME = "RA-Colin27-head.nii.gz"
SAMPLE_RESOURCE = ("reference", "head.nii.gz")
SAMPLE_SHA256 = "c8423c7c75a0c9c89b486936caff63ce2eba7947e585e657e8f9adfbe69c97c4"

# The small brain MRI model bundled with the extension (ra_engine/resources/models/<name>), used by the self-test.
DEMO_MODEL = "brain-t1-demo"

# A registry name (ra_engine.registry.NAME_PATTERN): what a trained model may be registered as.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def engineResources() -> Path:
    """The folder of ra_engine's bundled data (reference heads, sample scans, bundled models)."""
    import ra_engine  # light: no torch (ARCHITECTURE.md)

    return Path(ra_engine.__file__).resolve().parent / "resources"


#
# RAModule
#


class RAModule(ScriptedLoadableModule):
    """The module's description for Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Anomaly Detection (RA)"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["RA for 3D Slicer developers"]
        self.parent.helpText = f"""
<p><b>{NOTICE}</b></p>
<p>Unsupervised anomaly detection with Reversed Auto-Encoders (RA). A model trained on normal scans only
reconstructs a pseudo-healthy version of a scan; where the scan differs from its reconstruction, in intensity and in
perceptual features, is marked as anomalous.</p>
<p>Choose a scan and a model and press <i>Detect Anomalies</i>. The anomaly map is shown over the scan and the
detections as a segmentation. The <i>flag rate</i> sets the threshold: the share of normal brain/body voxels that
the model would flag, from its calibration on normal scans. Moving it does not run the network again. The scan score
is compared with the scores of the model's normal calibration scans when its calibration holds them.</p>
<p>The <i>Training</i> section trains a model on your own normal scans in a separate process
(the same as the <tt>ra train</tt> command).</p>
<p>The method: C.I. Bercea, B. Wiestler, D. Rueckert, J.A. Schnabel, "Towards Universal Unsupervised Anomaly
Detection in Medical Imaging", arXiv:2401.10637 (2024).</p>
"""
        self.parent.acknowledgementText = """
<p>Reversed Auto-Encoders: Cosmin I. Bercea, Benedikt Wiestler, Daniel Rueckert and Julia A. Schnabel.
The sample scan is the Colin27 average head (C.J. Holmes et al., J Comput Assist Tomogr 22(2):324-333, 1998;
McConnell Brain Imaging Centre, Montreal Neurological Institute), as distributed with MRIcron (BSD-3-Clause).</p>
"""
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Adds the bundled sample scan to the Sample Data module, category "RA". Sample Data copies it from the
    installed file (file:// URI, no network) into its cache and checks its SHA256."""
    import SampleData

    try:
        scan = engineResources().joinpath(*SAMPLE_RESOURCE)
    except ImportError:
        logging.warning("RA: the ra_engine package is not importable, so its sample scan is not offered in Sample "
                        "Data; install the project into Slicer's Python (see docs/SLICER.md)")
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="RA",
        sampleName=SAMPLE_NAME,
        uris=scan.as_uri(),
        fileNames=SAMPLE_FILE_NAME,
        nodeNames=SAMPLE_NAME,
        checksums=f"SHA256:{SAMPLE_SHA256}",
        thumbnailFileName=str(Path(__file__).resolve().parent / "Resources" / "Icons" / f"{SAMPLE_NAME}.png"),
    )


#
# RAModuleWidget
#


class RAModuleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Widgets write the module's parameter node (RALogic's wrapper); the parameter node's changes update
    the widgets; buttons call RALogic."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.models = None
        self.result = None  # the RAResult on show, None before a detection and after the scene is closed
        self._parameterNode = None
        self._updatingGUI = False
        self._detecting = False
        self._cancelRequested = False
        self._training = None  # the RALogic.launcher.TrainingProcess started from this panel

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from RALogic import RALogic
        from RALogic.models import ModelManager

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RAModule.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = RALogic()
        self.models = ModelManager()

        self.ui.modelSelector.placeholderText = "no model: import or train one"
        self.ui.manageModelsButton.setMenu(self._modelsMenu())
        # The threshold follows the slider while it moves, at most every 150 ms.
        self._flagRateTimer = qt.QTimer()
        self._flagRateTimer.setSingleShot(True)
        self._flagRateTimer.setInterval(150)
        self._flagRateTimer.connect("timeout()", self._applyFlagRate)
        self._trainingTimer = qt.QTimer()
        self._trainingTimer.setInterval(500)
        self._trainingTimer.connect("timeout()", self._pollTraining)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputVolumeSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", lambda node: self.updateParameterNodeFromGUI("inputVolume", node))
        self.ui.modelSelector.connect(
            "currentIndexChanged(int)",
            lambda index: self.updateParameterNodeFromGUI("model", self.ui.modelSelector.itemData(index)))
        self.ui.deviceSelector.connect(
            "currentIndexChanged(int)",
            lambda index: self.updateParameterNodeFromGUI("device", self.ui.deviceSelector.itemText(index)))
        self.ui.flagRateSlider.connect("valueChanged(double)", self.onFlagRateChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.detectButton.connect("clicked(bool)", self.onDetectButton)

        self.ui.trainDataFolderButton.connect("clicked()", self.onChooseTrainingFolder)
        self.ui.trainDataCsvButton.connect("clicked()", self.onChooseTrainingCsv)
        self.ui.trainDataLineEdit.connect("textChanged(QString)", lambda text: self._updateTrainButton())
        self.ui.trainOutputPathLineEdit.connect("currentPathChanged(QString)", lambda path: self._updateTrainButton())
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)

        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self):
        """Called when the application closes or the module is reloaded: stops what this panel started. Also runs
        after a setup() that failed early (e.g. RALogic not importable), so what setup() creates may be missing."""
        self._cancelRequested = True
        if self._training is not None:
            self._training.cancel()
        for timer in (getattr(self, "_trainingTimer", None), getattr(self, "_flagRateTimer", None)):
            if timer is not None:
                timer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.cleanup()

    def enter(self):
        self.refreshModels()
        self.initializeParameterNode()

    def exit(self):
        # The panel is hidden: stop following the parameter node (a running detection keeps its own references).
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        # RALogic stops a running detection itself (SceneClosed). Training works on files, not on the scene, in a
        # process of its own: it is left running.
        self.setParameterNode(None)
        self._showResult(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # Parameter node <-> GUI

    def initializeParameterNode(self):
        """Follows the module's parameter node, choosing an input volume and a model when none is chosen yet."""
        from RALogic.outputs import KIND_ATTRIBUTE

        self.setParameterNode(self.logic.parameters)
        parameters = self._parameterNode
        if parameters.inputVolume is None:
            # Only a volume the input selector can show: it hides the .ui's hideChildNodeTypes (label maps, vector,
            # tensor and diffusion volumes, all vtkMRMLScalarVolumeNode subclasses) and nodes hidden from editors.
            hidden = list(self.ui.inputVolumeSelector.hideChildNodeTypes)
            volumes = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                       if not any(node.IsA(nodeType) for nodeType in hidden) and not node.GetHideFromEditors()
                       and not node.GetAttribute(KIND_ATTRIBUTE)]
            if volumes:
                parameters.inputVolume = volumes[0]
        if not parameters.model and self.ui.modelSelector.count:
            parameters.model = self.ui.modelSelector.itemData(0)

    def setParameterNode(self, parameterNode):
        """parameterNode: RALogic's parameter wrapper (RALogic.parameters.RAParameters), or None; its MRML node
        is observed for changes."""
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode.node, vtk.vtkCommand.ModifiedEvent,
                                self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self.addObserver(parameterNode.node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        parameters = self._parameterNode
        if parameters is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            self.ui.inputVolumeSelector.setCurrentNode(parameters.inputVolume)
            modelIndex = self.ui.modelSelector.findData(parameters.model)
            if modelIndex >= 0:
                self.ui.modelSelector.currentIndex = modelIndex
            deviceIndex = self.ui.deviceSelector.findText(parameters.device or "auto")
            if deviceIndex >= 0:
                self.ui.deviceSelector.currentIndex = deviceIndex
            if parameters.flagRate is not None:
                self.ui.flagRateSlider.value = 100.0 * parameters.flagRate
            self.ui.opacitySlider.value = parameters.opacity
            self._showReport(parameters.report)  # the last scores, also after detection from the Python console
        finally:
            self._updatingGUI = False
        self._updateDetectButton()

    def updateParameterNodeFromGUI(self, name, value):
        """Writes one parameter (inputVolume, model, device, flagRate, opacity) from the widget that changed it."""
        if self._parameterNode is None or self._updatingGUI:
            return
        setattr(self._parameterNode, name, value)
        self._updateDetectButton()

    # Detection

    def _updateDetectButton(self):
        if self._detecting:
            return  # the button is Cancel
        from RALogic.dependencies import missingDependencies

        parameters = self._parameterNode
        # Without the engine's packages the button stays usable: pressing it offers their installation.
        ready = (parameters is not None and parameters.inputVolume is not None
                 and (bool(parameters.model) or bool(missingDependencies())))
        self.ui.detectButton.enabled = ready
        self.ui.detectButton.toolTip = (
            "Reconstruct a pseudo-healthy version of the scan and show where the scan differs from it." if ready
            else "Choose an input volume and a model first.")

    def onDetectButton(self):
        if self._detecting:
            self._cancelRequested = True
            self.ui.detectButton.enabled = False  # until the engine has stopped
            self.ui.statusLabel.text = "Cancelling..."
            return
        if not self.ensureDependencies():
            return
        from RALogic import SceneClosed
        from RALogic.dependencies import deviceInfo
        from ra_engine import Cancelled

        parameters = self._parameterNode
        volume, model, flagRate, device = (parameters.inputVolume, parameters.model, parameters.flagRate,
                                           parameters.device or "auto")
        if not model:
            slicer.util.errorDisplay("No model is available: import one (Manage...) or train one (Training).")
            return
        _, deviceMessage = deviceInfo(device)  # RALogic resolves the same choice ("auto") the same way
        self._setDetecting(True)
        self.ui.statusLabel.text = f"Detecting anomalies with {model}. {deviceMessage}"
        started = time.monotonic()
        try:
            with slicer.util.tryWithErrorDisplay("Anomaly detection failed."):
                try:
                    result = self.logic.detect(volume, model=model, flagRate=flagRate, device=device,
                                               progress=self._onDetectProgress)
                except SceneClosed as closed:
                    self.ui.statusLabel.text = str(closed)
                    return
                except Cancelled:
                    self.ui.statusLabel.text = "Cancelled; nothing was added to the scene."
                    return
                self.logic.setOpacity(self.ui.opacitySlider.value)
                self.logic.showResults()
                self._showResult(result)
                self.ui.statusLabel.text = (f"Done in {time.monotonic() - started:.1f} s. {deviceMessage} "
                                            f"{result.report.get('notice') or NOTICE}")
        finally:
            self._setDetecting(False)

    def _onDetectProgress(self, done, total):
        """RALogic's progress callback: shows progress, keeps Slicer responsive; False asks the engine to stop."""
        self.ui.detectProgressBar.maximum = max(int(total), 1)
        self.ui.detectProgressBar.value = int(done)
        slicer.app.processEvents()
        return not self._cancelRequested

    def _setDetecting(self, running):
        self._detecting = running
        self._cancelRequested = False
        self.ui.detectButton.text = "Cancel" if running else "Detect Anomalies"
        self.ui.detectButton.enabled = True
        self.ui.detectProgressBar.value = 0
        self.ui.detectProgressBar.visible = running
        for widget in (self.ui.inputVolumeSelector, self.ui.modelSelector, self.ui.manageModelsButton,
                       self.ui.deviceSelector, self.ui.flagRateSlider):
            widget.enabled = not running
        if not running:
            self.ui.flagRateSlider.enabled = self.result is not None
            self._updateDetectButton()

    def _showResult(self, result):
        """result: this panel's RAResult, whose detections the flag-rate slider can recompute, or None."""
        self.result = result
        self.ui.flagRateSlider.enabled = result is not None
        self._showReport(result.report if result is not None else None)
        flagRate = result.report.get("flag_rate") if result is not None else None
        if flagRate is not None:  # the model card's default when none was chosen
            updating, self._updatingGUI = self._updatingGUI, True
            try:
                self.ui.flagRateSlider.value = 100.0 * flagRate
            finally:
                self._updatingGUI = updating

    def _showReport(self, report):
        """Shows a detection report (ra_engine's scores dict), or dashes for None."""
        if report is None:
            self.ui.scoreLabel.text = "-"
            self.ui.regionsLabel.text = "-"
            return
        score = report["scan_score"]
        percentile = report.get("scan_percentile_of_normal")
        self.ui.scoreLabel.text = f"{score:.4g} " + (
            f"(percentile {percentile:.0f} of the model's normal scans)" if percentile is not None
            else "(the model's calibration holds no normal scan scores to compare with)")
        flagRate = report.get("flag_rate")
        at = f"{100.0 * flagRate:.1f}% flag rate" if flagRate is not None else "a fixed threshold"
        self.ui.regionsLabel.text = (f"{report['regions_total']} regions, {report['flagged_voxels']} voxels "
                                     f"flagged at {at} (threshold {report['threshold']:.4g}). {NOTICE}")

    def onFlagRateChanged(self, percent):
        if self._updatingGUI:
            return
        self.updateParameterNodeFromGUI("flagRate", percent / 100.0)
        # Not restarted while pending (QTimer.start() restarts a running timer): a continuous drag updates the
        # detections every 150 ms instead of only once the slider stops; the timeout reads the slider's value then.
        if self.result is not None and not self._flagRateTimer.isActive():
            self._flagRateTimer.start()

    def _applyFlagRate(self):
        if self.result is None:
            return
        with slicer.util.tryWithErrorDisplay("The detections could not be updated."):
            self._showReport(self.logic.setFlagRate(self.ui.flagRateSlider.value / 100.0).report)

    def onOpacityChanged(self, opacity):
        if self._updatingGUI:
            return
        self.updateParameterNodeFromGUI("opacity", opacity)
        if self.result is not None:
            self.logic.setOpacity(opacity)

    # Dependencies

    def ensureDependencies(self):
        """True when the engine's packages are importable. Otherwise offers to install them: PyTorch through the
        PyTorch extension (PyTorchUtils picks the build that fits this computer's GPU; it asks for confirmation
        itself), the others with pip into Slicer's Python. Shows what is still missing and returns False."""
        from RALogic.dependencies import dependencyMessage, installPackages, installTorch, missingDependencies

        missing = missingDependencies()
        if not missing:
            return True
        if any(dependency.viaPyTorchExtension for dependency in missing):
            try:
                with slicer.util.tryWithErrorDisplay("PyTorch could not be installed."):
                    if installTorch(askConfirmation=True) is None:
                        return False  # declined
            except Exception:
                return False  # shown to the user by tryWithErrorDisplay
        others = [dependency.requirement for dependency in missingDependencies()
                  if not dependency.viaPyTorchExtension]
        if others:
            if not slicer.util.confirmOkCancelDisplay(
                    "Anomaly detection needs these Python packages, not yet installed in Slicer's Python: "
                    f"{', '.join(others)}.\n\nInstall them now with pip? This may take a few minutes.",
                    windowTitle="Anomaly Detection (RA)"):
                return False
            try:
                with slicer.util.tryWithErrorDisplay("The packages could not be installed.", waitCursor=True):
                    installPackages(others)
            except Exception:
                return False
        stillMissing = dependencyMessage()
        if stillMissing:
            slicer.util.errorDisplay(f"{stillMissing}\n\nRestarting Slicer may help after an installation.",
                                     windowTitle="Anomaly Detection (RA)")
            return False
        self.refreshModels()  # the model cards can be read now
        return True

    # Models

    def refreshModels(self):
        """Fills the model list from the registry (registered models, then bundled ones), keeping the choice.
        Model cards are read without torch, so the list fills before the engine's packages are installed; the
        status line then says what is missing (only a missing platformdirs leaves the list empty)."""
        from RALogic.dependencies import dependencyMessage

        combo = self.ui.modelSelector
        chosen = combo.itemData(combo.currentIndex)
        missing = dependencyMessage()
        if missing:
            self.ui.statusLabel.text = missing
        try:
            entries = self.models.listModels()
        except ImportError:
            entries = []
        self._updatingGUI = True
        try:
            combo.clear()
            for entry in entries:
                label = entry["name"]
                details = [entry["preset"]] if entry.get("preset") else []
                if entry.get("bundled"):
                    details.append("bundled")
                if entry.get("problem"):
                    details.append("cannot be read")
                elif not entry.get("calibrated"):
                    details.append("not calibrated")
                if details:
                    label += f" ({', '.join(details)})"
                combo.addItem(label, entry["name"])
                combo.setItemData(combo.count - 1, entry.get("problem") or entry.get("path", ""), qt.Qt.ToolTipRole)
            index = combo.findData(chosen)
            combo.currentIndex = index if index >= 0 else (0 if combo.count else -1)
        finally:
            self._updatingGUI = False
        if combo.itemData(combo.currentIndex) != chosen:
            self.updateParameterNodeFromGUI("model", combo.itemData(combo.currentIndex))

    def _selectModel(self, name):
        index = self.ui.modelSelector.findData(name)
        if index >= 0:
            self.ui.modelSelector.currentIndex = index

    def _modelsMenu(self):
        menu = qt.QMenu(self.ui.manageModelsButton)
        for text, slot in (("Import from folder...", self.onImportModelFolder),
                           ("Import from URL...", self.onImportModelUrl),
                           ("Remove selected model", self.onRemoveModel),
                           ("Open models folder", self.onOpenModelsFolder)):
            menu.addAction(text).connect("triggered()", slot)
        return menu

    def onImportModelFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), "Choose a model folder (it holds model.json and model.safetensors)")
        if folder:
            self._importModel(folder)

    def onImportModelUrl(self):
        url = qt.QInputDialog.getText(slicer.util.mainWindow(), "Import a model",
                                      "URL of the model's .zip (http, https or file):").strip()
        if not url:
            return
        sha256 = qt.QInputDialog.getText(
            slicer.util.mainWindow(), "Import a model",
            "SHA256 of the .zip, as published with it (empty: the download is checked only against its own "
            "model card):").strip()
        self._importModel(url, sha256 or None)

    def _importModel(self, source, sha256=None):
        if not self.ensureDependencies():  # importing checks the weights against their card with torch
            return
        before = {self.ui.modelSelector.itemData(i) for i in range(self.ui.modelSelector.count)}
        with slicer.util.tryWithErrorDisplay("The model could not be imported.", waitCursor=True):
            self.models.importModel(source, sha256=sha256)
        self.refreshModels()
        added = [self.ui.modelSelector.itemData(i) for i in range(self.ui.modelSelector.count)
                 if self.ui.modelSelector.itemData(i) not in before]
        if added:
            self._selectModel(added[0])

    def onRemoveModel(self):
        name = self.ui.modelSelector.itemData(self.ui.modelSelector.currentIndex)
        if not name or not slicer.util.confirmOkCancelDisplay(
                f"Remove the registered model {name}? Its folder is deleted.", windowTitle="Remove a model"):
            return
        with slicer.util.tryWithErrorDisplay(f"The model {name} could not be removed."):
            self.models.removeModel(name)
        self.refreshModels()

    def onOpenModelsFolder(self):
        with slicer.util.tryWithErrorDisplay("The models folder could not be opened."):
            self.models.openModelsFolder()

    # Training

    def onChooseTrainingFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Choose a folder of normal scans")
        if folder:
            self.ui.trainDataLineEdit.text = folder

    def onChooseTrainingCsv(self):
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Choose a CSV of normal scans", "",
                                              "CSV files (*.csv);;All files (*)")
        if path:
            self.ui.trainDataLineEdit.text = path

    def _trainingRunning(self):
        return self._training is not None and self._training.running

    def _updateTrainButton(self):
        if self._trainingRunning():
            return  # the button is Cancel
        self.ui.trainButton.enabled = bool(self.ui.trainDataLineEdit.text.strip()
                                           and self.ui.trainOutputPathLineEdit.currentPath)

    def onTrainButton(self):
        if self._trainingRunning():
            self._training.cancel()
            self.ui.trainButton.enabled = False  # until the process has stopped
            self.ui.trainLogTextEdit.appendPlainText("Stopping after the current iteration (with a checkpoint)...")
            return
        if not self.ensureDependencies():
            return
        from RALogic.launcher import TrainingProcess

        self._training = TrainingProcess(
            self.ui.trainDataLineEdit.text.strip(), self.ui.trainPresetSelector.currentText,
            self.ui.trainOutputPathLineEdit.currentPath, epochs=self.ui.trainEpochsSpinBox.value or None,
            resume=self.ui.trainResumeCheckBox.checked,
            options={"batchnorm": ("reference", "batch")[self.ui.trainBatchNormComboBox.currentIndex]})
        self.ui.trainLogTextEdit.clear()
        self.ui.trainLogTextEdit.appendPlainText("$ " + self._training.commandLine)
        with slicer.util.tryWithErrorDisplay("Training could not start."):
            self._training.start()  # checks the data and the output folder first
        self._setTraining(True)
        self._trainingTimer.start()

    def _setTraining(self, running):
        self.ui.trainButton.text = "Cancel Training" if running else "Start Training"
        self.ui.trainButton.enabled = True
        self.ui.trainProgressBar.visible = running
        if running:
            self.ui.trainProgressBar.value = 0
        for widget in (self.ui.trainDataLineEdit, self.ui.trainDataFolderButton, self.ui.trainDataCsvButton,
                       self.ui.trainPresetSelector, self.ui.trainOutputPathLineEdit, self.ui.trainEpochsSpinBox,
                       self.ui.trainBatchNormComboBox, self.ui.trainResumeCheckBox):
            widget.enabled = not running
        if not running:
            self._updateTrainButton()

    def _pollTraining(self):
        for event in self._training.poll():
            self._showTrainingEvent(event)
        if not self._training.running:
            self._trainingTimer.stop()
            self._finishTraining()

    def _showTrainingEvent(self, event):
        bar = self.ui.trainProgressBar
        if event.get("total_steps"):
            bar.maximum = int(event["total_steps"])
        if event.get("step") is not None:
            bar.value = min(int(event["step"]), bar.maximum)
        eta = event.get("eta_s")
        bar.format = "%p%" + (f", about {_duration(eta)} left" if eta else "")
        kind = event.get("event")
        if kind == "epoch":
            losses = ", ".join(f"{name} {value:.4g}" for name, value in (event.get("losses") or {}).items())
            validation = event.get("val_loss")
            self.ui.trainLogTextEdit.appendPlainText(
                f"epoch {event.get('epoch')}: {losses}"
                + (f"; validation {validation:.4g}" if validation is not None else ""))
        elif kind != "step":  # start, checkpoint, done, error: every step would flood the log
            message = event.get("message")
            self.ui.trainLogTextEdit.appendPlainText(f"{kind}: {message}" if message else kind)

    def _finishTraining(self):
        process = self._training
        self._setTraining(False)
        if process.modelPath is not None:
            self.ui.trainLogTextEdit.appendPlainText(f"Finished: the model is in {process.modelPath}")
            self._registerTrainedModel(process.modelPath)
        elif process.cancelled:
            self.ui.trainLogTextEdit.appendPlainText(
                "Stopped. Tick 'Resume an interrupted run' and start again to continue from the last checkpoint.")
        else:
            self.ui.trainLogTextEdit.appendPlainText(process.log[-4000:])
            slicer.util.errorDisplay(f"Training failed (exit code {process.returncode}); its log is in the "
                                     "Training section.")

    def _registerTrainedModel(self, modelDir):
        """Offers to add the trained model to the registry so that it appears in the model list."""
        suggested = re.sub(r"[^A-Za-z0-9._-]+", "-", modelDir.parent.name).strip("-.") or "my-model"
        name = qt.QInputDialog.getText(slicer.util.mainWindow(), "Register the trained model",
                                       "Name in the model list (letters, digits, '.', '_' and '-'):",
                                       qt.QLineEdit.Normal, suggested).strip()
        if not name:
            return
        if not MODEL_NAME_PATTERN.fullmatch(name):
            slicer.util.errorDisplay(f"{name!r} is not a usable model name: use letters, digits, '.', '_' and '-', "
                                     "starting with a letter or digit.")
            return
        with slicer.util.tryWithErrorDisplay("The trained model could not be registered.", waitCursor=True):
            self.models.importModel(str(modelDir), name=name)
        self.refreshModels()
        self._selectModel(name)


def _duration(seconds):
    """A rough human duration: '40 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


#
# RAModuleTest
#


class RAModuleTest(ScriptedLoadableModuleTest):
    """Self-test, offline: the bundled sample scan with a synthetic lesion, the bundled demonstration model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_detection_flags_synthetic_lesion, self.test_cancel_leaves_scene_unchanged,
                     self.test_panel_detects_and_moves_threshold):
            self.setUp()
            test()

    def test_detection_flags_synthetic_lesion(self):
        """Outputs on the input's grid; the lesion is flagged; the flag rate changes the detections."""
        import numpy as np
        from RALogic import RALogic

        volume, lesion = self._lesionedSample()
        self.delayDisplay("Detecting anomalies with the bundled demonstration model")
        logic = RALogic()
        result = logic.detect(volume, model=DEMO_MODEL, device="cpu")
        for node in (result.pseudoHealthyNode, result.anomalyMapNode, result.detectionsNode):
            self.assertEqual(node.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
            np.testing.assert_allclose(_ijkToRas(node), _ijkToRas(volume), atol=1e-9)
        self.assertTrue(result.detectionsNode.IsA("vtkMRMLLabelMapVolumeNode"))
        self.assertIsNotNone(result.segmentationNode)

        flagged = slicer.util.arrayFromVolume(result.detectionsNode) > 0
        self.assertGreater(flagged[lesion].mean(), 0.1, "less than 10% of the synthetic lesion is flagged")

        strict = logic.setFlagRate(0.01).report
        strictFlagged = np.count_nonzero(slicer.util.arrayFromVolume(result.detectionsNode))
        loose = logic.setFlagRate(0.2).report
        looseFlagged = np.count_nonzero(slicer.util.arrayFromVolume(result.detectionsNode))
        self.assertAlmostEqual(strict["flag_rate"], 0.01)
        self.assertAlmostEqual(loose["flag_rate"], 0.2)
        self.assertEqual(strict["flagged_voxels"], strictFlagged)
        self.assertEqual(loose["flagged_voxels"], looseFlagged)
        self.assertLess(strictFlagged, looseFlagged)
        self.delayDisplay("Detection test passed")

    def test_cancel_leaves_scene_unchanged(self):
        """A progress callback returning False stops detection with Cancelled and adds no node."""
        from RALogic import RALogic
        from ra_engine import Cancelled

        volume, _ = self._lesionedSample()
        logic = RALogic()
        logic.getParameterNode()  # created first: the count below is of everything else
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        calls = []

        def stop(done, total):
            calls.append((done, total))
            return False

        with self.assertRaises(Cancelled):
            logic.detect(volume, model=DEMO_MODEL, device="cpu", progress=stop)
        self.assertEqual(len(calls), 1)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Cancellation test passed")

    def test_panel_detects_and_moves_threshold(self):
        """The panel's Detect button shows a score; moving its flag-rate slider updates the detections."""
        import numpy as np

        volume, _ = self._lesionedSample()
        slicer.util.selectModule("RAModule")
        widget = slicer.modules.ramodule.widgetRepresentation().self()
        self.assertIn("not for diagnosis", widget.ui.noticeLabel.text)
        widget.ui.inputVolumeSelector.setCurrentNode(volume)
        modelIndex = widget.ui.modelSelector.findData(DEMO_MODEL)
        self.assertGreaterEqual(modelIndex, 0, f"the bundled model {DEMO_MODEL} is not in the model list")
        widget.ui.modelSelector.currentIndex = modelIndex
        widget.ui.deviceSelector.currentIndex = widget.ui.deviceSelector.findText("cpu")
        self.assertTrue(widget.ui.detectButton.enabled)

        widget.ui.detectButton.click()
        self.assertIsNotNone(widget.result, widget.ui.statusLabel.text)
        self.assertTrue(widget.ui.scoreLabel.text.startswith(f"{widget.result.report['scan_score']:.4g} "))
        self.assertTrue(widget.ui.flagRateSlider.enabled)
        self.assertEqual(widget.ui.detectButton.text, "Detect Anomalies")

        widget.ui.flagRateSlider.value = 0.5
        _processEventsFor(1.0)
        before = np.count_nonzero(slicer.util.arrayFromVolume(widget.result.detectionsNode))
        widget.ui.flagRateSlider.value = 15.0
        _processEventsFor(1.0)
        after = np.count_nonzero(slicer.util.arrayFromVolume(widget.result.detectionsNode))
        self.assertLess(before, after)
        self.assertAlmostEqual(widget.logic.parameters.flagRate, 0.15)
        self.delayDisplay("Panel test passed")

    def _lesionedSample(self):
        """The sample scan loaded through Sample Data, with ra_engine.demo's synthetic lesion written into its
        voxels; returns (volume node, lesion mask as a bool array indexed like arrayFromVolume)."""
        import numpy as np
        import SampleData
        from ra_engine.demo import insert_lesion
        from ra_engine import read_image

        self.delayDisplay("Loading the sample scan and inserting a synthetic lesion")
        registerSampleData()
        volume = SampleData.SampleDataLogic().downloadSample(SAMPLE_NAME)
        original = read_image(engineResources().joinpath(*SAMPLE_RESOURCE))
        # Slicer's (k, j, i) array of the loaded file is the engine's (z, y, x) array of the same file.
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), original.array)
        scan, lesion = insert_lesion(original)
        slicer.util.updateVolumeFromArray(volume, scan.array.astype(np.float32))
        return volume, lesion.astype(bool)


def _ijkToRas(volumeNode):
    import numpy as np

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def _processEventsFor(seconds):
    """Lets Qt timers fire (the flag-rate slider's delayed update) while a test waits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        slicer.app.processEvents()
        time.sleep(0.01)
