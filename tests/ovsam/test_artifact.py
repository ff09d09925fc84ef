"""Model artifacts: save -> load gives the same model, vocabulary, text tower and metadata."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ovsam
from ovsam.artifact import ARTIFACT_FORMAT, load_artifact, read_artifact_metadata, save_artifact
from ovsam.model import OVSAM
from ovsam.predictor import OVSAMPredictor
from ovsam.text import TextEncoder
from ovsam.vocabulary import VocabularyBuilder

PROVENANCE = {"base": "random init", "dataset": {"name": "synthetic", "images": 12}, "seed": 7}
METRICS = {"miou": 0.4321, "accuracy": 0.75, "per_class": {"cat": 0.5}}


def _model(seed=0):
    torch.manual_seed(seed)
    model = OVSAM(ovsam.get_config("tiny")).eval()
    # Non-default values everywhere, including buffers (pos_embed, BatchNorm running stats).
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and "running_var" not in name:
                t.add_(torch.randn_like(t) * 0.01)
    return model


@pytest.fixture
def parts(tmp_path):
    model = _model()
    torch.manual_seed(1)
    text = TextEncoder.from_config(model.cfg).eval()
    vocab = VocabularyBuilder(text, tmp_path / "vocab").build(
        ["cat", "dog", "traffic light"], synonyms={"dog": ["puppy"]}, base_labels=["cat", "traffic light"]
    )
    return model, text, vocab


def _image():
    rs = np.random.RandomState(0)
    img = rs.randint(0, 256, (45, 70, 3), dtype=np.uint8)
    img[10:30, 20:50] = (20, 200, 40)
    return img


def _predict(model, vocab):
    pred = OVSAMPredictor(model, vocab, device="cpu")
    pred.set_image(_image())
    return pred.predict(points=np.array([[30.0, 20.0], [60.0, 5.0]]), point_labels=np.array([1, 0]), top_k=3)


def test_round_trip_is_bit_identical(parts, tmp_path):
    model, text, vocab = parts
    path = save_artifact(tmp_path / "a" / "model.safetensors", model, vocab, "1.2.3", PROVENANCE, METRICS, text)
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp file left behind
    art = load_artifact(path)
    sd_a, sd_b = model.state_dict(), art.model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert art.config == model.cfg
    assert art.vocabulary.labels == vocab.labels
    assert art.vocabulary.synonyms == vocab.synonyms
    assert torch.equal(art.vocabulary.embeddings, vocab.embeddings)
    assert art.vocabulary.is_base.tolist() == [True, False, True]

    before = _predict(model, vocab)
    after = _predict(art.model, art.vocabulary)
    assert torch.equal(before.low_res_logits, after.low_res_logits)
    assert [(s.label, s.probability) for s in before.top_k] == [(s.label, s.probability) for s in after.top_k]
    assert np.array_equal(before.mask, after.mask)

    # The shipped text tower gives the same text features.
    loaded_text = art.get_text_encoder()
    assert loaded_text is art.text_encoder
    assert torch.equal(loaded_text.encode(["a photo of a dog."]), text.encode(["a photo of a dog."]))


def test_round_trip_differs_from_another_model(parts, tmp_path):
    """Guards the identity check above: another model's artifact gives other outputs."""
    model, text, vocab = parts
    path = save_artifact(tmp_path / "other.safetensors", _model(seed=5), vocab, "0.0.1")
    art = load_artifact(path)
    assert not torch.equal(_predict(model, vocab).low_res_logits, _predict(art.model, art.vocabulary).low_res_logits)
    assert art.text_encoder is None


def test_metadata_preserved(parts, tmp_path):
    model, text, vocab = parts
    path = save_artifact(tmp_path / "m.safetensors", model, vocab, "2024.11.0-rc1", PROVENANCE, METRICS, text)
    meta = read_artifact_metadata(path)
    assert meta["version"] == "2024.11.0-rc1"
    assert meta["provenance"] == PROVENANCE
    assert meta["metrics"] == METRICS
    assert ovsam.OVSAMConfig.from_dict(meta["config"]) == model.cfg
    assert meta["vocabulary"]["labels"] == ["cat", "dog", "traffic light"]
    assert meta["text_model"]["name"] == text.model_name
    art = load_artifact(path)
    assert art.version == "2024.11.0-rc1"
    assert art.provenance == PROVENANCE and art.metrics == METRICS
    assert art.path == path


