"""Token-weighted language-model losses: cross-entropy, the paper's focal baseline, and MiLe.

Pure JAX (imports only jax and numpy): any project can use these. Every loss here is the same
three steps, which is why they share one code path:

  1. per-token statistics from the logits: nll_i and the predictive entropy H_i (float32);
  2. a per-token weight from a *weight rule* (stop-gradient): CE 1, focal (1 - p_t)^gamma,
     MiLe (sigma + H)^gamma;
  3. one normalised reduction: loss = sum(m w nll) / normaliser.

Normalisation (a named, explicit choice):
  "global": normaliser = sum(m w) over every position given. The un-normalised pair
            (sum m w nll, sum m w) is exposed by `*_terms` functions, so a trainer can add it up
            over micro-batches and divide once: exact under any accumulation and any sharding.
  "paper":  reproduces the authors' reference code on one device. For its reweighted losses
            (focal, MiLe) masked positions enter the normaliser with their weight (focal: weight
            of nll=0; MiLe: the real entropy weight), the mean runs over all positions, and
            probabilities are clamped at 1e-8 in the entropy. Its CE baseline is the usual mean
            over non-ignored positions, so CE's paper mode equals "global" on one device (a spec
            says which case it is with `paper_all_positions`).

Gradients: weights and the normaliser are constants, so d loss / d z_i = (m_i w_i / N) (p_i - e_y).

Public API (`__all__`):
  losses        cross_entropy_loss, focal_loss, mile_loss -> (loss, aux) on logits [..., V]
  specs         LossSpec, get_loss, resolve_loss, loss_from_config, LOSS_NAMES, NORMALIZATIONS
  per token     per_token: nll, entropy, weight, numerator, denominator per position, for a
                trainer with its own reduction or normaliser
  terms         loss_terms, combine_terms, finalize_terms, apply_loss: sum over micro-batches
                and shards, divide once
  parts         token_statistics, weights_from_statistics, reduce_terms, ce_weights,
                focal_weights, mile_weights, safe_labels, check_float, check_labels,
                prepare_mask, paper_clamped_entropy, PAPER_PROB_FLOOR: the building blocks `mile.fused` (or your
                own LM head) reuses
"""

from __future__ import annotations

import dataclasses
import inspect
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    # losses on materialised logits
    "cross_entropy_loss",
    "focal_loss",
    "mile_loss",
    # loss specs
    "LossSpec",
    "get_loss",
    "resolve_loss",
    "loss_from_config",
    "LOSS_NAMES",
    "NORMALIZATIONS",
    # per-token values and additive terms
    "per_token",
    "loss_terms",
    "combine_terms",
    "finalize_terms",
    "apply_loss",
    # building blocks
    "token_statistics",
    "weights_from_statistics",
    "reduce_terms",
    "ce_weights",
    "focal_weights",
    "mile_weights",
    "safe_labels",
    "check_float",
    "check_labels",
    "prepare_mask",
    "paper_clamped_entropy",
    "PAPER_PROB_FLOOR",
]

NORMALIZATIONS = ("global", "paper")
PAPER_PROB_FLOOR = 1e-8  # the reference code clamps p to [1e-8, 1] before log in the entropy

# ---------------------------------------------------------------------------------------------
# Weight rules: per-token stats -> weight. They see nll and the entropy, already stop-gradient.
# ---------------------------------------------------------------------------------------------


def _check_nonnegative(name: str, value: float) -> float:
    if isinstance(value, (jax.Array, np.ndarray)) and getattr(value, "ndim", 0) == 0:
        try:
            value = float(value)
        except jax.errors.ConcretizationTypeError:
            return value  # a traced hyperparameter: cannot be checked at trace time
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}; pass {name}=0 or larger")
    return float(value)


def ce_weights(nll: jax.Array, entropy: jax.Array) -> jax.Array:
    del entropy
    return jnp.ones_like(nll)


def focal_weights(nll: jax.Array, entropy: jax.Array, *, gamma: float) -> jax.Array:
    del entropy
    # 1 - p_t = 1 - exp(-nll) = -expm1(-nll): exact for small nll, where 1 - exp loses digits.
    return (-jnp.expm1(-nll)) ** gamma


