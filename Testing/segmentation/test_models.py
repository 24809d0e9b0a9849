"""Model packages: schema validation, checksums, save/load round trip, registry, import, download, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from KneeSegLogic.commands.main import main
from KneeSegLogic.errors import InputError, KneeSegError
from KneeSegLogic.segmentation import package as contract
from KneeSegLogic.segmentation import registry
from KneeSegLogic.segmentation.networks import build_network

torch.set_num_threads(1)

LABELS = {"1": "femoral_cartilage", "2": "femur"}


def unet_args(in_channels: int = 5, out_channels: int = 3, spatial_dims: int = 2) -> dict:
    return {
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "channels": [4, 8],
        "strides": [2],
        "num_res_units": 1,
    }


def member(name: str = "sagittal-0.6mm", **input_overrides) -> dict:
    contract = {
        "kind": "2.5d",
        "plane": "sagittal",
        "context_slices": 2,
        "spacing_mm": [0.6, 0.6],
        "normalisation": {"name": "quartile"},
        "echo_index": 1,
    }
    contract.update(input_overrides)
    return {"name": name, "architecture": {"name": "monai.UNet", "args": unet_args()}, "input": contract, "weight": 1.0}


def spec(package_id: str = "tiny-knee", version: str = "1.0.0", members: list | None = None, **extra) -> dict:
    return {
        "id": package_id,
        "version": version,
        "description": "tiny test package",
        "license": "Apache-2.0",
        "labels": dict(LABELS),
        "members": members or [member()],
        "postprocessing": [{"name": "largest_component"}, {"name": "closing", "radius_mm": 2.0}],
        "training": {"epochs": 0},
        "metrics": {"dice": {}},
        **extra,
    }


def random_network(seed: int, args: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network("monai.UNet", args or unet_args()).eval()


def make_package(folder: Path, seed: int = 0, **spec_args) -> tuple[contract.ModelPackage, list[torch.nn.Module]]:
    package_spec = spec(**spec_args)
    networks = [random_network(seed + i, m["architecture"]["args"]) for i, m in enumerate(package_spec["members"])]
    package = contract.save_package(folder, package_spec, [n.state_dict() for n in networks])
    return package, networks


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Empty bundled, extra and home folders for the registry."""
    bundled, extra, home = tmp_path / "bundled", tmp_path / "extra", tmp_path / "home"
    for folder in (bundled, extra, home):
        folder.mkdir()
    monkeypatch.setattr(registry, "BUNDLED_MODELS_DIR", bundled)
    monkeypatch.setenv("KNEESEG_HOME", str(home))
    monkeypatch.setenv("KNEESEG_MODELS_PATH", str(extra))
    return bundled, extra, home


def edit_manifest(folder: Path, change) -> None:
    raw = json.loads((folder / "model.json").read_text())
    change(raw)
    (folder / "model.json").write_text(json.dumps(raw))


# --- round trip and checksums -------------------------------------------------------------------


def test_round_trip_gives_identical_outputs(tmp_path, places):
    two = [member("sagittal"), member("coronal", plane="coronal", context_slices=1)]
    two[1]["architecture"]["args"] = unet_args(in_channels=3)
    package, networks = make_package(tmp_path / "pkg", members=two)
    assert (tmp_path / "pkg" / "MODEL_CARD.md").read_text().startswith("# tiny-knee 1.0.0")
    assert not (tmp_path / "pkg.partial").exists()
    reloaded = contract.load_package(tmp_path / "pkg")
    assert [m.in_channels for m in reloaded.members] == [5, 3]
    assert reloaded.members[0].echo_index == 1 and reloaded.members[1].plane == "coronal"
    assert reloaded.tissue_labels == [0, 1, 5]  # channel -> tissue-table label value
    for index, network in enumerate(networks):
        x = torch.randn(2, reloaded.members[index].in_channels, 32, 32)
        loaded = reloaded.load_member(index, "cpu")
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(x), network(x))
    # Different seeds give different networks, so the equality above is not vacuous.
    x = torch.randn(1, 5, 32, 32)
    with torch.no_grad():
        assert not torch.equal(reloaded.load_member(0)(x), random_network(99)(x))
    # The manifest names each weights file's sha256, which is the file's real sha256.
    raw = json.loads((tmp_path / "pkg" / "model.json").read_text())
    for m in raw["members"]:
        assert m["sha256"] == hashlib.sha256((tmp_path / "pkg" / m["weights"]).read_bytes()).hexdigest()


