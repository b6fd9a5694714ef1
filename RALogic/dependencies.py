"""Which of the engine's Python packages are present, how to install the missing ones inside Slicer, and which
device to compute on (no Qt).

Nothing here imports torch in Slicer's process: Slicer loads modules at start-up, before PyTorch may be installed,
and the engine runs in child processes (`launcher`); only `deviceInfo`, which those call, imports it. Presence is
checked with `importlib.util.find_spec`, which finds a package without importing it (after an installation, with
the import caches cleared). PyTorch itself is installed only through the PyTorch extension (its `PyTorchUtils`
logic picks the build that fits the GPU driver), never with plain pip.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass

from ra_engine import RAError

TORCH_REQUIREMENT = ">=2.1"  # pyproject.toml's torch and torchvision requirements, passed on to PyTorchUtils
TORCHVISION_REQUIREMENT = ">=0.16"
TORCH_DISTRIBUTIONS = ("torch", "torchvision", "torchaudio")
# torchvision 0.(m + 15) is the release made with torch 2.m (0.16 with 2.1, ..., 0.29 with 2.14).
TORCHVISION_MINOR_OFFSET = 15
GB = 1024**3


class DependencyError(RAError):
    """A package the engine needs is missing or cannot be installed this way; the message says what to do. `shown`:
    the user has already seen this failure in Slicer's own error box (`pipShowsErrors`): do not show it again."""

    def __init__(self, message: str, shown: bool = False):
        super().__init__(message)
        self.shown = shown


@dataclass(frozen=True)
class Dependency:
    """module: the import name; requirement: what pip installs (distribution and version, as in pyproject.toml);
    required: needed for detection and training (False: only for evaluation figures and benchmarks)."""

    module: str
    requirement: str
    required: bool = True

    @property
    def distribution(self) -> str:
        return _distribution(self.requirement)

    @property
    def viaPyTorchExtension(self) -> bool:
        return self.distribution in TORCH_DISTRIBUTIONS


# The runtime dependencies of pyproject.toml (a test keeps the two in step), plus scipy, which the engine imports
# directly and scikit-image brings along.
DEPENDENCIES = (
    Dependency("torch", "torch>=2.1"),
    Dependency("torchvision", "torchvision>=0.16"),
    Dependency("lpips", "lpips>=0.1.4"),
    Dependency("numpy", "numpy>=1.24"),
    Dependency("SimpleITK", "SimpleITK>=2.3"),
    Dependency("skimage", "scikit-image>=0.21"),
    Dependency("scipy", "scipy"),
    Dependency("safetensors", "safetensors>=0.4"),
    Dependency("pydicom", "pydicom>=2.4"),
    Dependency("platformdirs", "platformdirs>=3"),
    Dependency("tqdm", "tqdm>=4.60"),
    Dependency("PIL", "pillow>=9"),
    Dependency("sklearn", "scikit-learn>=1.3", required=False),
    Dependency("matplotlib", "matplotlib>=3.7", required=False),
)


