"""COCO instance files: polygons, RLE (compressed and not), crowd, unknown categories."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from training.data.coco import load_coco, read_categories

H, W = 20, 30


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _write(tmp_path) -> tuple:
    blob = np.zeros((H, W), bool)
    blob[2:6, 3:9] = True
    blob[10, 20] = True
    crowd = np.zeros((H, W), bool)
    crowd[12:18, 0:5] = True
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": W, "height": H},
            {"id": 2, "file_name": "sub/b.jpg", "width": W, "height": H},
            {"id": 3, "file_name": "empty.jpg", "width": W, "height": H},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [10, 4, 10, 8],
                "area": 80,
                "segmentation": [[10, 4, 20, 4, 20, 12, 10, 12]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 7,
                "iscrowd": 0,
                "bbox": [3, 2, 18, 9],
                "area": 25,
                "segmentation": _rle(blob),
            },
            {
                "id": 3,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 1,
                "bbox": [0, 12, 5, 6],
                "area": 30,
                "segmentation": {
                    "size": [H, W],
                    "counts": mask_utils.encode(np.asfortranarray(crowd.astype(np.uint8)))["counts"].decode(),
                },
            },
            {
                "id": 4,
                "image_id": 2,
                "category_id": 7,
                "iscrowd": 0,
                "bbox": [0, 0, 2, 2],
                "area": 4,
                "segmentation": {"size": [H, W], "counts": [0, 2, H - 2, 2, H * W - H - 2]},
            },  # uncompressed RLE
            {
                "id": 5,
                "image_id": 2,
                "category_id": 99,
                "iscrowd": 0,
                "bbox": [0, 0, 2, 2],
                "area": 4,
                "segmentation": [[0, 0, 2, 0, 2, 2]],
            },
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, blob, crowd


def test_load_coco_polygons_rle_and_skips(tmp_path):
    path, blob, _ = _write(tmp_path)
    samples, report = load_coco(path, tmp_path / "imgs")
    assert [s.task_id for s in samples] == [1, 2]
    assert samples[0].image_ref == str(tmp_path / "imgs" / "a.jpg") and (samples[0].width, samples[0].height) == (W, H)
    poly, rle = samples[0].instances
    assert (poly.label, poly.region_type, rle.label, rle.region_type) == ("cat", "polygon", "dog", "rle")
    expected = np.zeros((H, W), bool)
    expected[4:12, 10:20] = True
    np.testing.assert_array_equal(poly.mask, expected)
    np.testing.assert_array_equal(poly.box, [10, 4, 20, 12])
    np.testing.assert_array_equal(rle.mask, blob)
    np.testing.assert_array_equal(rle.box, [3, 2, 21, 11])
    (uncompressed,) = samples[1].instances
    assert uncompressed.mask.sum() == 4 and uncompressed.mask[:2, :2].all()
    assert report.as_dict() == {"crowd": 1, "unknown label": 1, "no annotation": 1}


def test_load_coco_label_filter_and_crowd(tmp_path):
    path, _, crowd = _write(tmp_path)
    samples, report = load_coco(path, "root", labels=["cat"], include_crowd=True)
    assert [[i.label for i in s.instances] for s in samples] == [["cat", "cat"]]
    np.testing.assert_array_equal(samples[0].instances[1].mask, crowd)
    assert report.as_dict() == {"unknown label": 3, "no annotation": 2}


def test_load_lvis_v1_images_without_file_name(tmp_path):
    """LVIS v1 image entries have `coco_url` and no `file_name`: the path is the URL's, under the image root."""
    data = {
        "images": [{"id": 397133, "coco_url": "http://images.cocodataset.org/val2017/000000397133.jpg",
                    "width": W, "height": H, "neg_category_ids": [], "not_exhaustive_category_ids": []}],
        "categories": [{"id": 1, "name": "aerosol_can", "frequency": "c", "synonyms": ["aerosol_can"]}],
        "annotations": [{"id": 1, "image_id": 397133, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16,
                         "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}],  # LVIS has no iscrowd
    }
    path = tmp_path / "lvis_v1_val.json"
    path.write_text(json.dumps(data))
    samples, report = load_coco(path, tmp_path / "coco")
    assert [s.image_ref for s in samples] == [str(tmp_path / "coco" / "val2017" / "000000397133.jpg")]
    assert samples[0].instances[0].label == "aerosol_can" and report.as_dict() == {}
    assert read_categories(path)[0]["frequency"] == "c"
    del data["images"][0]["coco_url"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="neither file_name nor coco_url"):
        load_coco(path, tmp_path)