def test_tampered_weights_are_refused(tmp_path, places):
    package, _ = make_package(tmp_path / "pkg")
    weights = package.weights_path(0)
    expected = package.members[0].sha256
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(KneeSegError, match="refused") as caught:
        package.load_member(0)
    message = str(caught.value)
    assert str(weights) in message and expected in message and actual in message
    with pytest.raises(KneeSegError, match="refused"):
        package.verify()
    weights.unlink()
    with pytest.raises(KneeSegError, match="missing"):
        package.load_member(0)


def test_torch_pt_weights_load_with_weights_only(tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    network = random_network(3)
    torch.save(network.state_dict(), folder / "member0.pt")
    raw = spec()
    raw["format_version"] = 1
    raw["members"][0].update(weights="member0.pt", sha256=contract.sha256_of(folder / "member0.pt"))
    (folder / "model.json").write_text(json.dumps(raw))
    x = torch.randn(1, 5, 16, 16)
    with torch.no_grad():
        assert torch.equal(contract.load_package(folder).load_member(0)(x), network(x))
    # A pickle holding anything but tensors is not unpickled (weights_only=True refuses it).
    torch.save({"evil": Path("/")}, folder / "member0.pt")
    edit_manifest(folder, lambda r: r["members"][0].update(sha256=contract.sha256_of(folder / "member0.pt")))
    with pytest.raises(KneeSegError, match="refused: not a torch file of tensors only"):
        contract.load_package(folder).load_member(0)


def test_weights_of_another_architecture_do_not_fit(tmp_path):
    package, _ = make_package(tmp_path / "pkg")
    other = build_network("monai.UNet", {**unet_args(), "channels": [4, 16]})
    safetensors.torch.save_file(other.state_dict(), str(package.weights_path(0)))
    edit_manifest(package.path, lambda r: r["members"][0].update(sha256=contract.sha256_of(package.weights_path(0))))
    with pytest.raises(KneeSegError, match="do not fit monai.UNet"):
        contract.load_package(package.path).load_member(0)


def test_save_package_refuses_existing_folder_and_wrong_member_count(tmp_path):
    make_package(tmp_path / "pkg")
    with pytest.raises(KneeSegError, match="exists"):
        make_package(tmp_path / "pkg")
    with pytest.raises(KneeSegError, match="2 state dicts for 1 members"):
        contract.save_package(tmp_path / "other", spec(), [random_network(0).state_dict()] * 2)
    # A spec that does not validate leaves nothing behind.
    with pytest.raises(InputError, match="labels"):
        contract.save_package(
            tmp_path / "bad", {**spec(), "labels": {"1": "kneecap"}}, [random_network(0).state_dict()]
        )
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


# --- validation -----------------------------------------------------------------------------------


def invalid(change) -> str:
    """A valid model.json (as a dict) after ``change``."""
    raw = {**spec(), "format_version": 1}
    raw["members"][0]["weights"] = "member0.safetensors"
    raw["members"][0]["sha256"] = "0" * 64
    change(raw)
    return raw


@pytest.mark.parametrize(
    "change, where, words",
    [
        (lambda r: r.pop("id"), "id", "missing"),
        (lambda r: r.pop("license"), "license", "missing"),
        (lambda r: r.pop("members"), "members", "missing"),
        (lambda r: r.update(members=[]), "members", "at least one"),
        (lambda r: r.update(format_version=2), "format_version", "must be 1"),
        (lambda r: r.update(version="one"), "version", "1.0.0"),
        (lambda r: r.update(id="../evil"), "id", "letters"),
        (lambda r: r.update(colour="red"), "top level", "unknown field"),
        (lambda r: r["labels"].update({"3": "kneecap"}), "labels[3]", "not in the tissue table"),
        (lambda r: r.update(labels={"1": "femur", "3": "tibia"}), "labels", "without gaps"),
        (lambda r: r.update(labels={"0": "femur"}), "labels", "0 is background"),
        (lambda r: r.update(labels={"1": "femur", "2": "femur"}), "labels", "once"),
        (
            lambda r: r["members"][0]["architecture"].update(name="resnet"),
            "members[0].architecture.name",
            "unknown architecture 'resnet'",
        ),
        (lambda r: r["members"][0]["architecture"]["args"].update(depth=3), "members[0].architecture.args", "depth"),
        (lambda r: r["members"][0]["architecture"]["args"].update(in_channels=1), "args.in_channels", "need 5"),
        (lambda r: r["members"][0]["architecture"]["args"].update(out_channels=11), "args.out_channels", "need 3"),
        (lambda r: r["members"][0].pop("sha256"), "members[0].sha256", "missing"),
        (lambda r: r["members"][0].update(sha256="abc"), "members[0].sha256", "64 hexadecimal"),
        (
            lambda r: r["members"][0].update(weights="../outside.safetensors"),
            "members[0].weights",
            "inside the package",
        ),
        (lambda r: r["members"][0].update(weights="member0.pkl"), "members[0].weights", ".safetensors"),
        (lambda r: r["members"][0].update(weight=0), "members[0].weight", "> 0"),
        (lambda r: r["members"][0]["input"].update(kind="4d"), "input.kind", "not one of"),
        (lambda r: r["members"][0]["input"].pop("plane"), "input.plane", "needs a plane"),
        (lambda r: r["members"][0]["input"].update(context_slices=0), "input.context_slices", "k >= 1"),
        (lambda r: r["members"][0]["input"].update(context_slices=True), "input.context_slices", "an integer"),
        (lambda r: r["members"][0]["input"].update(spacing_mm=[0.6, 0.6, 0.6]), "input.spacing_mm", "2 positive"),
        (lambda r: r["members"][0]["input"].update(spacing_mm=[0.6, -1]), "input.spacing_mm", "2 positive"),
        (
            lambda r: r["members"][0]["input"].update(normalisation={"name": "minmax"}),
            "normalisation.name",
            "not one of",
        ),
        (
            lambda r: r["members"][0]["input"].update(normalisation={"name": "percentile", "low": 99, "high": 1}),
            "input.normalisation",
            "low < high",
        ),
        (
            lambda r: r["members"][0]["input"].update(normalisation={"name": "percentile", "low": 1}),
            "normalisation.high",
            "missing",
        ),
        (lambda r: r["members"][0]["input"].update(echo_index=-1), "input.echo_index", ">= 0"),
        (lambda r: r["members"][0]["input"].update(context_slice=2), "members[0].input", "unknown field"),
        (lambda r: r["members"].append(dict(r["members"][0])), "members", "unique"),
        (lambda r: r.update(postprocessing=[{"radius_mm": 2}]), "postprocessing[0]", '"name"'),
    ],
)
def test_invalid_manifest_gets_a_clear_error(tmp_path, change, where, words):
    (tmp_path / "model.json").write_text(json.dumps(invalid(change)))
    with pytest.raises(InputError) as caught:
        contract.load_package(tmp_path)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "model.json")), message
    assert where in message and words in message, message
    assert "\n" not in message