def mile_weights(nll: jax.Array, entropy: jax.Array, *, gamma: float, sigma: float) -> jax.Array:
    del nll
    return (sigma + entropy) ** gamma


def _callable_key(fn: Callable) -> Any:
    """What identifies a weight rule: a functools.partial by its function and bound arguments (so
    two get_loss("mile", gamma=1.0) calls agree), anything else by the object itself (a plain
    function compares by identity)."""
    if isinstance(fn, functools.partial):
        return ("partial", _callable_key(fn.func), fn.args, tuple(sorted(fn.keywords.items())))
    return fn


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A loss = a name, a weight rule with its hyperparameters bound, and a normalisation.

    `paper_all_positions`: in "paper" normalisation, whether the reference code divides by all
    positions (its reweighted losses) or only the non-ignored ones (its plain CE baseline).
    Equality and hash cover every field, the weight rule included, so a jit cache keyed on a spec
    never reuses the trace of a different rule that happens to share a name.
    """

    name: str
    weight_fn: Callable[[jax.Array, jax.Array], jax.Array]
    normalization: str = "global"
    hparams: Mapping[str, float] = dataclasses.field(default_factory=dict)
    paper_all_positions: bool = True

    @property
    def paper_reweighted(self) -> bool:
        """Whether the reference code's reweighted-loss rules apply: "paper" normalisation over
        all positions, with weights from the clamped entropy (not its plain CE baseline)."""
        return self.normalization == "paper" and self.paper_all_positions

    def _key(self):
        return (
            self.name,
            _callable_key(self.weight_fn),
            self.normalization,
            tuple(sorted(self.hparams.items())),
            self.paper_all_positions,
        )

    def __hash__(self):  # usable as a static argument of jit / custom_vjp
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, LossSpec) and self._key() == other._key()


def _check_normalization(normalization: str) -> str:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}")
    return normalization


def _ce_spec(*, normalization: str = "global") -> LossSpec:
    # The reference code's CE baseline: the mean over non-ignored positions, in paper mode too.
    return LossSpec("ce", ce_weights, _check_normalization(normalization), {}, paper_all_positions=False)


def _focal_spec(*, gamma: float = 1.0, normalization: str = "global") -> LossSpec:
    gamma = _check_nonnegative("gamma", gamma)
    return LossSpec(
        "focal",
        functools.partial(focal_weights, gamma=gamma),
        _check_normalization(normalization),
        {"gamma": gamma},
    )


def _mile_spec(*, gamma: float = 1.0, sigma: float = 1.0, normalization: str = "global") -> LossSpec:
    gamma = _check_nonnegative("gamma", gamma)
    sigma = _check_nonnegative("sigma", sigma)
    return LossSpec(
        "mile",
        functools.partial(mile_weights, gamma=gamma, sigma=sigma),
        _check_normalization(normalization),
        {"gamma": gamma, "sigma": sigma},
    )


_REGISTRY: dict[str, Callable[..., LossSpec]] = {
    "ce": _ce_spec,
    "focal": _focal_spec,
    "mile": _mile_spec,
}
LOSS_NAMES = tuple(_REGISTRY)


def get_loss(name: str, **hparams: Any) -> LossSpec:
    """The loss named by a config string ("ce", "focal", "mile") with its hyperparameters.

    Unknown hyperparameters are an error, so a typo in a config cannot silently do nothing.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; use one of {', '.join(LOSS_NAMES)}")
    factory = _REGISTRY[name]
    try:
        return factory(**hparams)
    except TypeError as e:
        raise ValueError(f"bad hyperparameters for loss {name!r}: {e}") from None


def resolve_loss(loss: str | LossSpec, **hparams: Any) -> LossSpec:
    """A LossSpec as given, or the one a name and its hyperparameters select (`get_loss`)."""
    if isinstance(loss, LossSpec):
        if hparams:
            raise ValueError("pass hyperparameters either in the LossSpec or as keywords, not both")
        return loss
    return get_loss(loss, **hparams)


# ---------------------------------------------------------------------------------------------
# Per-token statistics and the shared reduction.
# ---------------------------------------------------------------------------------------------