def _distribution(requirement: str) -> str:
    """'scikit-image>=0.21' -> 'scikit-image' (lower case, '_' as '-')."""
    return re.split(r"[\s<>=!~;\[@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def isInstalled(module: str) -> bool:
    """Whether `module` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module whose __spec__ is None
        return False


def checkDependencies(includeOptional: bool = False) -> dict[str, bool]:
    """{import name: installed} for the engine's dependencies (the required ones, unless `includeOptional`)."""
    return {d.module: isInstalled(d.module) for d in DEPENDENCIES if d.required or includeOptional}


def missingDependencies(includeOptional: bool = False) -> list[Dependency]:
    """The dependencies that cannot be imported, in the order of `DEPENDENCIES`."""
    return [d for d in DEPENDENCIES if (d.required or includeOptional) and not isInstalled(d.module)]


def torchMessage() -> str | None:
    """None when PyTorch is importable; otherwise how to install it in Slicer (the PyTorch extension)."""
    if isInstalled("torch"):
        return None
    return ("PyTorch is not installed. Install it through the PyTorch extension: open the Extension Manager "
            "(View > Extension Manager), install \"PyTorch\" and restart Slicer; then let this module install PyTorch "
            "(it runs the extension's PyTorchUtils logic, installTorch, which picks the build that fits this "
            "computer's GPU driver). Do not install torch with pip inside Slicer.")


def dependencyMessage(includeOptional: bool = False) -> str | None:
    """None when everything needed is importable; otherwise one message naming what is missing and how to get it."""
    missing = missingDependencies(includeOptional)
    if not missing:
        return None
    parts = []
    torchMissing = [d.distribution for d in missing if d.viaPyTorchExtension]
    others = [d.requirement for d in missing if not d.viaPyTorchExtension]
    if torchMissing:
        parts.append(torchMessage() if "torch" in torchMissing else
                     f"{', '.join(torchMissing)} missing: let this module install it (through the PyTorch "
                     f"extension, the release that matches the installed torch), or run in Slicer's Python console: "
                     f"from RALogic.dependencies import installTorch; installTorch().")
    if others:
        parts.append(f"Missing Python packages: {', '.join(others)}. Let this module install them, or run in "
                     f"Slicer's Python console: slicer.util.pip_install({others!r}).")
    return " ".join(parts)


def _pyTorchUtilsLogic():
    """PyTorchUtils' logic from the PyTorch extension; DependencyError when the extension is not installed."""
    try:
        import PyTorchUtils
    except ImportError as exc:
        raise DependencyError("PyTorch cannot be installed from here: the PyTorch extension is not installed. Open "
                              "the Extension Manager (View > Extension Manager), install \"PyTorch\", restart Slicer, "
                              "and try again.") from exc
    return PyTorchUtils.PyTorchUtilsLogic()


def torchRequirements() -> tuple[str, str]:
    """The (torch, torchvision) version requirements to install with: the engine's own when torch is not installed;
    when it is, that torch exactly (no replacement of a working PyTorch) and the torchvision release made for it,
    so that a torch without torchvision is completed rather than left a dead end."""
    try:
        installed = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return TORCH_REQUIREMENT, TORCHVISION_REQUIREMENT
    release = installed.split("+")[0]  # a local label (+cu121) is not part of a requirement
    match = re.match(r"2\.(\d+)\b", release)
    if match is None:  # a torch whose torchvision release is not known here: let the installer choose
        return f"=={release}", TORCHVISION_REQUIREMENT
    return f"=={release}", f"==0.{int(match.group(1)) + TORCHVISION_MINOR_OFFSET}.*"


def installTorch(askConfirmation: bool = True, force: bool = False) -> bool:
    """Installs PyTorch, torch and torchvision, through the PyTorch extension's `PyTorchUtilsLogic.installTorch`,
    which chooses the CUDA/CPU build for this computer (`torchRequirements`: a torchvision that matches an installed
    torch). Does nothing when both are importable, unless `force`. Returns True when both are importable afterwards,
    False when the user declined. Raises DependencyError when the PyTorch extension is absent or the installation
    failed. A restart of Slicer may be needed afterwards."""
    if isInstalled("torch") and isInstalled("torchvision") and not force:
        return True
    logic = _pyTorchUtilsLogic()
    torch, torchvision = torchRequirements()
    try:
        installed = logic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=torch,
                                       torchvisionVersionRequirement=torchvision)
    except (subprocess.CalledProcessError, ImportError) as error:
        raise DependencyError(f"PyTorch could not be installed (torch{torch}, torchvision{torchvision}): {error}. "
                              "Check the network connection; if PyTorch files are in use, restart Slicer and try "
                              "again.") from error
    importlib.invalidate_caches()
    if installed is None:
        return False  # declined
    return isInstalled("torch") and isInstalled("torchvision")


def pipShowsErrors() -> bool:
    """Whether `slicer.util.pip_install` shows its own progress dialog and, when pip fails, its own error box: in
    the Slicer application of the versions that have `slicer.packaging` (not in testing mode, where it installs
    without a dialog)."""
    try:
        import slicer
    except ImportError:
        return False
    app = getattr(slicer, "app", None)
    return app is not None and isInstalled("slicer.packaging") and not app.testingEnabled()