def test_half_precision_artifact(parts, tmp_path):
    model, text, vocab = parts
    path = save_artifact(tmp_path / "h.safetensors", model, vocab, "1", dtype=torch.float16)
    art = load_artifact(path)
    p = next(iter(art.model.parameters()))
    assert p.dtype == torch.float32
    a = _predict(model, vocab)
    b = _predict(art.model, art.vocabulary)
    torch.testing.assert_close(a.low_res_logits, b.low_res_logits, rtol=0.05, atol=0.05)
    assert torch.equal(art.vocabulary.embeddings, vocab.embeddings)  # vocabulary stays fp32


def test_refuses_non_finite_weights(parts, tmp_path):
    model, text, vocab = parts
    with torch.no_grad():
        model.head.label_token.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        save_artifact(tmp_path / "bad.safetensors", model, vocab, "1")
    assert not (tmp_path / "bad.safetensors").exists()


def test_random_bytes_are_a_clear_value_error(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(np.random.RandomState(0).bytes(4096))
    with pytest.raises(ValueError, match="not an OVSAM model artifact"):
        load_artifact(path)
    with pytest.raises(ValueError, match="not an OVSAM model artifact"):
        read_artifact_metadata(path)


def test_foreign_safetensors_is_a_clear_value_error(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an OVSAM model artifact"):
        load_artifact(path)
    path2 = tmp_path / "nometa.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path2))
    with pytest.raises(ValueError, match="not an OVSAM model artifact"):
        load_artifact(path2)


def test_truncated_artifact_is_a_clear_value_error(parts, tmp_path):
    model, text, vocab = parts
    path = save_artifact(tmp_path / "t.safetensors", model, vocab, "1")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        load_artifact(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError)):
        load_artifact(tmp_path / "nope.safetensors")


def test_format_constant():
    assert ARTIFACT_FORMAT.startswith("ovsam-artifact/")


def test_excluded_labels_survive_the_round_trip(parts, tmp_path):
    model, text, vocab = parts
    excluded = vocab.with_excluded([vocab.labels[0]])
    art = load_artifact(save_artifact(tmp_path / "x.safetensors", model, excluded, "x", text_encoder=text))
    assert art.vocabulary.excluded.tolist() == [True] + [False] * (len(vocab) - 1)
    assert not load_artifact(save_artifact(tmp_path / "y.safetensors", model, vocab, "y")).vocabulary.excluded.any()


def _flip_weight_bytes(path, count=1000):
    """Invert ``count`` bytes in the middle of the file's tensor data (its JSON header is left intact)."""
    import struct

    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", bytes(data[:8]))[0]
    start = 8 + header + (len(data) - 8 - header) // 2
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_weight_bytes_are_refused_with_a_clear_error(parts, tmp_path):
    from ovsam.artifact import ArtifactIntegrityError

    model, text, vocab = parts
    path = save_artifact(tmp_path / "m.safetensors", model, vocab, "v1", text_encoder=text)
    assert set(read_artifact_metadata(path)["checksum"]) == {"algorithm", "image_encoder", "rest"}
    load_artifact(path)  # intact: loads
    _flip_weight_bytes(path)
    with pytest.raises(ArtifactIntegrityError, match="do not match their checksum"):
        load_artifact(path)


def test_artifact_without_checksum_loads_with_a_log_line(parts, tmp_path, caplog):
    from safetensors import safe_open

    model, text, vocab = parts
    path = save_artifact(tmp_path / "m.safetensors", model, vocab, "v1", text_encoder=text)
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "checksum"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    with caplog.at_level("INFO", logger="ovsam.artifact"):
        art = load_artifact(old)
    assert art.checksum is None and "no weights checksum" in caplog.text


def test_version_can_carry_the_content_hash_and_encoders_can_be_shared(parts, tmp_path):
    model, text, vocab = parts
    a = save_artifact(tmp_path / "a.safetensors", model, vocab, lambda h: f"v-{h[:8]}", text_encoder=text)
    with torch.no_grad():
        model.head.label_token.weight.add_(1.0)  # another head, the same image encoder
    b = save_artifact(tmp_path / "b.safetensors", model, vocab, lambda h: f"v-{h[:8]}", text_encoder=text)
    meta_a, meta_b = read_artifact_metadata(a), read_artifact_metadata(b)
    assert meta_a["version"] != meta_b["version"] and meta_a["version"].startswith("v-")
    assert meta_a["checksum"]["image_encoder"] == meta_b["checksum"]["image_encoder"]
    assert meta_a["checksum"]["rest"] != meta_b["checksum"]["rest"]
    base = load_artifact(a)
    shared = load_artifact(b, shared_image_encoder=base.model)
    assert shared.model.trunk is base.model.trunk and shared.model.neck is base.model.neck
    assert torch.equal(shared.model.head.label_token.weight, model.head.label_token.weight)
    assert not torch.equal(shared.model.head.label_token.weight, base.model.head.label_token.weight)