def token_statistics(
    logits: jax.Array, labels: jax.Array, *, clamped_entropy: bool = False
) -> dict[str, jax.Array]:
    """nll, entropy (and optionally the paper's clamped entropy) per position, float32.

    Stable for huge logits: everything is computed from s = z - max(z) <= 0, so the entropy
    H = log(sum e^s) - sum(p s) is a difference of O(log V) numbers, never of O(|z|) ones.
    """
    z = logits.astype(jnp.float32)
    z_max = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    s = z - z_max
    log_norm = jnp.log(jnp.sum(jnp.exp(s), axis=-1, keepdims=True))  # lse - max, in [0, log V]
    log_p = s - log_norm
    label_log_p = jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)
    stats = {"nll": -label_log_p[..., 0]}
    p = jax.lax.stop_gradient(jnp.exp(log_p))
    log_p_sg = jax.lax.stop_gradient(log_p)
    stats["entropy"] = jnp.maximum(-jnp.sum(p * log_p_sg, axis=-1), 0.0)
    if clamped_entropy:
        stats["clamped_entropy"] = paper_clamped_entropy(log_p_sg)
    return stats


def paper_clamped_entropy(log_p: jax.Array) -> jax.Array:
    """The reference code's entropy, -sum p~ log p~ with p~ = clip(p, 1e-8, 1), from log p [..., V].

    Both factors are clamped: an entry below the floor adds 1e-8 * ln(1e8), not p * ln(1e8).
    Since exp is monotone, log p~ = max(log p, log 1e-8) and p~ = exp(log p~): one elementwise
    clamp, no count of the entries below the floor."""
    clamped_log_p = jnp.maximum(log_p, np.float32(np.log(PAPER_PROB_FLOOR)))
    return -jnp.sum(jnp.exp(clamped_log_p) * clamped_log_p, axis=-1)


