import json

import pytest
import torch

from pneumoscope.checkpoint import describe, load_checkpoint, read_description, save_checkpoint
from pneumoscope.models import create_model


def test_checkpoint_round_trip_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", pretrained="none", hidden=32).eval()
    path = save_checkpoint(tmp_path, model, describe(model, threshold=0.42, threshold_policy="test", metrics={"val": {"roc_auc": 0.9}}))
    loaded, desc = load_checkpoint(tmp_path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert desc["threshold"] == 0.42 and desc["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert desc["preprocessing"]["input_size"] == 224 and desc["versions"]["torch"]
    # the file holds tensors and JSON only: no pickle opcodes anywhere
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert json.loads(header["__metadata__"]["pneumoscope"])["backbone"] == "efficientnet_lite0"


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a pneumoscope checkpoint"):
        read_description(tmp_path)


def test_missing_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pneumoscope train"):
        load_checkpoint(tmp_path / "nothing")


def _edited(tmp_path, **changes):
    """A checkpoint whose JSON description was edited after saving (weights untouched)."""
    from safetensors.torch import load_file, save_file

    model = create_model("efficientnet_lite0", pretrained="none", hidden=8)
    path = save_checkpoint(tmp_path, model, describe(model, threshold=0.5, threshold_policy="test"))
    description = read_description(path)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = description
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = value
    save_file(load_file(str(path)), str(path), metadata={"pneumoscope": json.dumps(description)})
    return path


@pytest.mark.parametrize(
    "changes,match",
    [({"temperature": -1.0}, "temperature must be > 0"), ({"temperature": 0.0}, "temperature must be > 0"),
     ({"temperature": float("nan")}, "temperature must be finite"), ({"threshold": 1.5}, r"threshold must be in \(0, 1\)"),
     ({"threshold": 0.0}, r"threshold must be in \(0, 1\)"), ({"threshold": "high"}, "threshold must be a number"),
     ({"ood": {"cutoff": float("nan")}}, "ood.cutoff must be finite"), ({"ood": {"cutoff": -3.0}}, "ood.cutoff must be >= 0"),
     ({"preprocessing__input_size": 100000}, r"input_size must be an integer in \[16, 1024\]"),
     ({"preprocessing__std": [0.5, 0.0, 0.5]}, "std must be > 0"),
     ({"preprocessing__resize": "letterbox"}, r"resize must be one of \['bilinear-squash'\]"),
     ({"class_names": ["PNEUMONIA", "NORMAL"]}, "class_names must be")],
)  # fmt: skip
def test_a_description_that_would_change_answers_is_refused_on_load(tmp_path, changes, match):
    from pneumoscope.checkpoint import CheckpointError

    path = _edited(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "Fix:" in str(err.value)


def test_the_same_checks_guard_an_onnx_description():
    from pneumoscope.checkpoint import CheckpointError
    from pneumoscope.predict import Predictor

    class Backend:  # what an ONNX export's metadata would hand over
        name = "onnxruntime"

    description = {"threshold": 0.5, "temperature": -2.0, "preprocessing": {"input_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "in_chans": 3}}
    with pytest.raises(CheckpointError, match="temperature"):
        Predictor(Backend(), description, "model.onnx")
