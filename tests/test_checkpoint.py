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
