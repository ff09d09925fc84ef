"""Open-Vocabulary SAM in plain PyTorch: click or box in, mask and class name out."""
from .config import OVSAMConfig, get_config
from .model import OVSAM, ImageFeatures

__all__ = ["OVSAM", "OVSAMConfig", "ImageFeatures", "get_config"]
