"""Read what the backend needs from a Label Studio label config.

Label Studio sends the project's label config (XML) with every ``/setup`` and
``/predict`` call. The backend derives from it, on every request:

* which task data key holds the image (``<Image value="$image">``),
* which control receives our masks (BrushLabels, PolygonLabels or
  RectangleLabels targeting that image) and its labels, which are the model's
  vocabulary,
* text synonyms per label (Label Studio's ``predicted_values="car,automobile"``
  convention on ``<Label>``),
* which smart controls (KeyPointLabels / RectangleLabels with ``smart="true"``)
  carry interactive prompts.

Parsing goes through ``label_studio_sdk.label_interface.LabelInterface`` so that
``alias`` handling and tag detection follow Label Studio's own rules; results
are cached per XML string because this runs on every request. The XML is the
client's, so the cache is bounded in characters of XML, not in entries
(``LABEL_CONFIG_CACHE_MB``, see :func:`set_cache_limit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from label_studio_sdk.label_interface import LabelInterface

from ovsam.cache import SizedLRU

__all__ = [
    "LabelConfigError",
    "cache_stats",
    "OutputControl",
    "OutputKind",
    "ProjectSchema",
    "parse_label_config",
    "set_cache_limit",
]

OutputKind = Literal["brush", "polygon", "rectangle"]

# Label Studio control tag -> the kind of result the backend emits for it.
_OUTPUT_TAGS: dict[str, OutputKind] = {
    "brushlabels": "brush",
    "polygonlabels": "polygon",
    "rectanglelabels": "rectangle",
}
_KEYPOINT_TAG = "keypointlabels"
_RECTANGLE_TAG = "rectanglelabels"


class LabelConfigError(ValueError):
    """The label config cannot be used by this backend (message says why)."""


@dataclass(frozen=True)
class OutputControl:
    """The control our predictions are written to.

    ``type`` is the Label Studio result type (``"brushlabels"`` ...), i.e. the
    lower-cased tag name, which is what result dicts must carry.
    """

    name: str
    kind: OutputKind
    tag: str

    @property
    def type(self) -> str:
        return self.tag.lower()


@dataclass(frozen=True)
class ProjectSchema:
    """Everything the backend needs from one label config.

    Instances are cached and shared between requests: treat the list/dict
    fields as read-only.
    """

    image_name: str
    image_value_key: str
    output: OutputControl
    labels: list[str]
    synonyms: dict[str, list[str]]
    keypoint_controls: list[str] = field(default_factory=list)
    rectangle_controls: list[str] = field(default_factory=list)

    @property
    def prompt_controls(self) -> list[str]:
        """Names of all smart controls whose regions are interactive prompts."""
        return [*self.keypoint_controls, *self.rectangle_controls]

    @property
    def is_interactive(self) -> bool:
        return bool(self.keypoint_controls or self.rectangle_controls)


def _is_true(value: Any) -> bool:
    return str(value).strip().lower() in {"true", "1", "yes"}


def _is_smart(control: Any) -> bool:
    attr = control.attr or {}
    return _is_true(attr.get("smart", "false")) or _is_true(attr.get("smartOnly", "false"))


def _synonyms_for(label: str, label_tag: Any) -> list[str]:
    """Label first, then ``value`` (when ``alias`` renamed it), then predicted_values."""
    names = [label]
    attr = getattr(label_tag, "attr", None) or {}
    value = attr.get("value")
    if value and value != label:
        names.append(value)
    extra = attr.get("predicted_values") or ""
    names.extend(part.strip() for part in extra.split(","))
    seen: set[str] = set()
    out: list[str] = []
    for name in names:
        if name and name not in seen:
            seen.add(name)
            out.append(name)
    return out


def _build_schema(xml: str) -> ProjectSchema:
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("label config is empty")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises several unrelated exception types
        raise LabelConfigError(f"label config is not valid XML: {exc}") from exc

    images = [obj for obj in interface.objects if obj.tag.lower() == "image"]
    if not images:
        raise LabelConfigError("label config has no <Image> object tag; this backend labels images")

    controls = list(interface.controls)  # document order
    chosen_image = None
    output_control = None
    for image in images:
        candidates = [
            c
            for c in controls
            if c.tag.lower() in _OUTPUT_TAGS and image.name in (c.to_name or [])
        ]
        if not candidates:
            continue
        plain = [c for c in candidates if not _is_smart(c)]
        chosen_image = image
        output_control = (plain or candidates)[0]
        break
    if chosen_image is None or output_control is None:
        names = ", ".join(repr(i.name) for i in images)
        raise LabelConfigError(
            "label config has no BrushLabels, PolygonLabels or RectangleLabels control "
            f"targeting the image ({names}); add one so the backend has somewhere to write masks"
        )

    value = (chosen_image.value or "").strip()
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(
            f"<Image name={chosen_image.name!r}> must take its URL from task data "
            f'(value="$image"), got value={value!r}'
        )

    labels = list(output_control.labels or [])
    if not labels:
        raise LabelConfigError(
            f"output control {output_control.name!r} ({output_control.tag}) has no <Label> children; "
            "its labels are the model's vocabulary"
        )
    label_attrs = output_control.labels_attrs or {}
    synonyms = {label: _synonyms_for(label, label_attrs.get(label)) for label in labels}

    def smart_on_image(tag: str) -> list[str]:
        return [
            c.name
            for c in controls
            if c.tag.lower() == tag and chosen_image.name in (c.to_name or []) and _is_smart(c)
        ]

    return ProjectSchema(
        image_name=chosen_image.name,
        image_value_key=value[1:],
        output=OutputControl(
            name=output_control.name,
            kind=_OUTPUT_TAGS[output_control.tag.lower()],
            tag=output_control.tag,
        ),
        labels=labels,
        synonyms=synonyms,
        keypoint_controls=smart_on_image(_KEYPOINT_TAG),
        rectangle_controls=smart_on_image(_RECTANGLE_TAG),
    )


_DEFAULT_CACHE_CHARS = 16 * 1024 * 1024
# Parsed configs, bounded by the characters of their XML; a config over a quarter of the bound is parsed on
# every request instead of kept, so one huge config cannot evict every other project's.
_cache: SizedLRU[tuple[int, ProjectSchema]] = SizedLRU(
    _DEFAULT_CACHE_CHARS, lambda entry: entry[0], max_entry=_DEFAULT_CACHE_CHARS // 4
)


def set_cache_limit(max_chars: int) -> None:
    """Bound the parsed-config cache to ``max_chars`` characters of XML (the server sets LABEL_CONFIG_CACHE_MB)."""
    max_chars = max(0, int(max_chars))
    _cache.resize(max_chars, max_entry=max_chars // 4)


def cache_stats() -> dict[str, int]:
    """Entries and characters of XML in the parsed-config cache, and its limit."""
    return {"entries": len(_cache), "chars": _cache.size, "max_chars": _cache.max_size}


def parse_label_config(xml: str) -> ProjectSchema:
    """Parse a label config into a :class:`ProjectSchema` (cached per XML string, bounded in size).

    Raises :class:`LabelConfigError` when the config is not a string, is
    unparseable, or has no image / usable output control / labels.
    """
    if not isinstance(xml, str):
        raise LabelConfigError(f"label config must be an XML string, got {type(xml).__name__}")
    entry = _cache.get(xml)
    if entry is None:
        entry = (len(xml), _build_schema(xml))  # outside the lock: parsing a large config takes a while
        _cache.put(xml, entry)
    return entry[1]
