"""`python -m training distill`: SAM2CLIP — train the neck to reproduce SAM's image embedding.

Only the SAM2CLIP neck learns (its `pos_embed` is a frozen buffer); the CLIP trunk is frozen. The
targets are the fp16 embeddings written by `dump-sam-features`, looked up by image stem. Loss: MSE
over all elements (padding included); AdamW (lr 1e-4, wd 0.05, no decay on nn.LayerNorm), linear
warm-up then per-step cosine to 1%, gradient clipping at 5. Resumable and DDP-ready like `finetune`.
The student starts from a model artifact (`--base`) or a configuration (`--config`, with the CLIP
trunk from open_clip weights and, given `--sam-checkpoint`, SAM's pos_embed, prompt encoder and
mask decoder), and is written as a full model artifact.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ovsam.artifact import ModelArtifact, save_artifact
from ovsam.config import OVSAMConfig, get_config
from ovsam.model import OVSAM
from ovsam.transforms import ImageFrame, resize_and_normalize
from ovsam.vocabulary import VocabularyBuilder
from training.distributed import (RunLogger, ShardedSampler, all_reduce_sum, barrier, cleanup_distributed,
                                  init_distributed, wrap_ddp)
from training.dump_features import list_images, read_rgb
from training.optim import (build_adamw, default_warmup, load_training_state, no_decay_layernorm, param_groups,
                            rng_states, save_training_state, seed_everything, set_rng_states, warmup_cosine)
# The configuration and the command line live in torch-free modules (a fast `--help`); still importable from here.
from training.distill_cli import build_parser, main_distill  # noqa: F401
from training.distill_config import DistillConfig

CHECKPOINT = "checkpoints/last.pt"


class FeaturePairs(Dataset):
    """(normalised padded image, teacher embedding) for every image that has a dumped feature file."""

    def __init__(self, images: Sequence[Path], features: Path, model_cfg: OVSAMConfig) -> None:
        self.pairs = [(p, features / f"{p.stem}.pt") for p in images if (features / f"{p.stem}.pt").exists()]
        self.missing = len(images) - len(self.pairs)
        self.model_cfg = model_cfg
        self.image_size = model_cfg.image_size
        self.mean = torch.tensor(model_cfg.pixel_mean)
        self.std = torch.tensor(model_cfg.pixel_std)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        path, feat = self.pairs[index]
        image = read_rgb(path)
        frame = ImageFrame.for_image(image.shape[0], image.shape[1], self.image_size)
        x = resize_and_normalize(image, frame, self.mean, self.std)[0]
        return x, torch.load(feat, map_location="cpu", weights_only=True).float()


class DistillStep(nn.Module):
    """Student forward for DDP: frozen trunk, trainable neck."""

    def __init__(self, model: OVSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.model.trunk(x)
        return self.model.neck(feats)


def build_student(cfg: DistillConfig) -> ModelArtifact:
    """The model whose neck will be trained, with a vocabulary so the result is a complete artifact."""
    from training.vocab_cli import load_model_any

    if cfg.base:
        art = load_model_any(cfg.base, device="cpu")
    else:
        art = _from_config(cfg)
    if cfg.sam_checkpoint:
        parts = ("pos_embed",) if cfg.base else ("pos_embed", "prompt_encoder", "mask_decoder")
        _load_sam_parts(art.model, cfg.sam_checkpoint, parts)
    return art


def _from_config(cfg: DistillConfig) -> ModelArtifact:
    from ovsam.checkpoint import load_into, map_open_clip_visual, open_clip_state
    from ovsam.text import TextEncoder, load_pretrained_text_encoder

    mcfg = get_config(cfg.config)
    model = OVSAM(mcfg)
    clip = cfg.clip or mcfg.clip_pretrained
    state = None
    if clip:
        state = open_clip_state(mcfg, clip)
        load_into(model, map_open_clip_visual(state), ["trunk."], source="open_clip visual tower")
    if mcfg.text_cfg is not None:
        text = TextEncoder.from_config(mcfg)
    elif state is not None:
        text = TextEncoder.from_config(mcfg)
        text.load_open_clip_state(state)
    else:
        text = load_pretrained_text_encoder(mcfg)
    vocab = VocabularyBuilder(text).build(list(cfg.labels))
    return ModelArtifact(model, vocab, mcfg.name, {"source": f"config:{cfg.config}"}, {}, text)


def _load_sam_parts(model: OVSAM, path: str, parts: Sequence[str]) -> None:
    from ovsam.checkpoint import load_into, load_state_file, map_sam

    prefixes = {"pos_embed": "neck.pos_embed", "prompt_encoder": "prompt_encoder.", "mask_decoder": "head.mask_decoder."}
    load_into(model, map_sam(load_state_file(path), parts), [prefixes[p] for p in parts], source=f"SAM {path}")


def prepare_neck(model: OVSAM) -> List[nn.Parameter]:
    """Freeze everything, then let the neck's parameters train (pos_embed is a buffer and stays)."""
    model.requires_grad_(False)
    model.neck.requires_grad_(True)
    return [p for p in model.neck.parameters() if p.requires_grad]


