import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pneumoscope.errors import CheckpointError, MissingFileError
from pneumoscope.models.checkpoint import RunFolder, describe, load_checkpoint, read_description, save_checkpoint, save_derived_run
from pneumoscope.models.classifier import create_model
from pneumoscope.models.description import RunDescription

# What the code before RunDescription wrote: an ONNX export's description of a run trained, calibrated, then adapted
# (every section), with the image hash lists shortened and the data paths made neutral.
WRITTEN = Path(__file__).parents[1] / "fixtures" / "description_v1.json"


def test_checkpoint_round_trip_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", pretrained="none", hidden=32).eval()
    path = save_checkpoint(tmp_path, model, describe(model, threshold=0.42, threshold_policy="test", metrics={"val": {"roc_auc": 0.9}}))
    loaded, desc = load_checkpoint(tmp_path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert desc.threshold == 0.42 and desc.class_names == ("NORMAL", "PNEUMONIA")
    assert desc.preprocessing.input_size == 224 and desc.versions["torch"]
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
    description = read_description(path).to_dict()
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
    [
        ({"temperature": -1.0}, r"temperature must be in \[0.05, 20\]"),
        ({"temperature": 0.0}, r"temperature must be in \[0.05, 20\]"),
        ({"temperature": 1e300}, r"temperature must be in \[0.05, 20\]"),  # issue 23 item 11: accepted; every probability 0.5
        ({"temperature": float("nan")}, "temperature must be finite"),
        ({"threshold": 1.5}, r"threshold must be in \(0, 1\)"),
        ({"threshold": 0.0}, r"threshold must be in \(0, 1\)"),
        ({"threshold": "high"}, "threshold must be a number"),
        ({"ood": {"cutoff": float("nan")}}, "ood.cutoff must be finite"),
        ({"ood": {"cutoff": -3.0}}, "ood.cutoff must be >= 0"),
        ({"preprocessing__input_size": 100000}, r"input_size must be an integer in \[16, 1024\]"),
        ({"preprocessing__input_size": 16}, "input_size must be 224, the size efficientnet_lite0 is trained"),  # issue 23 item 11: 11 of 20
        ({"preprocessing__input_size": 1024}, "input_size must be 224"),  # labels changed, or 9.4 GB for 20 images
        ({"preprocessing__std": [0.5, 0.0, 0.5]}, "std must be > 0"),
        ({"preprocessing__resize": "letterbox"}, r"resize must be one of \['bilinear-squash'\]"),
        ({"class_names": ["PNEUMONIA", "NORMAL"]}, "positive_class must be .NORMAL."),
    ],
)
def test_a_description_that_would_change_answers_is_refused_on_load(tmp_path, changes, match):
    from pneumoscope.errors import CheckpointError

    path = _edited(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "Fix:" in str(err.value)


def test_the_same_checks_guard_an_onnx_description(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from pneumoscope.inference.predictor import Predictor

    description = {**json.loads(WRITTEN.read_text()), "temperature": -2.0}
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("image", "logit")]
    proto = helper.make_model(helper.make_graph([helper.make_node("Identity", ["image"], ["logit"])], "g", io[:1], io[1:]))
    proto.metadata_props.add(key="pneumoscope", value=json.dumps(description))
    onnx.save(proto, tmp_path / "model.onnx")
    with pytest.raises(CheckpointError, match="temperature must be in") as err:
        Predictor.from_onnx(tmp_path / "model.onnx")
    assert str(tmp_path / "model.onnx") in str(err.value)


# --------------------------------------------------------------------------- RunDescription


def test_a_description_written_before_round_trips_to_the_same_json():
    text = WRITTEN.read_text()
    written = json.loads(text)
    description = RunDescription.from_dict(written, WRITTEN)
    assert description.to_dict() == written
    assert json.dumps(description.to_dict(), indent=1) + "\n" == text  # same order too
    assert description.calibration["n"] == 24 and description.adaptation["method"] == "center+prior"
    assert description.ood_cutoff == written["ood"]["cutoff"] and description.head.hidden == 256
    assert description.preprocessing.mean == (0.5, 0.5, 0.5)


def test_the_description_reads_and_writes_the_same_through_a_checkpoint_and_a_derived_run(tmp_path):
    """The safetensors header and checkpoint.json hold the description as the code before wrote them;
    a derived run copies the source run's training context beside it."""
    written = json.loads(WRITTEN.read_text())
    model = create_model("efficientnet_lite0", pretrained="none", hidden=8)
    run = tmp_path / "run"
    save_checkpoint(run, model, describe(model, threshold=0.5, threshold_policy="test"))
    (run / "history.csv").write_text("epoch\n1\n")
    out = save_derived_run(run / "model.safetensors", tmp_path / "derived", model, RunDescription.from_dict(written, "x"))
    derived = RunFolder.of(out)
    assert derived.checkpoint_json.read_text() == json.dumps(written, indent=2) + "\n"
    header = json.loads(derived.checkpoint.read_bytes()[8 : 8 + int.from_bytes(derived.checkpoint.read_bytes()[:8], "little")])
    assert header["__metadata__"]["pneumoscope"] == json.dumps(written)
    assert read_description(out).to_dict() == written
    assert derived.history_csv.read_text() == "epoch\n1\n" and not derived.samples.exists()


def test_describe_writes_the_keys_in_the_order_it_always_has():
    model = create_model("efficientnet_lite0", pretrained="none", hidden=8)
    d = describe(
        model,
        threshold=0.5,
        threshold_policy="test",
        training={"seed": 0},
        ood={"method": "m", "cutoff": 3.0, "cutoff_rule": "r"},
        leakage={"ok": True},
    ).to_dict()
    assert list(d) == [
        "format",
        "format_version",
        "backbone",
        "head",
        "preprocessing",
        "class_names",
        "positive_class",
        "output",
        "temperature",
        "threshold",
        "threshold_policy",
        "metrics",
        "feature_adapter",
        "versions",
        "training",
        "ood",
        "leakage",
    ]
    assert d["ood"] == {"method": "m", "cutoff": 3.0, "cutoff_rule": "r"} and d["feature_adapter"] is None
    assert d["head"] == {"in_features": 1280, "hidden": 8, "dropout": model.head.dropout.p} and d["preprocessing"]["mean"] == [0.5] * 3
    added = replace(RunDescription.from_dict(d, "x"), calibration={"n": 1}).to_dict()
    assert list(added) == [*d, "calibration"]  # a section added to a read description goes last, as dict.update put it


def test_a_description_of_the_first_format_loads_and_writes_back_unchanged():
    """Before temperature scaling and site adaptation: no temperature, no feature_adapter, another output text."""
    written = json.loads(WRITTEN.read_text())
    first = {k: written[k] for k in ("format", "format_version", "backbone", "head", "preprocessing", "class_names", "positive_class")}
    first.update(output="one logit; P(PNEUMONIA) = sigmoid(logit)", threshold=0.4, threshold_policy="youden", metrics={}, versions={})
    description = RunDescription.from_dict(first, "old.safetensors")
    assert description.temperature == 1.0 and description.feature_adapter is None and description.ood_cutoff is None
    assert description.to_dict() == first and list(description.to_dict()) == list(first)
    assert list(replace(description, temperature=2.0).to_dict())[-1] == "temperature"


def test_unknown_top_level_keys_are_kept_and_unknown_keys_in_the_contract_refused():
    written = json.loads(WRITTEN.read_text())
    d = dict(written)
    d = {**dict(list(d.items())[:5]), "site_notes": {"ward": 3}, **dict(list(d.items())[5:])}
    description = RunDescription.from_dict(d, "x")
    assert description.extra == {"site_notes": {"ward": 3}} and list(description.to_dict()) == list(d) and description.to_dict() == d
    for section in ("preprocessing", "head", "ood"):
        with pytest.raises(CheckpointError, match=f"x: {section} must be a mapping of .*'crop'.*Fix:"):
            RunDescription.from_dict({**written, section: {**written[section], "crop": 0.9}}, "x")


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"threshold": 1.5}, r"threshold must be in \(0, 1\)"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"ood": {"cutoff": -1.0}}, "ood.cutoff must be >= 0"),
        ({"preprocessing": None}, "preprocessing must be a mapping"),
        ({"preprocessing": {"input_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3}}, "preprocessing.in_chans must be"),
        ({"format_version": 3}, "checkpoint format 3 is newer"),
        ({"head": {"in_features": 1280, "hidden": 0, "dropout": 0.3}}, "head.hidden"),
        # issue 23: sizes the loader allocates before reading the weights (hidden 10^9 asked for 5 TB), and a 1-channel contract
        ({"head": {"in_features": 1280, "hidden": 10**9, "dropout": 0.3}}, r"head.hidden must be an integer in \[1, 65536\]"),
        ({"feature_adapter": {"reference_sample": -5}}, r"feature_adapter.reference_sample must be an integer in \[1, 100000\]"),
        ({"feature_adapter": {"reference_sample": 10**12}}, "feature_adapter.reference_sample must be"),
        ({"preprocessing": {"input_size": 224, "mean": [0.5], "std": [0.5], "in_chans": 1}}, "preprocessing.in_chans must be 3"),
    ],
)
def test_from_dict_checks_the_description(changes, match):
    with pytest.raises(CheckpointError, match=match) as err:
        RunDescription.from_dict({**json.loads(WRITTEN.read_text()), **changes}, "run/model.safetensors")
    assert str(err.value).startswith("run/model.safetensors: ")


def test_a_description_without_a_backbone_or_head_is_refused():
    written = json.loads(WRITTEN.read_text())
    with pytest.raises(CheckpointError, match=r"lacks \['head'\].*Fix:"):
        RunDescription.from_dict({k: v for k, v in written.items() if k != "head"}, "x")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("threshold", 0.0, r"threshold must be in \(0, 1\)"),
        ("temperature", float("nan"), "temperature must be finite"),
        ("temperature", -1.0, "temperature must be in"),
        ("class_names", ("PNEUMONIA", "NORMAL"), "positive_class must be"),
    ],
)
def test_replace_checks_a_derived_description(field, value, match):
    description = RunDescription.from_dict(json.loads(WRITTEN.read_text()), "x")
    with pytest.raises(CheckpointError, match=match):
        replace(description, **{field: value})
    with pytest.raises(CheckpointError, match="ood.cutoff must be >= 0"):
        replace(description, ood=replace(description.ood, cutoff=-1.0))
    assert replace(description, threshold=0.3).threshold == 0.3 and description.threshold != 0.3


