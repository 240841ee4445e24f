"""Tests for the model zoo: the Classifier contract, shapes, parameter counts, torch.func use,
and loading local torchvision ResNet state dicts (safely)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp

from lfm.errors import LFMError
from lfm.models import (
    MODELS,
    Classifier,
    batchnorm_batch_stats,
    count_parameters,
    create_model,
    load_torchvision_resnet,
)
from lfm.models.weights import adapt_conv_channels

B = 2  # batch size for every forward pass: keeps the suite fast on two CPU cores


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Batch-2 forwards gain nothing from intra-op threads, and on a busy 2-core machine
    # OpenMP's spinning threads make this file several times slower; restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_has_the_zoo():
    expected = {"mlp", "cnn", "cnn1d", "resnet20", "resnet32", "resnet56", "wrn", "wrn28_10"}
    expected |= {"vgg19_bn", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}
    assert expected <= set(MODELS.names())
    assert all(MODELS.help(n) for n in MODELS.names())


SHAPE_CASES = [
    ("mlp", (64,), {}),
    ("mlp", (1, 8, 8), {"hidden_sizes": (32,)}),
    ("mlp", (1, 40), {"hidden_sizes": ()}),
    ("cnn", (3, 32, 32), {}),
    ("cnn", (1, 8, 8), {}),
    ("cnn", (3, 64, 64), {}),
    ("cnn", (1, 1, 1), {}),
    ("cnn1d", (1, 40), {}),
    ("cnn1d", (40,), {}),
    ("cnn1d", (2, 100), {}),
    ("resnet20", (3, 32, 32), {}),
    ("resnet32", (3, 32, 32), {}),
    ("resnet32", (1, 8, 8), {}),
    ("resnet32", (3, 64, 64), {}),
    ("resnet32", (3, 7, 9), {}),  # odd sides: option-A shortcut and conv must agree
    ("resnet56", (1, 8, 8), {}),
    ("wrn", (3, 32, 32), {"depth": 10, "width": 2}),
    ("wrn", (1, 8, 8), {"depth": 16, "width": 1, "dropout": 0.3}),
    ("wrn28_10", (3, 32, 32), {}),
    ("vgg19_bn", (3, 32, 32), {}),
    ("vgg19_bn", (1, 8, 8), {}),
    ("resnet18", (3, 32, 32), {}),
    ("resnet18", (1, 8, 8), {}),
    ("resnet18", (3, 64, 64), {}),
    ("resnet18", (1, 8, 8), {"small_input": False}),
    ("resnet34", (3, 8, 8), {}),
    ("resnet50", (1, 8, 8), {}),
]


@pytest.mark.parametrize("name,shape,kwargs", SHAPE_CASES, ids=lambda v: str(v))
def test_output_and_feature_shapes(name, shape, kwargs):
    num_classes = 7
    model = create_model(name, num_classes, shape, **kwargs)
    assert isinstance(model, Classifier)
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (model.feature_dim, num_classes)
    model.eval()  # eval: BatchNorm and dropout are deterministic, so the two passes agree
    x = torch.randn(B, *shape)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert feats.shape == (B, model.feature_dim)
    assert logits.shape == (B, num_classes)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, model.head(feats))


# Exact counts measured on this code; the torchvision ones are torchvision's own counts.
PARAM_COUNTS = [
    ("resnet20", 10, (3, 32, 32), 269_722),
    ("resnet32", 10, (3, 32, 32), 464_154),  # 0.46M, as in He et al. 2016 / Meta-Weight-Net
    ("resnet56", 10, (3, 32, 32), 853_018),
    ("wrn28_10", 10, (3, 32, 32), 36_479_194),  # 36.5M
    ("vgg19_bn", 10, (3, 32, 32), 20_040_522),  # 20.0M, 16 convs + one linear layer
    ("resnet18", 1000, (3, 224, 224), 11_689_512),  # torchvision
    ("resnet34", 1000, (3, 224, 224), 21_797_672),  # torchvision
    ("resnet50", 1000, (3, 224, 224), 25_557_032),  # torchvision
    ("resnet101", 1000, (3, 224, 224), 44_549_160),  # torchvision
    ("resnet152", 1000, (3, 224, 224), 60_192_808),  # torchvision
    ("cnn1d", 10, (1, 40), 5_210),  # MNIST-1D
]


@pytest.mark.parametrize("name,num_classes,shape,count", PARAM_COUNTS, ids=lambda v: str(v))
def test_parameter_counts(name, num_classes, shape, count):
    with torch.device("meta"):  # shapes only: no memory, no time spent on initialisation
        model = create_model(name, num_classes, shape)
    assert count_parameters(model) == count


def test_cnn1d_is_the_mnist1d_model():
    model = create_model("cnn1d", 10, (1, 40))
    convs = [m for m in model.body.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (25, (5,), (2,), (1,)),
        (25, (3,), (2,), (1,)),
        (25, (3,), (2,), (1,)),
    ]
    assert (model.feature_dim, model.head.out_features) == (125, 10)


def test_resnet32_has_option_a_shortcuts():
    model = create_model("resnet32", 10, (3, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31  # 1 stem + 3 stages x 5 blocks x 2; shortcuts have no conv
    assert [m.out_channels for m in convs][::10] == [16, 16, 32, 64]
    assert model.feature_dim == 64


def test_small_input_stem_is_chosen_by_image_side():
    def stem(shape, **kw):
        body = create_model("resnet18", 10, shape, **kw).body
        return body.conv1.kernel_size, isinstance(body.maxpool, nn.MaxPool2d)

    assert stem((3, 32, 32)) == ((3, 3), False)
    assert stem((3, 64, 64)) == ((3, 3), False)
    assert stem((3, 224, 224)) == ((7, 7), True)
    assert stem((3, 32, 32), small_input=False) == ((7, 7), True)
    assert stem((3, 224, 224), small_input=True) == ((3, 3), False)


def test_initialisation_is_standard():
    model = create_model("resnet20", 10, (3, 32, 32))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    conv = model.body.layer3[0].conv2  # kaiming normal, fan_out: std = sqrt(2 / (64 * 9))
    assert abs(conv.weight.std().item() - (2 / (64 * 9)) ** 0.5) < 0.01


@pytest.mark.parametrize(
    "name,shape", [("resnet20", (3, 8, 8)), ("cnn1d", (1, 40)), ("mlp", (64,)), ("cnn", (1, 8, 8))]
)
def test_functional_call_and_torch_func(name, shape):
    model = create_model(name, 3, shape)
    x = torch.randn(B, *shape)
    y = torch.tensor([0, 2])
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def logits(p):
        return functional_call(model, (p, buffers), (x,))

    def loss(p):
        return F.cross_entropy(logits(p), y)

    model.eval()
    with torch.no_grad():
        assert torch.allclose(logits(params), model(x), atol=1e-6)
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    out, jout = jvp(logits, (params,), (tangents,))
    assert jout.shape == out.shape == (B, 3)
    out, pullback = vjp(logits, params)
    (cotangent,) = pullback(torch.ones_like(out))
    g = grad(loss)(params)
    # vjp of sum(logits) and grad of the loss agree with autograd
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for k, p in model.named_parameters():
        assert torch.allclose(g[k], p.grad, atol=1e-5), k
        assert cotangent[k].shape == p.shape

    # Train mode: BatchNorm would mutate its buffers, which torch.func refuses; the context
    # manager keeps batch statistics and leaves the buffers alone.
    model.train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    with batchnorm_batch_stats(model):
        out, jout = jvp(logits, (params,), (tangents,))
        g = grad(loss)(params)
    assert all(torch.equal(before[k], v) for k, v in model.named_buffers())
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-5)  # same maths as a normal train step


def test_shared_body_with_two_heads():
    model = create_model("resnet20", 10, (3, 8, 8))
    other_head = nn.Linear(model.feature_dim, 10)
    feats = model.features(torch.randn(B, 3, 8, 8))
    assert other_head(feats).shape == model.head(feats).shape == (B, 10)


@pytest.mark.parametrize(
    "name,shape,kwargs,match",
    [
        ("no_such_model", (3, 32, 32), {}, "unknown model"),
        ("resnet32", (64,), {}, r"\(C, H, W\)"),
        ("cnn", (1, 40), {}, r"\(C, H, W\)"),
        ("cnn1d", (3, 32, 32), {}, r"\(C, L\)"),
        ("resnet32", (3, 32, 32), {"width": 2}, "unknown option"),
        ("wrn", (3, 32, 32), {"depth": 27}, "6n \\+ 4"),
        ("wrn", (3, 32, 32), {"dropout": 1.5}, "dropout"),
        ("mlp", (0, 3), {}, "positive integers"),
    ],
)
def test_bad_requests_are_lfm_errors(name, shape, kwargs, match):
    with pytest.raises(LFMError, match=match):
        create_model(name, 10, shape, **kwargs)


def test_bad_num_classes():
    with pytest.raises(LFMError, match="num_classes"):
        create_model("mlp", 0, (4,))


# ---------------------------------------------------------------------------------------------
# Local torchvision weights


def torchvision_resnet18_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """torchvision.models.resnet18's state-dict keys and shapes, written out by hand."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{k}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    c_in = 64
    for i, planes in enumerate((64, 128, 256, 512), start=1):
        for j in range(2):
            p = f"layer{i}.{j}"
            shapes[f"{p}.conv1.weight"] = (planes, c_in if j == 0 else planes, 3, 3)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            if j == 0 and i > 1:
                shapes[f"{p}.downsample.0.weight"] = (planes, c_in, 1, 1)
                bn(f"{p}.downsample.1", planes)
        c_in = planes
    shapes["fc.weight"] = (num_classes, 512)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def synthetic_resnet18_state_dict() -> dict[str, torch.Tensor]:
    """Random tensors in torchvision's resnet18 layout, with non-trivial BatchNorm statistics."""
    sd = {}
    for k, shape in torchvision_resnet18_shapes().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(100)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape) + 0.5
        elif k.endswith(".weight") and len(shape) == 4:
            sd[k] = torch.randn(shape) * (2 / (shape[1] * shape[2] * shape[3])) ** 0.5
        else:
            sd[k] = torch.randn(shape) * 0.1 + (1.0 if "bn" in k and k.endswith("weight") else 0)
    return sd