def distill(cfg: DistillConfig, on_progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    info = init_distributed(cfg.device)
    dev = info.device
    notify = on_progress or (lambda e: None)
    seed_everything(cfg.seed)
    art = build_student(cfg)
    model = art.model.to(dev)
    params = prepare_neck(model)
    images = list_images(cfg.images, cfg.recursive)
    dataset = FeaturePairs(images, Path(cfg.features), model.cfg)
    if len(dataset) == 0:
        raise ValueError(f"no image in {cfg.images} has a feature file in {cfg.features}")
    n_val = int(round(cfg.val_fraction * len(dataset)))
    val_pairs = dataset.pairs[len(dataset) - n_val:] if n_val else []
    dataset.pairs = dataset.pairs[: len(dataset) - n_val]
    _check_shapes(model, dataset, dev)

    sampler = ShardedSampler(len(dataset), info.world_size, info.rank, shuffle=True, seed=cfg.seed)
    micro_per_epoch = math.ceil(sampler.per_rank / cfg.batch_size)
    total = micro_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    optimizer = build_adamw(param_groups(model.neck, cfg.weight_decay, no_decay_layernorm), cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, default_warmup(total, cfg.warmup_steps), cfg.final_factor))
    step_module = DistillStep(model)
    wrapped: nn.Module = step_module
    if info.distributed:
        wrapped = wrap_ddp(step_module, dev)
    run = cfg.run_dir
    ckpt = run / CHECKPOINT
    start_epoch, step, skip = 0, 0, 0
    history: List[Dict[str, float]] = []
    if cfg.resume and ckpt.exists():
        state = load_training_state(ckpt)
        model.neck.load_state_dict(state["neck"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, skip, history = state["epoch"], state["step"], state["micro"], state["history"]
        set_rng_states(state["rng"])

    def checkpoint(epoch: int, micro: int) -> None:
        if info.is_main:
            save_training_state(ckpt, {"neck": model.neck.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
                                       "micro": micro, "rng": rng_states(), "history": history,
                                       "config": dataclasses.asdict(cfg)})

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (cfg.amp and dev.type == "cuda") \
        else contextlib.nullcontext
    logger = RunLogger(run, total, step, info.is_main, cfg.progress, cfg.tensorboard, desc="distill")
    model.train()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if step >= total:
                break
            sampler.set_epoch(epoch, skip=skip * cfg.batch_size)
            loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                                pin_memory=dev.type == "cuda")
            micro, skip = skip, 0
            for x, target in loader:
                x, target = x.to(dev, non_blocking=True), target.to(dev, non_blocking=True)
                with autocast():
                    pred = wrapped(x)
                loss = F.mse_loss(pred.float(), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_norm)) if cfg.max_norm else 0.0
                optimizer.step()
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                step += 1
                micro += 1
                mse = float(all_reduce_sum(loss.detach().double()) / info.world_size)
                row = {"lr": lr, "loss": mse, "grad_norm": grad_norm}
                history.append({"step": step, "epoch": epoch, **row})
                logger.log(step, epoch, row)
                notify({"event": "step", "step": step, "total_steps": total, "epoch": epoch, **row})
                if step >= total:
                    break
            checkpoint(epoch + 1, 0)
            notify({"event": "epoch_end", "epoch": epoch + 1, "step": step})
    finally:
        logger.close()
    barrier()
    summary: Dict[str, Any] = {}
    if info.is_main:
        metrics = {"train_mse_first": history[0]["loss"] if history else None,
                   "train_mse_last": history[-1]["loss"] if history else None}
        if val_pairs:
            metrics["val_mse"] = _val_mse(model, val_pairs, dataset, dev)
        version = cfg.version or f"{art.version.split('-distill-')[0]}-distill-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
        provenance = {"kind": "sam2clip-distill", "base_model": cfg.base or f"config:{cfg.config}",
                      "base_version": art.version, "images": [str(p) for p in cfg.images], "features": cfg.features,
                      "num_images": len(dataset), "missing_features": dataset.missing, "steps": step,
                      "epochs": cfg.epochs, "seed": cfg.seed, "world_size": info.world_size,
                      "command": cfg.command or " ".join(sys.argv), "sam_checkpoint": cfg.sam_checkpoint,
                      "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "hyperparameters": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("images", "command")}}
        from training.provenance import git_commit

        provenance["git_commit"] = git_commit()
        model.eval()
        save_artifact(cfg.out, model, art.vocabulary, version, provenance, {"distill": metrics}, text_encoder=art.text_encoder)
        summary = {"artifact": cfg.out, "version": version, **metrics, "steps": step}
    cleanup_distributed()  # no barrier: other ranks need not wait for rank 0's evaluation
    return summary


def _check_shapes(model: OVSAM, dataset: FeaturePairs, dev: torch.device) -> None:
    _, target = dataset[0]
    g, c = model.cfg.embedding_size, model.cfg.prompt_embed_dim
    if tuple(target.shape) != (c, g, g):
        raise ValueError(f"teacher features are {list(target.shape)} but the student's embedding is [{c}, {g}, {g}]; "
                         "dump them with a SAM of the student's input size")


@torch.no_grad()
def _val_mse(model: OVSAM, pairs: list, dataset: FeaturePairs, dev: torch.device) -> float:
    model.eval()
    held = FeaturePairs([], Path("."), dataset.model_cfg)
    held.pairs = pairs
    total = 0.0
    for i in range(len(held)):
        x, t = held[i]
        total += float(F.mse_loss(model.neck(model.trunk(x[None].to(dev))).float()[0], t.to(dev)))
    return total / max(1, len(held))
