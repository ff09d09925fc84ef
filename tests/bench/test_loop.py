"""A short active-learning loop through the real components (bench/loop.py): one small round must help.

The backend runs as its own process on the shipped demo model; the project's labels are new names for the
synthetic shapes, so recognition starts near chance while masks are already good. One round: 8 tasks are
annotated, Label Studio's Train button is pressed, the backend exports, fits the labels' embeddings to the
annotated objects (the loop's default training), gates and promotes.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "labelstudio_backend" / "default_model" / "ovsam_demo.safetensors"
sys.path.insert(0, str(REPO / "bench"))

import loop  # noqa: E402  (bench/loop.py)


def _run(seed: int, active: list[float], random: list[float], per_round: int = 10, ceiling: float = 0.9) -> dict:
    """One data seed's results as run_seed returns them, with the given click accuracy after each round."""
    results, summary = {}, {}
    for order, accuracy in (("active", active), ("random", random)):
        rounds = [loop.Round(order, i, i * per_round, 3 * i * per_round, f"v{i}", i > 0 or None, 1.0, 0.5,
                             {"click_accuracy": a, "click_miou": 0.9, "box_accuracy": a})
                  for i, a in enumerate(accuracy)]
        results[order] = rounds
        summary[order] = {"target_met_after_last_round": rounds[-1].target_met,
                          "tasks_to_target": loop.annotations_to_target(rounds)}
    figures = {"click_accuracy": ceiling, "click_miou": 0.8, "box_accuracy": ceiling, "box_miou": 0.85}
    return {"seed": seed, "results": results, "summary": summary, "ceiling": figures}


def test_orderings_compared_over_seeds():
    runs = [_run(1, [0.1, 0.96, 0.97], [0.1, 0.90, 0.96]),  # active reaches the target one round earlier
            _run(2, [0.1, 0.80, 0.94], [0.1, 0.85, 0.95]),  # only random reaches it
            _run(3, [0.1, 0.95, 0.95], [0.1, 0.95, 0.99], ceiling=0.99)]  # both after the first round
    comparison = loop.compare_orders(runs)
    assert (comparison["active_fewer_tasks_to_target"], comparison["random_fewer_tasks_to_target"],
            comparison["same_tasks_to_target"]) == (1, 1, 1)
    assert comparison["mean"]["active"]["tasks_annotated"] == [0, 10, 20]
    assert comparison["mean"]["active"]["click_accuracy"] == pytest.approx([0.1, 0.9033, 0.9533], abs=1e-4)
    assert comparison["mean"]["random"]["target_met_after_last_round"] == 3
    assert comparison["mean"]["active"]["target_met_after_last_round"] == 2
    assert comparison["mean_ceiling"]["click_accuracy"] == pytest.approx(0.93)
    assert comparison["mean_ceiling"]["box_miou"] == pytest.approx(0.85)


def test_no_seed_tests_on_another_seeds_pool(tmp_path):
    """With --seeds 7,8 the held-out images of seed 7 must not be images that seed 8 trains on."""
    pool8 = loop.make_split(tmp_path / "pool8", 2, 8, loop.DEFAULT_CLASSES, 1, 1)
    held7 = loop.make_split(tmp_path / "held7", 2, loop.held_out_seed(7), loop.DEFAULT_CLASSES, 2, 100_001)
    pool_images = {f.read_bytes() for f in (tmp_path / "pool8" / "images").iterdir()}
    assert len(pool8) == len(held7) == 2
    assert not pool_images & {f.read_bytes() for f in (tmp_path / "held7" / "images").iterdir()}
    with pytest.raises(SystemExit, match="held-out"):
        loop.main(["--seeds", f"7,{loop.held_out_seed(7)}"])


@pytest.mark.slow
def test_one_round_raises_click_accuracy(tmp_path):
    assert DEMO.is_file(), "the demo model is part of the repository"
    cmd = [sys.executable, str(REPO / "bench" / "loop.py"), "--rounds", "1", "--per-round", "8", "--pool", "8",
           "--held-out", "6", "--orders", "random", "--threads", "1", "--out", str(tmp_path)]  # the default training
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "loop.json").read_text())
    assert [run["seed"] for run in report["runs"]] == [7] and report["comparison"] is None  # one order: nothing to compare
    before, after = report["runs"][0]["rounds"]["random"]
    assert (before["round"], after["round"]) == (0, 1)
    assert after["tasks_annotated"] == 8 and after["regions_annotated"] > 8
    assert after["promoted"] is True, proc.stdout[-3000:]
    assert after["model_version"] != before["model_version"]
    assert after["metrics"]["click_accuracy"] > before["metrics"]["click_accuracy"], proc.stdout[-3000:]
    assert report["training_options"]["fit_label_embeddings"] is True and report["training_options"]["max_steps"] == 0
    assert (tmp_path / "loop.png").stat().st_size > 10_000
    reached = report["runs"][0]["summary"]["random"]["tasks_to_accuracy"]
    assert set(reached) == {"0.50", "0.60", "0.70", "0.80", "0.90", "0.95"}
    # Near chance before the round (0 tasks), so a level is either first reached after the round or not at all.
    assert all(n in (None, 8) for n in reached.values()), reached
    assert (reached["0.50"] == 8) == (after["metrics"]["click_accuracy"] >= 0.5)
    # The renamed base model (the ceiling) names the shapes it was trained on, unlike the same model under new names.
    ceiling = report["runs"][0]["ceiling"]
    assert ceiling["objects"] == before["metrics"]["objects"]
    assert ceiling["click_accuracy"] > before["metrics"]["click_accuracy"] + 0.3, ceiling
    assert ceiling["click_miou"] == pytest.approx(before["metrics"]["click_miou"], abs=1e-6)  # the same masks
