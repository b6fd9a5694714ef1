"""Training augmentation: the simulation of other acquisitions changes how an image looks, not where its anatomy
is; it is drawn from the step's generator (reproducible, shared by ranks), and it is off in the paper's
configuration, where training draws exactly what it drew before."""
import numpy as np
import pytest
import torch

from ra_engine.network.config import ArchConfig
from ra_engine.training.augment import draw_acquisition, draw_params, simulate_acquisition
from ra_engine.training.config import AcquisitionConfig, AugmentConfig, TrainConfig
from ra_engine.training.trainer import Trainer, step_generator


def disc_images(n=6, size=32) -> torch.Tensor:
    """Bright discs with an inner structure on a black background: (n, 1, size, size) in [0, 1]."""
    yy, xx = np.mgrid[:size, :size] - size / 2 + 0.5
    r = np.hypot(yy, xx)
    image = np.where(r < size * 0.35, 0.6 + 0.3 * np.cos(r / 2), 0.0) * (r > size * 0.08)
    return torch.tensor(np.repeat(image[None, None], n, 0), dtype=torch.float32)


def test_each_effect_keeps_the_range_and_the_background():
    x = disc_images()
    config = AcquisitionConfig(p=1.0)
    params = draw_acquisition(len(x), x.shape[-2:], config, torch.Generator().manual_seed(0))
    no_blur = type(params)(torch.zeros_like(params.blur_sigma), params.blur_axis, params.bias, params.gamma,
                           params.noise_sigma, params.noise)
    y = simulate_acquisition(x, no_blur)
    assert y.min() >= 0 and y.max() <= 1
    assert torch.equal(y[x == 0], torch.zeros_like(y[x == 0])), "without blur the background stays black"
    assert not torch.allclose(y, x), "bias, gamma and noise change the intensities"
    blurred = simulate_acquisition(x, params)
    inside = x > 0.05
    assert (blurred[inside] > 0).float().mean() > 0.99, "the anatomy stays where it was"


def test_blur_acts_along_one_axis_only():
    x = disc_images(2)
    base = draw_acquisition(2, x.shape[-2:], AcquisitionConfig(p=1.0, bias=0, gamma=0, noise=0),
                            torch.Generator().manual_seed(1))
    params = type(base)(torch.tensor([1.5, 1.5], dtype=torch.float64), torch.tensor([0, 1]), base.bias, base.gamma,
                        base.noise_sigma, base.noise)
    y = simulate_acquisition(x, params)
    along_y, along_x = y[0, 0], y[1, 0]
    assert torch.allclose(along_y, along_x.T, atol=1e-5), "the two axes mirror each other on a symmetric image"
    column_change = (along_y - x[0, 0]).abs().sum(0)
    assert float(column_change.sum()) > 0 and not torch.allclose(along_y, x[0, 0])


def test_the_draw_is_reproducible_and_off_by_default():
    config = AcquisitionConfig()
    a = draw_acquisition(4, (8, 8), config, torch.Generator().manual_seed(5))
    b = draw_acquisition(4, (8, 8), config, torch.Generator().manual_seed(5))
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("blur_sigma", "bias", "gamma", "noise"))
    assert AugmentConfig().acquisition is None and TrainConfig().augment.acquisition is None
    assert AugmentConfig.from_dict(AugmentConfig(acquisition=config).to_dict()).acquisition == config
    with pytest.raises(ValueError, match="non-negative"):
        AcquisitionConfig(noise=-1)


def test_training_with_it_draws_the_paper_configurations_numbers_first(tmp_path):
    """The affine's parameters and everything drawn before them are the same with and without the simulation."""
    images = np.random.default_rng(0).random((6, 16, 16), dtype=np.float32)
    arch = ArchConfig(image_size=16, latent_dim=4, widths=(4, 8))
    plain = Trainer(images[:4], images[4:], arch, TrainConfig(batch_size=2, checkpoint_every=0), tmp_path / "a",
                    torch.device("cpu"))
    acquired = Trainer(images[:4], images[4:], arch, TrainConfig(
        batch_size=2, checkpoint_every=0, augment=AugmentConfig(acquisition=AcquisitionConfig(p=1.0))),
        tmp_path / "b", torch.device("cpu"))
    perm = plain._epoch_permutation(0)
    x_plain = plain._batch(perm, 0, step_generator(2109, 0))
    generator = step_generator(2109, 0)
    x_acquired = acquired._batch(perm, 0, generator)
    replay = step_generator(2109, 0)
    draw_params(2, acquired.config.augment, replay)
    params = draw_acquisition(2, (16, 16), acquired.config.augment.acquisition, replay)
    assert torch.equal(x_acquired, simulate_acquisition(x_plain, params))
    assert torch.equal(generator.get_state(), replay.get_state())