def test_valid_3d_member_and_other_inputs(tmp_path):
    three_d = {
        "name": "bones-3d",
        "architecture": {"name": "monai.BasicUNet", "args": {"out_channels": 3, "features": [4, 4, 8, 8, 16, 4]}},
        "input": {
            "kind": "3d",
            "spacing_mm": [1, 1, 1.5],
            "patch_size": [32, 32, 16],
            "normalisation": {"name": "percentile", "low": 1, "high": 99},
        },
        "weight": 0.5,
    }
    raw = invalid(lambda r: r["members"].__setitem__(0, {**three_d, "weights": "m.safetensors", "sha256": "a" * 64}))
    (tmp_path / "model.json").write_text(json.dumps(raw))
    package = contract.load_package(tmp_path)
    m = package.members[0]
    assert (m.kind, m.plane, m.context_slices, m.in_channels, m.spatial_dims) == ("3d", None, 0, 1, 3)
    assert m.patch_size == (32, 32, 16) and m.spacing_mm == (1.0, 1.0, 1.5) and m.weight == 0.5
    # BasicUNet defaults to 3 spatial dims and 1 input channel, which is what a 3d member needs;
    # a 2d member with the same arguments does not fit.
    raw["members"][0]["input"] = {
        "kind": "2d",
        "plane": "axial",
        "spacing_mm": [1, 1],
        "normalisation": {"name": "zscore"},
    }
    (tmp_path / "model.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="spatial_dims"):
        contract.load_package(tmp_path)


def test_not_a_package(tmp_path):
    with pytest.raises(InputError, match="no such model package"):
        contract.load_package(tmp_path / "absent")
    with pytest.raises(InputError, match="model.json missing"):
        contract.load_package(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        contract.load_package(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(InputError, match="not a model package"):
        contract.load_package(tmp_path / "weights.bin")


# --- zips, registry, import, download -------------------------------------------------------------


def zip_folder(folder: Path, archive: Path, inner: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in sorted(folder.iterdir()):
            zipped.write(file, f"{inner}{file.name}")
    return archive


def test_zip_is_unpacked_once_and_imported_into_the_user_cache(tmp_path, places):
    _, _, home = places
    package, networks = make_package(tmp_path / "pkg", seed=5)
    archive = zip_folder(tmp_path / "pkg", tmp_path / "tiny-knee.zip", inner="tiny-knee/")
    from_zip = contract.load_package(archive)
    assert from_zip.path.parent.name == contract.sha256_of(archive) and from_zip.sha256 == package.sha256
    assert contract.load_package(archive).path == from_zip.path  # the cache is reused
    imported = registry.import_package(archive)
    assert imported.path == home / "models" / "tiny-knee-1.0.0" and imported.origin == "user"
    x = torch.randn(1, 5, 16, 16)
    with torch.no_grad():
        assert torch.equal(imported.load_member(0)(x), networks[0](x))
    assert registry.import_package(tmp_path / "pkg").path == imported.path  # same package again: no-op
    # The same id and version with other weights is refused, not silently replaced.
    shutil.rmtree(tmp_path / "pkg")
    make_package(tmp_path / "pkg", seed=6)
    with pytest.raises(KneeSegError, match="already installed"):
        registry.import_package(tmp_path / "pkg")


def test_import_refuses_tampered_package_and_unsafe_zip(tmp_path, places):
    _, _, home = places
    package, _ = make_package(tmp_path / "pkg")
    package.weights_path(0).write_bytes(package.weights_path(0).read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(KneeSegError, match="refused"):
        registry.import_package(tmp_path / "pkg")
    assert not (home / "models" / "tiny-knee-1.0.0").exists()
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zipped:
        zipped.writestr("model.json", "{}")
        zipped.writestr("../escaped.txt", "x")
    with pytest.raises(InputError, match="unsafe path"):
        contract.load_package(evil)
    assert not (home / "escaped.txt").exists() and not (home / "unpacked" / "escaped.txt").exists()


def test_registry_finds_bundled_extra_and_cached_packages(tmp_path, places):
    bundled, extra, home = places
    make_package(bundled / "bundled-knee", package_id="bundled-knee")
    make_package(tmp_path / "zipped", package_id="zipped-knee")
    zip_folder(tmp_path / "zipped", extra / "zipped-knee.zip")
    make_package(tmp_path / "cached", package_id="cached-knee", version="2.0.0")
    registry.import_package(tmp_path / "cached")
    (bundled / "README.md").write_text("not a package")
    (bundled / "broken").mkdir()
    (bundled / "broken" / "model.json").write_text("{}")

    problems: list[str] = []
    found = registry.find_packages(problems)
    assert [(p.id, p.origin) for p in found] == [
        ("bundled-knee", "bundled"),
        ("zipped-knee", "extra"),
        ("cached-knee", "user"),
    ]
    assert len(problems) == 1 and "broken" in problems[0] and "format_version" in problems[0]
    with pytest.warns(UserWarning, match="broken"):
        registry.find_packages()
    shutil.rmtree(bundled / "broken")

    # No package says "default": the first bundled one is the default.
    assert registry.get_package(None).id == "bundled-knee"
    assert registry.get_package("zipped-knee").origin == "extra"
    assert registry.get_package(str(tmp_path / "cached")).id == "cached-knee"  # a path is accepted
    with pytest.raises(KneeSegError, match=r"unknown model package 'nope'.*bundled-knee@1.0.0"):
        registry.get_package("nope")

    # A package marked default wins; for one id the newest version wins, wherever it is.
    make_package(tmp_path / "cached3", package_id="cached-knee", version="10.0.0", default=True)
    registry.import_package(tmp_path / "cached3")
    assert (registry.get_package(None).id, registry.get_package(None).version) == ("cached-knee", "10.0.0")
    assert registry.get_package("cached-knee@2.0.0").version == "2.0.0"


def test_registry_with_nothing_found(places):
    with pytest.raises(KneeSegError, match="no model package found"):
        registry.get_package(None)


def test_download_checks_the_sha256(tmp_path, places):
    _, _, home = places
    make_package(tmp_path / "pkg", package_id="remote-knee")
    archive = zip_folder(tmp_path / "pkg", tmp_path / "remote-knee.zip")
    right = contract.sha256_of(archive)
    wrong = "0" * 64
    with pytest.raises(KneeSegError, match=f"refused and deleted.*expected {wrong}, found {right}"):
        registry.download_package(archive.as_uri(), wrong)
    assert list((home / "downloads").iterdir()) == []
    assert registry.find_packages() == []
    with pytest.raises(KneeSegError, match="download failed"):
        registry.download_package((tmp_path / "absent.zip").as_uri(), right)
    package = registry.download_package(archive.as_uri(), "SHA256:" + right.upper())
    assert package.id == "remote-knee" and package.path == home / "models" / "remote-knee-1.0.0"
    assert list((home / "downloads").iterdir()) == []  # the zip is not kept once imported
    package.verify()


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_models_json_import_and_download(tmp_path, places, capsys):
    bundled, _, home = places
    make_package(bundled / "bundled-knee", package_id="bundled-knee", default=True)
    make_package(tmp_path / "offline", package_id="offline-knee")
    archive = zip_folder(tmp_path / "offline", tmp_path / "offline.zip")

    assert main(["models", "--import", str(archive), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    by_id = {p["id"]: p for p in listing["packages"]}
    assert set(by_id) == {"bundled-knee", "offline-knee"}
    assert by_id["bundled-knee"]["default"] is True and by_id["bundled-knee"]["origin"] == "bundled"
    assert by_id["offline-knee"]["location"] == str(home / "models" / "offline-knee-1.0.0")
    assert by_id["offline-knee"]["labels"] == LABELS and by_id["offline-knee"]["license"] == "Apache-2.0"
    assert by_id["offline-knee"]["members"][0]["kind"] == "2.5d"
    assert by_id["offline-knee"]["sha256"] == contract.sha256_of(tmp_path / "offline" / "model.json")

    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "bundled-knee 1.0.0 (default)" in text and "2.5d sagittal (5 slices)" in text

    assert main(["models", "--download", archive.as_uri()]) == 1
    assert "needs --sha256" in capsys.readouterr().err
    assert main(["models", "--download", archive.as_uri(), "--sha256", "1" * 64]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