def installPackages(names: list[str] | tuple[str, ...] | str) -> list[str]:
    """Installs the given packages (import names such as "skimage", distribution names, or pip requirements;
    the engine's own version bounds are added for known names) with `slicer.util.pip_install` (outside Slicer:
    this Python's pip). Refuses torch, torchvision and torchaudio: those come from the PyTorch extension
    (`installTorch`). Returns the requirements installed; DependencyError when pip failed."""
    names = [names] if isinstance(names, str) else list(names)
    refused = [n for n in names if _distribution(n) in TORCH_DISTRIBUTIONS]
    if refused:
        raise DependencyError(f"{', '.join(refused)} must not be installed with pip inside Slicer: use "
                              f"installTorch(), which installs PyTorch through the PyTorch extension")
    known = {**{d.module.lower(): d.requirement for d in DEPENDENCIES},
             **{d.distribution: d.requirement for d in DEPENDENCIES}}
    requirements = [known.get(n.strip().lower(), n.strip()) for n in names if n.strip()]
    if not requirements:
        return []
    try:
        import slicer.util

        pipInstall = slicer.util.pip_install
    except ImportError:
        pipInstall = None
    try:
        if pipInstall is not None:
            pipInstall(requirements)
        else:
            subprocess.check_call([sys.executable, "-m", "pip", "install", *requirements])
    except subprocess.CalledProcessError as error:
        raise DependencyError(f"pip could not install {', '.join(requirements)} (exit code {error.returncode}); "
                              "its output is in the Python console and the application log. Check the network "
                              "connection and try again.", shown=pipShowsErrors()) from error
    importlib.invalidate_caches()
    return requirements


# ---------------------------------------------------------------------------------------------------------------
# Device and memory
# ---------------------------------------------------------------------------------------------------------------
PAPER_WIDTHS = (64, 128, 256, 512, 512)
CUDA_CONTEXT_GB = 0.5  # the CUDA context and kernels, outside PyTorch's allocator
ALLOCATOR_MARGIN = 1.2  # PyTorch's CUDA caching allocator rounds blocks up and keeps freed ones
# Working memory beyond the loaded weights, measured on the CPU for the paper network (see `estimateMemoryGB`).
DETECT_GB_PER_SLICE = 0.014
DETECT_GB_FIXED = 0.045
TRAIN_GB_PER_SLICE = 0.14
TRAIN_GB_FIXED = 0.14


