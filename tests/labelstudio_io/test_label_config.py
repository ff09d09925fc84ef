"""Label config parsing: the shipped configs, the recorded ones, and every error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from labelstudio_io.label_config import (
    LabelConfigError,
    ProjectSchema,
    parse_label_config,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "backend" / "fixtures" / "label_studio"
SHIPPED = sorted((REPO / "label_configs").glob("*.xml"))


def _fixture_configs() -> list[tuple[str, str]]:
    out = []
    for path in sorted(FIXTURES.glob("*.json")):
        body = json.loads(path.read_text()).get("body") or {}
        if not isinstance(body, dict):
            continue
        for key in ("label_config", "schema"):
            if isinstance(body.get(key), str):
                out.append((path.name, body[key]))
        project = body.get("project")
        if isinstance(project, dict) and isinstance(project.get("label_config"), str):
            out.append((path.name, project["label_config"]))
    return out


FIXTURE_CONFIGS = _fixture_configs()


def _config(body: str, image: str = '<Image name="image" value="$image"/>') -> str:
    return f"<View>{image}{body}</View>"


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"brush_interactive.xml", "polygon_interactive.xml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_parse_and_validate(path: Path):
    xml = path.read_text()
    LabelInterface(xml).validate()  # Label Studio's own schema check
    schema = parse_label_config(xml)
    assert schema.image_value_key == "image"
    assert schema.output.kind == ("brush" if "brush" in path.name else "polygon")
    assert schema.keypoint_controls and schema.rectangle_controls
    assert schema.labels
    assert any(len(names) > 1 for names in schema.synonyms.values()), "ships a synonym example"
    for label, names in schema.synonyms.items():
        assert names[0] == label
    # the smart tools carry the same labels as the output control
    li = LabelInterface(xml)
    for name in schema.prompt_controls:
        assert li.get_control(name).labels == schema.labels


def test_fixture_configs_found():
    assert len(FIXTURE_CONFIGS) >= 5


@pytest.mark.parametrize("name,xml", FIXTURE_CONFIGS, ids=[n for n, _ in FIXTURE_CONFIGS])
def test_fixture_configs_parse(name: str, xml: str):
    schema = parse_label_config(xml)
    assert schema == ProjectSchema(
        image_name="image",
        image_value_key="image",
        output=schema.output,
        labels=["cat", "dog", "car"],
        synonyms={"cat": ["cat"], "dog": ["dog"], "car": ["car"]},
        keypoint_controls=["tag2"],
        rectangle_controls=["tag3"],
    )
    assert (schema.output.name, schema.output.kind, schema.output.type) == ("tag", "brush", "brushlabels")
    assert schema.prompt_controls == ["tag2", "tag3"]
    assert schema.is_interactive


def test_cached_per_xml_string():
    xml = FIXTURE_CONFIGS[0][1]
    assert parse_label_config(xml) is parse_label_config(xml)


def test_synonyms_from_predicted_values_deduplicated_label_first():
    xml = _config(
        '<PolygonLabels name="out" toName="image">'
        '<Label value="car" predicted_values="automobile, car ,auto,,automobile"/>'
        '<Label value="person"/>'
        '<Label value="tv" alias="television" predicted_values="monitor"/>'
        "</PolygonLabels>"
    )
    schema = parse_label_config(xml)
    assert schema.output.kind == "polygon"
    assert schema.labels == ["car", "person", "television"]
    assert schema.synonyms == {
        "car": ["car", "automobile", "auto"],
        "person": ["person"],
        # the stored label is the alias; the displayed value is a synonym
        "television": ["television", "tv", "monitor"],
    }
    assert schema.keypoint_controls == [] and not schema.is_interactive


def test_non_smart_output_preferred_over_smart_rectangle():
    xml = _config(
        '<RectangleLabels name="smartbox" toName="image" smart="true"><Label value="a"/></RectangleLabels>'
        '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="a"/></KeyPointLabels>'
        '<KeyPointLabels name="plainkp" toName="image"><Label value="a"/></KeyPointLabels>'
        '<BrushLabels name="brush" toName="image"><Label value="a"/><Label value="b"/></BrushLabels>'
    )
    schema = parse_label_config(xml)
    assert schema.output.name == "brush" and schema.output.kind == "brush"
    assert schema.labels == ["a", "b"]
    assert schema.keypoint_controls == ["kp"]  # the plain KeyPointLabels is not a prompt
    assert schema.rectangle_controls == ["smartbox"]


def test_smart_rectangle_is_output_when_nothing_else():
    xml = _config(
        '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="a"/></KeyPointLabels>'
        '<RectangleLabels name="box" toName="image" smart="true"><Label value="a"/></RectangleLabels>'
    )
    schema = parse_label_config(xml)
    assert (schema.output.name, schema.output.kind) == ("box", "rectangle")
    assert schema.rectangle_controls == ["box"]


def test_plain_rectangle_output_and_other_value_key():
    xml = _config(
        '<RectangleLabels name="det" toName="photo"><Label value="x"/></RectangleLabels>',
        image='<Image name="photo" value="$image_url"/>',
    )
    schema = parse_label_config(xml)
    assert (schema.image_name, schema.image_value_key) == ("photo", "image_url")
    assert schema.output.kind == "rectangle"
    assert schema.rectangle_controls == []


def test_picks_the_image_that_has_an_output_control():
    xml = (
        "<View>"
        '<Image name="ref" value="$reference"/>'
        '<Image name="img" value="$img"/>'
        '<Choices name="c" toName="ref"><Choice value="ok"/></Choices>'
        '<BrushLabels name="b" toName="img"><Label value="a"/></BrushLabels>'
        '<KeyPointLabels name="kp_other" toName="ref" smart="true"><Label value="a"/></KeyPointLabels>'
        "</View>"
    )
    schema = parse_label_config(xml)
    assert (schema.image_name, schema.image_value_key, schema.output.name) == ("img", "img", "b")
    assert schema.keypoint_controls == []  # smart tool on another image does not count


@pytest.mark.parametrize(
    "xml,message",
    [
        ("", "empty"),
        ("<View><Image name='image' value='$image'>", "not valid XML"),
        ("not xml at all", "not valid XML"),
        (_config("", image='<Text name="t" value="$text"/>'), "no <Image>"),
        (_config('<Choices name="c" toName="image"><Choice value="a"/></Choices>'), "no BrushLabels"),
        (_config('<Text name="t" value="$t"/><BrushLabels name="b" toName="t"><Label value="a"/></BrushLabels>'),
         "no BrushLabels"),
        (_config('<KeyPointLabels name="k" toName="image" smart="true"><Label value="a"/></KeyPointLabels>'), "no BrushLabels"),
        (_config('<BrushLabels name="b" toName="image"></BrushLabels>'), "no <Label>"),
        (_config('<BrushLabels name="b" toName="image"><Label value="a"/></BrushLabels>',
                 image='<Image name="image" value="http://example.org/x.png"/>'), "task data"),
    ],
)
def test_errors(xml: str, message: str):
    with pytest.raises(LabelConfigError, match=message) as info:
        parse_label_config(xml)
    assert isinstance(info.value, ValueError)


def test_non_string_config_is_an_error():
    with pytest.raises(LabelConfigError):
        parse_label_config(None)  # type: ignore[arg-type]
    with pytest.raises(LabelConfigError, match="XML string"):
        parse_label_config({"xml": 1})  # type: ignore[arg-type]
