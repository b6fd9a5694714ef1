"""Each loss term against an independent, straightforward computation, and the two-step iteration's freezing."""
import copy

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ra_engine.training.config import LossWeights
from ra_engine.training.losses import decoder_step_loss, encoder_step_loss
from ra_engine.network.config import ArchConfig
from ra_engine.network.model import ReversedAutoEncoder, set_batchnorm_mode
from ra_engine.training.trainer import set_requires_grad, train_iteration

W = LossWeights()


@pytest.fixture
def setup():
    torch.manual_seed(3)
    model = ReversedAutoEncoder(ArchConfig(image_size=16, latent_dim=4, widths=(4, 8))).double()
    model.train()
    set_batchnorm_mode(model, "reference")
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    z_p = torch.randn(3, 4, dtype=torch.float64)
    eps = [torch.randn(3, 4, dtype=torch.float64) for _ in range(5)]
    return model, x, z_p, eps


def replay(noises):
    """A noise source that hands out the given tensors in order."""
    queue = list(noises)
    return lambda shape: queue.pop(0)


# -- an independent, loop-by-sample reading of docs/METHOD.md ----------------------------------------------------------
def kl(mu, logvar):
    return kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(1)


def sse(a, b):
    return torch.stack([((a[i] - b[i]) ** 2).sum() for i in range(len(a))])


def cos_loss(fa, fb):
    out = []
    for i in range(len(fa)):
        u, v = fa[i].reshape(-1), fb[i].reshape(-1)
        out.append(1 - (u * v).sum() / (u.norm() * v.norm()))
    return torch.stack(out).mean()


def reference_encoder_loss(model, x, z_p, eps_z, eps_r, eps_f):
    s = 1 / 256
    mu, logvar, fx = model.encoder(x)
    x_r = model.decoder(mu + (0.5 * logvar).exp() * eps_z)
    x_f = model.decoder(z_p)
    terms = {"enc_rec": sse(x, x_r).mean(), "enc_kl": kl(mu, logvar).mean()}
    for name, x_g, e in (("exp_elbo_rec", x_r.detach(), eps_r), ("exp_elbo_fake", x_f.detach(), eps_f)):
        m, lv, f = model.encoder(x_g)
        rec = model.decoder(m + (0.5 * lv).exp() * e)
        terms[name] = torch.stack([torch.exp(-2 * s * (0.5 * sse(x_g, rec)[i] + 128 * kl(m, lv)[i]))
                                   for i in range(len(x))]).mean()
        if name == "exp_elbo_rec":
            fr = f
    terms["embedding"] = sum(0.5 * ((a - b) ** 2).mean() + cos_loss(a, b) for a, b in zip(fx, fr))
    terms["loss_e"] = (s * (0.5 * terms["enc_rec"] + 1.0 * terms["enc_kl"])
                       + 0.25 * (terms["exp_elbo_rec"] + terms["exp_elbo_fake"]) + 0.005 * terms["embedding"])
    return terms


def reference_decoder_loss(model, x, z, z_p, eps_r, eps_f):
    s = 1 / 256
    x_r, x_f = model.decoder(z.detach()), model.decoder(z_p)
    mu_r, lv_r, _ = model.encoder(x_r)
    mu_f, lv_f, _ = model.encoder(x_f)
    rr = model.decoder((mu_r + (0.5 * lv_r).exp() * eps_r).detach())
    rf = model.decoder((mu_f + (0.5 * lv_f).exp() * eps_f).detach())
    terms = {"dec_rec": sse(x, x_r).mean(), "dec_kl_rec": kl(mu_r, lv_r).mean(), "dec_kl_fake": kl(mu_f, lv_f).mean(),
             "dec_rec_rec": sse(x_r.detach(), rr).mean(), "dec_rec_fake": sse(x_f.detach(), rf).mean()}
    terms["loss_d"] = s * (0.5 * terms["dec_rec"] + 0.5 * 1.0 * (terms["dec_kl_rec"] + terms["dec_kl_fake"])
                           + 0.5 * 1e-8 * 0.5 * (terms["dec_rec_rec"] + terms["dec_rec_fake"]))
    return terms


def grads(module):
    return [p.grad.clone() if p.grad is not None else None for p in module.parameters()]