def reference_resnet18(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ResNet-18 inference written directly with torch.nn.functional on torchvision's keys."""

    def bn(t, p):
        return F.batch_norm(
            t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"]
        )

    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for i in range(1, 5):
        for j in range(2):
            p, stride = f"layer{i}.{j}", (2 if i > 1 and j == 0 else 1)
            out = F.relu(
                bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1")
            )
            out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = bn(
                    F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1"
                )
            x = F.relu(out + x)
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return F.linear(x, sd["fc.weight"], sd["fc.bias"])


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory):
    torch.manual_seed(1)
    sd = synthetic_resnet18_state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(sd, path)
    return path, sd


def test_our_resnet18_has_torchvision_keys_and_shapes():
    ours = create_model("resnet18", 1000, (3, 224, 224)).state_dict()
    renamed = {
        ("fc." + k[5:] if k.startswith("head.") else k[len("body.") :]): tuple(v.shape)
        for k, v in ours.items()
    }
    assert renamed == torchvision_resnet18_shapes()


def test_load_torchvision_resnet18_matches_reference(tv_file):
    path, sd = tv_file
    model = create_model("resnet18", 1000, (3, 64, 64), small_input=False).eval()
    report = load_torchvision_resnet(model, path)
    assert not report.skipped and not report.adapted
    assert len(report.loaded) == len(sd)
    x = torch.randn(B, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference_resnet18(sd, x), atol=1e-4)
    # the same through create_model(weights=...)
    again = create_model("resnet18", 1000, (3, 64, 64), small_input=False, weights=path).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_fc_skipped_when_classes_differ(tv_file):
    path, sd = tv_file
    model = create_model("resnet18", 10, (3, 64, 64), small_input=False).eval()
    report = load_torchvision_resnet(model, path)
    assert set(report.skipped) == {"fc.weight", "fc.bias"}
    x = torch.randn(B, 3, 64, 64)
    no_fc = dict(sd, **{"fc.weight": torch.eye(512), "fc.bias": torch.zeros(512)})
    with torch.no_grad():
        assert torch.allclose(model.features(x), reference_resnet18(no_fc, x), atol=1e-4)


