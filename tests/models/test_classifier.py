import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data as skdata

from pneumoscope.data.preprocessing import RESIZE_METHODS, Preprocessing
from pneumoscope.models.backbones import BACKBONES, load_imagenet_state_dict
from pneumoscope.models.classifier import create_model


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_contract(name):
    torch.manual_seed(0)
    model = create_model(name, pretrained="none", hidden=16)
    s = model.preprocessing.input_size
    x = torch.randn(2, 3, s, s)
    model.train()
    out = model(x)
    assert out.shape == (2, 1) and torch.isfinite(out).all()
    out.sum().backward()
    assert model.head.fc1.weight.grad is not None and model.head.fc1.weight.grad.abs().sum() > 0
    layer = model.cam_layer()
    assert isinstance(layer, torch.nn.Module)
    with torch.no_grad():
        fmap = model.eval().forward_features(x)
    assert fmap.ndim == 4 and fmap.shape[1] == model.head.fc1.in_features
    # the model carries its registry entry and class names: stage 2 and the CAM checks read them there
    assert model.spec is BACKBONES[name] and model.class_names == ("NORMAL", "PNEUMONIA")
    for top in model.spec.top_layers:
        assert isinstance(model.backbone.get_submodule(top), torch.nn.Module)


def test_preprocessing_is_derived_from_the_registry():
    img = np.linspace(0, 1, 100 * 80, dtype=np.float32).reshape(100, 80)
    for _name, spec in BACKBONES.items():
        x = spec.preprocessing.apply(img)
        s = spec.preprocessing.input_size
        assert x.shape == (3, s, s)
        np.testing.assert_allclose(x[0].mean(), (0.5 - spec.preprocessing.mean[0]) / spec.preprocessing.std[0], atol=0.02)


