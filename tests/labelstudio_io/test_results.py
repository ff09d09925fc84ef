"""Mask -> Label Studio result dicts: RLE round trips, polygons, boxes, dispatch."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from labelstudio_io.label_config import parse_label_config
from labelstudio_io.results import (
    brush_result,
    json_safe,
    mask_result,
    mask_to_polygon,
    polygon_result,
    rectangle_result,
    schema_mask_result,
    top_k_meta,
)

FIXTURES = Path(__file__).resolve().parents[1] / "backend" / "fixtures" / "label_studio"


def _decode(result: dict) -> np.ndarray:
    h, w = result["original_height"], result["original_width"]
    return decode_rle(result["value"]["rle"]).reshape(h, w, 4)


def _disk(h: int, w: int, cx: int, cy: int, r: int) -> np.ndarray:
    canvas = np.zeros((h, w), np.uint8)
    cv2.circle(canvas, (cx, cy), r, 1, thickness=-1)
    return canvas.astype(bool)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brush_rle_round_trip_random_160x120(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((120, 160)) < rng.uniform(0.05, 0.95)
    res = brush_result(mask, "cat", "tag", "image", 0.75)
    assert res["type"] == "brushlabels"
    assert (res["original_width"], res["original_height"], res["image_rotation"]) == (160, 120, 0)
    assert res["value"]["format"] == "rle" and res["value"]["brushlabels"] == ["cat"]
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in res["value"]["rle"])
    np.testing.assert_array_equal(_decode(res)[:, :, 3], mask.astype(np.uint8) * 255)
    json.dumps(res, allow_nan=False)


def test_brush_rle_round_trip_1024x768():
    rng = np.random.default_rng(3)
    # blocky random mask: many runs, but not a per-pixel coin flip (the SDK decoder is pure Python)
    mask = np.kron(rng.random((48, 64)) < 0.5, np.ones((16, 16), bool))
    mask |= _disk(768, 1024, 300, 200, 150)
    res = brush_result(mask, "dog", "tag", "image", 0.5)
    decoded = _decode(res)
    assert decoded.shape == (768, 1024, 4)
    np.testing.assert_array_equal(decoded[:, :, 3], mask.astype(np.uint8) * 255)


def test_brush_rle_round_trip_4000x3000_fast():
    mask = _disk(3000, 4000, 2100, 1400, 900) | _disk(3000, 4000, 500, 500, 120)
    mask[2900:, 3900:] = True  # touches the last pixel: runs longer than 65536 end there
    start = time.perf_counter()
    res = brush_result(mask, "car", "tag", "image", 0.9)
    decoded = _decode(res)
    assert time.perf_counter() - start < 5.0
    assert (res["original_width"], res["original_height"]) == (4000, 3000)
    np.testing.assert_array_equal(decoded[:, :, 3], mask.astype(np.uint8) * 255)


def test_brush_matches_recorded_accepted_rle():
    """Our encoding of the recorded mask equals the RLE Label Studio accepted."""
    recorded = json.loads((FIXTURES / "predict_task_open.json").read_text())["response"]
    item = recorded["results"][0]["result"][0]
    mask = _decode(item)[:, :, 3] > 0
    ours = brush_result(mask, item["value"]["brushlabels"][0], item["from_name"], item["to_name"], 0.9)
    assert ours["value"]["rle"] == item["value"]["rle"]
    for key in ("from_name", "to_name", "type", "original_width", "original_height", "image_rotation"):
        assert ours[key] == item[key]


def test_integer_masks_are_accepted_and_float_masks_rejected():
    mask = np.zeros((10, 12), np.uint8)
    mask[2:5, 3:7] = 1
    res = brush_result(mask, "a", "t", "i", 1)
    np.testing.assert_array_equal(_decode(res)[:, :, 3] > 0, mask > 0)
    with pytest.raises(ValueError, match="threshold"):
        brush_result(mask.astype(np.float32), "a", "t", "i", 1)
    with pytest.raises(ValueError, match="2-D"):
        brush_result(np.zeros((2, 3, 4), bool), "a", "t", "i", 1)


@pytest.mark.parametrize("builder", [brush_result, polygon_result, rectangle_result])
def test_empty_mask_gives_none(builder):
    assert builder(np.zeros((20, 30), bool), "a", "t", "i", 0.3) is None


@pytest.mark.parametrize("builder", [brush_result, polygon_result, rectangle_result])
def test_common_fields_meta_and_score(builder):
    mask = np.zeros((120, 160), bool)
    mask[30:90, 40:120] = True
    meta = top_k_meta(["cat", "dog", "car"], np.array([0.1, 0.7, 0.2], np.float32), k=2)
    res = builder(mask, "dog", "tag", "image", np.float32(0.7), meta)
    assert res["from_name"] == "tag" and res["to_name"] == "image"
    assert (res["original_width"], res["original_height"], res["image_rotation"]) == (160, 120, 0)
    assert res["value"][res["type"]] == ["dog"]
    assert isinstance(res["score"], float) and res["score"] == pytest.approx(0.7)
    assert [e["label"] for e in res["meta"]["top_k"]] == ["dog", "car"]
    assert all(type(e["probability"]) is float for e in res["meta"]["top_k"])
    json.dumps(res, allow_nan=False)


def test_bad_label_score_or_meta_raise():
    mask = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="label"):
        brush_result(mask, "", "t", "i", 1)
    with pytest.raises(ValueError, match="score"):
        brush_result(mask, "a", "t", "i", float("nan"))
    with pytest.raises(ValueError, match="JSON"):
        brush_result(mask, "a", "t", "i", 1, {"x": float("inf")})
    with pytest.raises(ValueError, match="JSON"):
        brush_result(mask, "a", "t", "i", 1, {"x": object()})


def test_json_safe_converts_numpy():
    out = json_safe({"a": np.int64(3), "b": np.arange(3), "c": (np.float32(0.5), None, "s", True)})
    assert out == {"a": 3, "b": [0, 1, 2], "c": [0.5, None, "s", True]}
    assert type(out["a"]) is int


def _rasterise(points_pct, w, h) -> np.ndarray:
    pts = np.array([[x / 100 * w - 0.5, y / 100 * h - 0.5] for x, y in points_pct])
    canvas = np.zeros((h, w), np.uint8)
    cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)
    return canvas.astype(bool)


def test_polygon_of_rectangle_is_exact_in_percent():
    mask = np.zeros((120, 160), bool)
    mask[30:90, 40:120] = True  # rows 30..89, cols 40..119
    res = polygon_result(mask, "cat", "tag", "image", 0.9)
    assert res["type"] == "polygonlabels" and res["value"]["closed"] is True
    pts = res["value"]["points"]
    assert len(pts) == 4
    # vertices at the centres of the corner pixels
    xs = sorted({p[0] for p in pts})
    ys = sorted({p[1] for p in pts})
    assert xs == pytest.approx([40.5 / 160 * 100, 119.5 / 160 * 100], abs=1e-4)
    assert ys == pytest.approx([30.5 / 120 * 100, 89.5 / 120 * 100], abs=1e-4)


def test_polygon_largest_contour_simplified_and_faithful():
    h, w = 600, 800
    big = _disk(h, w, 500, 300, 200)
    small = _disk(h, w, 100, 100, 30)
    res = polygon_result(big | small, "a", "t", "i", 1)
    pts = res["value"]["points"]
    assert 8 <= len(pts) <= 80, len(pts)
    assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in pts)
    raster = _rasterise(pts, w, h)
    iou = (raster & big).sum() / (raster | big).sum()
    assert iou > 0.98
    assert not (raster & small).any()  # only the largest contour


def test_polygon_tiny_masks_have_at_least_three_points():
    mask = np.zeros((10, 20), bool)
    mask[4, 5] = True
    assert mask_to_polygon(mask) == [[25.0, 40.0], [30.0, 40.0], [30.0, 50.0], [25.0, 50.0]]
    line = np.zeros((10, 20), bool)
    line[2, 3:9] = True
    assert len(mask_to_polygon(line)) >= 3
    full = np.ones((10, 20), bool)
    assert all(0 <= v <= 100 for p in mask_to_polygon(full) for v in p)


def test_rectangle_from_mask_and_box():
    mask = np.zeros((120, 160), bool)
    mask[30:90, 40:120] = True
    res = rectangle_result(mask, "cat", "tag", "image", 0.9)
    assert res["type"] == "rectanglelabels"
    assert res["value"] == {"x": 25.0, "y": 25.0, "width": 50.0, "height": 50.0, "rotation": 0,
                            "rectanglelabels": ["cat"]}
    res = rectangle_result(np.array([-10, 30, 120, 90.0]), "cat", "tag", "image", 0.9, width=160, height=120)
    assert res["value"]["x"] == 0 and res["value"]["width"] == pytest.approx(75.0)
    assert res["value"]["y"] == pytest.approx(25.0) and res["value"]["height"] == pytest.approx(50.0)
    assert rectangle_result([5, 5, 5, 9], "a", "t", "i", 1, width=10, height=10) is None
    with pytest.raises(ValueError, match="width and height"):
        rectangle_result([1, 2, 3, 4], "a", "t", "i", 1)
    with pytest.raises(ValueError, match="x1, y1, x2, y2"):
        rectangle_result([1, 2, 3], "a", "t", "i", 1, width=10, height=10)


def test_mask_result_dispatch_and_schema_check():
    mask = np.zeros((12, 16), bool)
    mask[3:9, 4:12] = True
    for kind, rtype in [("brush", "brushlabels"), ("polygon", "polygonlabels"), ("rectangle", "rectanglelabels")]:
        assert mask_result(kind, mask, "a", "t", "i", 0.5)["type"] == rtype
    with pytest.raises(ValueError, match="unknown output kind"):
        mask_result("ellipse", mask, "a", "t", "i", 0.5)

    xml = (FIXTURES / "setup.json").read_text()
    schema = parse_label_config(json.loads(xml)["body"]["schema"])
    res = schema_mask_result(schema, mask, "dog", 0.8, {"top_k": []})
    assert (res["from_name"], res["to_name"], res["type"]) == ("tag", "image", "brushlabels")
    with pytest.raises(ValueError, match="not one of the project's labels"):
        schema_mask_result(schema, mask, "zebra", 0.8)


def test_top_k_meta():
    meta = top_k_meta(["a", "b", "c"], [0.2, 0.5, 0.3], k=5)
    assert meta == {"top_k": [{"label": "b", "probability": 0.5}, {"label": "c", "probability": 0.3},
                              {"label": "a", "probability": 0.2}]}
    with pytest.raises(ValueError):
        top_k_meta(["a"], [0.2, 0.8])
