"""The losses of RA's two-step iteration (docs/METHOD.md, "Training"), each term a named quantity, and the one-step
losses of the plain VAE and auto-encoder baselines (the same reconstruction and KL terms, nothing introspective).

Notation as in docs/METHOD.md: s = 1/(H*W); SSE_i is the sum of squared errors over sample i's pixels; KL_i is
KL(q(z|x_i) || N(0, I)) summed over z; SSE and KL without an index are batch means. Images are (N, C, H, W) in [0, 1].
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ra_engine.network.model import Noise, reparameterize
from ra_engine.training.config import LossWeights

Encode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]
Decode = Callable[[torch.Tensor], torch.Tensor]


def sse_per_sample(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSE_i: (N,) sums of squared differences over each sample's channels and pixels."""
    return (x - y).pow(2).flatten(1).sum(1)


def kl_per_sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL_i: (N,) KL divergence of N(mu, exp(logvar)) from N(0, I), summed over the latent dimensions."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)


def exp_elbo(x_prime: torch.Tensor, x_prime_rec: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             s: float, w: LossWeights) -> torch.Tensor:
    """expelbo(x') = mean_i exp(-2 s (beta_rec SSE_i(x', D(E(x'))) + beta_neg KL_i(x'))), per sample, then averaged."""
    elbo_i = w.beta_rec * sse_per_sample(x_prime, x_prime_rec) + w.beta_neg * kl_per_sample(mu, logvar)
    return torch.exp(-2.0 * s * elbo_i).mean()


def embedding_loss(features_x: list[torch.Tensor], features_r: list[torch.Tensor]) -> torch.Tensor:
    """L_emb = sum over scales of 0.5 MSE(F_l(x), F_l(x_r)) + mean over the batch of (1 - cos(flat F_l(x), flat F_l(x_r)))."""
    total = features_x[0].new_zeros(())
    if len(features_x) != len(features_r):
        raise ValueError(f"{len(features_x)} embeddings of x but {len(features_r)} of x_r")
    for fx, fr in zip(features_x, features_r):
        cosine = F.cosine_similarity(fx.flatten(1), fr.flatten(1), dim=1)
        total = total + 0.5 * F.mse_loss(fx, fr) + (1.0 - cosine).mean()
    return total


Backward = Callable[[torch.Tensor], None]


def _backpropagate_now(part: torch.Tensor, backward: Backward | None) -> torch.Tensor:
    """With `backward`, backpropagates one part of a step's loss at once (freeing its graph) and returns its value
    detached; without, returns the part unchanged for the caller's single backward."""
    if backward is None:
        return part
    backward(part)
    return part.detach()


def _introspect(encode: Encode, decode: Decode, x_gen: torch.Tensor, noise: Noise | None, detach_z: bool):
    """Re-encodes a generated image stochastically and decodes it again: (mu, logvar, D(E(x_gen)))."""
    mu, logvar, features = encode(x_gen)
    z = reparameterize(mu, logvar, noise)
    return mu, logvar, features, decode(z.detach() if detach_z else z)


def encoder_step_loss(encode: Encode, decode: Decode, x: torch.Tensor, z_p: torch.Tensor, w: LossWeights,
                      noise: Noise | None = None, backward: Backward | None = None
                      ) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """L_E (the decoder is frozen by the caller; gradients pass through it into the encoder).

    `encode`/`decode` are the network's two halves (plain modules, or a DistributedDataParallel wrapper of the half
    being trained); `noise` draws the eps of every reparameterisation. L_E is the sum of two parts with disjoint
    graphs, the fake part 0.25*expelbo(x_f) and the rest; `backward`, when given, is called on each part as soon as it
    is formed, so only one part's graph is held at a time (the gradients add up to those of L_E).

    Returns (L_E, its named terms as scalar tensors, z) where z = mu + sigma*eps is reused by the decoder step.
    x_r.detach() is encoded once and serves both its exp-ELBO term and the reversed embedding loss.
    """
    s = 1.0 / (x.shape[-2] * x.shape[-1])
    x_f = decode(z_p).detach()
    mu_f, logvar_f, _, rec_f = _introspect(encode, decode, x_f, noise, detach_z=False)
    exp_elbo_fake = exp_elbo(x_f, rec_f, mu_f, logvar_f, s, w)
    fake_part = w.exp_elbo * exp_elbo_fake
    fake_part = _backpropagate_now(fake_part, backward)

    mu, logvar, features_x = encode(x)
    z = reparameterize(mu, logvar, noise)
    x_r = decode(z)
    rec = sse_per_sample(x, x_r).mean()
    kl = kl_per_sample(mu, logvar).mean()
    elbo_real = s * (w.beta_rec * rec + w.beta_kl * kl)
    x_r_in = x_r.detach()
    mu_r, logvar_r, features_r, rec_r = _introspect(encode, decode, x_r_in, noise, detach_z=False)
    exp_elbo_rec = exp_elbo(x_r_in, rec_r, mu_r, logvar_r, s, w)
    emb = embedding_loss(features_x, features_r)
    real_part = elbo_real + w.exp_elbo * exp_elbo_rec + w.embedding * emb
    real_part = _backpropagate_now(real_part, backward)

    loss = real_part + fake_part
    terms = {"enc_rec": rec, "enc_kl": kl, "exp_elbo_rec": exp_elbo_rec, "exp_elbo_fake": exp_elbo_fake,
             "embedding": emb, "loss_e": loss}
    return loss, terms, z.detach()


