"""3D Slicer module "Anomaly Detection (RA)": the panel that wires Slicer's widgets to RALogic.

No computation lives here: detection, thresholds, display, training, the model registry, the sample scan and the
engine's errors are RALogic's (no Qt), which runs the engine in child processes. The panel imports nothing but
RALogic, Slicer (and its Sample Data module), Qt, CTK, VTK and the standard library (a test keeps it so).

Slicer imports this file at start-up, in whatever version it is, before the project's packages or PyTorch may be
installed: RALogic is imported only when the panel opens, after the Slicer version is checked, and the panel says
what is wrong when it cannot work. The file's syntax stays that of Python 3.6 (Slicer 4.11), so that older versions
load it and show that message.
"""
import html
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

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # a Slicer without translations: the texts as they are

    def _(text):
        return text

    def translate(context, text):
        return text


TITLE = "Anomaly Detection (RA)"
NOTICE = "Research use only, not for diagnosis."
# The oldest Slicer the module supports (docs/SLICER.md): 5.6 and 5.8 embed Python 3.9, 5.10 Python 3.12.
MINIMUM_SLICER_VERSION = (5, 6)
# The user guide (CMakeLists.txt's EXTENSION_HOMEPAGE; a test keeps them equal).
DOCUMENTATION_URL = "https://github.com/<owner>/<repository>/blob/main/docs/SLICER.md"
INSTALL_COMMAND = "PythonSlicer -m pip install --no-deps -e /path/to/the/repository"

# A registry name (ra_engine.registry.NAME_PATTERN): what a trained model may be registered as.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
POLL_INTERVAL_MS = 100  # how often the panel looks at a running detection


def slicerVersion():
    """(major, minor) of the running Slicer."""
    return int(slicer.app.majorVersion), int(slicer.app.minorVersion)


def supportProblem():
    """Why the panel cannot work in this Slicer, said for the user (HTML), or None: a Slicer older than
    MINIMUM_SLICER_VERSION, or the project's packages (RALogic, ra_engine) not importable in its Python (not
    installed, or not valid on its Python version)."""
    version = slicerVersion()
    if version < MINIMUM_SLICER_VERSION:
        return _("<b>This module needs 3D Slicer {minimum} or later</b>; this is Slicer {version}. Install a current "
                 "release from <a href=\"https://download.slicer.org\">download.slicer.org</a>.").format(
            minimum="{}.{}".format(*MINIMUM_SLICER_VERSION), version="{}.{}".format(*version))
    try:
        import RALogic.logic  # noqa: F401  (loads RALogic and ra_engine, no PyTorch)
    except Exception as error:  # ImportError when not installed, SyntaxError or TypeError on an older Python
        import sys

        return _("<b>The module's Python packages cannot be loaded</b> in this Slicer's Python ({python}): "
                 "{error}.<br>Install them into Slicer's Python with <tt>{command}</tt>, then restart Slicer; see "
                 "the <a href=\"{url}\">user guide</a>.").format(
            python=sys.version.split()[0], error=html.escape("{}: {}".format(type(error).__name__, error)),
            command=html.escape(INSTALL_COMMAND), url=html.escape(DOCUMENTATION_URL, quote=True))
    return None


#
# RAModule
#


class RAModule(ScriptedLoadableModule):
    """The module's description for Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Anomaly Detection (RA)")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["RA for 3D Slicer developers"]
        self.parent.helpText = _("""
<p><b>Research use only, not for diagnosis.</b></p>
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
""") + _('<p>For more information see the <a href="{url}">user guide</a>.</p>').format(
            url=html.escape(DOCUMENTATION_URL, quote=True))
        self.parent.acknowledgementText = _("""
