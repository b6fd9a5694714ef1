"""RALogic.dependencies: package checks without importing (and after an installation, with fresh import caches),
PyTorch only through the PyTorch extension (a torch without torchvision completed with the matching release), pip
for the rest (a failure that Slicer's own dialog showed is marked so), the device choice with its fallbacks and
memory warning, the memory estimate."""
import importlib
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from RALogic import dependencies
from RALogic.dependencies import (DEPENDENCIES, DependencyError, checkDependencies, dependencyMessage, deviceInfo,
                                  estimateMemoryGB, installPackages, installTorch, missingDependencies, pipShowsErrors,
                                  torchMessage, torchRequirements)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def without(monkeypatch):
    """without("torch", "lpips"): find_spec reports those modules as absent (nothing is uninstalled)."""

    def hide(*modules):
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))

    return hide


@pytest.fixture
def pip_calls(monkeypatch):
    """Records slicer.util.pip_install's calls instead of installing anything."""
    import slicer.util

    calls = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirements, **kw: calls.append(requirements))
    return calls


def test_everything_needed_is_found_here_without_importing_it():
    assert checkDependencies() and all(checkDependencies().values())
    assert missingDependencies() == [] and dependencyMessage() is None and torchMessage() is None


def test_missing_packages_are_detected_and_explained(without):
    without("torch", "lpips", "sklearn")
    found = checkDependencies()
    assert found["torch"] is False and found["lpips"] is False and found["numpy"] is True
    assert "sklearn" not in found and checkDependencies(includeOptional=True)["sklearn"] is False
    assert [d.distribution for d in missingDependencies()] == ["torch", "lpips"]
    message = dependencyMessage()
    assert "PyTorch extension" in message and "lpips>=0.1.4" in message and "torch>=" not in message


def test_torch_message_points_to_the_pytorch_extension(without):
    without("torch")
    message = torchMessage()
    assert "PyTorch extension" in message and "Extension Manager" in message and "installTorch" in message


def test_the_dependency_table_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(declared) == sorted(d.requirement for d in DEPENDENCIES if d.requirement != "scipy")


def test_install_torch_without_the_pytorch_extension_is_a_clear_error(monkeypatch, without):
    without("torch")
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # `import PyTorchUtils` raises ImportError
    with pytest.raises(DependencyError, match="PyTorch extension is not installed.*Extension Manager"):
        installTorch()


@pytest.fixture
def pytorch_utils(monkeypatch):
    """A stand-in PyTorch extension: records PyTorchUtilsLogic.installTorch's requirements instead of installing."""
    calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            calls.append((askConfirmation, torchVersionRequirement, torchvisionVersionRequirement))
            return "torch module"

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    return calls


def installed_requirements():
    """(torch, torchvision) requirements that keep this environment's torch: its version, the matching torchvision."""
    release = importlib.metadata.version("torch").split("+")[0]
    return f"=={release}", f"==0.{int(release.split('.')[1]) + 15}.*"


def test_install_torch_goes_through_pytorch_utils(pytorch_utils, pip_calls, without):
    assert installTorch() is True and pytorch_utils == [], "an importable torch and torchvision are not installed again"
    assert installTorch(askConfirmation=False, force=True) is True
    assert pytorch_utils == [(False, *installed_requirements())] and pip_calls == []


def test_torch_without_torchvision_is_completed_with_the_matching_release(pytorch_utils, without):
    """Not a dead end: a torch that is there but a torchvision that is not makes PyTorchUtils install the
    torchvision release made for that torch, keeping the torch."""
    without("torchvision")
    installTorch(askConfirmation=True)
    assert pytorch_utils == [(True, *installed_requirements())]


@pytest.mark.parametrize("installed, expected", [
    (None, (">=2.1", ">=0.16")),
    ("2.1.0", ("==2.1.0", "==0.16.*")),
    ("2.14.1+cu121", ("==2.14.1", "==0.29.*")),
    ("3.0.0", ("==3.0.0", ">=0.16")),
])
def test_torch_requirements_keep_an_installed_torch(monkeypatch, installed, expected):
    def version(name):
        if name != "torch" or installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert torchRequirements() == expected


def test_the_import_caches_are_cleared_after_an_installation(monkeypatch, pytorch_utils, pip_calls, without):
    """find_spec answers from caches of the folders' contents: after pip wrote new packages, they are cleared."""
    cleared = []
    monkeypatch.setattr(importlib, "invalidate_caches", lambda: cleared.append(True))
    installPackages(["lpips"])
    assert cleared == [True]
    without("torchvision")
    installTorch()
    assert cleared == [True, True]


