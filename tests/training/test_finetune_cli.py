"""Command-line surface of the training commands: registration, --help, and `vocab`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_finetune_support import LABELS, make_synth, make_tiny_artifact  # noqa: E402

from training.__main__ import COMMANDS, main  # noqa: E402

OURS = ("finetune", "evaluate", "vocab", "dump-sam-features", "distill", "demo-model", "synth")


@pytest.mark.parametrize("command", OURS)
def test_commands_are_registered_and_answer_help(command, capsys):
    assert command in COMMANDS
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"python -m training {command}" in capsys.readouterr().out


def test_vocab_embeds_labels_and_label_config(tmp_path, capsys):
    from ovsam.artifact import load_artifact

    art = make_tiny_artifact(tmp_path / "tiny.safetensors")
    out = tmp_path / "emb.pt"
    assert main(["vocab", "--model", str(art), "--labels", "circle,square", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    saved = torch.load(out, weights_only=False)
    assert saved["labels"] == ["circle", "square"] and saved["embeddings"].shape == (2, 1, 32)
    stored = load_artifact(art).vocabulary  # same text tower, same prototypes as the artifact's vocabulary
    assert torch.allclose(saved["embeddings"], stored.embeddings[:2], atol=1e-5)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shape"] == [2, 1, 32]

    data = make_synth(tmp_path / "synth", num_images=1)
    assert main(["vocab", "--model", str(art), "--label-config", str(data["config"]), "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert torch.load(out, weights_only=False)["labels"] == list(LABELS)