def test_conv1_adapted_to_one_channel(tv_file):
    path, _ = tv_file
    grey = create_model("resnet18", 1000, (1, 64, 64), small_input=False).eval()
    rgb = create_model("resnet18", 1000, (3, 64, 64), small_input=False).eval()
    report = load_torchvision_resnet(grey, path)
    load_torchvision_resnet(rgb, path)
    assert "conv1.weight" in report.adapted
    x = torch.randn(B, 1, 64, 64)
    with torch.no_grad():  # a grey image behaves like the same image copied to R, G and B
        assert torch.allclose(grey(x), rgb(x.expand(B, 3, 64, 64)), atol=1e-4)
    w = torch.randn(4, 3, 7, 7)
    assert adapt_conv_channels(w, 5).shape == (4, 5, 7, 7)


def test_small_input_stem_skips_conv1(tv_file):
    path, _ = tv_file
    model = create_model("resnet18", 1000, (3, 32, 32), weights=path)
    report = load_torchvision_resnet(model, path)
    assert list(report.skipped) == ["conv1.weight"]


def test_wrapped_checkpoint_and_old_files_load(tv_file, tmp_path):
    _, sd = tv_file
    old = {f"module.{k}": v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": old, "epoch": 90}, path)
    model = create_model("resnet18", 1000, (3, 64, 64), small_input=False)
    report = load_torchvision_resnet(model, path)
    assert not report.skipped
    assert torch.equal(model.body.layer4[1].bn2.running_var, sd["layer4.1.bn2.running_var"])


def test_missing_and_unexpected_keys_are_named(tv_file, tmp_path):
    _, sd = tv_file
    model = create_model("resnet18", 1000, (3, 64, 64))
    missing = {k: v for k, v in sd.items() if k != "layer3.1.bn2.running_var"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(LFMError, match=r"missing keys: layer3\.1\.bn2\.running_var"):
        load_torchvision_resnet(model, tmp_path / "missing.pth")
    torch.save(dict(sd, **{"layer5.0.conv1.weight": torch.zeros(1)}), tmp_path / "extra.pth")
    with pytest.raises(LFMError, match=r"unexpected keys: layer5\.0\.conv1\.weight"):
        load_torchvision_resnet(model, tmp_path / "extra.pth")
    with pytest.raises(LFMError, match="does not fit"):  # a ResNet-18 file into a ResNet-34
        create_model("resnet34", 1000, (3, 64, 64), weights=tmp_path / "extra.pth")


def test_wrong_shape_is_named(tv_file, tmp_path):
    _, sd = tv_file
    torch.save(dict(sd, **{"layer2.0.conv2.weight": torch.zeros(3, 3)}), tmp_path / "bad.pth")
    with pytest.raises(LFMError, match=r"layer2\.0\.conv2\.weight"):
        load_torchvision_resnet(create_model("resnet18", 10, (3, 8, 8)), tmp_path / "bad.pth")


def test_missing_file_and_non_state_dicts(tmp_path):
    model = create_model("resnet18", 10, (3, 8, 8))
    with pytest.raises(LFMError, match="does not exist"):
        load_torchvision_resnet(model, tmp_path / "nope.pth")
    for i, obj in enumerate(([1, 2, 3], {"a": 1}, torch.zeros(3), {})):
        torch.save(obj, tmp_path / f"junk{i}.pth")
        with pytest.raises(LFMError, match="not a state dict"):
            load_torchvision_resnet(model, tmp_path / f"junk{i}.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(LFMError, match="not a plain tensor state dict"):
        load_torchvision_resnet(model, tmp_path / "text.pth")


class _Evil:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_side_effect(tmp_path):
    model = create_model("resnet18", 10, (3, 8, 8))
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": _Evil(marker)}, tmp_path / "evil.pth")  # zip format
    with open(tmp_path / "evil.pkl", "wb") as f:  # legacy, bare pickle
        pickle.dump(_Evil(marker), f)
    for name in ("evil.pth", "evil.pkl"):
        with pytest.raises(LFMError, match="weights_only"):
            load_torchvision_resnet(model, tmp_path / name)
        assert not marker.exists()
