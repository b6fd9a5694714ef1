"""The model registry: imports from a folder, a zip and a file:// URL with checksums, refusals that leave nothing
behind, lookup by name, and the `ra models` commands."""
import argparse
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch

from ra_engine.core.errors import ModelError
from ra_engine.network.config import ArchConfig
from ra_engine.network.model import ReversedAutoEncoder
from ra_engine.models.card import ModelCard
from ra_engine.models.modeldir import load_model, save_model_dir
from ra_engine.cli.models import add_models_parser
from ra_engine.preprocess.presets import preset_config
from ra_engine.models.install import import_model
from ra_engine.models.registry import list_models, models_dir, remove_model, resolve_model


@pytest.fixture(autouse=True)
def registry(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "registry"
    monkeypatch.setenv("RA_MODELS_DIR", str(folder))
    monkeypatch.setattr("ra_engine.models.registry.BUNDLED_DIR", tmp_path / "bundled")
    return folder


def make_model(folder: Path, name: str = "tiny", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    arch = ArchConfig(image_size=16, latent_dim=4, widths=(4, 8))
    save_model_dir(folder, ReversedAutoEncoder(arch).state_dict(),
                   ModelCard(name=name, architecture=arch, preset=preset_config("xray", image_size=16)))
    return folder


def tamper_weights(folder: Path) -> Path:
    """Flips the last byte of the model's weights, so that they no longer match the card's sha256."""
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return folder


def zip_of(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, prefix + path.name)
    return archive


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def registry_entries(registry: Path) -> list[str]:
    """Everything in the registry folder, hidden staging folders included."""
    return sorted(p.name for p in registry.iterdir()) if registry.exists() else []


def test_import_from_a_folder_registers_a_loadable_copy_under_the_cards_name(tmp_path, registry):
    source = make_model(tmp_path / "src")
    path = import_model(source)
    assert path == registry / "tiny" and registry_entries(registry) == ["tiny"]
    assert load_model(path).card.weights_sha256 == load_model(source).card.weights_sha256
    [entry] = list_models()
    assert entry["name"] == "tiny" and entry["preset"] == "xray" and entry["image_size"] == 16
    assert entry["calibrated"] is False and entry["parameters"] > 0 and entry["created"]


@pytest.mark.parametrize("prefix", ["", "tiny-model/"], ids=["files-at-top", "in-one-folder"])
def test_import_from_a_zip_with_or_without_a_top_folder(tmp_path, registry, prefix):
    archive = zip_of(make_model(tmp_path / "src"), tmp_path / "tiny.zip", prefix)
    path = import_model(archive, name="from-zip", sha256=sha256(archive))
    assert path == registry / "from-zip" and load_model(path)
    assert registry_entries(registry) == ["from-zip"]


def test_import_from_a_file_url_checks_the_archive_sha256(tmp_path, registry):
    archive = zip_of(make_model(tmp_path / "src"), tmp_path / "tiny.zip")
    url = archive.as_uri()
    with pytest.raises(ModelError, match="does not match the sha256 given"):
        import_model(url, sha256="0" * 64)
    assert registry_entries(registry) == [], "a refused download leaves nothing behind"
    seen = []
    path = import_model(url, sha256="SHA256:" + sha256(archive).upper(), progress=lambda done, total: seen.append(done))
    assert path == registry / "tiny" and load_model(path) and seen[-1] == archive.stat().st_size
    assert registry_entries(registry) == ["tiny"]


def test_a_url_without_sha256_imports_with_a_warning(tmp_path, registry):
    archive = zip_of(make_model(tmp_path / "src"), tmp_path / "tiny.zip")
    with pytest.warns(UserWarning, match="no sha256"):
        import_model(archive.as_uri())
    assert registry_entries(registry) == ["tiny"]


def test_tampered_weights_are_refused_from_a_folder_and_from_a_zip(tmp_path, registry):
    source = tamper_weights(make_model(tmp_path / "src"))
    with pytest.raises(ModelError, match="does not match its card"):
        import_model(source)
    archive = zip_of(source, tmp_path / "tampered.zip")
    with pytest.raises(ModelError, match="does not match its card"):
        import_model(archive, sha256=sha256(archive))  # the archive is the one published; its weights are not
    assert registry_entries(registry) == []


@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/evil.txt", "model/../../evil.txt", "C:/evil.txt",
                                  "..\\evil.txt"])
