"""Independent float64 NumPy reference of the losses in ../shared/paper-spec.md (test helper)."""

import numpy as np


def random_inputs(seed, shape=(3, 11), vocab=37, scale=3.0, keep=0.7):
    """(float32 logits, int32 labels, bool mask) with about `keep` of the positions counted; masked
    positions hold the ignore label -100 (a loss must never read it)."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(shape + (vocab,)) * scale).astype(np.float32)
    labels = rng.integers(0, vocab, shape).astype(np.int32)
    mask = rng.random(shape) < keep
    mask.flat[0] = True
    return logits, np.where(mask, labels, -100), mask


def loss_hparams(loss, gamma, sigma) -> dict:
    """The hyperparameters `loss` takes, as keyword arguments."""
    return {"ce": {}, "focal": {"gamma": gamma}, "mile": {"gamma": gamma, "sigma": sigma}}[loss]


def paper_clamped_entropy(p):
    """The reference code's entropy: p~ = clip(p, 1e-8, 1), then -sum p~ ln p~ (both factors)."""
    clipped = np.clip(np.asarray(p, np.float64), 1e-8, 1.0)
    return -(clipped * np.log(clipped)).sum(-1)


def reference_loss(logits, labels, mask, *, loss, gamma=1.0, sigma=1.0, normalization="global"):
    """Returns (loss, dloss/dlogits, aux) in float64, written straight from the paper's formulas."""
    z = np.asarray(logits, np.float64)
    vocab = z.shape[-1]
    z = z.reshape(-1, vocab)
    m = np.ones(z.shape[0]) if mask is None else np.asarray(mask, np.float64).reshape(-1)
    y = np.where(m > 0, np.asarray(labels).reshape(-1), 0)

    z_max = z.max(-1, keepdims=True)
    lse = z_max[:, 0] + np.log(np.exp(z - z_max).sum(-1))
    log_p = z - lse[:, None]
    p = np.exp(log_p)
    nll = -log_p[np.arange(len(y)), y]
    entropy = -(p * log_p).sum(-1)

    paper = normalization == "paper"
    nll_for_weight = nll * m if paper else nll  # the reference's ignore_index gives nll = 0
    entropy_for_weight = paper_clamped_entropy(p) if paper else entropy
    if loss == "ce":
        w = np.ones_like(nll)
    elif loss == "focal":
        w = (1.0 - np.exp(-nll_for_weight)) ** gamma
    elif loss == "mile":
        w = (sigma + entropy_for_weight) ** gamma
    else:
        raise ValueError(loss)

    numerator = np.sum(m * w * nll)
    # The reference code's CE baseline is torch's CrossEntropyLoss(ignore_index=...): the mean over
    # non-ignored positions. Only its reweighted losses (focal, MiLe) divide by all positions.
    if paper and loss != "ce":
        # alpha = 1 / mean(w) over all positions; the final mean also runs over all positions.
        n = len(nll)
        alpha = 1.0 / np.mean(w)
        value = np.mean(alpha * w * nll * m)
        denominator = n / alpha
    else:
        denominator = np.sum(m * w)
        value = numerator / denominator if denominator > 0 else 0.0
    onehot = np.eye(vocab)[y]
    scale = (m * w / denominator) if denominator > 0 else np.zeros_like(m)
    grad = (scale[:, None] * (p - onehot)).reshape(np.shape(logits))
    valid = m > 0
    aux = {
        "nll": np.sum(m * nll) / np.sum(m),
        "entropy": np.sum(m * entropy) / np.sum(m),
        "weight_mean": np.sum(m * w) / np.sum(m),
        "weight_min": w[valid].min(),
        "weight_max": w[valid].max(),
        "num_tokens": np.sum(m),
    }
    return value, grad, aux