def weights_from_statistics(
    spec: LossSpec,
    nll: jax.Array,
    entropy: jax.Array,
    mask: jax.Array,
    clamped_entropy: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(weight w, normaliser contribution) per position, both stop-gradient.

    global: normaliser += m w.
    paper:  weights from nll zeroed at masked positions (the reference's ignore_index gives
            nll = 0 there) and the clamped entropy; normaliser += w at every position. A spec
            with paper_all_positions=False (CE) normalises as global.
    """
    nll = jax.lax.stop_gradient(nll)
    entropy = jax.lax.stop_gradient(entropy)
    if spec.paper_reweighted:
        nll = jnp.where(mask > 0, nll, 0.0)
        if clamped_entropy is not None:
            entropy = jax.lax.stop_gradient(clamped_entropy)
        w = spec.weight_fn(nll, entropy).astype(jnp.float32)
        return w, w
    w = spec.weight_fn(nll, entropy).astype(jnp.float32)
    return w, mask * w


def reduce_terms(
    nll: jax.Array, entropy: jax.Array, mask: jax.Array, weight: jax.Array, norm_weight: jax.Array
) -> dict[str, jax.Array]:
    """The additive terms of a loss: sums a trainer may add across micro-batches and shards.

    `numerator` = sum(m w nll) is the only differentiable entry. Min/max entries are reduced
    with min/max, all others with +. Under jit these sums over a sharded batch are global.
    """
    sg = jax.lax.stop_gradient
    weight = sg(weight)
    valid = mask > 0
    return {
        "numerator": jnp.sum(mask * weight * nll),
        "denominator": sg(jnp.sum(norm_weight)),
        "nll_sum": sg(jnp.sum(mask * nll)),
        "entropy_sum": sg(jnp.sum(mask * entropy)),
        "weight_sum": jnp.sum(mask * weight),
        "weight_min": jnp.min(jnp.where(valid, weight, jnp.inf), initial=jnp.inf),
        "weight_max": jnp.max(jnp.where(valid, weight, -jnp.inf), initial=-jnp.inf),
        "num_tokens": jnp.sum(mask),
    }


def combine_terms(a: Mapping[str, jax.Array], b: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Merge the terms of two micro-batches (or shards): sums add, min/max reduce."""
    out = {}
    for key in a:
        if key == "weight_min":
            out[key] = jnp.minimum(a[key], b[key])
        elif key == "weight_max":
            out[key] = jnp.maximum(a[key], b[key])
        else:
            out[key] = a[key] + b[key]
    return out


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    # An all-masked batch has den = 0 and num = 0: return 0 with zero (finite) gradients.
    return num / jnp.where(den > 0, den, 1.0)


def finalize_terms(terms: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, aux) from (possibly accumulated) terms; divides once."""
    n = terms["num_tokens"]
    has_tokens = n > 0
    aux = {
        "nll": _safe_div(terms["nll_sum"], n),
        "entropy": _safe_div(terms["entropy_sum"], n),
        "weight_mean": _safe_div(terms["weight_sum"], n),
        "weight_min": jnp.where(has_tokens, terms["weight_min"], 0.0),
        "weight_max": jnp.where(has_tokens, terms["weight_max"], 0.0),
        "num_tokens": n,
        "denominator": terms["denominator"],
    }
    return _safe_div(terms["numerator"], terms["denominator"]), aux


# ---------------------------------------------------------------------------------------------
# Input validation (trace time: shapes and dtypes are static).
# ---------------------------------------------------------------------------------------------


def prepare_mask(mask: jax.Array | None, labels: jax.Array) -> jax.Array:
    if mask is None:
        return jnp.ones(labels.shape, jnp.float32)
    mask = jnp.asarray(mask)
    if mask.shape != labels.shape:
        raise ValueError(
            f"mask shape {mask.shape} does not match labels shape {labels.shape}; "
            "pass one mask entry per label (or mask=None for all valid)"
        )
    return mask.astype(jnp.float32)


def check_labels(labels: jax.Array, expected_shape: tuple[int, ...], what: str) -> jax.Array:
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be integers (token ids), got dtype {labels.dtype}; cast with .astype(jnp.int32)"
        )
    if labels.shape != tuple(expected_shape):
        raise ValueError(
            f"labels shape {labels.shape} does not match {what} {tuple(expected_shape)}; "
            "give one label per position"
        )
    return labels


def check_float(name: str, x: jax.Array, min_ndim: int = 1) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a floating-point array, got dtype {x.dtype}; cast with .astype(jnp.float32)"
        )
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {x.shape}")
    return x


def safe_labels(labels: jax.Array, mask: jax.Array) -> jax.Array:
    """labels with every masked position (mask == 0) set to id 0.

    A masked position may hold any label (e.g. -100); an out-of-range id must never reach a
    gather or a one-hot, so it gets a harmless in-range id. Its nll is then meaningless and is
    always multiplied by mask = 0."""
    return jnp.where(mask > 0, labels, 0)


# ---------------------------------------------------------------------------------------------
# Public API on materialised logits.
# ---------------------------------------------------------------------------------------------


def _token_values(spec: LossSpec, logits, labels, mask):
    """Validated inputs -> (stats, mask, weight, norm_weight), all per position [...].

    The one path shared by `loss_terms` and `per_token`, so the two cannot drift apart."""
    logits = check_float("logits", logits)
    labels = check_labels(labels, logits.shape[:-1], "logits.shape[:-1]")
    mask = prepare_mask(mask, labels)
    stats = token_statistics(logits, safe_labels(labels, mask), clamped_entropy=spec.paper_reweighted)
    weight, norm_weight = weights_from_statistics(
        spec, stats["nll"], stats["entropy"], mask, stats.get("clamped_entropy")
    )
    return stats, mask, weight, norm_weight


def loss_terms(
    spec: LossSpec, logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """The additive terms of `spec` on materialised logits [..., V]."""
    stats, mask, weight, norm_weight = _token_values(spec, logits, labels, mask)
    return reduce_terms(stats["nll"], stats["entropy"], mask, weight, norm_weight)


def per_token(
    loss: str | LossSpec,
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
    **hparams: Any,
) -> dict[str, jax.Array]:
    """Per-position values of a loss, for a trainer that reduces (or normalises) them itself.

    `loss` is a name ("ce", "focal", "mile") with its `hparams`, or a LossSpec. Returns float32
    arrays of labels.shape:
      mask         the mask as used (float32; 0 where masked);
      nll          -log p(label), differentiable; 0 where masked;
      entropy      predictive entropy H in nats, stop-gradient; 0 where masked;
      weight       the loss's weight w (stop-gradient, like the loss's); 0 where masked;
      numerator    mask * weight * nll: the token's share of the loss numerator, differentiable;
      denominator  the token's share of the normaliser, stop-gradient (global: mask * w;
                   paper: w at every position, masked ones included, as the reference code).
    The loss itself is sum(numerator) / sum(denominator) (see `loss_terms`, `finalize_terms`),
    with the same value and gradients; any other normaliser is the caller's choice.
    """
    spec = resolve_loss(loss, **hparams)
    stats, mask, weight, norm_weight = _token_values(spec, logits, labels, mask)
    weight = jax.lax.stop_gradient(weight)
    valid = mask > 0
    return {
        "mask": mask,
        # A masked position's nll is of the placeholder label 0 (see `safe_labels`): hide it.
        "nll": jnp.where(valid, stats["nll"], 0.0),
        "entropy": jnp.where(valid, stats["entropy"], 0.0),
        "weight": jnp.where(valid, weight, 0.0),
        "numerator": mask * weight * stats["nll"],  # the same product `reduce_terms` sums
        "denominator": jax.lax.stop_gradient(norm_weight),
    }


def apply_loss(spec: LossSpec, logits, labels, mask=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    return finalize_terms(loss_terms(spec, logits, labels, mask))


def cross_entropy_loss(logits, labels, mask=None, *, normalization: str = "global"):
    """Mean token cross-entropy over valid positions. Returns (loss, aux)."""
    return apply_loss(_ce_spec(normalization=normalization), logits, labels, mask)


def focal_loss(logits, labels, mask=None, *, gamma: float = 1.0, normalization: str = "global"):
    """The paper's focal baseline: CE weighted by stop-gradient (1 - p_t)^gamma, mean-1 normalised."""
    return apply_loss(_focal_spec(gamma=gamma, normalization=normalization), logits, labels, mask)