def test_zip_slip_entries_refuse_the_whole_archive(tmp_path, registry, evil):
    archive = zip_of(make_model(tmp_path / "src"), tmp_path / "evil.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(evil, "pwned")
    with pytest.raises(ModelError, match="outside the model folder"):
        import_model(archive)
    assert registry_entries(registry) == [] and not (tmp_path / "evil.txt").exists()


def test_a_symbolic_link_in_a_zip_is_refused(tmp_path, registry):
    archive = zip_of(make_model(tmp_path / "src"), tmp_path / "link.zip")
    link = zipfile.ZipInfo("notes.txt")
    link.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(ModelError, match="are links"):
        import_model(archive)
    assert registry_entries(registry) == []


def test_archives_that_hold_no_single_model_are_refused(tmp_path, registry):
    not_zip = tmp_path / "weights.zip"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a zip archive"):
        import_model(not_zip)
    source = make_model(tmp_path / "src")
    two = zip_of(source, tmp_path / "two.zip", "a/")
    with zipfile.ZipFile(two, "a") as zf:
        for path in source.iterdir():
            zf.write(path, "b/" + path.name)
    with pytest.raises(ModelError, match="one model directory"):
        import_model(two)
    with pytest.raises(ModelError, match="is not a model directory"):
        import_model(tmp_path)  # a folder that holds a model folder, not a model folder
    assert registry_entries(registry) == []


def test_a_name_collision_is_refused_unless_overwrite(tmp_path, registry):
    first = import_model(make_model(tmp_path / "one", seed=1))
    original = load_model(first).card.weights_sha256
    other = make_model(tmp_path / "two", seed=2)
    with pytest.raises(ModelError, match="already registered.*--overwrite"):
        import_model(other)
    assert load_model(first).card.weights_sha256 == original
    import_model(other, overwrite=True)
    assert load_model(first).card.weights_sha256 == load_model(other).card.weights_sha256 != original
    assert registry_entries(registry) == ["tiny"], "the replaced model is gone, no staging folder is left"


def test_bad_names_and_digests_are_refused_before_anything_is_copied(tmp_path, registry):
    source = make_model(tmp_path / "src")
    for name in ("../up", "a/b", "", ".hidden"):
        with pytest.raises(ModelError, match="not a usable model name"):
            import_model(source, name=name)
    with pytest.raises(ModelError, match="not a sha256 digest"):
        import_model(zip_of(source, tmp_path / "m.zip"), sha256="abc")
    with pytest.raises(ModelError, match="checks an archive"):
        import_model(source, sha256="0" * 64)
    with pytest.raises(ModelError, match="does not exist"):
        import_model(tmp_path / "missing")
    with pytest.raises(ModelError, match="cannot download"):
        import_model((tmp_path / "missing.zip").as_uri(), sha256="0" * 64)
    assert registry_entries(registry) == []


def test_resolve_prefers_an_existing_folder_then_a_registered_name(tmp_path, registry, monkeypatch):
    source = make_model(tmp_path / "src")
    import_model(source, name="brain")
    assert resolve_model(source) == source
    assert resolve_model("brain") == registry / "brain"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "brain").mkdir()
    assert resolve_model("brain") == Path("brain"), "a folder of that name in the working directory wins"
    with pytest.raises(ModelError, match="registered models: brain"):
        resolve_model("unknown")


def test_bundled_models_are_found_by_name_after_registered_ones_and_cannot_be_removed(tmp_path, registry):
    bundled = make_model(tmp_path / "bundled" / "demo")
    assert resolve_model("demo") == bundled
    assert [(m["name"], m["bundled"]) for m in list_models()] == [("demo", True)]
    with pytest.raises(ModelError, match="bundled with ra"):
        remove_model("demo")
    assert (bundled / "model.json").is_file()
    import_model(make_model(tmp_path / "src", seed=1), name="demo")
    assert resolve_model("demo") == registry / "demo", "a registered model shadows the bundled one"
    assert [(m["name"], m["bundled"]) for m in list_models()] == [("demo", False)]


def test_remove_deletes_the_model_and_unknown_names_are_errors(tmp_path, registry):
    import_model(make_model(tmp_path / "src"), name="a")
    import_model(make_model(tmp_path / "src"), name="b")
    assert [m["name"] for m in list_models()] == ["a", "b"]
    assert remove_model("a") == registry / "a"
    assert [m["name"] for m in list_models()] == ["b"] and registry_entries(registry) == ["b"]
    with pytest.raises(ModelError, match="no registered model is named a; registered models: b"):
        remove_model("a")


def test_models_dir_follows_the_environment_then_platformdirs(registry, monkeypatch):
    assert models_dir() == registry
    monkeypatch.delenv("RA_MODELS_DIR")
    assert models_dir().name == "models" and models_dir().parent.name.lower() in ("ra-slicer", "data")


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="ra")
    add_models_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", *argv])
    return args.run(args)


def test_models_commands(tmp_path, registry, capsys):
    assert run_cli("path") == 0 and capsys.readouterr().out.strip() == str(registry)
    assert run_cli("list") == 0 and "no models registered" in capsys.readouterr().err
    archive = zip_of(make_model(tmp_path / "src"), tmp_path / "tiny.zip")
    assert run_cli("import", archive.as_uri(), "--name", "xr", "--sha256", sha256(archive), "--quiet") == 0
    assert "imported xr" in capsys.readouterr().err
    assert run_cli("list") == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["NAME", "PRESET", "SIZE"] and row.split()[:3] == ["xr", "xray", "16px"]
    with pytest.raises(ModelError, match="already registered"):
        run_cli("import", str(archive), "--name", "xr")
    assert run_cli("remove", "xr") == 0 and "removed" in capsys.readouterr().err
    assert list_models() == []
    # A card that cannot be read is listed as such, not hidden, and does not break the listing.
    (registry / "broken").mkdir()
    (registry / "broken" / "model.json").write_text(json.dumps({"format_version": 99}))
    assert run_cli("list") == 0 and "broken: unreadable" in capsys.readouterr().err
