"""Fetch the released OVSAM weights and SAM ViT-H into one directory that `ovsam.checkpoint.load_model` reads.

Offline this fails fast (short connect timeout; `HF_HUB_OFFLINE` respected) with one message saying
which files to download by hand and where to put them.
"""
from __future__ import annotations

import os
import shutil
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

HF_REPO = "HarborYuan/ovsam_models"
SAM_VIT_H_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
# OpenAI's TorchScript RN50x16 (open_clip's `openai` source); `load_model` reads it as any *.pt CLIP file.
OPENAI_RN50X16_URL = (
    "https://openaipublic.azureedge.net/clip/models/"
    "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt"
)
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Asset:
    """One downloadable file: where it comes from and the name `load_model` looks for."""

    filename: str
    hf_repo: Optional[str] = None  # else a plain URL
    url: Optional[str] = None
    manual_name: Optional[str] = None  # the name to save a hand download under, when it differs

    def source(self) -> str:
        if self.hf_repo:
            return f"{_hf_endpoint()}/{self.hf_repo}/resolve/main/{self.filename}"
        return sam_url() if self.url is None else self.url

    def names(self) -> List[str]:
        return [self.filename] + ([self.manual_name] if self.manual_name else [])


def sam_url() -> str:
    """SAM ViT-H's URL; `OVSAM_SAM_URL` overrides it (mirrors, tests)."""
    return os.environ.get("OVSAM_SAM_URL", SAM_VIT_H_URL)


ASSETS: Dict[str, Asset] = {
    "sam2clip": Asset("sam2clip_vith_rn50x16.pth", hf_repo=HF_REPO),
    "clip2sam_coco": Asset("clip2sam_coco_rn50x16.pth", hf_repo=HF_REPO),
    "clip2sam_lvis": Asset("clip2sam_lvis_rn50x16.pth", hf_repo=HF_REPO),
    "sam_vit_h": Asset("sam_vit_h_4b8939.pth"),  # url resolved at download time (OVSAM_SAM_URL)
    # Optional: OpenAI's RN50x16 via open_clip, so the directory also works without network later.
    "clip_rn50x16": Asset("open_clip_rn50x16.bin", url=OPENAI_RN50X16_URL, manual_name="RN50x16.pt"),
}
DEFAULT_ASSETS = ("sam2clip", "clip2sam_coco", "clip2sam_lvis", "sam_vit_h")


class DownloadError(RuntimeError):
    """Some files could not be fetched; the message says what to download by hand and where."""


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _unreachable(url: str) -> Optional[str]:
    """Why `url`'s host cannot be reached (None if it can): one short TCP connect instead of a client's
    retry loop (huggingface_hub backs off for ~30 s offline). Skipped behind a proxy."""
    parts = urlsplit(url)
    if urllib.request.getproxies().get(parts.scheme):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return f"{parts.hostname}:{port} unreachable: {exc}"
    return None


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _download_hf(repo: str, filename: str, dest: Path, force: bool) -> Path:
    """Into `dest` directly (huggingface_hub writes to a temp file and renames)."""
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(
        repo_id=repo,
        filename=filename,
        local_dir=str(dest),
        force_download=force,
        local_files_only=_hf_offline(),
        etag_timeout=CONNECT_TIMEOUT_S,
    )
    return Path(path)


def _download_open_clip_rn50x16(dest: Path, target: str, force: bool) -> Path:
    """open_clip's own download logic (safetensors if published, else the .bin), copied under our name."""
    import open_clip

    if _hf_offline():
        raise ConnectionError("HF_HUB_OFFLINE is set")
    cached = Path(open_clip.download_pretrained(open_clip.get_pretrained_cfg("RN50x16", "openai")))
    out = dest / (Path(target).stem + cached.suffix)
    tmp = out.with_name(f".{out.name}.part")
    shutil.copyfile(cached, tmp)
    os.replace(tmp, out)
    return out


def _download_url(url: str, out: Path) -> Path:
    """Stream to `.<name>.part` with a progress bar, check the length, then rename."""
    import requests
    from tqdm import tqdm

    tmp = out.with_name(f".{out.name}.part")
    try:
        with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as resp:
            resp.raise_for_status()
            total = int(resp.headers.get("content-length", 0)) or None
            written = 0
            with open(tmp, "wb") as fh, tqdm(total=total, unit="B", unit_scale=True, desc=out.name) as bar:
                for chunk in resp.iter_content(chunk_size=1 << 20):
                    fh.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
        if total is not None and written != total:
            raise IOError(f"incomplete download: {written} of {total} bytes")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _existing(dest: Path, asset: Asset) -> Optional[Path]:
    candidates = [dest / n for n in asset.names()] + sorted(dest.glob(f"{Path(asset.filename).stem}.*"))
    for path in candidates:
        if path.is_file() and not path.name.endswith(".part"):
            return path
    return None


def download_official(
    dest_dir: Union[str, os.PathLike],
    which: Sequence[str] = DEFAULT_ASSETS,
    force: bool = False,
) -> Dict[str, Path]:
    """Download the chosen assets (keys of `ASSETS`) into `dest_dir`; existing files are kept unless `force`.

    Tries every asset, then raises one `DownloadError` listing the failures with their manual URLs.
    """
    unknown = [w for w in which if w not in ASSETS]
    if unknown:
        raise ValueError(f"unknown assets {unknown}; choose from {sorted(ASSETS)}")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    done: Dict[str, Path] = {}
    failed: List[Tuple[str, str, str]] = []  # (url, name to save as, why)
    hosts: Dict[str, Optional[str]] = {}  # host -> why unreachable, checked once
    for key in which:
        asset = ASSETS[key]
        have = None if force else _existing(dest, asset)
        if have is not None:
            done[key] = have
            continue
        url = asset.source()
        offline = _hf_offline() and asset.hf_repo is not None
        host = urlsplit(url).netloc
        if not offline and host not in hosts:
            hosts[host] = _unreachable(url)
        if not offline and hosts[host]:
            failed.append((url, asset.names()[-1], hosts[host]))
            continue
        try:
            if key == "clip_rn50x16":
                done[key] = _download_open_clip_rn50x16(dest, asset.filename, force)
            elif asset.hf_repo:
                done[key] = _download_hf(asset.hf_repo, asset.filename, dest, force)
            else:
                done[key] = _download_url(asset.source(), dest / asset.filename)
        except Exception as exc:  # network, HTTP, offline mode: all reported together below
            failed.append((url, asset.names()[-1], f"{type(exc).__name__}: {exc}".splitlines()[0][:200]))
    if failed:
        reasons = "; ".join(dict.fromkeys(why for _, _, why in failed))
        files = ", ".join(f"{url} (save as {name})" for url, name, _ in failed)
        raise DownloadError(f"could not download {len(failed)} file(s) ({reasons}). Download by hand into {dest}: {files}")
    return done
