"""Label Studio export parsing: region types, bad rows, annotation policies, real fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from training.data.agreement import annotation_agreement
from training.data.labelstudio_export import AnnotationPolicy, load_labelstudio_export, load_labelstudio_export_file
from training.data.types import Instance

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "label_studio"  # copied from shared/fixtures
W, H = 40, 30


def rect_mask(x1: int, y1: int, x2: int, y2: int, w: int = W, h: int = H) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y1:y2, x1:x2] = True
    return m


def brush(mask: np.ndarray, label: str = "cat", **extra) -> dict:
    """A brush region encoded by the SDK itself, as the editor would store it."""
    h, w = mask.shape
    region = {
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]},
    }
    region.update(extra)
    return region


def polygon(points: list[list[float]], label: str = "cat", w: int = W, h: int = H) -> dict:
    return {
        "from_name": "poly",
        "to_name": "image",
        "type": "polygonlabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {"points": points, "closed": True, "polygonlabels": [label]},
    }


def rectangle(
    x: float, y: float, width: float, height: float, rotation: float = 0.0, label: str = "cat", w: int = W, h: int = H
) -> dict:
    return {
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": width, "height": height, "rotation": rotation, "rectanglelabels": [label]},
    }


def annotation(result: list[dict], ann_id: int = 1, updated: str = "2026-01-01T00:00:00Z", **extra) -> dict:
    ann = {
        "id": ann_id,
        "result": result,
        "was_cancelled": False,
        "ground_truth": False,
        "completed_by": 1,
        "created_at": updated,
        "updated_at": updated,
    }
    ann.update(extra)
    return ann


def task(annotations: list[dict], task_id: int = 1, image: str = "/data/upload/1/a.png") -> dict:
    return {"id": task_id, "data": {"image": image}, "annotations": annotations, "predictions": []}


# ----------------------------------------------------------------------------- region types


def test_brush_region_decodes_to_the_encoded_mask():
    mask = rect_mask(5, 3, 17, 20)
    mask[10, 30] = True
    samples, report = load_labelstudio_export([task([annotation([brush(mask)])])])
    assert not report
    (sample,) = samples
    assert (sample.width, sample.height, sample.task_id, sample.image_ref) == (W, H, 1, "/data/upload/1/a.png")
    (inst,) = sample.instances
    assert inst.label == "cat" and inst.region_type == "brush"
    np.testing.assert_array_equal(inst.mask, mask)
    np.testing.assert_array_equal(inst.box, [5, 3, 31, 20])


def test_polygon_is_rasterised_at_original_size():
    # Percent corners of the pixel rectangle x 10..30, y 6..24 (exclusive) on a 40x30 image.
    pts = [[25, 20], [75, 20], [75, 80], [25, 80]]
    (sample,), report = load_labelstudio_export([task([annotation([polygon(pts)])])])
    assert not report
    (inst,) = sample.instances
    assert inst.region_type == "polygon" and inst.mask.shape == (H, W)
    np.testing.assert_array_equal(inst.mask, rect_mask(10, 6, 30, 24))
    np.testing.assert_array_equal(inst.box, [10, 6, 30, 24])


def test_triangle_polygon_covers_its_interior_only():
    (sample,), _ = load_labelstudio_export([task([annotation([polygon([[0, 0], [100, 0], [0, 100]])])])])
    mask = sample.instances[0].mask
    assert mask[0, 0] and mask[1, 1] and not mask[H - 1, W - 1]
    assert abs(mask.sum() - W * H / 2) < W + H  # half the image, give or take the diagonal


def test_rectangle_without_rotation_is_a_box_only_instance():
    (sample,), report = load_labelstudio_export([task([annotation([rectangle(10, 20, 50, 40)])])])
    assert not report
    (inst,) = sample.instances
    assert inst.mask is None and not inst.has_mask and inst.region_type == "rectangle"
    np.testing.assert_allclose(inst.box, [4, 6, 24, 18])


@pytest.mark.parametrize(
    "rotation, expected",
    [
        # Top-left (20, 15) px, 20 x 12 px, rotated clockwise about the top-left corner.
        (90, [8, 15, 20, 30]),  # spans y 15..35, clipped to the 30 px image
        (180, [0, 3, 20, 15]),  # x 0..20 and y 3..15
        (-90, [20, 0, 32, 15]),
    ],
)
def test_rectangle_rotation_is_about_the_top_left_corner(rotation, expected):
    (sample,), _ = load_labelstudio_export([task([annotation([rectangle(50, 50, 50, 40, rotation)])])])
    np.testing.assert_allclose(sample.instances[0].box, expected, atol=1e-4)


def test_mixed_regions_keep_annotation_order():
    result = [
        brush(rect_mask(0, 0, 10, 10), "cat"),
        rectangle(50, 50, 10, 10, label="dog"),
        polygon([[50, 0], [90, 0], [90, 40]], "car"),
    ]
    (sample,), _ = load_labelstudio_export([task([annotation(result)])])
    assert [(i.label, i.region_type) for i in sample.instances] == [
        ("cat", "brush"),
        ("dog", "rectangle"),
        ("car", "polygon"),
    ]


# ----------------------------------------------------------------------------- bad rows


def test_every_bad_row_is_counted_by_reason():
    good = brush(rect_mask(0, 0, 10, 10))
    truncated = brush(rect_mask(0, 0, 10, 10))
    truncated["value"]["rle"] = truncated["value"]["rle"][:8]
    wrong_size = brush(rect_mask(0, 0, 10, 10, w=20, h=20), original_width=W, original_height=H)
    bad_values = brush(rect_mask(0, 0, 10, 10))
    bad_values["value"]["rle"] = bad_values["value"]["rle"][:-1] + [300]
    no_size = brush(rect_mask(0, 0, 10, 10))
    del no_size["original_width"]
    unlabelled = brush(rect_mask(0, 0, 10, 10))
    unlabelled["value"]["brushlabels"] = []
    two_labels = brush(rect_mask(0, 0, 10, 10))
    two_labels["value"]["brushlabels"] = ["cat", "dog"]
    other_size = brush(rect_mask(0, 0, 10, 10, w=50, h=50))
    keypoint = {
        "type": "keypointlabels",
        "original_width": W,
        "original_height": H,
        "value": {"x": 1, "y": 1, "keypointlabels": ["cat"]},
    }
    tasks = [
        {"id": 1, "data": {"image": "a.png"}, "annotations": []},
        {"id": 2, "data": {"image": "b.png"}},
        task([annotation([good], was_cancelled=True)], task_id=3),
        {"id": 4, "data": {"text": "x", "other": "y"}, "annotations": [annotation([good])]},
        task(
            [
                annotation(
                    [
                        good,
                        brush(rect_mask(0, 0, 10, 10), "zebra"),  # unknown label
                        brush(np.zeros((H, W), bool)),  # empty mask
                        truncated,
                        wrong_size,
                        bad_values,  # corrupt mask x3
                        polygon([[0, 0], [50, 50]]),  # bad polygon
                        rectangle(10, 10, 0, 20),  # empty box
                        dict(rectangle(10, 10, 5, 5), value={"x": "left", "rectanglelabels": ["cat"]}),  # bad box
                        no_size,
                        unlabelled,
                        two_labels,
                        keypoint,
                        other_size,
                    ]
                )
            ],
            task_id=5,
        ),
        task([annotation([brush(np.zeros((H, W), bool))])], task_id=6),  # nothing usable left
        "not a task",
    ]
    samples, report = load_labelstudio_export(tasks, labels=["cat", "dog"])
    assert [s.task_id for s in samples] == [5] and len(samples[0].instances) == 1
    assert report.as_dict() == {
        "bad box": 1,
        "bad polygon": 1,
        "cancelled": 1,
        "corrupt mask": 3,
        "empty box": 1,
        "empty mask": 2,
        "malformed task": 1,
        "missing image": 1,
        "missing size": 1,
        "multiple labels": 1,
        "no annotation": 2,
        "no instances": 1,
        "no label": 1,
        "size mismatch": 1,
        "unknown label": 1,
        "unsupported region": 1,
    }
    assert report.total == 20
    text = report.summary()
    assert "3 corrupt mask (e.g. task 5)" in text and text.startswith("skipped 20")


def test_labels_filter_and_image_key():
    t = {
        "id": 7,
        "data": {"img": "x.png", "caption": "hello"},
        "annotations": [annotation([brush(rect_mask(0, 0, 5, 5), "cat"), brush(rect_mask(5, 5, 9, 9), "dog")])],
    }
    samples, report = load_labelstudio_export([t], labels=["dog"], image_key="img")
    assert samples[0].image_ref == "x.png" and [i.label for i in samples[0].instances] == ["dog"]
    assert report.as_dict() == {"unknown label": 1}
    _, report = load_labelstudio_export([t])  # two string values: no way to tell which is the image
    assert report.as_dict() == {"missing image": 1}


def test_tasks_without_ids_use_their_index_and_single_string_data():
    t = {"data": {"photo": "p.png"}, "annotations": [annotation([brush(rect_mask(0, 0, 5, 5))])]}
    samples, _ = load_labelstudio_export([t, t])
    assert [(s.task_id, s.image_ref) for s in samples] == [(0, "p.png"), (1, "p.png")]


# ----------------------------------------------------------------------------- policies


def _two_annotator_task() -> dict:
    older = annotation(
        [brush(rect_mask(0, 0, 10, 10), "cat")], ann_id=5, updated="2026-01-01T10:00:00Z", ground_truth=True
    )
    newer = annotation([brush(rect_mask(0, 0, 10, 10), "dog")], ann_id=3, updated="2026-01-02T10:00:00.5Z")
    cancelled = annotation(
        [brush(rect_mask(0, 0, 10, 10), "car")], ann_id=9, updated="2026-02-01T00:00:00Z", was_cancelled=True
    )
    return task([older, newer, cancelled])


def test_latest_policy_takes_the_newest_non_cancelled_annotation():
    samples, report = load_labelstudio_export([_two_annotator_task()])
    assert [i.label for s in samples for i in s.instances] == ["dog"]
    assert report.as_dict() == {"cancelled": 1}


def test_latest_policy_breaks_timestamp_ties_by_id():
    same = "2026-01-01T00:00:00Z"
    t = task(
        [
            annotation([brush(rect_mask(0, 0, 5, 5), "b")], ann_id=2, updated=same),
            annotation([brush(rect_mask(0, 0, 5, 5), "a")], ann_id=1, updated=same),
        ]
    )
    samples, _ = load_labelstudio_export([t])
    assert samples[0].instances[0].label == "b"


def test_all_and_ground_truth_policies():
    samples, _ = load_labelstudio_export([_two_annotator_task()], policy=AnnotationPolicy("all"))
    assert [s.instances[0].label for s in samples] == ["cat", "dog"] and {s.task_id for s in samples} == {1}
    samples, _ = load_labelstudio_export([_two_annotator_task()], policy=AnnotationPolicy("ground_truth"))
    assert [s.instances[0].label for s in samples] == ["cat"]
    no_gt = task([annotation([brush(rect_mask(0, 0, 5, 5))])], task_id=2)
    samples, report = load_labelstudio_export([no_gt], policy=AnnotationPolicy("ground_truth"))
    assert samples == [] and report.as_dict() == {"no ground truth": 1}
    with pytest.raises(ValueError):
        AnnotationPolicy("newest")


def test_min_agreement_keeps_only_tasks_annotators_agree_on():
    a = annotation([brush(rect_mask(0, 0, 10, 10)), rectangle(50, 50, 25, 20, label="dog")], ann_id=1)
    # Same box; mask 10x10 vs 10x5 inside it: IoU 0.5. Mean over the two matched regions: 0.75.
    b = annotation([brush(rect_mask(0, 0, 10, 5)), rectangle(50, 50, 25, 20, label="dog")], ann_id=2)
    single = task([annotation([brush(rect_mask(0, 0, 3, 3))])], task_id=2)
    for threshold, kept in [(0.7, [1, 2]), (0.8, [2])]:
        samples, report = load_labelstudio_export(
            [task([a, b]), single], policy=AnnotationPolicy(min_agreement=threshold)
        )
        assert [s.task_id for s in samples] == kept
        assert report.as_dict() == ({} if threshold == 0.7 else {"low agreement": 1})


def test_agreement_counts_missed_and_mislabelled_objects_as_zero():
    def inst(label, x1, x2):
        m = rect_mask(x1, 0, x2, 10)
        return Instance(label, m, np.array([x1, 0, x2, 10], np.float32), "brush")

    a = [inst("cat", 0, 10), inst("dog", 20, 30)]
    assert annotation_agreement(a, a) == pytest.approx(1.0)
    assert annotation_agreement(a, a[:1]) == pytest.approx(1 / 2)  # one matched at 1.0, one missed
    assert annotation_agreement(a, [inst("cat", 0, 5), inst("car", 20, 30)]) == pytest.approx(0.5 / 3)
    assert annotation_agreement([], []) == 1.0


# ----------------------------------------------------------------------------- recorded payloads


def test_real_webhook_annotation_decodes_to_a_120x160_mask():
    body = json.loads((FIXTURES / "webhook_annotation_created.json").read_text())["body"]
    samples, report = load_labelstudio_export([dict(body["task"], annotations=[body["annotation"]])])
    assert not report
    (inst,) = samples[0].instances
    assert inst.mask.shape == (120, 160) and inst.label == "cat"
    np.testing.assert_array_equal(inst.mask, rect_mask(40, 30, 120, 90, w=160, h=120))


def test_real_export_from_legacy_train_payload(tmp_path):
    tasks = json.loads((FIXTURES / "train_legacy.json").read_text())["body"]["annotations"]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    samples, report = load_labelstudio_export_file(path, labels=["cat", "dog", "car"])
    assert not report and len(samples) == 1
    assert samples[0].task_id == 2 and samples[0].image_ref == "/data/upload/1/caaa0312-e2e_rect.png"
    assert samples[0].instances[0].mask.sum() == 60 * 80
