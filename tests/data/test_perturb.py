import pytest
import torch

from superdiffusion.data.perturb import PhotometricView


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