def _featureElements(imageSize: int, widths: tuple[int, ...]) -> int:
    """Elements of one slice's largest feature map per stage, summed (the encoder's stem and stages; the decoder
    mirrors them): what activations scale with."""
    return sum(w * (imageSize // 2**i) ** 2 for i, w in enumerate(widths))


def _parameterCount(imageSize: int, widths: tuple[int, ...], latentDim: int) -> int:
    """Weights of `ra_engine.model.ReversedAutoEncoder` with one input channel (BatchNorm included), counted
    without building it."""
    bottleneck = imageSize // 2 ** len(widths)

    def block(cin: int, cout: int, skip: bool) -> int:
        return 9 * cin * cout + 9 * cout * cout + 4 * cout + (cin * cout if skip else 0)

    stem = 25 * widths[0] + 2 * widths[0]
    stages = sum(block(widths[i], widths[i + 1], True) for i in range(len(widths) - 1))
    encoder = stem + stages + block(widths[-1], widths[-1], False) + (widths[-1] * bottleneck**2 + 1) * 2 * latentDim
    r = widths[::-1]
    decoder = ((latentDim + 1) * r[0] * bottleneck**2 + block(r[0], r[0], False)
               + sum(block(r[i], r[i + 1], True) for i in range(len(r) - 1)) + block(r[-1], r[-1], False)
               + 25 * r[-1] + 1)
    return encoder + decoder


def estimateMemoryGB(task: str = "detect", batchSize: int = 8, imageSize: int = 128,
                     widths: tuple[int, ...] = PAPER_WIDTHS, latentDim: int = 128, gpu: bool = True) -> float:
    """A rough estimate of the memory in GB (2^30 bytes) that detection or training needs on one device, float32.

    Basis, measured on the CPU for the paper network (128x128, widths 64-128-256-512-512, latent 128; torch 2.x,
    2 threads, AMD EPYC): the peak RSS (VmHWM, reset before the work) of a fresh process over two batches, less its
    RSS before them. Detection (the inference copy of the network plus the LPIPS-alex scoring of both pairs):
    0.038, 0.166 and 0.483 GB at batches 1, 8 and 32, i.e. `DETECT_GB_FIXED` + `DETECT_GB_PER_SLICE` per slice.
    One training iteration (both steps with Adam, from freshly built optimisers): 0.755 and 1.593 GB at batches 2
    and 8, i.e. three copies of the weights (gradients, two Adam moments) + `TRAIN_GB_FIXED` + `TRAIN_GB_PER_SLICE`
    per slice. Other networks are scaled by their feature-map elements per slice relative to the paper network;
    their weights are counted exactly. On a GPU the working memory is multiplied by `ALLOCATOR_MARGIN` and
    `CUDA_CONTEXT_GB` is added. cuDNN workspaces differ from the CPU's kernels, so take the result as +-30%: the
    paper model needs about 0.8 GB of GPU memory for detection at batch 8, about 2.5 GB for training at batch 8.
    """
    if task not in ("detect", "train"):
        raise ValueError(f"task must be 'detect' or 'train', not {task!r}")
    widths = tuple(int(w) for w in widths)
    scale = _featureElements(imageSize, widths) / _featureElements(128, PAPER_WIDTHS)
    weightsGB = _parameterCount(imageSize, widths, latentDim) * 4 / GB
    if task == "detect":
        weights, working = weightsGB, DETECT_GB_FIXED + DETECT_GB_PER_SLICE * batchSize * scale
    else:
        weights, working = 4 * weightsGB, TRAIN_GB_FIXED + TRAIN_GB_PER_SLICE * batchSize * scale
    if gpu:
        return round(CUDA_CONTEXT_GB + weights + ALLOCATOR_MARGIN * working, 2)
    return round(weights + working, 2)


def deviceInfo(requested: str = "auto", *, task: str = "detect", batchSize: int = 8, imageSize: int = 128,
               widths: tuple[int, ...] = PAPER_WIDTHS, latentDim: int = 128) -> tuple[str, str]:
    """The device to compute on and a message for the user: ("cuda:0" | "mps" | "cpu", message).

    requested: "auto" (a CUDA GPU, then Apple MPS, then the CPU), "cpu", "cuda", "cuda:N" or "mps". A GPU that is not
    available falls back to the CPU, and the message says why and what to do; a CUDA GPU whose free memory is below
    `estimateMemoryGB` for the given task, batch and network gets a warning in the message (it is still chosen).
    Without PyTorch: ("cpu", `torchMessage()`)."""
    choices = ("auto", "cpu", "cuda", "mps")
    if requested not in choices and not re.fullmatch(r"cuda:\d+", requested):
        raise ValueError(f"unknown device {requested!r}: choose one of {', '.join(choices)} or cuda:N")
    if not isInstalled("torch"):
        return "cpu", torchMessage() or ""
    import torch

    cuda = torch.cuda.is_available()
    mpsBackend = getattr(torch.backends, "mps", None)
    mps = mpsBackend is not None and mpsBackend.is_available()
    if requested == "cpu":
        note = " (a CUDA GPU is available: choose auto or cuda to use it)" if cuda else ""
        return "cpu", f"Computing on the CPU{note}."
    if requested.startswith("cuda") or (requested == "auto" and cuda):
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if not cuda:
            build = torch.version.cuda
            reason = (f"this PyTorch ({torch.__version__}) is built for CUDA {build} but finds no usable GPU or driver"
                      if build else f"this PyTorch ({torch.__version__}) is a CPU-only build")
            return "cpu", (f"CUDA was requested but is not available: {reason}. Computing on the CPU instead, which "
                           f"is much slower; to use an NVIDIA GPU, reinstall PyTorch through the PyTorch extension.")
        if index >= torch.cuda.device_count():
            return "cpu", (f"cuda:{index} was requested but only {torch.cuda.device_count()} CUDA GPU(s) are "
                           f"available. Computing on the CPU instead; choose cuda:0 to use the first GPU.")
        return f"cuda:{index}", _cudaMessage(torch, index, task, batchSize, imageSize, widths, latentDim)
    if requested == "mps" or (requested == "auto" and mps):
        if not mps:
            return "cpu", ("Apple MPS was requested but is not available (it needs an Apple silicon Mac and macOS 12.3 "
                           "or later). Computing on the CPU instead.")
        return "mps", "Computing on the Apple GPU (MPS)."
    return "cpu", "No GPU is available to PyTorch: computing on the CPU (slower)."


def _cudaMessage(torch, index: int, task: str, batchSize: int, imageSize: int, widths, latentDim: int) -> str:
    name = torch.cuda.get_device_name(index)
    free, total = torch.cuda.mem_get_info(index)
    needed = estimateMemoryGB(task, batchSize, imageSize, widths, latentDim, gpu=True)
    message = f"Computing on {name} (cuda:{index}, {free / GB:.1f} of {total / GB:.1f} GB free)."
    if free / GB < needed:
        message += (f" Warning: {task} at batch {batchSize} needs about {needed:.1f} GB of GPU memory: lower the batch "
                    f"size, close other programs using the GPU, or choose the CPU.")
    return message