def decoder_step_loss(encode: Encode, decode: Decode, x: torch.Tensor, z: torch.Tensor, z_p: torch.Tensor,
                      w: LossWeights, noise: Noise | None = None, backward: Backward | None = None
                      ) -> tuple[torch.Tensor, dict]:
    """L_D (the encoder is frozen by the caller; gradients pass through it into the decoder's KL terms).

    Exactly three things are detached: z (given detached), the re-encoded z before it is decoded again, and x_r, x_f
    as targets of the gamma_r terms. As in `encoder_step_loss`, `backward` is called on the fake part and then on
    the real part (the terms of x_f and of x_r have disjoint graphs).
    """
    s = 1.0 / (x.shape[-2] * x.shape[-1])
    x_f = decode(z_p)
    mu_f, logvar_f, _, rec_f = _introspect(encode, decode, x_f, noise, detach_z=True)
    kl_fake = kl_per_sample(mu_f, logvar_f).mean()
    rec_fake = sse_per_sample(x_f.detach(), rec_f).mean()
    fake_part = s * (0.5 * w.beta_kl * kl_fake + 0.5 * w.gamma_r * w.beta_rec * rec_fake)
    fake_part = _backpropagate_now(fake_part, backward)

    x_r = decode(z)
    mu_r, logvar_r, _, rec_r = _introspect(encode, decode, x_r, noise, detach_z=True)
    rec = sse_per_sample(x, x_r).mean()
    kl_rec = kl_per_sample(mu_r, logvar_r).mean()
    rec_rec = sse_per_sample(x_r.detach(), rec_r).mean()
    real_part = s * (w.beta_rec * rec + 0.5 * w.beta_kl * kl_rec + 0.5 * w.gamma_r * w.beta_rec * rec_rec)
    real_part = _backpropagate_now(real_part, backward)

    loss = real_part + fake_part
    terms = {"dec_rec": rec, "dec_kl_rec": kl_rec, "dec_kl_fake": kl_fake, "dec_rec_rec": rec_rec,
             "dec_rec_fake": rec_fake, "loss_d": loss}
    return loss, terms


def vae_step_loss(encode: Encode, decode: Decode, x: torch.Tensor, w: LossWeights, noise: Noise | None = None
                  ) -> tuple[torch.Tensor, dict]:
    """L_VAE = s*(beta_rec*SSE(x, x_r) + beta_kl*KL(x)) with x_r = D(z), z = mu + sigma*eps: the ELBO term of L_E
    alone, trained through both halves at once (the plain VAE baseline)."""
    s = 1.0 / (x.shape[-2] * x.shape[-1])
    mu, logvar, _ = encode(x)
    x_r = decode(reparameterize(mu, logvar, noise))
    rec = sse_per_sample(x, x_r).mean()
    kl = kl_per_sample(mu, logvar).mean()
    loss = s * (w.beta_rec * rec + w.beta_kl * kl)
    return loss, {"rec": rec, "kl": kl, "loss": loss}


def ae_step_loss(encode: Encode, decode: Decode, x: torch.Tensor, w: LossWeights) -> tuple[torch.Tensor, dict]:
    """L_AE = s*beta_rec*SSE(x, D(mu)): the plain auto-encoder baseline, deterministic (no sampling, no KL; the
    encoder's logvar output is unused)."""
    s = 1.0 / (x.shape[-2] * x.shape[-1])
    mu, _, _ = encode(x)
    rec = sse_per_sample(x, decode(mu)).mean()
    loss = s * w.beta_rec * rec
    return loss, {"rec": rec, "loss": loss}
