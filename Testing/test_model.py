"""The RA network: the paper configuration's size and embeddings, other sizes, deterministic reconstruction."""
import pytest
import torch

from ra_engine.network.config import ArchConfig
from ra_engine.network.model import ResidualBlock, ReversedAutoEncoder, set_batchnorm_mode


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_configuration_has_the_spec_parameter_count():
    model = ReversedAutoEncoder()
    assert model.config == ArchConfig(in_channels=1, image_size=128, latent_dim=128, widths=(64, 128, 256, 512, 512))
    assert n_params(model) == 29_955_073
    # The two 512->512 transition blocks (encoder's last stage, decoder's second block) carry 1x1 skip convs.
    skips = [m.skip for m in model.modules() if isinstance(m, ResidualBlock) and isinstance(m.skip, torch.nn.Conv2d)]
    same_width = [s for s in skips if s.in_channels == s.out_channels == 512]
    assert len(skips) == 8 and len(same_width) == 2
    assert n_params(model) - sum(n_params(s) for s in same_width) == 29_430_785


def test_embeddings_have_the_five_spec_shapes():
    model = ReversedAutoEncoder().eval()
    with torch.no_grad():
        mu, logvar, embeddings = model.encode(torch.rand(2, 1, 128, 128))
        out = model.decode(mu)
    assert mu.shape == logvar.shape == (2, 128)
    assert [tuple(e.shape[1:]) for e in embeddings] == [(64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8),
                                                        (512, 4, 4)]
    assert out.shape == (2, 1, 128, 128) and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("size,widths,channels", [(64, (16, 32, 64), 1), (256, (8, 8, 16, 16, 32, 32), 3)])
def test_image_size_channels_and_widths_are_arguments(size, widths, channels):
    arch = ArchConfig(in_channels=channels, image_size=size, latent_dim=16, widths=widths)
    model = ReversedAutoEncoder(arch).eval()
    with torch.no_grad():
        mu, _, embeddings = model.encode(torch.rand(1, channels, size, size))
        assert model.decode(mu).shape == (1, channels, size, size)
    assert embeddings[-1].shape[-1] == size // 2 ** len(widths) == arch.bottleneck
    assert len(embeddings) == len(widths)


def test_an_image_size_that_does_not_halve_evenly_is_refused():
    with pytest.raises(ValueError, match="not divisible"):
        ArchConfig(image_size=100)


def test_arch_config_round_trips_through_json_form():
    arch = ArchConfig(image_size=64, latent_dim=32, widths=(16, 32, 64, 64))
    assert ArchConfig.from_dict(arch.to_dict()) == arch


def test_reconstruction_is_deterministic():
    torch.manual_seed(0)
    model = ReversedAutoEncoder(ArchConfig(image_size=32, latent_dim=8, widths=(8, 16))).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model.reconstruct(x), model.reconstruct(x))


def test_reference_batchnorm_mode_keeps_running_statistics_and_uses_them():
    model = ReversedAutoEncoder(ArchConfig(image_size=32, latent_dim=8, widths=(8, 16)))
    model.train()
    set_batchnorm_mode(model, "reference")
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.encode(torch.rand(4, 1, 32, 32) * 5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.train()
    set_batchnorm_mode(model, "batch")
    model.encode(torch.rand(4, 1, 32, 32) * 5)
    assert any(not torch.equal(before[k], model.state_dict()[k]) for k in before)
    with pytest.raises(ValueError, match="BatchNorm mode"):
        set_batchnorm_mode(model, "frozen")


def test_the_inference_copy_reconstructs_as_the_network_does():
    """BatchNorm folded into the convolutions and channels-last weights change nothing but float rounding."""
    from ra_engine.network.model import inference_copy

    torch.manual_seed(1)
    model = ReversedAutoEncoder(ArchConfig(image_size=64, latent_dim=16, widths=(8, 16, 32, 32)))
    for m in model.modules():  # non-trivial statistics and affine parameters, so that folding has work to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    fast = inference_copy(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.rand(5, 1, 64, 64)
    with torch.inference_mode():
        expected = model.reconstruct(x)
        got = fast.reconstruct(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()), "the original is left as it was"