<p>Reversed Auto-Encoders: Cosmin I. Bercea, Benedikt Wiestler, Daniel Rueckert and Julia A. Schnabel.
The sample scan is the Colin27 average head (C.J. Holmes et al., J Comput Assist Tomogr 22(2):324-333, 1998;
McConnell Brain Imaging Centre, Montreal Neurological Institute), as distributed with MRIcron (BSD-3-Clause).</p>
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Adds the bundled sample scan to the Sample Data module, category "RA". Sample Data copies it from the
    installed file (file:// URI, no network) into its cache and checks its SHA256."""
    if slicerVersion() < MINIMUM_SLICER_VERSION:
        return
    try:
        from RALogic.sample import SAMPLE_FILE_NAME, SAMPLE_NAME, SAMPLE_SHA256, sampleScanPath
    except Exception as error:  # the panel says what to do; here only the sample is missing
        logging.warning("RA: the sample scan is not offered in Sample Data, because the project's packages cannot "
                        "be loaded ({}); see docs/SLICER.md".format(error))
        return
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="RA",
        sampleName=SAMPLE_NAME,
        uris=sampleScanPath().as_uri(),
        fileNames=SAMPLE_FILE_NAME,
        nodeNames=SAMPLE_NAME,
        checksums="SHA256:" + SAMPLE_SHA256,
        thumbnailFileName=str(Path(__file__).resolve().parent / "Resources" / "Icons" / (SAMPLE_NAME + ".png")),
    )


#
# RAModuleWidget
#


class RAModuleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Widgets write the module's parameter node (RALogic's wrapper); the parameter node's changes update
    the widgets; buttons call RALogic. A detection runs in a child process that a timer polls: the panel stays
    responsive and never runs Qt's event loop from inside a callback."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.models = None
        self.result = None  # the RAResult on show, None before a detection and after the scene is closed
        self._parameterNode = None
        self._updatingGUI = False
        self._detection = None  # the RALogic DetectionTask started from this panel
        self._detectionStarted = 0.0
        self._training = None  # the RALogic.launcher.TrainingProcess started from this panel

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        problem = supportProblem()
        if problem is not None:
            label = qt.QLabel(problem)
            label.wordWrap = True
            label.openExternalLinks = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        from RALogic import RALogic
        from RALogic.models import ModelManager

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RAModule.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = RALogic()
        self.models = ModelManager()

        self.ui.modelSelector.placeholderText = _("no model: import or train one")
        self.ui.manageModelsButton.setMenu(self._modelsMenu())
        # The threshold follows the slider while it moves, at most every 150 ms.
        self._flagRateTimer = qt.QTimer()
        self._flagRateTimer.setSingleShot(True)
        self._flagRateTimer.setInterval(150)
        self._flagRateTimer.connect("timeout()", self._applyFlagRate)
        self._detectionTimer = qt.QTimer()
        self._detectionTimer.setInterval(POLL_INTERVAL_MS)
        self._detectionTimer.connect("timeout()", self._pollDetection)
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
        """Called when the application closes or the module is reloaded: stops what this panel started (a running
        detection is killed, a running training stops with a checkpoint). Also runs after a setup() that stopped
        early (unsupported Slicer, packages missing), so what setup() creates may be missing."""
        if self._training is not None:
            self._training.cancel()
        for name in ("_trainingTimer", "_flagRateTimer", "_detectionTimer"):
            timer = getattr(self, name, None)
            if timer is not None:
                timer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.cleanup()

    def enter(self):
        if self.logic is None:
            return
        self.refreshModels()
        self.initializeParameterNode()

    def exit(self):
        # The panel is hidden: stop following the parameter node (a running detection keeps its own references).
        if self.logic is not None:
            self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        # RALogic cancels a running detection itself (it ends with SceneClosed). Training works on files, not on
        # the scene, in a process of its own: it is left running.
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

    @property
    def detecting(self):
        """Whether a detection started from this panel is running (its button is then Cancel)."""
        return self._detection is not None and self._detection.running

    def _updateDetectButton(self):
        if self.detecting:
            return  # the button is Cancel
        from RALogic.dependencies import missingDependencies

        parameters = self._parameterNode
        # Without the engine's packages the button stays usable: pressing it offers their installation.
        ready = (parameters is not None and parameters.inputVolume is not None
                 and (bool(parameters.model) or bool(missingDependencies())))
        self.ui.detectButton.enabled = ready
        self.ui.detectButton.toolTip = (
            _("Reconstruct a pseudo-healthy version of the scan and show where the scan differs from it.") if ready
            else _("Choose an input volume and a model first."))

    def onDetectButton(self):
        if self.detecting:
            self._detection.cancel()
            self.ui.detectButton.enabled = False  # until the job has stopped
            self.ui.statusLabel.text = _("Cancelling...")
            return
        if not self.ensureDependencies():
            return
        parameters = self._parameterNode
        model = parameters.model
        if not model:
            slicer.util.errorDisplay(_("No model is available: import one (Manage...) or train one (Training)."))
            return
        # Refusals that need no engine (input, model, calibration) come at once, with the scene unchanged.
        with slicer.util.tryWithErrorDisplay(_("Anomaly detection could not start.")):
            self._detection = self.logic.startDetection(parameters.inputVolume, model=model,
                                                        flagRate=parameters.flagRate,
                                                        device=parameters.device or "auto")
        self._detectionStarted = time.monotonic()
        self._setDetecting(True)
        self._showDetectionProgress()
        self._detectionTimer.start()

    def _pollDetection(self):
        """The timer's tick: the job's progress, and its end (results shown, or why there are none)."""
        task = self._detection
        task.poll()
        if task.running:
            self._showDetectionProgress()
            return
        self._detectionTimer.stop()
        self._setDetecting(False)
        from RALogic import Cancelled, SceneClosed

        if task.error is None:
            self.logic.setOpacity(self.ui.opacitySlider.value)
            self.logic.showResults()
            self._showResult(task.result)
            report = task.result.report
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s on {device}. {notice}").format(
                seconds=time.monotonic() - self._detectionStarted, device=report.get("device"),
                notice=report.get("notice") or NOTICE)
        elif isinstance(task.error, (Cancelled, SceneClosed)):
            self.ui.statusLabel.text = str(task.error)
        else:
            self.ui.statusLabel.text = _("Anomaly detection failed.")
            slicer.util.errorDisplay(_("Anomaly detection failed: {error}").format(error=task.error),
                                     windowTitle=TITLE, detailedText=task.log)

    def _showDetectionProgress(self):
        """The job's phase in the status line; the bar counts scored slices once the network runs (busy before)."""
        task = self._detection
        bar = self.ui.detectProgressBar
        if task.progress is None:
            bar.maximum = 0  # Qt's busy indicator
        else:
            done, total = task.progress
            bar.maximum = max(total, 1)
            bar.value = done
        self.ui.statusLabel.text = _("Detecting anomalies with {model}: {message}").format(
            model=self._parameterNode.model if self._parameterNode is not None else "", message=task.message)

    def _setDetecting(self, running):
        self.ui.detectButton.text = _("Cancel") if running else _("Detect Anomalies")
        self.ui.detectButton.enabled = True
        self.ui.detectProgressBar.maximum = 100
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
        self.ui.scoreLabel.text = "{:.4g} ".format(score) + (
            _("(percentile {percentile:.0f} of the model's normal scans)").format(percentile=percentile)
            if percentile is not None
            else _("(the model's calibration holds no normal scan scores to compare with)"))
        flagRate = report.get("flag_rate")
        at = (_("{rate:.1f}% flag rate").format(rate=100.0 * flagRate) if flagRate is not None
              else _("a fixed threshold"))
        self.ui.regionsLabel.text = _("{regions} regions, {voxels} voxels flagged at {at} (threshold {threshold:.4g}). "
                                      "{notice}").format(regions=report["regions_total"],
                                                         voxels=report["flagged_voxels"], at=at,
                                                         threshold=report["threshold"], notice=NOTICE)

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
        with slicer.util.tryWithErrorDisplay(_("The detections could not be updated.")):
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
        itself), the others with pip into Slicer's Python after asking. A failure is shown once (Slicer's own pip
        dialog may have shown it already); shows what is still missing and returns False."""
        from RALogic.dependencies import (DependencyError, dependencyMessage, installPackages, installTorch,
                                          missingDependencies)

        missing = missingDependencies()
        if not missing:
            return True
        try:
            if any(dependency.viaPyTorchExtension for dependency in missing) and not installTorch(askConfirmation=True):
                return False  # declined
            others = [dependency.requirement for dependency in missingDependencies()
                      if not dependency.viaPyTorchExtension]
            if others:
                if not slicer.util.confirmOkCancelDisplay(
                        _("Anomaly detection needs these Python packages, not yet installed in Slicer's Python: "
                          "{packages}.\n\nInstall them now with pip? This may take a few minutes.").format(
                            packages=", ".join(others)), windowTitle=TITLE):
                    return False
                slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
                try:
                    installPackages(others)
                finally:
                    slicer.app.restoreOverrideCursor()
        except DependencyError as error:
            if not error.shown:
                slicer.util.errorDisplay(str(error), windowTitle=TITLE)
            return False
        stillMissing = dependencyMessage()
        if stillMissing:
            slicer.util.errorDisplay(_("{missing}\n\nRestarting Slicer may help after an installation.").format(
                missing=stillMissing), windowTitle=TITLE)
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
                    details.append(_("bundled"))
                if entry.get("problem"):
                    details.append(_("cannot be read"))
                elif not entry.get("calibrated"):
                    details.append(_("not calibrated"))
                if details:
                    label += " ({})".format(", ".join(details))
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
        for text, slot in ((_("Import from folder..."), self.onImportModelFolder),
                           (_("Import from URL..."), self.onImportModelUrl),
                           (_("Remove selected model"), self.onRemoveModel),
                           (_("Open models folder"), self.onOpenModelsFolder)):
            menu.addAction(text).connect("triggered()", slot)
        return menu

    def onImportModelFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Choose a model folder (it holds model.json and model.safetensors)"))
        if folder:
            self._importModel(folder)

    def onImportModelUrl(self):
        url = qt.QInputDialog.getText(slicer.util.mainWindow(), _("Import a model"),
                                      _("URL of the model's .zip (http, https or file):")).strip()
        if not url:
            return
        sha256 = qt.QInputDialog.getText(
            slicer.util.mainWindow(), _("Import a model"),
            _("SHA256 of the .zip, as published with it (empty: the download is checked only against its own "
              "model card):")).strip()
        self._importModel(url, sha256 or None)

    def _importModel(self, source, sha256=None):
        """Registers a model from a folder, a .zip or a URL, in a modal progress dialog whose Cancel stops a
        download (nothing is registered then)."""
        if not self.ensureDependencies():  # importing checks the weights against their card with torch
            return
        from RALogic import Cancelled

        before = {self.ui.modelSelector.itemData(i) for i in range(self.ui.modelSelector.count)}
        dialog = slicer.util.createProgressDialog(
            windowTitle=_("Import a model"), labelText=_("Importing {source}").format(source=source), maximum=0,
            windowModality=qt.Qt.ApplicationModal, autoClose=False)

        def onProgress(done, total):
            # Bytes may pass a Qt progress bar's int range: the bar counts per mille.
            if total:
                dialog.maximum = 1000
                dialog.value = min(1000, int(1000 * done / total))
            dialog.labelText = _("Importing {source}: {megabytes:.1f} MB").format(source=source,
                                                                                 megabytes=done / 1e6)
            slicer.app.processEvents()  # inside a modal dialog: only its Cancel button takes input
            return not dialog.wasCanceled

        try:
            with slicer.util.tryWithErrorDisplay(_("The model could not be imported."), waitCursor=True):
                try:
                    self.models.importModel(source, sha256=sha256, progress=onProgress)
                except Cancelled:
                    self.ui.statusLabel.text = _("Import cancelled; no model was registered.")
        finally:
            dialog.close()
        self.refreshModels()
        added = [self.ui.modelSelector.itemData(i) for i in range(self.ui.modelSelector.count)
                 if self.ui.modelSelector.itemData(i) not in before]
        if added:
            self._selectModel(added[0])

    def onRemoveModel(self):
        name = self.ui.modelSelector.itemData(self.ui.modelSelector.currentIndex)
        if not name or not slicer.util.confirmOkCancelDisplay(
                _("Remove the registered model {name}? Its folder is deleted.").format(name=name),
                windowTitle=_("Remove a model")):
            return
        with slicer.util.tryWithErrorDisplay(_("The model {name} could not be removed.").format(name=name)):
            self.models.removeModel(name)
        self.refreshModels()

    def onOpenModelsFolder(self):
        with slicer.util.tryWithErrorDisplay(_("The models folder could not be opened.")):
            self.models.openModelsFolder()

    # Training

    def onChooseTrainingFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose a folder of normal scans"))
        if folder:
            self.ui.trainDataLineEdit.text = folder

    def onChooseTrainingCsv(self):
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Choose a CSV of normal scans"), "",
                                              _("CSV files (*.csv);;All files (*)"))
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
            self.ui.trainLogTextEdit.appendPlainText(_("Stopping after the current iteration (with a checkpoint)..."))
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
        with slicer.util.tryWithErrorDisplay(_("Training could not start.")):
            self._training.start()  # checks the data and the output folder first
        self._setTraining(True)
        self._trainingTimer.start()

    def _setTraining(self, running):
        self.ui.trainButton.text = _("Cancel Training") if running else _("Start Training")
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
        bar.format = "%p%" + (_(", about {duration} left").format(duration=_duration(eta)) if eta else "")
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
            self.ui.trainLogTextEdit.appendPlainText(
                _("Finished: the model is in {path}").format(path=process.modelPath))
            self._registerTrainedModel(process.modelPath)
        elif process.cancelled:
            self.ui.trainLogTextEdit.appendPlainText(
                _("Stopped. Tick 'Resume an interrupted run' and start again to continue from the last checkpoint."))
        else:
            self.ui.trainLogTextEdit.appendPlainText(process.log[-4000:])
            slicer.util.errorDisplay(_("Training failed (exit code {code}); its log is in the Training "
                                       "section.").format(code=process.returncode), windowTitle=TITLE)

    def _registerTrainedModel(self, modelDir):
        """Offers to add the trained model to the registry so that it appears in the model list."""
        suggested = re.sub(r"[^A-Za-z0-9._-]+", "-", modelDir.parent.name).strip("-.") or "my-model"
        name = qt.QInputDialog.getText(slicer.util.mainWindow(), _("Register the trained model"),
                                       _("Name in the model list (letters, digits, '.', '_' and '-'):"),
                                       qt.QLineEdit.Normal, suggested).strip()
        if not name:
            return
        if not MODEL_NAME_PATTERN.fullmatch(name):
            slicer.util.errorDisplay(_("{name} is not a usable model name: use letters, digits, '.', '_' and '-', "
                                       "starting with a letter or digit.").format(name=repr(name)))
            return
        with slicer.util.tryWithErrorDisplay(_("The trained model could not be registered."), waitCursor=True):
            self.models.importModel(str(modelDir), name=name)
        self.refreshModels()
        self._selectModel(name)


def _duration(seconds):
    """A rough human duration: '40 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return "{:.0f} s".format(seconds)
    if seconds < 90 * 60:
        return "{:.0f} min".format(seconds / 60)
    return "{:.1f} h".format(seconds / 3600)


