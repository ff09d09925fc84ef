"""Interactive context -> prompt in pixels, on the recorded Label Studio payloads and edge cases."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from labelstudio_io.label_config import parse_label_config
from labelstudio_io.prompts import (
    InteractivePrompt,
    PromptError,
    check_image_size,
    parse_prompt,
    prompt_from_context,
)

FIXTURES = Path(__file__).resolve().parents[1] / "backend" / "fixtures" / "label_studio"


def _body(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())["body"]


def _keypoint(x, y, positive=True, label="cat", w=160, h=120, **extra):
    region = {
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 2.5, "keypointlabels": [label], "labels": [label]},
        "is_positive": positive,
        "from_name": "tag2",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }
    region.update(extra)
    return region


def _box(x, y, width, height, rotation=0, label="dog", w=160, h=120):
    return {
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": width, "height": height, "rotation": rotation,
                  "rectanglelabels": [label]},
        "from_name": "tag3",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }


def test_fixture_single_keypoint():
    body = _body("predict_interactive_keypoint.json")
    schema = parse_label_config(body["label_config"])
    prompt = prompt_from_context(body["params"]["context"], from_names=schema.prompt_controls)
    assert isinstance(prompt, InteractivePrompt)
    # value.x = 50 %, value.y = 50 % of 160 x 120
    np.testing.assert_array_equal(prompt.points, np.array([[80.0, 60.0]]))
    np.testing.assert_array_equal(prompt.point_labels, np.array([1]))
    assert prompt.points.shape == (1, 2) and prompt.point_labels.dtype == np.int64
    assert prompt.box is None and not prompt.has_box and prompt.has_points
    assert (prompt.width, prompt.height) == (160, 120)
    assert prompt.chosen_label == "cat"
    assert (prompt.from_name, prompt.to_name) == ("tag2", "image")
    assert prompt.region_ids == ("ca266b50fc",)


def test_fixture_positive_and_negative_keypoints():
    body = _body("predict_interactive_keypoints_pos_neg.json")
    prompt = prompt_from_context(body["params"]["context"])
    # (50 %, 50 %) positive, (6 %, 6 %) negative on 160 x 120
    np.testing.assert_array_equal(
        prompt.points, np.array([[50 / 100 * 160, 50 / 100 * 120], [6 / 100 * 160, 6 / 100 * 120]])
    )
    np.testing.assert_allclose(prompt.points, [[80.0, 60.0], [9.6, 7.2]], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(prompt.point_labels, [1, 0])
    assert prompt.box is None
    assert prompt.chosen_label == "cat"


def test_fixture_rectangle():
    body = _body("predict_interactive_rectangle.json")
    schema = parse_label_config(body["label_config"])
    prompt = prompt_from_context(body["params"]["context"], from_names=schema.prompt_controls)
    # x = y = 22.5 %, width = height = 55 % of 160 x 120 -> x1=36, y1=27, x2=124, y2=93
    np.testing.assert_allclose(prompt.box, [36.0, 27.0, 124.0, 93.0], rtol=0, atol=1e-12)
    assert prompt.points.shape == (0, 2) and prompt.point_labels.shape == (0,)
    assert not prompt.has_points and prompt.has_box
    assert prompt.chosen_label == "dog"
    assert (prompt.from_name, prompt.width, prompt.height) == ("tag3", 160, 120)


def test_points_and_box_combined_last_box_wins():
    result = [
        _box(10, 10, 20, 20),
        _keypoint(25, 25),
        _box(50, 50, 25, 25, label="car"),
        _keypoint(90, 90, positive=False),
        {"type": "brushlabels", "value": {"format": "rle", "rle": [1]}, "from_name": "tag"},
    ]
    prompt = parse_prompt(result)
    np.testing.assert_allclose(prompt.points, [[40, 30], [144, 108]])
    np.testing.assert_array_equal(prompt.point_labels, [1, 0])
    np.testing.assert_allclose(prompt.box, [80, 60, 120, 90])
    assert prompt.chosen_label == "cat"  # the last labelled prompt region


def test_regions_without_is_positive_are_positive_and_labels_fallbacks():
    region = _keypoint(10, 10)
    del region["is_positive"]
    region["value"] = {"x": 10, "y": 10, "labels": ["dog"]}
    prompt = parse_prompt([region])
    np.testing.assert_array_equal(prompt.point_labels, [1])
    assert prompt.chosen_label == "dog"
    region["value"] = {"x": 10, "y": 10}
    assert parse_prompt([region]).chosen_label is None
    region["is_positive"] = "false"
    np.testing.assert_array_equal(parse_prompt([region]).point_labels, [0])


def test_from_names_filter():
    result = [_keypoint(10, 10), _keypoint(20, 20, from_name="other")]
    assert len(parse_prompt(result, from_names=["tag2"]).points) == 1
    with pytest.raises(PromptError, match="no keypoint or rectangle"):
        parse_prompt(result, from_names=["nothing"])


def test_rotated_box_gives_axis_aligned_bounds():
    # 40 x 30 px box at (40, 30) px, rotated 90 degrees about its top-left corner (y down):
    # (w, 0) -> (0, w) and (0, h) -> (-h, 0): x in [10, 40], y in [30, 70]
    prompt = parse_prompt([_box(25, 25, 25, 25, rotation=90)])
    np.testing.assert_allclose(prompt.box, [10.0, 30.0, 40.0, 70.0], atol=1e-9)
    # 45 degrees: corners (0,0), (w c, w s), (w c - h s, w s + h c), (-h s, h c)
    x, y, bw, bh = 40.0, 30.0, 40.0, 30.0
    c = s = math.sqrt(0.5)
    expected = [x - bh * s, y, x + bw * c, y + bw * s + bh * c]
    np.testing.assert_allclose(parse_prompt([_box(25, 25, 25, 25, rotation=45)]).box, expected, atol=1e-9)
    # a rotation pushing corners out of the image is clipped, not rejected
    clipped = parse_prompt([_box(1, 1, 50, 50, rotation=180)]).box
    np.testing.assert_allclose(clipped, [0, 0, 1.6, 1.2], atol=1e-9)
    # a full turn is no rotation
    np.testing.assert_allclose(parse_prompt([_box(25, 25, 25, 25, rotation=360)]).box, [40, 30, 80, 60])


def test_edge_tolerance_clips():
    prompt = parse_prompt([_keypoint(100.3, -0.4), _box(-0.2, 0, 100.4, 100)])
    np.testing.assert_allclose(prompt.points, [[160, 0]])
    np.testing.assert_allclose(prompt.box, [0, 0, 160, 120])


def test_integral_float_sizes_are_accepted():
    region = _keypoint(50, 50, w=160.0, h=120.0)
    prompt = parse_prompt([region])
    assert (prompt.width, prompt.height) == (160, 120) and isinstance(prompt.width, int)


@pytest.mark.parametrize(
    "context,message",
    [
        (None, "no interactive context"),
        ({}, "no 'result'"),
        ({"result": None}, "no 'result'"),
        ({"result": []}, "empty"),
        ({"result": "abc"}, "must be a list"),
        ({"result": [42]}, "must be an object"),
        ({"result": [{"type": "brushlabels", "value": {}}]}, "no keypoint or rectangle"),
    ],
)
def test_context_errors(context, message):
    with pytest.raises(PromptError, match=message):
        prompt_from_context(context)


def _without(region: dict, key: str) -> dict:
    region = copy.deepcopy(region)
    del region[key]
    return region


def _with_value(region: dict, **value) -> dict:
    region = copy.deepcopy(region)
    region["value"].update(value)
    return region


@pytest.mark.parametrize(
    "result,message",
    [
        ([_without(_keypoint(1, 1), "original_width")], "no original_width"),
        ([_without(_keypoint(1, 1), "original_height")], "no original_height"),
        ([_keypoint(1, 1, w=0)], "positive integer"),
        ([_keypoint(1, 1, w=160.5)], "positive integer"),
        ([_keypoint(1, 1, w="160")], "must be a number"),
        ([_without(_keypoint(1, 1), "value")], "no 'value'"),
        ([_with_value(_keypoint(1, 1), x="50")], "must be a number"),
        ([_with_value(_keypoint(1, 1), x=None)], "must be a number"),
        ([_with_value(_keypoint(1, 1), y=True)], "must be a number"),
        ([_with_value(_keypoint(1, 1), x=float("nan"))], "finite"),
        ([_with_value(_box(1, 1, 10, 10), width="10")], "must be a number"),
        ([_with_value(_box(1, 1, 10, 10), rotation="9")], "must be a number"),
        ([_keypoint(101, 50)], "outside the image"),
        ([_keypoint(50, -1)], "outside the image"),
        ([_box(101, 10, 10, 10)], "no extent inside the image"),  # entirely past the right edge
        ([_box(-20, 10, 19.5, 10)], "no extent inside the image"),  # ends 0.8 px inside the left edge
        ([_with_value(_keypoint(1, 1), x=10**400)], "finite number"),
        ([_with_value(_keypoint(1, 1), x=-1.5e308)], "far outside the image"),  # finite %, infinite px
        ([_box(1.1e308, 1, 1.1e308, 10)], "far outside the image"),  # x + width overflows
        ([_box(10, 10, 0, 10)], "degenerate box"),
        ([_box(10, 10, 10, 0)], "degenerate box"),
        ([_box(10, 10, -5, 10)], "degenerate box"),
        ([_box(10, 10, 0.5, 10)], "degenerate box"),  # 0.8 px wide
        ([_box(150, 150, 10, 10, rotation=30)], "no extent inside the image"),
        ([_keypoint(1, 1), _keypoint(1, 1, w=320, h=240)], "disagree on the image size"),
        ([_keypoint(1, 1), _box(1, 1, 10, 10, w=160, h=100)], "disagree on the image size"),
    ],
)
def test_region_errors(result, message):
    with pytest.raises(PromptError, match=message) as info:
        parse_prompt(result)
    assert isinstance(info.value, ValueError)


def test_boxes_past_the_edge_are_clipped():
    # dragged 3 px past the left edge (x = -3 px) and past the bottom-right corner
    prompt = parse_prompt([_box(-3 / 1.6, 10, 50, 50)])
    np.testing.assert_allclose(prompt.box, [0, 12, 80 - 3, 72])
    prompt = parse_prompt([_box(80, 60, 40, 60)])
    np.testing.assert_allclose(prompt.box, [128, 72, 160, 120])
    # a box larger than the image on every side is the whole image
    np.testing.assert_allclose(parse_prompt([_box(-10, -10, 130, 130)]).box, [0, 0, 160, 120])


def test_points_keep_the_small_tolerance():
    np.testing.assert_allclose(parse_prompt([_keypoint(100.4, 50)]).points, [[160, 60]])
    with pytest.raises(PromptError, match="outside the image"):
        parse_prompt([_keypoint(102, 50)])


@pytest.mark.parametrize(
    "claimed,real",
    [((160, 120), (160, 120)), ((161, 121), (160, 120)), ((80, 60), (160, 120)), ((100, 75), (1000, 750)),
     ((33, 25), (160, 120)), ((1, 1), (3, 2)), ((4040, 3030), (4000, 3000))],
)
def test_claimed_sizes_explained_by_the_image_are_accepted(claimed, real):
    check_image_size(*claimed, *real)


@pytest.mark.parametrize(
    "claimed,real,message",
    [((30000, 30000), (160, 120), "must not exceed"), ((163, 120), (160, 120), "must not exceed"),
     ((160, 123), (160, 120), "must not exceed"), ((160, 90), (160, 120), "aspect ratios differ"),
     ((80, 80), (160, 120), "aspect ratios differ"), ((4100, 3000), (4000, 3000), "must not exceed")],
)
def test_claimed_sizes_beyond_rounding_are_refused(claimed, real, message):
    with pytest.raises(PromptError, match=message) as info:
        check_image_size(*claimed, *real)
    assert f"{claimed[0]}x{claimed[1]}" in str(info.value) and f"{real[0]}x{real[1]}" in str(info.value)
