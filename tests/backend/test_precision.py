"""PRECISION: bf16 autocast on CUDA (default) or fp32 (the reference's numerics) for the served model."""
from __future__ import annotations

from pathlib import Path

import pytest

from labelstudio_backend import runtime
from labelstudio_backend.config import Settings, SettingsError
from labelstudio_backend.registry import ModelRegistry
from ovsam.predictor import OVSAMPredictor


def test_precision_setting_from_the_environment() -> None:
    assert Settings.from_env({}).precision == "bf16"
    assert Settings.from_env({"PRECISION": "FP32"}).precision == "fp32"
    with pytest.raises(SettingsError, match="PRECISION"):
        Settings.from_env({"PRECISION": "fp16"})


class _CudaLike(OVSAMPredictor):
    """A predictor that autocasts as it would on a CUDA device (this test runs on the CPU)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_autocast = True


@pytest.mark.parametrize("precision, autocast", [("bf16", True), ("fp32", False)])
def test_served_predictor_follows_precision(tmp_path: Path, monkeypatch, precision: str, autocast: bool) -> None:
    monkeypatch.setattr(runtime, "OVSAMPredictor", _CudaLike)
    settings = Settings(model_dir=tmp_path, device="cpu", precision=precision)
    rt = runtime.ModelRuntime(settings, ModelRegistry(tmp_path))
    serving = rt.load(runtime.ModelSource("untrained-tiny", None))
    assert serving.predictor.use_autocast is autocast