def test_a_description_is_frozen():
    description = RunDescription.from_dict(json.loads(WRITTEN.read_text()), "x")
    with pytest.raises(AttributeError):
        description.threshold = 0.9


# --------------------------------------------------------------------------- RunFolder


def test_run_folder_is_the_folder_given_or_the_folder_of_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"")
    by_folder, by_file = RunFolder.of(run), RunFolder.of(run / "model.safetensors")
    assert by_folder == by_file and by_folder.path == run and by_file.checkpoint == run / "model.safetensors"
    assert by_folder.skipped == run / "skipped.csv" and by_folder.checkpoint_json == run / "checkpoint.json"
    (run / "best.safetensors").write_bytes(b"")
    assert RunFolder.of(run / "best.safetensors").checkpoint == run / "best.safetensors"  # a checkpoint under another name is kept


def test_a_missing_run_folder_says_what_to_give(tmp_path):
    with pytest.raises(MissingFileError, match=r"no run folder or checkpoint here.*pneumoscope train"):
        RunFolder.of(tmp_path / "nothing")


def test_a_description_without_its_format_is_refused(tmp_path):
    """Every description pneumoscope writes names its format; one without it was not written by pneumoscope."""
    from pneumoscope.errors import CheckpointError
    from pneumoscope.models.checkpoint import describe
    from pneumoscope.models.description import RunDescription

    d = describe(create_model("efficientnet_lite0", pretrained="none", hidden=8), threshold=0.5, threshold_policy="test").to_dict()
    del d["format"]
    with pytest.raises(CheckpointError, match="lacks \\['format'\\]"):
        RunDescription.from_dict(d, "x.json")


def test_a_format_version_that_is_not_a_number_is_a_checkpoint_error():
    """A damaged header is the user's to fix (one line naming the file), not a TypeError reported as a bug."""
    from pneumoscope.errors import CheckpointError
    from pneumoscope.models.checkpoint import describe
    from pneumoscope.models.description import RunDescription

    d = describe(create_model("efficientnet_lite0", pretrained="none", hidden=8), threshold=0.5, threshold_policy="test").to_dict()
    d["format_version"] = "one"
    with pytest.raises(CheckpointError, match="x.json: format_version must be a number"):
        RunDescription.from_dict(d, "x.json")
