"""The exported (ONNX, run by OpenVINO) image encoder: equal to eager, same click masks, and PyTorch when it cannot be."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from ovsam import encoder_export  # noqa: E402
from ovsam.checkpoint import load_model  # noqa: E402
from ovsam.config import get_config  # noqa: E402
from ovsam.encoder_export import REL_TOLERANCE, export_encoder, max_relative_diff  # noqa: E402
from ovsam.encoder_runtime import OnnxEncoder, configure_encoder, parse_runtime, wants_onnx  # noqa: E402
from ovsam.predictor import OVSAMPredictor  # noqa: E402

DEMO = Path(__file__).resolve().parents[2] / "labelstudio_backend" / "default_model" / "ovsam_demo.safetensors"


def synthetic_image(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    """One of the project's synthetic images (`python -m training synth`'s generator: the demo model's kind)."""
    from training.synth import SynthConfig, generate_image

    cfg = SynthConfig(out=".")
    image, _ = generate_image(np.random.default_rng([seed, 0]), w, h, cfg.classes, cfg.min_objects, cfg.max_objects)
    return image


CLICKS = [np.array([[80.0, 60.0]], np.float32), np.array([[20.0, 15.0]], np.float32)]


@pytest.fixture(scope="module")
def demo_artifact():
    return load_model(DEMO)


@pytest.fixture
def tiny_official(official_dir):
    """A tiny model loaded from files in the released key layouts (with the CLIP branch)."""
    return load_model(official_dir, cfg=get_config("tiny")), official_dir


def assert_equal_encoders(model, onnx: OnnxEncoder, images) -> None:
    for image in images:
        x, _ = model.preprocess(image)
        with torch.no_grad():
            eager = model.encode_outputs(x)
        exported = [t.numpy() for t in onnx.outputs(x)]
        assert len(exported) == len(model.encode_output_names())
        assert max_relative_diff(eager, exported) <= REL_TOLERANCE


def assert_same_clicks(model, vocabulary, onnx: OnnxEncoder, images) -> list:
    """Every click's mask identical with both runtimes; returns the masks' area fractions."""
    areas = []
    eager = OVSAMPredictor(model, vocabulary, cache_bytes=0)
    exported = OVSAMPredictor(model, vocabulary, cache_bytes=0)
    exported.image_encoder.use_onnx(onnx, "test")
    for image in images:
        fe, fx = eager.set_image(image), exported.set_image(image)
        for click in CLICKS:
            a = eager.predict(click, np.ones(1, np.int64), features=fe)
            b = exported.predict(click, np.ones(1, np.int64), features=fx)
            np.testing.assert_array_equal(a.mask, b.mask)
            assert a.label == b.label
            areas.append(float(a.mask.mean()))
    return areas


def test_tiny_official_layout_export_is_equal(tiny_official, tmp_path):
    artifact, directory = tiny_official
    assert artifact.model.cfg.use_clip_branch  # the CLIP branch's key/value maps are exported too
    result = export_encoder(artifact.model, directory, cache_dir=tmp_path)
    assert result.path is not None and result.path.parent == tmp_path, result.error
    assert result.max_rel_diff <= REL_TOLERANCE
    onnx = OnnxEncoder(artifact.model, result.path)
    images = [synthetic_image(0), synthetic_image(1)]
    assert_equal_encoders(artifact.model, onnx, images)
    assert_same_clicks(artifact.model, artifact.vocabulary, onnx, images)


def test_demo_model_export_is_equal(demo_artifact, tmp_path):
    model = demo_artifact.model
    assert model.head.reads_high_res  # the decoder's stride-8/4 maps are exported too
    result = export_encoder(model, DEMO, cache_dir=tmp_path)
    assert result.path is not None, result.error
    onnx = OnnxEncoder(model, result.path)
    images = [synthetic_image(0), synthetic_image(1)]
    assert_equal_encoders(model, onnx, images)
    areas = assert_same_clicks(model, demo_artifact.vocabulary, onnx, images)
    assert all(0 < a < 1 for a in areas)  # the trained demo model outlines objects: a real comparison


def test_export_is_cached_by_content(tiny_official, tmp_path):
    artifact, directory = tiny_official
    first = export_encoder(artifact.model, directory, cache_dir=tmp_path)
    again = export_encoder(artifact.model, directory, cache_dir=tmp_path)
    assert again.cached and again.path == first.path
    with torch.no_grad():
        artifact.model.neck.neck[0].weight.add_(1.0)  # other weights: another key, another file
    other = export_encoder(artifact.model, directory, cache_dir=tmp_path)
    assert not other.cached and other.path != first.path


