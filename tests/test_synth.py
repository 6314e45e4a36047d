"""The synthetic ultrasound generator: layout, determinism, realism basics, and that classes
differ in structure but not in brightness (the demo's pretrained-vs-random gap depends on it)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from usjepa.data import synth
from usjepa.errors import UserError


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "ds"
    return out, synth.write_synthetic_dataset(out, 40, size=64, seed=1)


@pytest.fixture(scope="module")
def items() -> list[synth.SyntheticImage]:
    """Enough images at the demo's size for the statistical checks (~1.5 s)."""
    return list(synth.generate(200, size=128, seed=3))


def _pngs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


def _labels(items) -> np.ndarray:
    return np.array([synth.CLASS_NAMES.index(item.class_name) for item in items])


def _auc(feature: np.ndarray, labels: np.ndarray, positive: str, negative: str) -> float:
    p, q = synth.CLASS_NAMES.index(positive), synth.CLASS_NAMES.index(negative)
    keep = (labels == p) | (labels == q)
    return roc_auc_score(labels[keep] == p, feature[keep])


def test_layout_and_summary(written):
    out, summary = written
    assert summary == {
        "n": 40,
        "size": 64,
        "seed": 1,
        "classes": summary["classes"],
        "groups": summary["groups"],
        "out": str(out),
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(synth.CLASS_NAMES)
    files = _pngs(out)
    assert len(files) == 40 and not [p for p in out.rglob("*") if p.is_file() and p.suffix != ".png"]
    assert sorted(int(p.stem.rsplit("_", 1)[1]) for p in files) == list(range(40))
    groups = [re.match(synth.GROUP_PATTERN, p.stem) for p in files]
    assert all(groups), "every file name must carry its group"
    ids, counts = np.unique([g.group(1) for g in groups], return_counts=True)
    assert len(ids) == summary["groups"] and counts.min() > 1
    assert sum(summary["classes"].values()) == 40
    assert {name: len(list((out / name).glob("*.png"))) for name in synth.CLASS_NAMES} == summary["classes"]


def test_classes_balanced(written, items):
    assert set(written[1]["classes"].values()) == {10}
    _, counts = np.unique(_labels(items), return_counts=True)
    assert counts.tolist() == [50, 50, 50, 50]


def test_pngs_are_8bit_grey_with_black_surround(written):
    out, _ = written
    by_path = {out / item.relpath: item for item in synth.generate(40, size=64, seed=1)}
    outside_text = 0
    for path in _pngs(out):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "L" and image.size == (64, 64)
            pixels = np.asarray(image)
        item = by_path[path]
        np.testing.assert_array_equal(pixels, item.image)  # the file is what generate() yields
        outside = pixels[~item.mask]
        assert (outside == 0).mean() > 0.9, "the surround must be black apart from overlays"
        assert item.mask.mean() > 0.3, "the FOV must fill a good part of the frame"
        outside_text += int((outside > 0).sum())
    assert outside_text > 0, "rulers and labels belong outside the FOV"


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    def write(name, seed):
        synth.write_synthetic_dataset(tmp_path / name, 8, size=48, seed=seed)
        return {p.relative_to(tmp_path / name): p.read_bytes() for p in _pngs(tmp_path / name)}

    first, again, other = write("a", 5), write("b", 5), write("c", 6)
    assert first == again
    assert not set(first.values()) & set(other.values())


def test_both_probe_geometries():
    rng = np.random.default_rng(0)
    shapes = set()
    for i in range(20):
        patient = synth.sample_patient(rng, f"patient{i:04d}")
        _, mask = synth.render_image(np.random.default_rng(i), "normal", patient, 64)
        rows, cols = np.nonzero(mask)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        rectangular = mask.sum() == box
        assert rectangular == (patient.probe == "linear")
        shapes.add(patient.probe)
    assert shapes == {"sector", "linear"}


def test_brightness_and_contrast_do_not_identify_the_class(items):
    """A classifier on in-FOV mean and standard deviation must sit near chance (0.25)."""
    features = np.array([[item.image[item.mask].mean(), item.image[item.mask].std()] for item in items])
    groups = [item.group for item in items]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    f1 = cross_val_score(model, features, _labels(items), groups=groups, cv=GroupKFold(5), scoring="f1_macro")
    assert f1.mean() < 0.4


def _enclosed_dark_fraction(item: synth.SyntheticImage) -> float:
    """FOV fraction in compact dark blobs that do not touch the FOV edge.

    Anechoic cysts are closed, roundish dark regions; shadows run to the bottom of the FOV,
    vessels are long and thin and speckle nulls are small, so this is a crude cyst detector
    that no brightness statistic can mimic.
    """
    inner = ndimage.binary_erosion(item.mask, iterations=3)
    smooth = ndimage.gaussian_filter(item.image.astype(float), 1.5)
    blobs, _ = ndimage.label((smooth < 0.3 * item.image[item.mask].mean()) & inner)
    touching = set(np.unique(blobs[inner & ~ndimage.binary_erosion(inner)]).tolist())
    area = 0
    for label, box in enumerate(ndimage.find_objects(blobs), start=1):
        rows, cols = np.nonzero(blobs[box] == label)
        if label in touching or rows.size < 12:
            continue
        low, high = np.linalg.eigvalsh(np.cov(np.stack([rows, cols])))
        area += rows.size if low > 0.15 * high else 0
    return area / inner.sum()


def _bright_spot_over_shadow(item: synth.SyntheticImage) -> float:
    """Largest drop from a pixel to the column just below it.

    Calcifications are bright foci with a dark shadow right underneath; calipers, fascia and
    speckle are bright too but have tissue below them.
    """
    smooth = ndimage.gaussian_filter(item.image.astype(float), 1.0)
    below = np.roll(ndimage.uniform_filter1d(smooth, 12, axis=0), -9, axis=0)  # rows +3..+14
    inner = ndimage.binary_erosion(item.mask, iterations=3)
    valid = inner & np.roll(inner, -15, axis=0)
    return (smooth - below)[valid].max()


def test_classes_differ_in_structure(items):
    labels = _labels(items)
    enclosed = np.array([_enclosed_dark_fraction(item) for item in items])
    spots = np.array([_bright_spot_over_shadow(item) for item in items])
    assert _auc(enclosed, labels, "cyst", "normal") > 0.75
    assert _auc(spots, labels, "calcified", "normal") > 0.75


def test_render_image_contract():
    patient = synth.sample_patient(np.random.default_rng(1), "patient0001")
    image, mask = synth.render_image(np.random.default_rng(2), "solid", patient, 40)
    again, _ = synth.render_image(np.random.default_rng(2), "solid", patient, 40)
    assert image.dtype == np.uint8 and image.shape == (40, 40)
    assert mask.dtype == bool and mask.shape == (40, 40)
    np.testing.assert_array_equal(image, again)
    with pytest.raises(ValueError):
        synth.render_image(np.random.default_rng(2), "tumour", patient, 40)


@pytest.mark.parametrize("n, size, why", [(3, 64, "--n 3"), (8, 31, "--size 31")])
def test_rejects_bad_arguments(tmp_path, n, size, why):
    with pytest.raises(UserError, match=re.escape(why)) as error:
        synth.write_synthetic_dataset(tmp_path / "out", n, size=size)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_or_file_output(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "full", tmp_path / "file"):
        with pytest.raises(UserError, match="not an empty folder") as error:
            synth.write_synthetic_dataset(out, 8, size=48)
        assert "\n" not in str(error.value)
    under = tmp_path / "file" / "out"
    with pytest.raises(UserError) as error:
        synth.write_synthetic_dataset(under, 8, size=48)
    assert str(error.value) == (
        f"cannot create the image folder {under / 'normal'} ({tmp_path / 'file'} is a file, not a folder); "
        "choose a new folder path for OUT"
    )
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert synth.write_synthetic_dataset(tmp_path / "empty", 4, size=32)["n"] == 4  # empty is fine


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="usjepa")
    synth.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synth", str(tmp_path / "cli"), "--n", "8", "--size", "48", "--seed", "2"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "8 images" in printed[0] and str(tmp_path / "cli") in printed[0]
    assert len(_pngs(tmp_path / "cli")) == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", str(tmp_path / "x")])  # --n is required
