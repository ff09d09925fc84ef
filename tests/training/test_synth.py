"""Synthetic data: byte-reproducible, and its Label Studio tasks and COCO file agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from pycocotools.coco import COCO

from training.data.coco import load_coco
from training.data.labelstudio_export import load_labelstudio_export_file
from training.synth import SHAPES, SynthConfig, main_synth, shape_mask, write_dataset

REPO = Path(__file__).resolve().parents[2]


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _make(out: Path, seed: int = 0, **kw) -> Path:
    write_dataset(SynthConfig(out=out, num_images=4, width=96, height=80, seed=seed, **kw), progress=False)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _make(tmp_path_factory.mktemp("synth") / "a")


def test_same_seed_same_bytes_other_seed_other_data(dataset, tmp_path):
    again = _files(_make(tmp_path / "b"))
    first = _files(dataset)
    assert sorted(first) == [
        "coco.json",
        "images/img_0000.png",
        "images/img_0001.png",
        "images/img_0002.png",
        "images/img_0003.png",
        "label_config.xml",
        "tasks.json",
        "tasks_unlabelled.json",
    ]
    assert again == first
    other = _files(_make(tmp_path / "c", seed=1))
    assert other["tasks.json"] != first["tasks.json"]
    assert all(other[f"images/img_000{i}.png"] != first[f"images/img_000{i}.png"] for i in range(4))


def test_tasks_load_back_with_the_masks_of_the_coco_file(dataset):
    samples, report = load_labelstudio_export_file(dataset / "tasks.json", labels=list(SHAPES))
    assert not report and len(samples) == 4
    coco_samples, coco_report = load_coco(dataset / "coco.json", dataset / "images", labels=list(SHAPES))
    assert not coco_report and len(coco_samples) == 4
    for ls, cc in zip(samples, coco_samples):
        assert ls.image_ref == "images/" + Path(cc.image_ref).name
        assert (ls.width, ls.height) == (cc.width, cc.height) == (96, 80)
        assert [i.label for i in ls.instances] == [i.label for i in cc.instances]
        for a, b in zip(ls.instances, cc.instances):
            np.testing.assert_array_equal(a.mask, b.mask)
            np.testing.assert_array_equal(a.box, b.box)
            assert a.mask.sum() >= 32
    coco = COCO(str(dataset / "coco.json"))
    ann = coco.loadAnns(coco.getAnnIds(imgIds=1))[0]
    assert ann["area"] == coco.annToMask(ann).sum()


def test_objects_do_not_overlap_and_images_are_rgb(dataset):
    from PIL import Image

    samples, _ = load_labelstudio_export_file(dataset / "tasks.json")
    for s in samples:
        stack = np.stack([i.mask for i in s.instances]).astype(int)
        assert stack.sum(0).max() == 1  # visible masks of occluding objects are disjoint
        with Image.open(dataset / s.image_ref) as im:
            assert im.mode == "RGB" and im.size == (96, 80)


def test_side_files(dataset):
    tasks = json.loads((dataset / "tasks.json").read_text())
    assert tasks[0]["annotations"][0]["ground_truth"] is True
    region = tasks[0]["annotations"][0]["result"][0]
    assert (region["from_name"], region["to_name"], region["type"]) == ("tag", "image", "brushlabels")
    assert json.loads((dataset / "tasks_unlabelled.json").read_text()) == [{"data": t["data"]} for t in tasks]
    config = LabelInterface((dataset / "label_config.xml").read_text())
    kinds = {type(c).__name__: c for c in config.controls}
    assert set(kinds) == {"BrushLabelsTag", "KeyPointLabelsTag", "RectangleLabelsTag"}
    assert all(c.labels == list(SHAPES) for c in config.controls)
    assert kinds["KeyPointLabelsTag"].attr.get("smart") == "true"


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_is_drawn_where_asked(shape):
    mask = shape_mask(shape, 32, 32, 20, 0.3, 64, 64)
    ys, xs = np.nonzero(mask)
    assert mask.sum() > 150 and abs(xs.mean() - 32) < 4 and abs(ys.mean() - 32) < 4
    assert mask[32, 32] == (shape != "ring")  # a ring has a hole


def test_cli_writes_a_data_set_with_named_classes(tmp_path, capsys):
    argv = [
        "--out",
        str(tmp_path / "d"),
        "--num-images",
        "2",
        "--size",
        "64x48",
        "--seed",
        "3",
        "--classes",
        "cat=circle,dog=star",
        "--min-objects",
        "1",
        "--max-objects",
        "2",
        "--image-url-prefix",
        "http://files:8081/imgs/",
        "--no-progress",
    ]
    assert main_synth(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 2 and summary["classes"] == ["cat", "dog"]
    samples, report = load_labelstudio_export_file(tmp_path / "d" / "tasks.json", labels=["cat", "dog"])
    assert not report and samples[0].image_ref == "http://files:8081/imgs/img_0000.png"
    assert (samples[0].width, samples[0].height) == (64, 48)
    with pytest.raises(SystemExit):
        main_synth(["--out", str(tmp_path / "e"), "--classes", "cat"])  # not a shape and no =shape


def test_module_entry_point_help():
    for argv in (["--help"], ["synth", "--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "training", *argv], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert "synth" in done.stdout
    assert "--num-images" in done.stdout


def _object_hues(seed: int, appearance: str, n_images: int = 30) -> list[tuple[str, float]]:
    """(label, circular mean hue in 0..1 of the object's visible pixels) for every object."""
    import cv2

    from training.synth import generate_image

    out = []
    classes = tuple((s, s) for s in SHAPES)
    for index in range(n_images):
        image, objects = generate_image(np.random.default_rng([seed, index]), 128, 128, classes, 2, 6, appearance)
        hue = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)[..., 0].astype(np.float64) / 256 * 2 * np.pi
        for label, mask in objects:
            out.append((label, float(np.angle(np.exp(1j * hue[mask]).mean()) / (2 * np.pi) % 1.0)))
    return out