def test_export_lands_beside_a_writable_artifact(tiny_official):
    artifact, directory = tiny_official
    result = export_encoder(artifact.model, directory)
    assert result.path.parent == directory and result.path.name.startswith("official.encoder-")


@pytest.mark.parametrize("failure", ["export", "mismatch"])
def test_failure_falls_back_to_torch_once(tiny_official, tmp_path, monkeypatch, caplog, failure):
    artifact, directory = tiny_official
    calls = []
    real_export = encoder_export.export_bytes

    def export_bytes(model):
        calls.append(1)
        if failure == "export":
            raise RuntimeError("unsupported operator")
        return real_export(model)

    monkeypatch.setattr(encoder_export, "export_bytes", export_bytes)
    if failure == "mismatch":
        monkeypatch.setattr(encoder_export, "max_relative_diff", lambda ref, out: 0.5)
    predictor = OVSAMPredictor(artifact.model, artifact.vocabulary, cache_bytes=0)
    with caplog.at_level(logging.INFO, logger="ovsam.encoder_runtime"):
        assert configure_encoder(predictor.image_encoder, "onnx", directory, cache_dir=tmp_path) == "torch"
    lines = [r.getMessage() for r in caplog.records if "falling back to PyTorch" in r.getMessage()]
    assert len(lines) == 1
    assert ("unsupported operator" if failure == "export" else "differs from eager") in lines[0]
    assert predictor.image_encoder.onnx is None and not list(tmp_path.glob("*.onnx"))
    # The failure is remembered: the next load does not export again.
    assert configure_encoder(predictor.image_encoder, "onnx", directory, cache_dir=tmp_path) == "torch"
    assert len(calls) == 1
    predictor.set_image(synthetic_image(0))  # PyTorch still serves


def test_runtime_switch(tiny_official, tmp_path):
    artifact, directory = tiny_official
    predictor = OVSAMPredictor(artifact.model, artifact.vocabulary, cache_bytes=0)
    assert configure_encoder(predictor.image_encoder, "torch", directory, cache_dir=tmp_path) == "torch"
    assert not list(tmp_path.glob("*.onnx"))  # torch never exports
    # auto without exporting: only an export already present is used.
    assert configure_encoder(predictor.image_encoder, "auto", directory, export=False, cache_dir=tmp_path) == "torch"
    assert configure_encoder(predictor.image_encoder, "auto", directory, cache_dir=tmp_path) == "onnx"
    assert configure_encoder(predictor.image_encoder, "auto", directory, export=False, cache_dir=tmp_path) == "onnx"
    assert wants_onnx("auto", "cpu") and wants_onnx("onnx", "cpu")
    assert not wants_onnx("auto", "cuda") and not wants_onnx("onnx", "cuda:0") and not wants_onnx("torch", "cpu")
    assert parse_runtime(None) == "auto" and parse_runtime(" ONNX ") == "onnx"
    with pytest.raises(ValueError, match="ENCODER_RUNTIME"):
        parse_runtime("openvino")


def test_export_onnx_command(tmp_path, capsys, monkeypatch):
    from ovsam.artifact import save_artifact
    from ovsam.cli import main
    from ovsam.model import OVSAM
    from ovsam.vocabulary import Vocabulary

    torch.manual_seed(0)
    model = OVSAM(get_config("tiny")).eval()
    vocab = Vocabulary(["a"], [["a"]], torch.nn.functional.normalize(torch.randn(1, 1, 32), dim=-1))
    artifact = save_artifact(tmp_path / "m.safetensors", model, vocab, "v1")
    assert main(["export-onnx", str(artifact)]) == 0
    assert "exported:" in capsys.readouterr().out
    assert [p.name.split(".encoder-")[0] for p in tmp_path.glob("*.onnx")] == ["m.safetensors"]
    assert main(["export-onnx", str(artifact)]) == 0
    assert "already exported" in capsys.readouterr().out
    monkeypatch.setattr(encoder_export, "export_bytes", lambda m: (_ for _ in ()).throw(RuntimeError("no op")))
    assert main(["export-onnx", str(artifact), "--cache-dir", str(tmp_path / "c"), "--force"]) == 2
    assert "was not exported: RuntimeError: no op" in capsys.readouterr().err
