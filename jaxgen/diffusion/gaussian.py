"""Gaussian diffusion of MAR's DiffLoss (the IDDPM/ADM process as LTH14/mar configures it).

The process tables are float64 numpy, built exactly as the official code builds them; the JAX methods
gather a table entry per row and cast it to float32 before any arithmetic, as the official
`_extract_into_tensor(...).float()` does, so float32 results round the same way.

Fixed choices (the only ones MAR uses): model mean = EPSILON, variance = LEARNED_RANGE, loss = MSE + VLB,
clip_denoised = False. Every `t` given to a method is a RESPACED index (0..num_timesteps-1); the denoiser is
called with `timestep_map[t]`, the index into the original 1000-step process.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Sequence, Set, Union

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, original timestep) -> [eps | var_values]


# ----------------------------------------------------------------------------------------------- schedules

def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta), in Python float64 arithmetic."""
    betas = []
    for i in range(num_timesteps):
        t1 = i / num_timesteps
        t2 = (i + 1) / num_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    if name == "linear":
        # Ho et al.'s 1e-4 .. 2e-2 over 1000 steps, rescaled so other step counts cover the same range.
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise_schedule {name!r}; expected 'cosine' or 'linear'")


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> Set[int]:
    """Original-process steps kept by respacing: `section_counts` steps spread over equal sections.

    "ddimN" uses the DDIM paper's fixed integer stride. Python's round() (banker's rounding) is part of the
    official definition: with "100" of 1000 it gives 0, 10, ..., 50, 61, 71, ..., 999.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps of {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, (int, np.integer)):
        section_counts = [int(section_counts)]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


# ----------------------------------------------------------------------------------------------- KL / NLL

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


@jax.custom_jvp
def _tanh(u):
    """tanh within ~1.5 ulp in float32 (XLA's CPU tanh is up to ~4 ulp off).

    The decoder NLL takes log(cdf(a) - cdf(b)) of two CDFs near 0 or 1, so tanh's last-ulp error becomes a
    relative error of ~1e-4 in its gradient; torch's tanh is ~1 ulp. Large |u|: expm1 form, no cancellation.
    """
    a = jnp.minimum(jnp.abs(u), 20.0)  # tanh(20) == 1 in float32; keeps expm1 finite
    m = jnp.expm1(2.0 * a)
    return jnp.where(jnp.abs(u) < 0.5, jnp.tanh(u), jnp.sign(u) * (m / (m + 2.0)))


@_tanh.defjvp
def _tanh_jvp(primals, tangents):
    y = _tanh(primals[0])
    return y, tangents[0] * (1.0 - y * y)  # torch's tanh_backward form


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF that the official decoder NLL uses."""
    return 0.5 * (1.0 + _tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(bin of x) under N(means, e^(2 log_scales)) with 1/255-wide bins on [-1, 1] (open-ended edges), nats."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x):
    """Mean over every non-batch dimension (official `mean_flat`)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------- process

_TABLES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
           "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
           "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
           "posterior_mean_coef1", "posterior_mean_coef2", "log_betas")


class GaussianDiffusion:
    """A (possibly respaced) diffusion process; build it with `create_diffusion`."""

    def __init__(self, betas: np.ndarray, timestep_map: Iterable[int]):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be 1-D with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = np.asarray(list(timestep_map), dtype=np.int64)
        if self.timestep_map.shape != (self.num_timesteps,):
            raise ValueError(f"timestep_map has {self.timestep_map.size} entries for {self.num_timesteps} steps")

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0, so its log is clipped by repeating the t = 1 value.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.num_timesteps > 1 else np.array([], dtype=np.float64))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)  # the LEARNED_RANGE upper end, also taken in float64

    def tables(self) -> Dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in _TABLES}

    # -- helpers

    @staticmethod
    def _extract(table: np.ndarray, t, x) -> jax.Array:
        """table[t] as float32, shaped to broadcast against x's trailing dims."""
        vals = jnp.asarray(table.astype(np.float32))[t]
        return vals.reshape(vals.shape + (1,) * (x.ndim - vals.ndim))

    def original_timesteps(self, t) -> jax.Array:
        """Respaced index -> index into the original process (what the denoiser is conditioned on)."""
        return jnp.asarray(self.timestep_map.astype(np.int32))[t]

    def _split_output(self, model_output, x_t):
        channels = x_t.shape[-1]
        if model_output.shape[-1] != 2 * channels:
            raise ValueError(f"model output has {model_output.shape[-1]} channels; LEARNED_RANGE needs "
                             f"2 x {channels} (eps, variance values)")
        return model_output[..., :channels], model_output[..., channels:]

    # -- forward process

    def q_mean_variance(self, x_start, t):
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start,
                jnp.broadcast_to(self._extract(1.0 - self.alphas_cumprod, t, x_start), x_start.shape),
                jnp.broadcast_to(self._extract(self.log_one_minus_alphas_cumprod, t, x_start), x_start.shape))

    def q_sample(self, x_start, t, noise):
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        var = jnp.broadcast_to(self._extract(self.posterior_variance, t, x_t), x_t.shape)
        log_var = jnp.broadcast_to(self._extract(self.posterior_log_variance_clipped, t, x_t), x_t.shape)
        return mean, var, log_var

    # -- reverse process

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def p_mean_variance(self, model_output, x_t, t) -> Dict[str, jax.Array]:
        """p(x_{t-1} | x_t) from the denoiser output [eps | v], v in [-1, 1] interpolating log-variance
        between the clipped posterior variance (v = -1) and beta_t (v = 1)."""
        eps, var_values = self._split_output(model_output, x_t)
        min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._extract(self.log_betas, t, x_t)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": jnp.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_sample(self, model_output, x_t, t, noise, temperature=1.0) -> Dict[str, jax.Array]:
        """One ancestral step; temperature scales the injected noise only, and t == 0 adds none."""
        out = self.p_mean_variance(model_output, x_t, t)
        nonzero = (jnp.asarray(t) != 0).astype(jnp.float32)
        nonzero = nonzero.reshape(nonzero.shape + (1,) * (x_t.ndim - nonzero.ndim))
        sample = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise * temperature
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # -- training objective

    def vb_terms_bpd(self, model_output, x_start, x_t, t) -> jax.Array:
        """Per-row VLB term in bits: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or the decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / np.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / np.log(2.0)
        return jnp.where(jnp.asarray(t) == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x_start, t, noise) -> Dict[str, jax.Array]:
        """Per-row loss = mse(eps) + vb; the VLB sees eps through a stop-gradient so it only trains the variance."""
        x_t = self.q_sample(x_start, t, noise)
        model_output = model_fn(x_t, self.original_timesteps(t))
        eps, var_values = self._split_output(model_output, x_t)
        frozen = jnp.concatenate([jax.lax.stop_gradient(eps), var_values], axis=-1)
        vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
        mse = mean_flat(jnp.square(noise - eps))
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def create_diffusion(timestep_respacing: Union[str, int, Sequence[int]] = "", noise_schedule: str = "cosine",
                     num_timesteps: int = 1000) -> GaussianDiffusion:
    """The official `create_diffusion` as MAR calls it (learned-range variance, eps prediction, MSE + VLB).

    Respacing keeps a subset of the original steps and recomputes betas from the kept alpha_bar values, so
    the respaced process has the same marginals at the kept steps.
    """
    base_betas = named_beta_schedule(noise_schedule, num_timesteps)
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [num_timesteps]
    use = space_timesteps(num_timesteps, timestep_respacing)
    alphas_cumprod = np.cumprod(1.0 - base_betas, axis=0)
    last, new_betas, timestep_map = 1.0, [], []
    for i, a in enumerate(alphas_cumprod):
        if i in use:
            new_betas.append(1 - a / last)
            last = a
            timestep_map.append(i)
    return GaussianDiffusion(np.array(new_betas), timestep_map)