def _share_nearest_to_own_class_hue(hues: list[tuple[str, float]]) -> float:
    from training.synth import class_styles

    styles = class_styles(list(SHAPES))
    gap = lambda a, b: min(abs(a - b), 1 - abs(a - b))  # noqa: E731
    nearest = [min(styles, key=lambda l: gap(styles[l].hue, h)) == label for label, h in hues]
    return sum(nearest) / len(nearest)


def test_class_appearance_gives_each_class_its_hue_and_random_appearance_does_not():
    """Under `class` (the default) an object's hue points to its class most of the time, but not always
    (neighbouring classes overlap, textures mix shades); under `random` it says about nothing."""
    class_share = _share_nearest_to_own_class_hue(_object_hues(3, "class"))
    random_share = _share_nearest_to_own_class_hue(_object_hues(3, "random"))
    assert 0.6 <= class_share < 0.99, class_share
    assert random_share < 0.4, random_share


def test_appearance_changes_the_pixels_not_the_objects(tmp_path):
    a = load_labelstudio_export_file(_make(tmp_path / "class") / "tasks.json")[0]
    b = load_labelstudio_export_file(_make(tmp_path / "random", appearance="random") / "tasks.json")[0]
    assert [[i.label for i in s.instances] for s in a] == [[i.label for i in s.instances] for s in b]
    assert all(np.array_equal(x.mask, y.mask) for s, t in zip(a, b) for x, y in zip(s.instances, t.instances))
    assert (tmp_path / "class/images/img_0000.png").read_bytes() != (tmp_path / "random/images/img_0000.png").read_bytes()
    assert SynthConfig(out=tmp_path).appearance == "class"
    with pytest.raises(ValueError, match="unknown appearance"):
        _make(tmp_path / "bad", appearance="pastel")


def test_cli_appearance_option(tmp_path, capsys):
    assert main_synth(["--out", str(tmp_path / "r"), "--num-images", "1", "--size", "64", "--appearance", "random",
                       "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1
    with pytest.raises(SystemExit):
        main_synth(["--out", str(tmp_path / "x"), "--appearance", "pastel"])
