"""Session fixtures for the end-to-end tests: a real Label Studio 1.23.2 plus our backend.

The tests skip only when Label Studio cannot be installed (no registry, no disk); every other
failure (Label Studio does not start, the backend does not start, a protocol step fails) fails.
A short summary of what was checked is printed at the end of the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ls_harness as h  # noqa: E402

# The classes of `python -m training synth` (the shipped demo model was trained on them).
SYNTH_LABELS = ["circle", "square", "triangle", "star", "ring", "cross"]
# (name, width, height, seed): sizes that differ from the model input and from each other.
IMAGE_SPECS = [("small", 160, 120, 11), ("large", 320, 240, 12), ("square", 256, 256, 13)]

TIMINGS = h.TIMINGS
note = h.note
SynthImage = h.SynthImage


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if not h.SUMMARY and not h.TIMINGS:
        return
    terminalreporter.section("Label Studio end-to-end summary")
    if h.TIMINGS:
        terminalreporter.write_line("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in h.TIMINGS.items()))
    for line in h.SUMMARY:
        terminalreporter.write_line(line)


# ----------------------------------------------------------------------------- Label Studio


@pytest.fixture(scope="session")
def label_studio_booting(tmp_path_factory):
    """Label Studio installed and started, not yet waited for: it boots while the model and the
    images are prepared. Skips only if label-studio cannot be installed."""
    try:
        exe, seconds = h.install_label_studio()
    except h.LabelStudioUnavailable as exc:
        pytest.skip(f"label-studio=={h.LS_VERSION} cannot be installed: {exc}")
    TIMINGS["label-studio install/check"] = seconds
    root = tmp_path_factory.mktemp("label-studio")
    server = h.LabelStudioServer(exe, root / "data")
    t0 = time.monotonic()
    template = h.migrated_db_template(exe)  # migrations once per install, not once per run
    TIMINGS["label-studio db template"] = time.monotonic() - t0
    if template is not None:
        server.seed_database(template)
    server.spawn()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def label_studio(label_studio_booting, model_choice, synth_images):
    """A running Label Studio 1.23.2 with a fresh data dir (and the settings of the protocol notes)."""
    server = label_studio_booting
    server.wait_ready()
    TIMINGS["label-studio start"] = server.start_seconds
    moved = f" (asked for port {server.moved_from}, it moved)" if server.moved_from else ""
    note(f"label-studio {server.version().get('release')} at {server.url}{moved}, data dir {server.data_dir}, "
         f"{'copy of a migrated empty db' if server.template else 'fresh migrations'}")
    return server


@pytest.fixture(scope="session")
def ls_api(label_studio) -> h.LabelStudioAPI:
    return h.LabelStudioAPI(label_studio.url, label_studio.token)


# ----------------------------------------------------------------------------- model and data


@dataclass
class ModelChoice:
    kind: str  # "default-demo" (the shipped trained model) or "tiny-random" (an artifact the test wrote)
    checkpoint: Path | None
    trained: bool  # masks are meaningful: clicks must be covered
    labels: list[str] = field(default_factory=lambda: list(SYNTH_LABELS))


def _default_model_path() -> Path:
    return h.REPO / "labelstudio_backend" / "default_model" / "ovsam_demo.safetensors"


def write_tiny_artifact(path: Path, labels: list[str], cache_dir: Path) -> Path:
    """A tiny random OVSAM with its own text tower and a vocabulary of the project's labels."""
    import torch

    from ovsam.artifact import save_artifact
    from ovsam.config import get_config
    from ovsam.model import OVSAM
    from ovsam.text import TextEncoder
    from ovsam.vocabulary import VocabularyBuilder

    cfg = get_config("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = OVSAM(cfg).eval()
        text = TextEncoder.from_config(cfg).eval()
    vocabulary = VocabularyBuilder(text, cache_dir=cache_dir).build(labels)
    return save_artifact(path, model, vocabulary, "e2e-tiny-1", provenance={"note": "e2e test, random weights"},
                         text_encoder=text)


@pytest.fixture(scope="session")
def model_choice(label_studio_booting, tmp_path_factory) -> ModelChoice:
    """The best model available: the shipped demo model if it exists, else a tiny random artifact."""
    demo = _default_model_path()
    if demo.is_file():
        choice = ModelChoice("default-demo", None, trained=True)
    else:
        root = tmp_path_factory.mktemp("model")
        t0 = time.monotonic()
        path = write_tiny_artifact(root / "e2e_tiny.safetensors", SYNTH_LABELS, root / "vocab-cache")
        TIMINGS["tiny artifact"] = time.monotonic() - t0
        choice = ModelChoice("tiny-random", path, trained=False)
    note(f"model: {choice.kind}" + (f" ({choice.checkpoint.name} via OVSAM_CHECKPOINT)" if choice.checkpoint else
                                     f" ({demo.relative_to(h.REPO)}, no OVSAM_CHECKPOINT)")
         + f"; click coverage asserted: {'yes' if choice.trained else 'no (random weights)'}")
    return choice


@pytest.fixture(scope="session")
def synth_images(label_studio_booting, tmp_path_factory) -> list[SynthImage]:
    """Images from `python -m training synth` (the demo model's kind of data), at several sizes."""
    from label_studio_sdk.converter.brush import decode_rle

    root = tmp_path_factory.mktemp("images")
    out: list[SynthImage] = []
    for name, width, height, seed in IMAGE_SPECS:
        ds = root / f"synth_{name}"
        proc = subprocess.run(
            [sys.executable, "-m", "training", "synth", "--out", str(ds), "--num-images", "1",
             "--size", f"{width}x{height}", "--seed", str(seed), "--min-objects", "2", "--max-objects", "4",
             "--no-progress"],
            cwd=h.REPO, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, f"training synth failed:\n{proc.stdout}\n{proc.stderr}"
        task = json.loads((ds / "tasks.json").read_text())[0]
        objects = []
        for region in task["annotations"][0]["result"]:
            mask = decode_rle(region["value"]["rle"]).reshape(height, width, 4)[..., 0] > 0
            objects.append((region["value"]["brushlabels"][0], mask))
        # a distinct upload name per image (Label Studio prefixes it, the test reads it back)
        path = root / f"e2e_{name}.png"
        path.write_bytes((ds / "images" / "img_0000.png").read_bytes())
        out.append(SynthImage(name, path, width, height, objects))
    return out


# ----------------------------------------------------------------------------- backend


@pytest.fixture(scope="session")
def backend(label_studio, model_choice, tmp_path_factory):
    """`python -m labelstudio_backend` pointed at the Label Studio above."""
    root = tmp_path_factory.mktemp("backend")
    env = {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "MODEL_DIR": str(root / "models"),
        "LOG_LEVEL": "INFO",
        "OVSAM_CACHE_DIR": str(root / "cache"),
        # A random model's class probabilities are low: keep every instance so regions exist.
        "PREANNOTATION_THRESHOLD": "0.7" if model_choice.trained else "0.0",
        "PREANNOTATION_MAX_REGIONS": "20",
        "AUTO_POINTS_PER_SIDE": "16",  # the default: with 8 the demo model finds nothing on the 160x120 image
        # Automatic mode's other settings are the backend's defaults (tuned with the demo model, bench/README.md).
        # Retrieve Predictions on the 150-task project answers what fits in 20 s; a background job posts the rest.
        "PREDICT_BATCH_BUDGET_S": "20",
    }
    if model_choice.checkpoint is not None:
        env["OVSAM_CHECKPOINT"] = str(model_choice.checkpoint)
    server = h.BackendServer(root, env)
    server.start()
    TIMINGS["backend start"] = server.start_seconds
    model = server.health.get("model", {})
    if model_choice.kind == "default-demo":
        assert model.get("kind") == "default-demo", f"expected the shipped demo model, backend says {model}"
    else:
        assert model.get("kind") == "checkpoint" and server.health.get("model_version") == "e2e-tiny-1", model
    note(f"backend at {server.url}: model_version {server.health.get('model_version')!r}, kind {model.get('kind')!r}, "
         f"config {model.get('config')!r}, device {model.get('device')!r}")
    yield server
    server.stop()
    if os.environ.get("E2E_SHOW_BACKEND_LOG"):
        print(server.process.log(20000))
