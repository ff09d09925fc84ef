"""Official OVSAM / SAM / OpenCLIP weights -> our `OVSAM` (docs/REFERENCE_NOTES.md, key layouts).

Every source is renamed by an explicit mapper and loaded strictly: a key we do not know how to map, a
key the model lacks, a missing key or a shape mismatch is a `CheckpointError` naming the keys. After
`build_official_model` every parameter and buffer has been set from a file, none is left at its
random initialisation.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from .config import OVSAMConfig, get_config
from .model import OVSAM

if TYPE_CHECKING:
    from .class_texts import ReferenceVocabulary

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]

# Names of the released files (HF model repo `HarborYuan/ovsam_models`) and of SAM ViT-H.
SAM2CLIP_FILES = ("sam2clip_vith_rn50x16.pth", "sam2clip_vith_rn50.pth")
CLIP2SAM_FILES = {"coco": "clip2sam_coco_rn50x16.pth", "lvis": "clip2sam_lvis_rn50x16.pth"}
SAM_FILE = "sam_vit_h_4b8939.pth"
OPEN_CLIP_FILE = "open_clip_rn50x16.bin"
_CLIP_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")

# Counters that do not affect a frozen (eval-mode) BatchNorm; some CLIP exports omit them.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)

# COCO 2017's 80 thing classes, in category-id order (mmdet `CocoDataset.METAINFO['classes']`).
COCO_CLASSES: Tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

# The open-vocabulary COCO 48/17 split of OVR-CNN (Zareian et al., CVPR 2021), used by OVSAM's
# `CocoOVDataset` (`COCO4817_BASE_IDS` / `COCO4817_NOVEL_IDS`): the clip2sam_coco head trained on the 48 base
# classes only. The remaining 15 COCO classes are in neither set.
COCO_BASE_CLASSES: Tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep", "bear",
    "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard", "bottle", "fork",
    "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed",
    "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster", "refrigerator", "book", "clock",
    "vase", "toothbrush",
)
COCO_NOVEL_CLASSES: Tuple[str, ...] = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup", "knife",
    "cake", "couch", "keyboard", "sink", "scissors",
)


class CheckpointError(KeyError):
    """Keys of a checkpoint that cannot be mapped or loaded; the message names them."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def _preview(keys: Iterable[str], limit: int = 8) -> str:
    """A short, counted list of keys for error messages."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    more = f", … (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)}: [{shown}{more}]"


def _is_optional(key: str) -> bool:
    return key.endswith(OPTIONAL_SUFFIXES)


# ---- reading files ----------------------------------------------------------------------------------
def _is_torchscript(path: Path) -> bool:
    """TorchScript archives (OpenAI's CLIP `.pt`) are zip files holding `constants.pkl`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in zf.namelist())


def _unwrap(obj: object, path: Path) -> StateDict:
    """Accept a plain state dict or the common `{'state_dict': …}` / `{'model': …}` wrappers."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    for wrapper in ("state_dict", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            obj = inner
            break
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state_file(path: PathLike) -> StateDict:
    """A checkpoint file as a flat state dict on the CPU (memory-mapped where the format allows)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if _is_torchscript(path):
        raise CheckpointError(f"{path} is a TorchScript archive; load OpenAI CLIP files with load_open_clip_file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # legacy (pre-zip) files cannot be memory-mapped
            raise
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with objects beyond tensors/containers
        raise CheckpointError(f"{path}: not a plain tensor checkpoint ({type(exc).__name__}: {exc})") from exc
    return _unwrap(obj, path)


def load_open_clip_file(path: PathLike) -> StateDict:
    """A whole open_clip CLIP state dict from a local file: open_clip/HF weights or OpenAI's TorchScript `.pt`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights file not found: {path}")
    if _is_torchscript(path):
        import open_clip

        # open_clip's own OpenAI loader rebuilds the model from the archive and casts it to fp32.
        model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
        return {k: v for k, v in model.state_dict().items()}
    return load_state_file(path)


def load_open_clip_pretrained(cfg: OVSAMConfig, tag: str) -> StateDict:
    """open_clip pretrained weights by tag (downloads on first use); the visual tower is the same with or
    without QuickGELU, so the text model's name gives both towers from one download."""
    import open_clip

    name = cfg.text_model if cfg.text_cfg is None else cfg.clip_model
    try:
        model = open_clip.create_model(name, pretrained=tag)
    except Exception as exc:
        raise FileNotFoundError(
            f"could not get open_clip {name} pretrained={tag!r} weights ({type(exc).__name__}: {exc}); "
            f"without network, put the OpenCLIP file (e.g. {OPEN_CLIP_FILE}, or OpenAI's {cfg.clip_model}.pt) "
            "next to the OVSAM files or pass clip=PATH"
        ) from exc
    return dict(model.state_dict())


# ---- key mappers ------------------------------------------------------------------------------------
def _rename(state: Mapping[str, torch.Tensor], rules: Sequence[Tuple[str, str]], source: str) -> StateDict:
    """Apply the first matching regex rule to each key; keys no rule matches are an error."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out: StateDict = {}
    unknown: List[str] = []
    for key, value in state.items():
        for pattern, repl in compiled:
            if pattern.fullmatch(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: unexpected keys {_preview(sorted(unknown))}")
    return out


def map_sam2clip(state: Mapping[str, torch.Tensor]) -> StateDict:
    """`neck_student.X` -> `neck.X` (our neck keeps the released names, `projection` wrapper included)."""
    return _rename(state, [(r"neck_student\.(.+)", r"neck.\1")], "sam2clip checkpoint")


CLIP2SAM_RULES: Tuple[Tuple[str, str], ...] = (
    (r"mask_decoder\.mask_decoder\.(.+)", r"head.mask_decoder.\1"),
    (r"mask_decoder\.label_token\.weight", r"head.label_token.weight"),
    (r"mask_decoder\.label_mlp\.layers\.(\d+)\.(weight|bias)", r"head.label_mlp.layers.\1.\2"),
    (r"mask_decoder\.roi_conv\.0\.conv\.weight", r"head.roi_conv.weight"),  # mmcv ConvModule -> bare Conv2d
    (r"fpn_neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)", r"head.fpn.inner_blocks.\1.0.\2"),  # mmdet -> torchvision
    (r"fpn_neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)", r"head.fpn.layer_blocks.\1.0.\2"),
)


def map_clip2sam(state: Mapping[str, torch.Tensor]) -> StateDict:
    """CLIP2SAM head + FPN (mmdet/mmcv names) -> `head.*`."""
    return _rename(state, CLIP2SAM_RULES, "clip2sam checkpoint")


SAM_PARTS = ("prompt_encoder", "pos_embed", "mask_decoder")
_SAM_TARGET = {"prompt_encoder": "prompt_encoder.", "pos_embed": "neck.pos_embed", "mask_decoder": "head.mask_decoder."}
# SAM's multi-output parts that OVSAM's single-mask, IoU-free decoder drops.
_SAM_DECODER_DROPPED = re.compile(r"iou_token\..+|iou_prediction_head\..+|output_hypernetworks_mlps\.[1-9]\d*\..+")


def map_sam(state: Mapping[str, torch.Tensor], parts: Sequence[str] = ("prompt_encoder",)) -> StateDict:
    """Pick parts of a SAM checkpoint: `prompt_encoder`, `pos_embed` (image encoder -> neck) and `mask_decoder`
    (stage-2-from-scratch initialisation: the single-output mask token and hypernet 0, no IoU branch)."""
    bad = set(parts) - set(SAM_PARTS)
    if bad:
        raise ValueError(f"unknown SAM parts {sorted(bad)}; choose from {SAM_PARTS}")
    out: StateDict = {}
    unknown: List[str] = []
    for key, value in state.items():
        group, _, rest = key.partition(".")
        if group == "prompt_encoder":
            if "prompt_encoder" in parts:
                out[key] = value
        elif group == "image_encoder":
            if rest == "pos_embed" and "pos_embed" in parts:
                out["neck.pos_embed"] = value
        elif group == "mask_decoder":
            if "mask_decoder" not in parts or _SAM_DECODER_DROPPED.fullmatch(rest):
                continue
            out[f"head.mask_decoder.{rest}"] = value[:1] if rest == "mask_tokens.weight" else value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"SAM checkpoint: unexpected keys {_preview(sorted(unknown))}")
    missing = [p for p in parts if not any(k.startswith(_SAM_TARGET[p]) for k in out)]
    if missing:
        raise CheckpointError(f"SAM checkpoint: no keys for {missing}; is this a SAM checkpoint?")
    return out


# Text-tower and bookkeeping keys of an open_clip (or OpenAI) CLIP state dict that the image side ignores.
_OPEN_CLIP_TEXT = re.compile(
    r"(token_embedding|transformer|ln_final|text)\..+"
    r"|positional_embedding|text_projection|logit_scale|logit_bias|attn_mask|input_resolution|context_length|vocab_size"
)


def map_open_clip_visual(state: Mapping[str, torch.Tensor]) -> StateDict:
    """open_clip `visual.*` -> `trunk.visual.*`; text keys are ignored, anything else is an error."""
    out: StateDict = {}
    unknown: List[str] = []
    for key, value in state.items():
        if key.startswith("visual."):
            out[f"trunk.{key}"] = value
        elif not _OPEN_CLIP_TEXT.fullmatch(key):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"open_clip checkpoint: unexpected keys {_preview(sorted(unknown))}")
    if not out:
        raise CheckpointError("open_clip checkpoint: no visual.* keys (a text-only file?)")
    return out


# ---- strict loading ---------------------------------------------------------------------------------
def load_into(
    model: nn.Module,
    mapped: Mapping[str, torch.Tensor],
    expected_prefixes: Sequence[str],
    allow_missing: Iterable[str] = (),
    source: str = "checkpoint",
) -> Set[str]:
    """Load `mapped` into `model` strictly within `expected_prefixes`; returns the keys set.

    Every model key under the prefixes must be given (bar `allow_missing` and BatchNorm counters), and every
    given key must be a model key under the prefixes with the same shape.
    """
    prefixes = tuple(expected_prefixes)
    own = model.state_dict()
    allowed = set(allow_missing)
    expected = {k for k in own if k.startswith(prefixes)}
    missing = sorted(k for k in expected - mapped.keys() if k not in allowed and not _is_optional(k))
    unexpected = sorted(k for k in mapped if k not in expected)
    not_tensor = sorted(k for k in mapped if k in expected and not isinstance(mapped[k], torch.Tensor))
    mismatched = [
        f"{k} {list(mapped[k].shape)} vs model {list(own[k].shape)}"
        for k in sorted(mapped)
        if k in expected and k not in not_tensor and mapped[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_preview(unexpected)}")
    if not_tensor:
        problems.append(f"non-tensor values {_preview(not_tensor)}")
    if mismatched:
        problems.append(f"shape mismatches {_preview(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model ({', '.join(prefixes)}): " + "; ".join(problems))
    with torch.no_grad():  # state_dict() tensors share storage with the model: copy in place (casts dtype/device)
        for key, value in mapped.items():
            own[key].copy_(value)
    return set(mapped)


def _check_all_set(model: nn.Module, loaded: Set[str]) -> None:
    """No parameter or buffer may keep its random initialisation."""
    left = sorted(k for k in model.state_dict() if k not in loaded and not _is_optional(k))
    if left:
        raise CheckpointError(f"weights left at initialisation (no source set them) {_preview(left)}")


# ---- the official model -----------------------------------------------------------------------------
ClipSource = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


def open_clip_state(cfg: OVSAMConfig, clip: ClipSource) -> StateDict:
    """A full open_clip state dict from a loaded dict, a local file, or a pretrained tag such as 'openai'."""
    if isinstance(clip, Mapping):
        return dict(clip)
    if Path(clip).is_file():
        return load_open_clip_file(clip)
    if isinstance(clip, str) and os.sep not in clip and not clip.endswith(_CLIP_SUFFIXES):
        return load_open_clip_pretrained(cfg, clip)
    raise FileNotFoundError(f"CLIP weights: {clip} is neither a file nor an open_clip pretrained tag")


def build_official_model(
    cfg: Optional[OVSAMConfig] = None,
    sam2clip: PathLike = SAM2CLIP_FILES[0],
    clip2sam: PathLike = CLIP2SAM_FILES["coco"],
    sam: Optional[PathLike] = SAM_FILE,
    clip: ClipSource = "openai",
    device: Union[str, torch.device] = "cpu",
) -> OVSAM:
    """OVSAM from the released files: CLIP trunk (open_clip), SAM2CLIP neck, CLIP2SAM head, SAM prompt encoder.

    `pos_embed` comes with the sam2clip file; SAM's `image_encoder.pos_embed` is used only if it is absent.
    """
    if sam is None:
        raise FileNotFoundError(f"the SAM ViT-H checkpoint ({SAM_FILE}) is needed for the prompt encoder")
    cfg = cfg or get_config("rn50x16")
    with torch.device(device):
        model = OVSAM(cfg)
    loaded: Set[str] = set()

    neck = map_sam2clip(load_state_file(sam2clip))
    loaded |= load_into(model, neck, ["neck."], allow_missing=["neck.pos_embed"], source=f"sam2clip {sam2clip}")
    loaded |= load_into(model, map_clip2sam(load_state_file(clip2sam)), ["head."], source=f"clip2sam {clip2sam}")
    parts = ("prompt_encoder",) if "neck.pos_embed" in neck else ("prompt_encoder", "pos_embed")
    prefixes = ["prompt_encoder."] + (["neck.pos_embed"] if "pos_embed" in parts else [])
    loaded |= load_into(model, map_sam(load_state_file(sam), parts), prefixes, source=f"SAM {sam}")
    visual = map_open_clip_visual(open_clip_state(cfg, clip))
    loaded |= load_into(model, visual, ["trunk."], source="open_clip visual tower")
    _check_all_set(model, loaded)
    return model.eval()


# ---- the backend's entry point ------------------------------------------------------------------------
def _find_one(directory: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"{directory} has no {what} file (expected one of {list(names)}); "
        "fetch the official files with `python -m ovsam download --dest DIR`"
    )


def _find_clip_file(directory: Path, taken: Set[Path]) -> Optional[Path]:
    """`open_clip_rn50x16.bin`, else any other *.bin/*.pt/*.pth/*.safetensors CLIP file in the directory."""
    if (directory / OPEN_CLIP_FILE).is_file():
        return directory / OPEN_CLIP_FILE
    known = set(SAM2CLIP_FILES) | set(CLIP2SAM_FILES.values()) | {SAM_FILE}
    others = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in _CLIP_SUFFIXES and p.name not in known)
    others = [p for p in others if p not in taken]
    return others[0] if others else None


def find_official_files(directory: PathLike, variant: Optional[str] = None) -> Dict[str, Optional[Path]]:
    """The official files in a directory: sam2clip, clip2sam (`variant` coco/lvis; COCO preferred), sam, clip."""
    directory = Path(directory)
    if variant is not None and variant not in CLIP2SAM_FILES:
        raise ValueError(f"unknown clip2sam variant {variant!r}; choose from {sorted(CLIP2SAM_FILES)}")
    names = [CLIP2SAM_FILES[variant]] if variant else [CLIP2SAM_FILES["coco"], CLIP2SAM_FILES["lvis"]]
    files: Dict[str, Optional[Path]] = {
        "sam2clip": _find_one(directory, SAM2CLIP_FILES, "SAM2CLIP neck"),
        "clip2sam": _find_one(directory, names, "CLIP2SAM head"),
        "sam": _find_one(directory, [SAM_FILE], "SAM ViT-H (prompt encoder)"),
    }
    files["clip"] = _find_clip_file(directory, {p for p in files.values() if p is not None})
    return files


def load_model(
    path_or_dir: PathLike,
    device: Union[str, torch.device] = "cpu",
    cfg: Optional[OVSAMConfig] = None,
    variant: Optional[str] = None,
    labels: Sequence[str] = COCO_CLASSES,
    reference: Optional[ReferenceVocabulary] = None,
):
    """The one loader behind `OVSAM_CHECKPOINT`: an artifact file, or a directory of the official files.

    For a directory the vocabulary is `labels` (COCO's 80 by default) embedded by the CLIP text tower; with
    the COCO head, `is_base` marks the 48 base classes it was trained on (all labels count as base for LVIS).
    COCO's 80 classes are embedded from the reference's synonym texts, and its 15 classes in neither split are
    excluded (scored -1000 after the fusion) as in the reference's evaluation. `reference` (a benchmark's
    vocabulary, e.g. LVIS's from its annotation file) replaces `labels`: its classes, texts and split are stored,
    its base classes being what the official head was trained on. An artifact file keeps its own vocabulary.
    """
    from .artifact import ModelArtifact, load_artifact
    from .class_texts import coco_reference_vocabulary
    from .text import TextEncoder
    from .vocabulary import VocabularyBuilder

    path = Path(path_or_dir)
    if path.is_file():
        return load_artifact(path, device=device)
    if not path.is_dir():
        raise FileNotFoundError(f"no OVSAM checkpoint at {path}: expected an artifact file or a directory of official files")
    files = find_official_files(path, variant)
    is_coco = files["clip2sam"].name == CLIP2SAM_FILES["coco"]
    cfg = cfg or get_config("rn50x16" if is_coco else "rn50x16_lvis")
    clip_source: ClipSource = files["clip"] if files["clip"] is not None else (cfg.clip_pretrained or "openai")
    clip_state = open_clip_state(cfg, clip_source)
    model = build_official_model(cfg, files["sam2clip"], files["clip2sam"], files["sam"], clip_state, device)
    text_encoder = TextEncoder.from_config(cfg)
    text_encoder.load_open_clip_state(clip_state)
    text_encoder.to(device).eval()
    del clip_state
    base = [l for l in labels if l in COCO_BASE_CLASSES] if is_coco else list(labels)
    texts = excluded = None
    if reference is None and is_coco and list(labels) == list(COCO_CLASSES):  # the paper's COCO vocabulary
        reference = coco_reference_vocabulary()
    if reference is not None:
        labels, base, texts, excluded = reference.labels, reference.base, reference.texts, list(reference.excluded)
    vocabulary = VocabularyBuilder(text_encoder).build(list(labels), base_labels=base, texts=texts,
                                                       excluded_labels=excluded)
    provenance = {
        "source": "official",
        "sam2clip": files["sam2clip"].name,
        "clip2sam": files["clip2sam"].name,
        "sam": files["sam"].name,
        "clip": files["clip"].name if files["clip"] is not None else str(clip_source),
    }
    version = f"official-{cfg.clip_model.lower()}-{'coco' if is_coco else 'lvis'}"
    return ModelArtifact(model, vocabulary, version, provenance, {}, text_encoder, path)