def test_preprocessing_refuses_an_unknown_resize():
    assert Preprocessing(224, (0.5,) * 3, (0.5,) * 3).resize in RESIZE_METHODS
    with pytest.raises(ValueError, match="resize must be one of .*'bilinear-squash'.*got 'letterbox'"):
        Preprocessing(224, (0.5,) * 3, (0.5,) * 3, resize="letterbox")
    with pytest.raises(ValueError, match="resize must be one of"):
        Preprocessing.from_dict({"input_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "in_chans": 3, "resize": "nearest"})


def test_preprocessing_apply_is_resize_then_normalize():
    pre = BACKBONES["resnet50"].preprocessing
    img = np.random.default_rng(0).uniform(size=(100, 80)).astype(np.float32)
    small = pre.resize_image(img)
    assert small.shape == (224, 224) and small.dtype == np.float32
    x = pre.apply(img)
    np.testing.assert_array_equal(x, pre.normalize(small[None]))
    np.testing.assert_array_equal(x, pre.normalize(torch.tensor(small)[None]).numpy())  # torch in, torch out: the same numbers
    np.testing.assert_allclose(x[1], (small - pre.mean[1]) / pre.std[1], rtol=1e-6)
    with pytest.raises(ValueError, match="normalize takes a"):
        pre.normalize(small[None].repeat(2, axis=0))


def _imagenet_top1(name: str, image: np.ndarray) -> int:
    spec = BACKBONES[name]
    net = timm.create_model(spec.timm_name, pretrained=False)
    net.load_state_dict(load_imagenet_state_dict(name), strict=True)
    s = spec.preprocessing.input_size
    x = np.asarray(Image.fromarray(image).resize((s, s), Image.Resampling.BILINEAR), np.float32) / 255.0
    x = (x - np.array(spec.preprocessing.mean, np.float32)) / np.array(spec.preprocessing.std, np.float32)
    with torch.no_grad():
        return int(net.eval()(torch.from_numpy(x).permute(2, 0, 1)[None]).argmax())


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_offline_imagenet_weights_recognise_a_cat_and_an_espresso(name):
    assert 281 <= _imagenet_top1(name, skdata.chelsea()) <= 285  # tabby/tiger/Persian/Siamese/Egyptian cat
    assert _imagenet_top1(name, skdata.coffee()) == 967  # espresso


def test_resnet50_loads_a_local_state_dict(tmp_path):
    reference = timm.create_model("resnet50", pretrained=False)
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("resnet50", weights=path)
    torch.testing.assert_close(model.backbone.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(model.backbone.layer4[2].bn3.running_var, reference.layer4[2].bn3.running_var)


def test_resnet50_local_weights_of_the_wrong_model_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit resnet50"):
        create_model("resnet50", weights=path)


def test_resnet50_imagenet_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(timm, "create_model", _offline_create_model(timm.create_model))
    with pytest.raises(RuntimeError, match="--weights PATH.*--pretrained none"):
        create_model("resnet50", pretrained="imagenet")


def _offline_create_model(real):
    def create(name, pretrained=False, **kw):
        if pretrained:  # what huggingface_hub raises with no network
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(name, pretrained=False, **kw)

    return create


def test_unknown_backbone_lists_choices():
    with pytest.raises(ValueError, match="choose one of"):
        create_model("vgg99", pretrained="none")


def test_an_ensemble_is_its_members_side_by_side_and_reuses_their_feature_caches(kaggle_tree, tmp_path, monkeypatch):
    from pneumoscope.data.layouts import load_dataset
    from pneumoscope.data.splits import scan
    from pneumoscope.models.features import extract_features

    torch.manual_seed(0)
    ensemble = create_model("efficientnet_lite0+2", pretrained="none", hidden=8).eval()
    members = []
    for name, member in zip(("efficientnet_lite0", "efficientnet_lite2"), ensemble.backbone.members, strict=True):
        single = create_model(name, pretrained="none", hidden=8).eval()
        single.backbone.load_state_dict(member.state_dict())
        single.preprocessing = ensemble.preprocessing  # members run at the ensemble's input size
        members.append(single)
    dataset = scan(load_dataset(kaggle_tree))
    records = dataset.records[:3]
    computed = extract_features(ensemble, dataset, records, cache_dir=tmp_path / "a", progress=False).features
    assert computed.shape == (3, 1280 + 1280)
    singles = [extract_features(m, dataset, records, cache_dir=tmp_path / "b", progress=False).features for m in members]
    np.testing.assert_allclose(computed, np.concatenate(singles, axis=1), atol=1e-4)

    def no_forward(*_):
        raise AssertionError("features should have come from the members' caches")

    monkeypatch.setattr(ensemble, "pooled_features", no_forward)
    cached = extract_features(ensemble, dataset, records, cache_dir=tmp_path / "b", progress=False).features
    np.testing.assert_allclose(cached, computed, atol=1e-4)


def test_packed_heads_average_their_members_logits():
    from pneumoscope.models.classifier import Head, pack_heads

    torch.manual_seed(0)
    a, b = Head(6, hidden=4).eval(), Head(10, hidden=3).eval()
    x = torch.randn(5, 16)
    packed = pack_heads([a, b], [6, 10])
    with torch.no_grad():
        expected = (a(x[:, :6]) + b(x[:, 6:])) / 2
        torch.testing.assert_close(packed(x), expected)
    assert (packed.fc1.in_features, packed.fc1.out_features) == (16, 7)
    with pytest.raises(ValueError, match="10 features"):
        pack_heads([a, a], [6, 10])


@pytest.mark.parametrize("outputs", [1, 3])
def test_packed_and_averaged_heads_give_the_mean_of_their_members_logits(outputs):
    """Issue 22: an ensemble's packed head and the cross-fitted heads' average work for K outputs as for one."""
    from pneumoscope.models.classifier import Head, average_heads, pack_heads

    torch.manual_seed(0)
    widths = [5, 7]
    heads = [Head(w, hidden=4, dropout=0.0, outputs=outputs).eval() for w in widths]
    x = torch.randn(6, sum(widths))
    with torch.no_grad():
        want = (heads[0](x[:, :5]) + heads[1](x[:, 5:])) / 2
        torch.testing.assert_close(pack_heads(heads, widths)(x), want, rtol=1e-5, atol=1e-6)
        same = [Head(5, hidden=4, dropout=0.0, outputs=outputs).eval() for _ in range(3)]
        torch.testing.assert_close(average_heads(same)(x[:, :5]), sum(h(x[:, :5]) for h in same) / 3, rtol=1e-5, atol=1e-6)