# -- tests ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split_backward", [False, True])
def test_encoder_step_terms_and_gradients_match_the_straightforward_computation(setup, split_backward):
    model, x, z_p, (eps_z, eps_r, eps_f, _, _) = setup
    twin = copy.deepcopy(model)
    set_requires_grad(model.decoder, False)
    set_requires_grad(twin.decoder, False)

    # encoder_step_loss draws eps for the fake re-encoding first, then z, then the re-encoding of x_r.
    backward = (lambda loss: loss.backward()) if split_backward else None
    loss, terms, z = encoder_step_loss(model.encoder, model.decoder, x, z_p, W, replay([eps_f, eps_z, eps_r]),
                                       backward)
    if not split_backward:
        loss.backward()
    expected = reference_encoder_loss(twin, x, z_p, eps_z, eps_r, eps_f)
    expected["loss_e"].backward()

    assert set(terms) == set(expected)
    for name in expected:
        torch.testing.assert_close(terms[name].detach(), expected[name].detach(), rtol=1e-10, atol=1e-12, msg=name)
    mu, logvar, _ = twin.encoder(x)
    torch.testing.assert_close(z, (mu + (0.5 * logvar).exp() * eps_z).detach())
    for g, g_ref in zip(grads(model.encoder), grads(twin.encoder)):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
        assert g.abs().sum() > 0
    assert all(p.grad is None for p in model.decoder.parameters()), "a frozen decoder computes no weight gradients"


@pytest.mark.parametrize("split_backward", [False, True])
def test_decoder_step_terms_and_gradients_match_the_straightforward_computation(setup, split_backward):
    model, x, z_p, (eps_z, _, _, eps_r, eps_f) = setup
    twin = copy.deepcopy(model)
    z = torch.randn(3, 4, dtype=torch.float64)
    set_requires_grad(model.encoder, False)
    set_requires_grad(twin.encoder, False)

    backward = (lambda loss: loss.backward()) if split_backward else None
    loss, terms = decoder_step_loss(model.encoder, model.decoder, x, z, z_p, W, replay([eps_f, eps_r]), backward)
    if not split_backward:
        loss.backward()
    expected = reference_decoder_loss(twin, x, z, z_p, eps_r, eps_f)
    expected["loss_d"].backward()

    for name in expected:
        torch.testing.assert_close(terms[name].detach(), expected[name].detach(), rtol=1e-10, atol=1e-12, msg=name)
    for g, g_ref in zip(grads(model.decoder), grads(twin.decoder)):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-15)
    assert all(p.grad is None for p in model.encoder.parameters()), "a frozen encoder computes no weight gradients"


def test_decoder_kl_gradients_pass_through_the_frozen_encoder(setup):
    """Without gradients through E, the decoder step's KL terms would not reach the decoder."""
    model, x, z_p, _ = setup
    set_requires_grad(model.encoder, False)
    z = torch.randn(3, 4, dtype=torch.float64)
    _, terms = decoder_step_loss(model.encoder, model.decoder, x, z, z_p, W)
    (terms["dec_kl_rec"] + terms["dec_kl_fake"]).backward()
    assert sum(p.grad.abs().sum() for p in model.decoder.parameters() if p.grad is not None) > 0


def test_each_step_updates_only_its_own_half(setup):
    model, x, z_p, _ = setup
    opt_e = torch.optim.Adam(model.encoder.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(model.decoder.parameters(), lr=1e-3)
    snap = lambda m: [p.detach().clone() for p in m.parameters()]
    seen = {}
    enc0, dec0 = snap(model.encoder), snap(model.decoder)
    opt_e.register_step_post_hook(lambda *_: seen.update(after_e=(snap(model.encoder), snap(model.decoder))))
    opt_d.register_step_pre_hook(lambda *_: seen.update(before_d=snap(model.encoder)))
    gen = torch.Generator().manual_seed(0)
    train_iteration(model, opt_e, opt_d, x, z_p, W,
                    lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64))
    enc_after_e, dec_after_e = seen["after_e"]
    assert all(torch.equal(a, b) for a, b in zip(dec0, dec_after_e)), "the encoder step changed the decoder"
    assert any(not torch.equal(a, b) for a, b in zip(enc0, enc_after_e)), "the encoder step did not train"
    assert all(torch.equal(a, b) for a, b in zip(seen["before_d"], snap(model.encoder))), \
        "the decoder step changed the encoder"
    assert any(not torch.equal(a, b) for a, b in zip(dec_after_e, snap(model.decoder))), "the decoder did not train"
    assert all(p.requires_grad for p in model.parameters())
