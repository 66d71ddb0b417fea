import pytest
import torch

from superdiffusion.data.perturb import PhotometricView, cutmix, cutmix_boxes


@pytest.mark.parametrize("shape", [(4, 1, 24, 24), (2, 1, 6, 12, 12)])
def test_photometric_view_is_seeded_and_perturbs_each_image(shape):
    x = torch.rand(shape) * 2 - 1
    view = PhotometricView(prob=1.0)
    a = view(x, torch.Generator().manual_seed(1))
    b = view(x, torch.Generator().manual_seed(1))
    c = view(x, torch.Generator().manual_seed(2))
    assert type(a) is torch.Tensor and a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, b)  # the caller's generator fixes every draw: resumed runs repeat
    assert not torch.allclose(a, c)
    change = (a - x).flatten(1).abs().mean(1)
    assert bool((change > 0.01).all())  # every image of the batch is perturbed
    assert not torch.allclose(change[0], change[1])  # ...each by its own draw


def test_photometric_view_keeps_channels_last():
    x = torch.rand(2, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    out = PhotometricView()(x, torch.Generator().manual_seed(0))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_photometric_view_never_moves_structures():
    """Intensities only: an image's brightest region stays where it was, so a clean-view pseudo-label fits."""
    x = -torch.ones(8, 1, 32, 32)
    x[:, :, 8:16, 8:16] = 1.0
    out = PhotometricView(prob=1.0)(x, torch.Generator().manual_seed(0))
    inside, outside = out[:, :, 8:16, 8:16].mean((1, 2, 3)), out[:, :, 20:, 20:].mean((1, 2, 3))
    assert bool((inside > outside + 0.5).all())


@pytest.mark.parametrize("shape", [(64, 1, 32, 32), (32, 1, 8, 16, 16)])
def test_cutmix_boxes_are_seeded_boxes_of_the_drawn_area(shape):
    x = torch.zeros(shape)
    boxes = cutmix_boxes(x, torch.Generator().manual_seed(0), prob=0.5, area=(0.05, 0.3))
    torch.testing.assert_close(boxes, cutmix_boxes(x, torch.Generator().manual_seed(0), prob=0.5, area=(0.05, 0.3)))
    assert boxes.shape == (shape[0], *shape[2:]) and boxes.dtype == torch.bool
    fraction = boxes.flatten(1).float().mean(1)
    drawn = fraction > 0
    assert 0.2 < drawn.float().mean() < 0.8  # about half the images take a box
    assert bool((fraction[drawn] > 0.02).all() and (fraction[drawn] < 0.45).all())  # the area, up to rounding
    for box in boxes[drawn]:  # one solid box: its extent along every axis is filled
        extent = [box.any(dim=tuple(d for d in range(box.ndim) if d != axis)).nonzero().flatten()
                  for axis in range(box.ndim)]
        assert all(len(e) == int(e[-1] - e[0]) + 1 for e in extent)
        assert int(box.sum()) == int(torch.tensor([len(e) for e in extent]).prod())


def test_cutmix_mixes_images_and_label_maps_by_the_same_boxes():
    """Image i takes image i - 1's pixels inside its box: a label map mixed by the same boxes stays its target."""
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 12, 12)
    labels = torch.arange(4).view(4, 1, 1).expand(4, 12, 12)
    boxes = cutmix_boxes(x, torch.Generator().manual_seed(3), prob=1.0)
    mixed_x, mixed_y = cutmix(x, boxes), cutmix(labels, boxes)
    torch.testing.assert_close(mixed_x[:, 0].long(), mixed_y)
    for i in range(4):
        assert bool((mixed_y[i][boxes[i]] == (i - 1) % 4).all() and (mixed_y[i][~boxes[i]] == i).all())


def test_rgb_hsv_round_trip():
    from superdiffusion.data.perturb import hsv_to_rgb, rgb_to_hsv

    x = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(rgb_to_hsv(red).flatten(), torch.tensor([0.0, 1.0, 1.0]))


@pytest.mark.parametrize("channels", [1, 3])
def test_colour_jitter_view_is_seeded_and_stays_in_range(channels):
    from superdiffusion.data.perturb import ColourJitterView

    x = torch.rand(6, channels, 16, 16) * 2 - 1
    view = ColourJitterView(prob=1.0, blur=0.0)
    a, b = view(x, torch.Generator().manual_seed(1)), view(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert a.min() >= x.min() - 1e-6 and a.max() <= x.max() + 1e-6  # clamped to each image's own range
    assert bool(((a - x).flatten(1).abs().mean(1) > 1e-3).all())  # every image jittered
    grey = x[:, :1].expand(-1, 3, -1, -1).contiguous()  # on a grey RGB image saturation and hue change nothing
    saturation_hue = ColourJitterView(prob=1.0, brightness=0.0, contrast=0.0, blur=0.0)
    torch.testing.assert_close(saturation_hue(grey, torch.Generator().manual_seed(0)), grey, atol=1e-5, rtol=0)
