import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pneumoscope.explain import compute_gradcam
from pneumoscope.models import create_model


def _manual_gradcam(model, x, sign):
    """Grad-CAM by hand: weights = spatial mean of d(sign * logit)/dA; relu(sum w A); upsample; min-max."""
    acts = {}
    handle = model.cam_layer().register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    try:
        logit = model(x)[:, 0]
    finally:
        handle.remove()
    a = acts["a"]  # (B, K, h, w)
    (grads,) = torch.autograd.grad((sign * logit).sum(), a)
    w = grads.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = F.relu((w * a).sum(1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = cam.amin(dim=(1, 2), keepdim=True)
    hi = cam.amax(dim=(1, 2), keepdim=True)
    return ((cam - lo) / (hi - lo + 1e-7)).detach().numpy()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("efficientnet_lite0", pretrained="imagenet", hidden=16).eval()


@pytest.mark.parametrize("target,sign", [(1, 1.0), (0, -1.0)])
def test_gradcam_matches_a_hand_computation_for_our_head(model, target, sign):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ours = compute_gradcam(model, x, target)
    ref = _manual_gradcam(model, x, sign)
    assert ours.shape == (2, 224, 224) and np.isfinite(ours).all()
    assert ours.min() >= 0 and ours.max() <= 1
    for a, b in zip(ours, ref):
        if b.max() > 0:
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98


def test_normal_and_pneumonia_targets_explain_different_things(model):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    pos, neg = compute_gradcam(model, x, 1)[0], compute_gradcam(model, x, 0)[0]
    # the NORMAL target is the negated logit: its pre-ReLU map is the negative of PNEUMONIA's,
    # so where one map is strong the other is (up to upsampling blur) zero
    assert pos.max() > 0 or neg.max() > 0
    assert neg[pos > 0.9].max(initial=0) < 0.1 and pos[neg > 0.9].max(initial=0) < 0.1


def test_hooks_are_released(model):
    layer = model.cam_layer()
    before = (len(layer._forward_hooks), len(layer._backward_hooks), len(layer._forward_pre_hooks))
    compute_gradcam(model, torch.randn(1, 3, 224, 224), 1)
    assert (len(layer._forward_hooks), len(layer._backward_hooks), len(layer._forward_pre_hooks)) == before


def test_bad_target_is_refused(model):
    with pytest.raises(ValueError, match="target_class"):
        compute_gradcam(model, torch.randn(1, 3, 224, 224), 2)
