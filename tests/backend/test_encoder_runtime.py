"""ENCODER_RUNTIME: the served model's image encoder is the ONNX export (OpenVINO) on CPU when asked (or auto), else PyTorch."""

from __future__ import annotations

from pathlib import Path

import pytest

from labelstudio_backend import runtime
from labelstudio_backend.config import Settings, SettingsError
from labelstudio_backend.registry import ModelRegistry

pytest.importorskip("openvino")


def test_setting_from_env() -> None:
    assert Settings.from_env({}).encoder_runtime == "auto"
    assert Settings.from_env({"ENCODER_RUNTIME": "Torch"}).encoder_runtime == "torch"
    assert Settings.from_env({"ENCODER_RUNTIME": "onnx"}).encoder_runtime == "onnx"
    with pytest.raises(SettingsError, match="ENCODER_RUNTIME"):
        Settings.from_env({"ENCODER_RUNTIME": "tensorrt"})


@pytest.mark.parametrize("choice, expected", [("onnx", "onnx"), ("auto", "onnx"), ("torch", "torch")])
def test_served_encoder_follows_the_setting(tmp_path: Path, tiny_artifact: Path, choice: str, expected: str) -> None:
    settings = Settings(model_dir=tmp_path, checkpoint=str(tiny_artifact), device="cpu", encoder_runtime=choice)
    rt = runtime.ModelRuntime(settings, ModelRegistry(tmp_path))
    try:
        serving = rt.start()  # returns before any export: that runs in the background
        if serving.encoder_setup is not None:
            serving.encoder_setup.join(120)
        assert serving.predictor.image_encoder.runtime == expected
        assert serving.describe()["image_encoder"] == expected
    finally:
        rt.close()
