"""RALogic.dependencies: package checks without importing, PyTorch only through the PyTorch extension, pip for the
rest, the device choice with its fallbacks and memory warning, the memory estimate."""
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

from RALogic import dependencies
from RALogic.dependencies import (DEPENDENCIES, DependencyError, checkDependencies, dependencyMessage, deviceInfo,
                                  estimateMemoryGB, installPackages, installTorch, missingDependencies, torchMessage)

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


def test_install_torch_goes_through_pytorch_utils(monkeypatch, pip_calls, without):
    calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
            calls.append((askConfirmation, torchVersionRequirement))
            return "torch module"

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    import torch

    assert installTorch() is torch and calls == [], "an importable torch is not installed again"
    assert installTorch(askConfirmation=False, force=True) == "torch module"
    without("torch")
    assert installTorch(askConfirmation=True) == "torch module"
    assert calls == [(False, ">=2.1"), (True, ">=2.1")] and pip_calls == []


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