def test_a_pip_failure_is_an_error_that_says_whether_slicer_showed_it(monkeypatch):
    """Slicer versions whose pip_install shows its own progress dialog also show its failure: the error says so,
    and the panel does not show a second one."""
    import slicer
    import slicer.util

    def failing(requirements, **kw):
        raise subprocess.CalledProcessError(1, "pip install")

    monkeypatch.setattr(slicer.util, "pip_install", failing)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: False), raising=False)
    real = importlib.util.find_spec
    for packaging, shown in ((False, False), (True, True)):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, packaging=packaging: (
            object() if packaging else None) if name == "slicer.packaging" else real(name, *a))
        assert pipShowsErrors() is shown
        with pytest.raises(DependencyError, match="pip could not install lpips") as raised:
            installPackages(["lpips"])
        assert raised.value.shown is shown
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: True))
    assert pipShowsErrors() is False, "in testing mode Slicer installs without a dialog"


@pytest.mark.parametrize("name", ["torch", "torchvision==0.20.1", "Torch>=2", "torchaudio"])
def test_install_packages_refuses_torch(pip_calls, name):
    with pytest.raises(DependencyError, match="installTorch"):
        installPackages(["lpips", name])
    assert pip_calls == [], "nothing is installed when one name is refused"


def test_install_packages_uses_slicer_pip_install_with_the_engine_requirements(pip_calls):
    assert installPackages(["skimage", "lpips", "pillow", "nibabel>=5"]) == [
        "scikit-image>=0.21", "lpips>=0.1.4", "pillow>=9", "nibabel>=5"]
    assert pip_calls == [["scikit-image>=0.21", "lpips>=0.1.4", "pillow>=9", "nibabel>=5"]]
    assert installPackages([]) == [] and len(pip_calls) == 1


def test_cuda_requested_on_a_machine_without_it_falls_back_to_the_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    device, message = deviceInfo("cuda")
    assert device == "cpu" and "CUDA was requested but is not available" in message and "CPU" in message
    assert deviceInfo("cuda:1")[0] == "cpu"
    device, message = deviceInfo("auto")
    assert device in ("cpu", "mps") and message
    assert deviceInfo("cpu") == ("cpu", "Computing on the CPU.")
    with pytest.raises(ValueError, match="unknown device"):
        deviceInfo("gpu")


def test_without_torch_the_device_is_the_cpu_with_the_install_message(without):
    without("torch")
    device, message = deviceInfo("auto")
    assert device == "cpu" and "PyTorch extension" in message


def test_a_gpu_with_too_little_free_memory_gets_a_warning(monkeypatch):
    import torch

    gb = 1024**3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Test GPU")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (int(0.6 * gb), 4 * gb))
    device, message = deviceInfo("auto", task="detect", batchSize=8)
    assert device == "cuda:0" and "Test GPU" in message and "Warning" in message and "batch" in message
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (2 * gb, 4 * gb))
    device, message = deviceInfo("cuda", task="detect", batchSize=8)
    assert device == "cuda:0" and "Warning" not in message and "2.0 of 4.0 GB free" in message
    assert "Warning" in deviceInfo("cuda", task="train", batchSize=8)[1]
    assert "Warning" not in deviceInfo("cuda", task="train", batchSize=2)[1]


def test_the_memory_estimate_grows_with_batch_image_and_task():
    paper_detect = estimateMemoryGB("detect", batchSize=8)
    assert 0.5 < paper_detect < 1.5
    assert estimateMemoryGB("detect", batchSize=32) > paper_detect > estimateMemoryGB("detect", batchSize=1)
    assert estimateMemoryGB("train", batchSize=8) > paper_detect
    assert estimateMemoryGB("train", batchSize=8) == pytest.approx(2.46, abs=0.01)  # the docstring's figure
    assert 0.25 < estimateMemoryGB("detect", batchSize=8, gpu=False) < paper_detect - 0.5
    small = estimateMemoryGB("detect", batchSize=8, imageSize=64, widths=(16, 32, 64, 128), latentDim=64)
    assert small < paper_detect
    with pytest.raises(ValueError):
        estimateMemoryGB("segment")


@pytest.mark.parametrize("size, widths, latent", [(128, (64, 128, 256, 512, 512), 128), (32, (8, 16), 8)])
def test_the_parameter_count_is_the_networks(size, widths, latent):
    from ra_engine.network.config import ArchConfig
    from ra_engine.network.model import ReversedAutoEncoder

    network = ReversedAutoEncoder(ArchConfig(image_size=size, widths=widths, latent_dim=latent))
    assert dependencies._parameterCount(size, widths, latent) == sum(p.numel() for p in network.parameters())


def test_no_module_level_torch_or_qt_import():
    for name in ("dependencies", "launcher", "models"):
        source = (REPO / "RALogic" / f"{name}.py").read_text()
        assert not re.search(r"^(import|from) (torch|qt|ctk)\b", source, re.MULTILINE), name