def mile_loss(
    logits,
    labels,
    mask=None,
    *,
    gamma: float = 1.0,
    sigma: float = 1.0,
    normalization: str = "global",
):
    """MiLe: CE weighted by stop-gradient (sigma + H)^gamma, H the predictive entropy (nats)."""
    spec = _mile_spec(gamma=gamma, sigma=sigma, normalization=normalization)
    return apply_loss(spec, logits, labels, mask)


def _hparam_defaults() -> dict[str, dict[str, Any]]:
    """{hyperparameter: {loss name: its default}} over every registered loss."""
    out: dict[str, dict[str, Any]] = {}
    for name, factory in _REGISTRY.items():
        for key, param in inspect.signature(factory).parameters.items():
            out.setdefault(key, {})[name] = param.default
    return out


def loss_from_config(loss_cfg: Mapping[str, Any]) -> LossSpec:
    """The LossSpec a config's loss section names, so callers never branch on the name.

    A config carries gamma and sigma for every loss: each loss gets the hyperparameters it takes.
    One it does not take must keep its default, so `loss.gamma=2` with `loss.name=ce` is an
    error rather than a setting that silently does nothing. Other keys (head, chunk_size) belong
    to the trainer and are not looked at."""
    name = loss_cfg["name"]
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; use one of {', '.join(LOSS_NAMES)} (config loss.name)")
    taken = {}
    for key, defaults in _hparam_defaults().items():
        if key not in loss_cfg:
            continue
        if name in defaults:
            taken[key] = loss_cfg[key]
        elif loss_cfg[key] not in defaults.values():  # a default of the losses that take it is fine
            users = ", ".join(sorted(defaults))
            takes = "take" if len(defaults) > 1 else "takes"
            raise ValueError(
                f"loss.{key}={loss_cfg[key]!r} has no effect on loss {name!r} (only {users} {takes} {key}); "
                f"drop the override, or set loss.name to one of {users}"
            )
    return get_loss(name, **taken)
