"""`python -m training demo-model`: reproduce the offline demo model the backend serves by default.

No CLIP or SAM weights can be shipped in the repository or downloaded offline, so the demo model is the
small `demo` preset trained from scratch, with this project's own code, on `python -m training synth`
shapes:

1. a synthetic training set (5% of its tasks held out for the run's own validation) and a separate
   held-out set with another seed for the final figures (in the generator's default ``class``
   appearance, the data a user labels);
2. a random-init model (`ovsam init`) whose random text tower is first spread apart
   (`training.text_spread`) so that different label names are distinguishable targets;
3. `finetune --train-all`: trunk, neck and CLIP2SAM head trained together (not the OVSAM recipe, which
   keeps the trunk and neck frozen; it has no pretrained trunk to keep), with the head pooling its RoI
   features over each object's mask (`head_mask_pooling`: the shapes overlap and most are not boxes, so a
   box average mixes in neighbours and background), first on shapes whose colour and
   texture say nothing about their class (``--appearance random``), so that the trunk has to learn shape;
4. a second, longer phase on a larger fresh set of those at a lower learning rate (a from-scratch trunk
   learns shapes far faster at 5e-4 than at 2e-3, whose first phase mostly trains the masks), with 16
   prompts per image instead of 40 (most of the 40 repeat the same few objects; half the step time);
5. a third phase on fresh images in the default ``class`` appearance: a trunk trained only on random
   colours has learnt to ignore colour, which a class's hue and texture then cannot help to recognise,
   and a project fine-tuned from the demo model keeps its trunk frozen;
6. a fourth, on more fresh ``class`` images at a lower learning rate, and a fifth on yet more: every
   phase's losses were still falling when it ended, and each drop of the learning rate bought the most;
7. a sixth in the OVSAM recipe's own split, trunk and neck frozen (their features cached, so it is cheap),
   that gives the mask decoder the trunk's stride-8 and stride-4 maps (`decoder_high_res`): the stride-16
   embedding alone draws edges on a 16-pixel grid, and the clicks that get a poor mask are the ones the
   head then names wrong (mask pooling reads the mask);
8. a seventh in the same split on phase 6's images with the model moved to a 320 input (`finetune --image-size`):
   the objects get 1.56 times the pixels (the synthetic images are 256 wide), which sharpens the click masks at
   once, and the head and decoder learn the features' new scale (without it, recognition falls);
9. evaluation on the held-out set, and the artifact written in float16 (about 11 MB) with its figures.

A killed run continues where it stopped when started again with the same `--work`.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Tuple

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "labelstudio_backend" / "default_model" / "ovsam_demo.safetensors"
SHAPE_LABELS = ("circle", "square", "triangle", "star", "ring", "cross")
FIRST_APPEARANCE = "random"  # phase 1: shape is the only cue, so the trunk has to learn shape
HELD_OUT_APPEARANCE = "class"  # the generator's default: the data a user labels


@dataclass(frozen=True)
class Phase:
    """One `finetune --train-all` run of the recipe after the first, on its own fresh synthetic images."""

    number: int
    images: int
    appearance: str
    epochs: int
    steps: Optional[int]
    lr: float
    train_all: bool = True  # False: trunk and neck frozen (features cached), head and mask decoder train
    decoder_high_res: bool = False  # add the decoder's high-resolution inputs (`OVSAMConfig.decoder_high_res`)
    prompts: Tuple[int, int] = (16, 8)  # prompts per image, of which boxes
    image_size: Optional[int] = None  # move the model to this input side first (`finetune --image-size`)
    seed_offset: Optional[int] = None  # draw with data_seed + this (default: number - 1)

    def seed(self, data_seed: int) -> int:
        """Phase n draws its images with data_seed + n - 1 (phase 1: data_seed itself) unless it says otherwise."""
        return data_seed + (self.number - 1 if self.seed_offset is None else self.seed_offset)


# Phases after the first, as the CLI's defaults (each `--phaseN-images/-epochs/-steps/-lr` overrides its own).
LATER_PHASES = (Phase(2, 3000, "random", 8, None, 5e-4), Phase(3, 3000, "class", 8, None, 5e-4),
                Phase(4, 5000, "class", 8, None, 3e-4), Phase(5, 3000, "class", 8, None, 3e-4),
                Phase(6, 2000, "class", 4, None, 3e-4, train_all=False, decoder_high_res=True, prompts=(40, 21)),
                # Phase 6's images again (its seed: seed 7 would draw bench/loop.py's seed-7 pool), at a 320 input.
                Phase(7, 2000, "class", 4, None, 3e-4, train_all=False, prompts=(40, 21), image_size=320, seed_offset=5))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training demo-model", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="artifact to write (default: the backend's default model)")
    p.add_argument("--work", type=Path, default=Path("runs/demo-model"), help="data, checkpoints and logs")
    p.add_argument("--images", type=int, default=1200, help="synthetic training images")
    p.add_argument("--val-images", type=int, default=60, help="synthetic held-out images (final evaluation)")
    p.add_argument("--data-seed", type=int, default=1, help="seed of the training images (held-out: +1000)")
    p.add_argument("--epochs", type=int, default=12, help="passes over the training images")
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimiser steps (default: --epochs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--text-steps", type=int, default=300, help="steps of spreading the text tower")
    for ph in LATER_PHASES:
        n = ph.number
        p.add_argument(f"--phase{n}-images", type=int, default=ph.images,
                       help=f"fresh synthetic images of phase {n}, in the {ph.appearance} appearance (0: no phase {n})")
        p.add_argument(f"--phase{n}-epochs", type=int, default=ph.epochs)
        p.add_argument(f"--phase{n}-steps", type=int, default=ph.steps, help=f"stop phase {n} after this many steps")
        p.add_argument(f"--phase{n}-lr", type=float, default=ph.lr)
    p.add_argument("--seed", type=int, default=0, help="model initialisation and training order")
    p.add_argument("--device", default=None, help="cpu, cuda (default: DEVICE or the local GPU)")
    p.add_argument("--fp32", action="store_true", help="write float32 weights (twice the size)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _synth(out: Path, n: int, seed: int, appearance: str, progress: bool) -> Path:
    from training.synth import SynthConfig, write_dataset

    if not (out / "tasks.json").exists():
        write_dataset(SynthConfig(out=out, num_images=n, seed=seed, appearance=appearance), progress=progress)
    return out / "tasks.json"


def _base_artifact(path: Path, seed: int, text_steps: int, progress: bool) -> dict:
    """Random-init demo model with a spread text tower (written once; a rerun reuses it)."""
    import torch

    from ovsam.artifact import read_artifact_metadata, save_artifact
    from ovsam.random_model import build_random
    from ovsam.vocabulary import VocabularyBuilder
    from training.text_spread import spread_text_tower

    if path.exists():
        return read_artifact_metadata(path)["provenance"].get("text_spread", {})
    art = build_random("demo", SHAPE_LABELS, seed, "demo-init")
    spread = spread_text_tower(art.text_encoder, steps=text_steps, seed=seed, progress=progress)
    vocabulary = VocabularyBuilder(art.text_encoder).build(list(SHAPE_LABELS))  # the spread tower's rows
    save_artifact(path, art.model, vocabulary, art.version, provenance={**art.provenance, "text_spread": spread},
                  text_encoder=art.text_encoder)
    return spread


def _evaluate(trained, tasks_file: Path, report_dir: Path, progress: bool) -> dict:
    """Click (object centre) and box prompts on the held-out images; writes the usual report and plots."""
    from training.data.labelstudio_export import load_labelstudio_export_file
    from training.dataset import make_image_source
    from training.evaluate import evaluate_model, write_report

    samples, _ = load_labelstudio_export_file(tasks_file)
    result = evaluate_model(trained.model, trained.vocabulary, samples, make_image_source(tasks_file.parent),
                            device="cpu", modes=("center", "box"), progress=progress)
    write_report(result, report_dir, title="OVSAM demo model, held-out synthetic images")
    return result.metrics


def main_demo_model(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ovsam.artifact import load_artifact, save_artifact
    from training.finetune import finetune
    from training.finetune_config import FinetuneConfig

    work, progress = args.work, not args.no_progress
    work.mkdir(parents=True, exist_ok=True)
    train_file = _synth(work / "train", args.images, args.data_seed, FIRST_APPEARANCE, progress)
    held_out_file = _synth(work / "held_out_class", args.val_images, args.data_seed + 1000, HELD_OUT_APPEARANCE, progress)
    base_path = work / "demo-init.safetensors"
    spread = _base_artifact(base_path, args.seed, args.text_steps, progress)
    print(f"text tower: mean |cos| between names {spread.get('mean_abs_cosine_before', float('nan')):.2f} -> "
          f"{spread.get('mean_abs_cosine_after', float('nan')):.2f}", file=sys.stderr)

    cfg = FinetuneConfig(
        base=str(base_path), data=str(train_file), val_fraction=0.05, out=str(work / "run"),
        version="ovsam-demo-1", train_all=True, augment=False, batch_size=args.batch_size, epochs=args.epochs,
        max_steps=args.steps, lr=args.lr, warmup_steps=200, max_norm=1.0,
        weight_decay_groups="extended",  # what the shipped demo model was trained with (keeps the recipe reproducing it)
        eval_prompts=("center", "box"), seed=args.seed, device=args.device, resume=True, head_mask_pooling=True,
        checkpoint_interval=500, progress=progress, command=" ".join(["python -m training demo-model", *(argv or sys.argv[1:])]),
    )
    result = finetune(cfg, save=True)
    phases = [result.provenance]
    later = [replace(ph, **{key: getattr(args, f"phase{ph.number}_{key}") for key in ("images", "epochs", "steps", "lr")})
             for ph in LATER_PHASES]
    drawn = {}  # (seed, images, appearance) -> tasks file: a phase that draws an earlier phase's images reuses them
    for phase in (p for p in later if p.images > 0):
        key = (phase.seed(args.data_seed), phase.images, phase.appearance)
        data = drawn.get(key) or _synth(work / f"train{phase.number}", phase.images, phase.seed(args.data_seed),
                                        phase.appearance, progress)
        drawn[key] = data
        cfg = replace(cfg, base=result.artifact, data=str(data), val_fraction=0.02, out=str(work / f"run{phase.number}"),
                      version=f"ovsam-demo-{len(phases) + 1}", epochs=phase.epochs, max_steps=phase.steps,
                      lr=phase.lr, warmup_steps=100, num_proposals=phase.prompts[0], num_box_prompts=phase.prompts[1],
                      train_all=phase.train_all, cache_features=not phase.train_all,
                      decoder_high_res=phase.decoder_high_res, image_size=phase.image_size)
        result = finetune(cfg, save=True)
        phases.append({**result.provenance, "appearance": phase.appearance})
    trained = load_artifact(result.artifact)
    held_out = _evaluate(trained, held_out_file, work / "held_out_report", progress)
    shape_only_file = _synth(work / "held_out_random", args.val_images, args.data_seed + 1000, "random", progress)
    shape_only = _evaluate(trained, shape_only_file, work / "held_out_random_report", progress)
    provenance = {**result.provenance, "kind": "demo", "text_spread": spread, "phases": phases,
                  "recipe": "python -m training demo-model (training/demo_model.py)",
                  "data": {"generator": "python -m training synth", "train_images": args.images,
                           "train_seed": args.data_seed, "train_appearance": FIRST_APPEARANCE,
                           **{f"phase{p.number}_{key}": value for p in later
                              for key, value in (("images", p.images), ("seed", p.seed(args.data_seed)),
                                                 ("appearance", p.appearance))},
                           "held_out_images": args.val_images, "held_out_seed": args.data_seed + 1000,
                           "held_out_appearance": HELD_OUT_APPEARANCE}}
    import torch

    out = save_artifact(args.out, trained.model, trained.vocabulary, trained.version, provenance,
                        {**result.metrics, "held_out": held_out, "held_out_random_appearance": shape_only},
                        text_encoder=trained.text_encoder, dtype=None if args.fp32 else torch.float16)
    figures = {name: {mode: {k: m[mode][k] for k in ("miou", "accuracy")} for mode in ("center", "box")}
               for name, m in (("held_out", held_out), ("held_out_random_appearance", shape_only))}
    print(json.dumps({"artifact": str(out), "bytes": out.stat().st_size, "version": trained.version, **figures}))
    return 0
