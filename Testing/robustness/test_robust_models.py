"""Hostile and broken model files: a wrong checksum, a card that does not fit its weights, an unknown architecture or a
future card format, pickles posing as weights, checkpoints or LPIPS weights (refused without being unpickled: their
payload would create a marker file, which must not exist afterwards), archives with `..`, absolute paths, links or a
decompression bomb, tar archives, and downloads that break off. Each ends in a ModelError (or RAError) that says what
is wrong, with nothing registered and no code run. test_registry.py has the basic cases; these are the hostile ones."""
from __future__ import annotations

import http.server
import io
import json
import pickle
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from ra_engine.core.errors import ModelError
from ra_engine.core.files import sha256_of
from ra_engine.models import install
from ra_engine.models.card import read_card, write_card
from ra_engine.models.install import import_model
from ra_engine.models.modeldir import load_model
from robust_helpers import files_under
from test_registry import make_model, registry_entries, tamper_weights, zip_of


@pytest.fixture(autouse=True)
def registry(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "registry"
    monkeypatch.setenv("RA_MODELS_DIR", str(folder))
    monkeypatch.setattr("ra_engine.models.registry.BUNDLED_DIR", tmp_path / "bundled")
    return folder


class Payload:
    """Unpickling this creates the file `marker`: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def with_card_matching(folder: Path, weights: bytes) -> Path:
    """Replaces the model's weights by `weights` and makes its card's sha256 match them (what an attacker who
    controls the whole download can do)."""
    (folder / "model.safetensors").write_bytes(weights)
    card = read_card(folder)
    card.weights_sha256 = sha256_of(folder / "model.safetensors")
    write_card(folder, card)
    return folder


def edit_card(folder: Path, change) -> Path:
    data = json.loads((folder / "model.json").read_text())
    change(data)
    (folder / "model.json").write_text(json.dumps(data))
    return folder


# ---- the model directory ---------------------------------------------------------------------------------------


def test_weights_that_do_not_match_the_cards_checksum_are_refused(tmp_path):
    with pytest.raises(ModelError, match="does not match its card"):
        load_model(tamper_weights(make_model(tmp_path / "m")))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["architecture"].update(latent_dim=8), "does not fit the architecture"),
    (lambda d: d["architecture"].update(widths=[4, 8, 8]), "not divisible|does not fit"),
    (lambda d: d["architecture"].update(widths=[8, 16]), "does not fit the architecture"),
    (lambda d: d["architecture"].update(widths=[-4, 8]), "cannot be built"),
    (lambda d: d["architecture"].update(widths=[]), "cannot be built"),
    (lambda d: d["architecture"].update(image_size=2**16), "does not fit the architecture"),  # no 8 GB allocation
    (lambda d: d["architecture"].update(image_size=16.5), "malformed|cannot be built"),
    (lambda d: d["architecture"].update({"class": "UNet"}), "describes a 'UNet' network"),
    (lambda d: d.update(format_version=3), "has format 3"),
    (lambda d: d.update(format_version=None), "has format None"),
    (lambda d: d.pop("preset"), "incomplete or malformed"),
    (lambda d: d.update(image_score="median_a"), "does not know"),
    (lambda d: d.update(calibration={"thresholds": "x"}), "incomplete or malformed"),
], ids=["latent", "widths-deeper", "widths-wider", "widths-negative", "widths-empty", "image-size-huge",
        "image-size-float", "unknown-class", "future-format", "no-format", "no-preset", "unknown-score",
        "bad-calibration"])
def test_a_card_that_does_not_fit_its_weights_or_this_version_is_refused(tmp_path, change, message):
    folder = edit_card(make_model(tmp_path / "m"), change)
    with pytest.raises(ModelError, match=message):
        load_model(folder)


@pytest.mark.parametrize("content", [b"", b"{", b"[1, 2]", b"\xff\xfe not utf-8", b'{"format_version": 2}'])
def test_a_card_that_is_not_a_card_is_refused(tmp_path, content):
    folder = make_model(tmp_path / "m")
    (folder / "model.json").write_bytes(content)
    with pytest.raises(ModelError):
        load_model(folder)


def test_weights_missing_a_tensor_or_with_an_extra_one_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = make_model(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    fewer = dict(list(state.items())[1:])
    save_file(fewer, str(tmp_path / "fewer.safetensors"))
    with pytest.raises(ModelError, match="does not fit the architecture.*missing"):
        load_model(with_card_matching(folder, (tmp_path / "fewer.safetensors").read_bytes()))
    save_file({**state, "extra": torch.zeros(3)}, str(tmp_path / "more.safetensors"))
    with pytest.raises(ModelError, match="does not fit the architecture"):
        load_model(with_card_matching(folder, (tmp_path / "more.safetensors").read_bytes()))


@pytest.mark.parametrize("form", ["pickle", "torch-save"])
def test_a_pickle_posing_as_weights_is_refused_without_being_unpickled(tmp_path, form):
    marker = tmp_path / "code-ran"
    if form == "pickle":
        data = pickle.dumps({"encoder.stem.0.weight": Payload(marker)})
    else:
        buffer = io.BytesIO()
        torch.save({"encoder.stem.0.weight": Payload(marker)}, buffer)
        data = buffer.getvalue()
    assert not marker.exists()
    folder = with_card_matching(make_model(tmp_path / "m"), data)
    with pytest.raises(ModelError, match="not a safetensors weights file"):
        load_model(folder)
    with pytest.raises(ModelError, match="not a safetensors weights file"):
        import_model(folder)
    assert not marker.exists(), "loading the weights ran code from the file"


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".ckpt"])
def test_a_pickle_posing_as_lpips_weights_is_refused_without_being_unpickled(tmp_path, suffix, monkeypatch):
    from ra_engine.scoring.lpips_weights import load_lpips

    marker = tmp_path / "code-ran"
    path = tmp_path / f"alex{suffix}"
    if suffix == ".pth":
        torch.save({"features.0.weight": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"AlexNet_0": {"Conv_0": {"kernel": Payload(marker)}}}, protocol=3))
    monkeypatch.setenv("RA_LPIPS_WEIGHTS", str(path))
    with pytest.raises(ModelError):
        load_lpips("alex")
    assert not marker.exists(), "loading the LPIPS weights ran code from the file"


def test_a_pickle_posing_as_a_checkpoint_is_refused_without_being_unpickled(tmp_path, capsys):
    """`ra train --resume` on a run folder whose latest.pt is a pickle (plain, or torch.save's zip) that would run
    code: refused with an error naming the checkpoint, the payload never runs, the file stays as it was."""
    from fixtures_io import write_radiographs
    from ra_engine.cli import main

    data = write_radiographs(tmp_path / "normals")
    marker = tmp_path / "code-ran"
    for form in ("pickle", "torch-save"):
        run = tmp_path / f"run-{form}"
        (run / "checkpoints").mkdir(parents=True)
        latest = run / "checkpoints" / "latest.pt"
        if form == "pickle":
            latest.write_bytes(pickle.dumps({"model": Payload(marker)}))
        else:
            torch.save({"format": 1, "model": Payload(marker)}, latest)
        before = latest.read_bytes()
        code = main(["train", "--data", str(data), "--out", str(run), "--preset", "xray", "--image-size", "16",
                     "--widths", "4,8", "--latent-dim", "4", "--batch-size", "2", "--device", "cpu", "--quiet",
                     "--resume", "--no-calibrate"])
        err = capsys.readouterr().err
        assert code == 2 and "cannot be read" in err and "latest.pt" in err, err
        assert latest.read_bytes() == before
    assert not marker.exists(), "loading the checkpoint ran code from the file"


# ---- archives ----------------------------------------------------------------------------------------------------


def test_a_decompression_bomb_is_refused_before_it_is_unpacked(tmp_path, registry):
    archive = zip_of(make_model(tmp_path / "src"), tmp_path / "bomb.zip")
    with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("notes.txt", b"\0" * (64 * 2**20))  # 64 MB of zeros: about 64 kB packed
    assert archive.stat().st_size < 2**20
    with pytest.raises(ModelError, match="would unpack to .* times its packed size"):
        import_model(archive)
    assert registry_entries(registry) == []


def test_an_archive_larger_than_a_model_is_refused_before_it_is_unpacked(tmp_path, registry, monkeypatch):
    archive = zip_of(make_model(tmp_path / "src"), tmp_path / "large.zip")
    monkeypatch.setattr(install, "MAX_UNPACKED_BYTES", 10_000)  # the limit (4 GiB) scaled down to this tiny model
    with pytest.raises(ModelError, match="more than a model directory holds"):
        import_model(archive)
    assert registry_entries(registry) == []


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil-absolute.txt", "link"])
@pytest.mark.parametrize("compression", ["", "gz"])
def test_a_tar_archive_is_refused_clearly_and_nothing_is_extracted(tmp_path, registry, member, compression):
    source = make_model(tmp_path / "src")
    archive = tmp_path / f"model.tar{'.' + compression if compression else ''}"
    with tarfile.open(archive, f"w:{compression}") as tf:
        for path in source.iterdir():
            tf.add(path, path.name)
        info = tarfile.TarInfo(member)
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(info)
        else:
            info.size = 5
            tf.addfile(info, io.BytesIO(b"pwned"))
    with pytest.raises(ModelError, match="a tar archive, which is not imported"):
        import_model(archive)
    assert registry_entries(registry) == []
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil-absolute.txt").exists()


def test_zip_entries_with_absolute_paths_dot_dot_or_links_never_land_anywhere(tmp_path, registry):
    """All of them in one archive, after the model's files: refused whole, nothing written outside or inside."""
    archive = zip_of(make_model(tmp_path / "src"), tmp_path / "evil.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        for name in ("../../evil-up.txt", "/tmp/evil-absolute.txt", "ok/../../evil-deep.txt", "D:\\evil.txt"):
            zf.writestr(name, "pwned")
        link = zipfile.ZipInfo("model.safetensors.link")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/shadow")
    before = files_under(tmp_path / "src")
    with pytest.raises(ModelError, match="outside the model folder or are links"):
        import_model(archive)
    assert registry_entries(registry) == [] and files_under(tmp_path / "src") == before
    assert not any(Path(p).exists() for p in ("/tmp/evil-absolute.txt", tmp_path / "evil-up.txt",
                                              tmp_path.parent / "evil-up.txt", tmp_path / "evil-deep.txt"))


# ---- downloads -----------------------------------------------------------------------------------------------------


class BrokenServer:
    """A local HTTP server that sends `body`, announcing `length` bytes (None: no Content-Length), and closes the
    connection after `send` bytes."""

    def __init__(self, body: bytes, send: int, length: int | None):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body[:send])
                self.wfile.flush()
                self.close_connection = True
                outer.requests += 1

            def log_message(self, *args):
                pass

        self.requests = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/model.zip"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("announced", [True, False], ids=["with-length", "without-length"])
def test_a_download_that_breaks_off_halfway_registers_nothing(tmp_path, registry, announced):
    archive = zip_of(make_model(tmp_path / "src"), tmp_path / "model.zip")
    body = archive.read_bytes()
    with BrokenServer(body, len(body) // 2, len(body) if announced else None) as server:
        with pytest.warns(UserWarning, match="no sha256"):
            with pytest.raises(ModelError, match="connection ended after" if announced else "not a zip archive"):
                import_model(server.url)
        with pytest.raises(ModelError, match="connection ended after" if announced else "does not match the sha256"):
            import_model(server.url, sha256=sha256_of(archive))
        assert server.requests == 2
    assert registry_entries(registry) == [], "a broken download left something in the registry"


def test_a_truncated_zip_by_file_url_registers_nothing(tmp_path, registry):
    archive = zip_of(make_model(tmp_path / "src"), tmp_path / "model.zip")
    cut = tmp_path / "cut.zip"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size * 2 // 3])
    with pytest.raises(ModelError, match="does not match the sha256"):
        import_model(cut.as_uri(), sha256=sha256_of(archive))
    with pytest.warns(UserWarning), pytest.raises(ModelError, match="not a zip archive"):
        import_model(cut.as_uri())
    assert registry_entries(registry) == []


def test_a_download_from_a_server_that_is_not_there_registers_nothing(tmp_path, registry):
    with BrokenServer(b"", 0, None) as server:
        url = server.url
    with pytest.raises(ModelError, match="cannot download"):
        import_model(url, sha256="0" * 64)
    assert registry_entries(registry) == []