#
# RAModuleTest
#


class RAModuleTest(ScriptedLoadableModuleTest):
    """Self-test, offline: the bundled sample scan with a synthetic lesion, the bundled demonstration model. It needs
    the engine's packages and never installs any: without them it fails, saying what is missing."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from RALogic.dependencies import dependencyMessage

        missing = dependencyMessage()
        self.assertIsNone(missing, "the self-test needs the engine's packages and does not install them; open the "
                                   "module and press Detect Anomalies to install them first")
        for test in (self.test_detection_flags_synthetic_lesion, self.test_cancel_leaves_scene_unchanged,
                     self.test_panel_detects_and_moves_threshold, self.test_panel_cancel_leaves_scene_unchanged):
            self.setUp()
            test()

    def test_detection_flags_synthetic_lesion(self):
        """Outputs on the input's grid; the lesion is flagged; the flag rate changes the detections."""
        from RALogic import RALogic
        from RALogic.sample import DEMO_MODEL

        volume, lesion = self._lesionedSample()
        self.delayDisplay("Detecting anomalies with the bundled demonstration model")
        logic = RALogic()
        result = logic.detect(volume, model=DEMO_MODEL, device="cpu")
        for node in (result.pseudoHealthyNode, result.anomalyMapNode, result.detectionsNode):
            self.assertEqual(node.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
            self.assertEqual(_ijkToRas(node), _ijkToRas(volume))  # exactly the input's grid
        self.assertTrue(result.detectionsNode.IsA("vtkMRMLLabelMapVolumeNode"))
        self.assertIsNotNone(result.segmentationNode)

        flagged = slicer.util.arrayFromVolume(result.detectionsNode) > 0
        self.assertGreater(flagged[lesion].mean(), 0.1, "less than 10% of the synthetic lesion is flagged")

        strict = logic.setFlagRate(0.01).report
        strictFlagged = _countFlagged(result.detectionsNode)
        loose = logic.setFlagRate(0.2).report
        looseFlagged = _countFlagged(result.detectionsNode)
        self.assertAlmostEqual(strict["flag_rate"], 0.01)
        self.assertAlmostEqual(loose["flag_rate"], 0.2)
        self.assertEqual(strict["flagged_voxels"], strictFlagged)
        self.assertEqual(loose["flagged_voxels"], looseFlagged)
        self.assertLess(strictFlagged, looseFlagged)
        self.delayDisplay("Detection test passed")

    def test_cancel_leaves_scene_unchanged(self):
        """A progress callback returning False stops detection with Cancelled and adds no node."""
        from RALogic import Cancelled, RALogic
        from RALogic.sample import DEMO_MODEL

        volume, _lesion = self._lesionedSample()
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
        """The panel's Detect button runs detection in the background (the panel stays responsive, the button
        turns into Cancel) and shows a score; moving its flag-rate slider updates the detections."""
        widget = self._panelWithSample()
        widget.ui.detectButton.click()
        self.assertTrue(widget.detecting)
        self.assertTrue(widget.ui.detectProgressBar.isVisibleTo(widget.parent))
        _processEventsUntil(lambda: not widget.detecting)
        self.assertIsNotNone(widget.result, widget.ui.statusLabel.text)
        self.assertTrue(widget.ui.scoreLabel.text.startswith("{:.4g} ".format(widget.result.report["scan_score"])))
        self.assertTrue(widget.ui.flagRateSlider.enabled)

        widget.ui.flagRateSlider.value = 0.5
        _processEventsFor(1.0)
        before = _countFlagged(widget.result.detectionsNode)
        widget.ui.flagRateSlider.value = 15.0
        _processEventsFor(1.0)
        after = _countFlagged(widget.result.detectionsNode)
        self.assertLess(before, after)
        self.assertAlmostEqual(widget.logic.parameters.flagRate, 0.15)
        self.delayDisplay("Panel test passed")

    def test_panel_cancel_leaves_scene_unchanged(self):
        """Pressing the button again while detection runs cancels it: nothing is added to the scene."""
        widget = self._panelWithSample()
        widget.logic.getParameterNode()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        widget.ui.detectButton.click()
        self.assertTrue(widget.detecting)
        widget.ui.detectButton.click()  # Cancel
        _processEventsUntil(lambda: not widget.detecting)
        self.assertIsNone(widget.result)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Panel cancellation test passed")

    def _panelWithSample(self):
        """The module's panel with the lesioned sample, the bundled model and the CPU chosen."""
        from RALogic.sample import DEMO_MODEL

        volume, _lesion = self._lesionedSample()
        slicer.util.selectModule("RAModule")
        widget = slicer.modules.ramodule.widgetRepresentation().self()
        self.assertIn("not for diagnosis", widget.ui.noticeLabel.text)
        widget.ui.inputVolumeSelector.setCurrentNode(volume)
        modelIndex = widget.ui.modelSelector.findData(DEMO_MODEL)
        self.assertGreaterEqual(modelIndex, 0, "the bundled model {} is not in the model list".format(DEMO_MODEL))
        widget.ui.modelSelector.currentIndex = modelIndex
        widget.ui.deviceSelector.currentIndex = widget.ui.deviceSelector.findText("cpu")
        self.assertTrue(widget.ui.detectButton.enabled)
        return widget

    def _lesionedSample(self):
        """The sample scan loaded through Sample Data, with ra demo's synthetic lesion written into its voxels;
        returns (volume node, lesion mask as a bool array indexed like arrayFromVolume)."""
        import SampleData
        from RALogic.sample import SAMPLE_NAME, insertSyntheticLesion

        self.delayDisplay("Loading the sample scan and inserting a synthetic lesion")
        registerSampleData()
        volume = SampleData.SampleDataLogic().downloadSample(SAMPLE_NAME)
        return volume, insertSyntheticLesion(volume)


def _ijkToRas(volumeNode):
    """The node's IJK-to-RAS matrix as nested lists (rows)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return [[matrix.GetElement(row, column) for column in range(4)] for row in range(4)]


def _countFlagged(labelMapNode):
    return int((slicer.util.arrayFromVolume(labelMapNode) > 0).sum())


def _processEventsFor(seconds):
    """Lets Qt timers fire (the flag-rate slider's delayed update) while a test waits."""
    _processEventsUntil(lambda: False, seconds)


def _processEventsUntil(condition, timeout=600.0):
    """Runs Qt's event loop (the panel's timers) until `condition()` holds or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        slicer.app.processEvents()
        time.sleep(0.01)
