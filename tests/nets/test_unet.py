"""The networks of `model.arch`: MONAI's UNet (default) with an optional time embedding, and the double-conv
U-Net that runs made before `model.arch` existed keep."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet as MonaiBody

from superdiffusion.config import DEFAULTS, LEGACY_DEFAULTS, complete
from superdiffusion.nets.unet import MonaiUNet, SSL4MISUNet, UNet, build_unet

CHANNELS = [16, 32, 64, 128, 256]


def test_monai_arch_is_monais_unet_with_the_same_parameters_and_outputs():
    torch.manual_seed(0)
    ours = MonaiUNet(dims=2, in_channels=1, out_channels=2, channels=CHANNELS, norm="batch")
    plain = MonaiBody(spatial_dims=2, in_channels=1, out_channels=2, channels=CHANNELS, strides=(2, 2, 2, 2),
                      num_res_units=0, norm="batch")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in plain.parameters())  # 0.66 M
    plain.load_state_dict({k.replace("first.", "model.0.").replace("inner.", "model.1.").replace("last.", "model.2."): v
                           for k, v in ours.state_dict().items()})
    x = torch.randn(2, 1, 32, 32)
    ours.eval(), plain.eval()
    assert torch.allclose(ours(x), plain(x), atol=1e-6)
    assert ours.divisor == 16


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dims,shape", [(2, (16, 24)), (3, (16, 16, 8))])
def test_time_embedding_conditions_the_output_and_is_required(dims, shape):
    torch.manual_seed(0)
    net = MonaiUNet(dims=dims, in_channels=3, out_channels=2, channels=[4, 8, 16], norm="instance",
                    time_embedding="stem").eval()
    x = torch.randn(2, 3, *shape)
    a, b = net(x, torch.tensor([0, 0])), net(x, torch.tensor([900, 900]))
    assert a.shape == (2, 2, *shape) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="time-conditioned"):
        net(x)
    scripted = torch.jit.script(net)  # export scripts it as it is
    assert torch.allclose(scripted(x, torch.tensor([0, 0])), a, atol=1e-6)


def test_block_time_embedding_and_unknown_arch_are_refused():
    with pytest.raises(ValueError, match="stem only"):
        MonaiUNet(dims=2, in_channels=1, out_channels=2, time_embedding="blocks")
    with pytest.raises(ValueError, match="model.arch"):
        build_unet({**DEFAULTS["model"], "arch": "resnet"}, dims=2, in_channels=1, out_channels=2)


def test_dropout_in_every_convolution_or_per_encoder_level():
    net = build_unet({**DEFAULTS["model"], "dropout": 0.3}, dims=2, in_channels=1, out_channels=2)
    drops = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 2 * 4 - 2 and all(p == 0.3 for p in drops)  # every convolution but the output one
    rates = [0.05, 0.1, 0.2, 0.3, 0.5]  # SSL4MIS's 2D U-Net: encoder only, deeper levels more
    net = build_unet({**DEFAULTS["model"], "channels": CHANNELS, "dropout": rates}, dims=2, in_channels=1,
                     out_channels=2)
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)] == rates + [0.0] * 3
    with pytest.raises(ValueError, match="one rate per level"):
        build_unet({**DEFAULTS["model"], "dropout": [0.1, 0.2]}, dims=2, in_channels=1, out_channels=2)


def test_default_is_monai_and_configs_from_before_the_key_keep_double_conv():
    assert isinstance(build_unet(DEFAULTS["model"], dims=2, in_channels=1, out_channels=2), MonaiUNet)
    old = complete({"model": {"channels": [4, 8]}}, where="old run")
    assert old["model"]["arch"] == LEGACY_DEFAULTS["model.arch"] == "double-conv"
    assert isinstance(build_unet(old["model"], dims=2, in_channels=1, out_channels=2), UNet)
    assert complete({}, where="older run")["model"]["arch"] == "double-conv"
    assert complete({"model": {"arch": "monai"}}, where="new run")["model"]["arch"] == "monai"


def test_monai_arch_costs_a_fraction_of_double_conv_per_pixel():
    """FLOPs, not time (speed lives in bench-speed): multiply-adds of every convolution at 96x96."""
    def macs(net: torch.nn.Module) -> int:
        total = 0

        def hook(module, inputs, output):
            nonlocal total
            k = module.weight[0].numel() if isinstance(module, torch.nn.Conv2d) else module.weight[:, 0].numel()
            total += output.numel() * k

        handles = [m.register_forward_hook(hook) for m in net.modules()
                   if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
        net(torch.randn(1, 1, 96, 96))
        for h in handles:
            h.remove()
        return total

    light = macs(MonaiUNet(dims=2, in_channels=1, out_channels=2, channels=CHANNELS))
    heavy = macs(UNet(dims=2, in_channels=1, out_channels=2, channels=[16, 32, 64, 128]))
    assert light * 3 < heavy


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_ssl4mis_arch_is_their_unet_layer_for_layer():
    """SSL4MIS's code/networks/unet.py `UNet`: per level conv-BN-LeakyReLU, dropout, conv-BN-LeakyReLU; max-pooling
    down; 1x1 conv, bilinear (align_corners) upsampling and [skip, up] in the decoder, no dropout there; 3x3 head."""
    rates = [0.05, 0.1, 0.2, 0.3, 0.5]
    net = build_unet({**DEFAULTS["model"], "arch": "ssl4mis", "channels": CHANNELS, "norm": "batch",
                      "dropout": rates}, dims=2, in_channels=1, out_channels=4)
    assert isinstance(net, SSL4MISUNet) and net.divisor == 16
    kinds = [type(m) for m in net.modules()]
    assert kinds.count(torch.nn.MaxPool2d) == 4 and kinds.count(torch.nn.BatchNorm2d) == 2 * 9
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)] == rates + [0.0] * 4
    ups = [m for m in net.modules() if isinstance(m, torch.nn.Upsample)]
    assert len(ups) == 4 and all(u.mode == "bilinear" and u.align_corners for u in ups)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs].count((1, 1)) == 4 and convs[-1].kernel_size == (3, 3)
    assert [(c.in_channels, c.out_channels) for c in convs if c.kernel_size == (3, 3)][:10] == [
        (1, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256)]
    features = [torch.randn(2, 1, 96, 96)]
    for level in net.encoder:
        features.append(level(features[-1]))
    assert [f.shape[-1] for f in features[1:]] == [96, 48, 24, 12, 6]
    net.eval()
    x = torch.randn(2, 1, 96, 96)
    assert torch.equal(torch.jit.script(net)(x), net(x)) and net(x).shape == (2, 4, 96, 96)  # export scripts it
    with pytest.raises(ValueError, match="timestep"):
        build_unet({**DEFAULTS["model"], "arch": "ssl4mis"}, dims=2, in_channels=3, out_channels=2,
                   time_embedding="stem")


@pytest.mark.parametrize("arch,dims", [("monai", 2), ("monai", 3), ("ssl4mis", 2)])
def test_encode_then_decode_is_forward(arch, dims):
    """UniMatch decodes perturbed encoder features: encode/decode must split the net exactly."""
    torch.manual_seed(0)
    net = build_unet({"arch": arch, "channels": [4, 8, 16], "norm": "instance", "dropout": 0.0,
                      "time_embedding": "stem"}, dims=dims, in_channels=1, out_channels=2).eval()
    x = torch.randn(2, 1, *[16] * dims)
    features = net.encode(x)
    assert [f.shape[1] for f in features] == [4, 8, 16]
    assert torch.equal(net.decode(features), net(x))
