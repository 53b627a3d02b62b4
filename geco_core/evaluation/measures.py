"""The paper's measurements of a trained model (section 4): sigma_opt, the quantised-normal NLL,
held-out RMSE against each kappa, the average KL and the marginal KL.

``evaluate_run`` makes one pass per measure and data split: sigma_opt on a training subset; then one
pass over the held-out data, whose single forward per batch gives the NLL, the RMSE, the held-out
KL and every constraint; the average KL from the encoder alone (:meth:`VAE.kl`); the marginal KL.
Each measure draws from its own seed (``seed``, ``seed + 1``, ...), so none depends on another.

Conventions (``geco eval`` writes them into its report):

* **sigma_opt** (eq. 3): ``sqrt(mean over examples and pixels of (x - g(z))^2)``, ``z ~ q(z|x)``, one
  draw per example, on ``sigma_examples`` (1000) random training examples, every other parameter
  fixed. The paper's formula divides by the number of examples only; we also divide by the pixels
  per example, which makes sigma a per-pixel standard deviation (the maximum-likelihood value of
  a global sigma), the quantity the quantised normal needs.
* **NLL** under the quantised normal: pixel ``x = k / 255``, ``k in {0..255}``, has probability
  ``Phi((x + h - mu) / sigma) - Phi((x - h - mu) / sigma)`` with ``h = 0.5 / 255`` and
  ``mu = g(z)``, ``z ~ q(z|x)`` (one draw); the first and last bins extend to -inf and +inf, so the
  256 probabilities sum to 1. Reported per pixel (every channel counts as one) in nats and in bits
  (``bits_per_dim = nats / ln 2``). It is the reconstruction term ``-E_q log p(x|z)`` (the paper's
  information plane), not the negative ELBO; the KL is reported beside it.
* **average KL** ``1/n sum_i KL[q(z|x_i) || p(z)]``: the model's own KL (analytic for Gaussian
  posteriors, one-sample Monte Carlo for flows, summed per-step analytic KLs for ConvDraw), nats.
* **marginal KL** ``KL[q_n(z) || p(z)]`` with ``q_n(z) = 1/n sum_i q(z|x_i)``: Monte Carlo over
  ``m = n * samples_per_example`` draws ``z_j ~ q(z|x_j)`` (stratified: each example ``samples``
  times), ``log q_n(z_j)`` exact as a log-mean-exp of the ``n x m`` matrix ``log q(z_j|x_i)``,
  computed in blocks (matrix products for Gaussians, pairs of examples otherwise). The estimate is
  unbiased for the n-point aggregate; as an estimate of the population aggregate it is biased
  upwards, by at most ``log n`` (ELBO surgery: ``average KL = I_n(x; z) + marginal KL`` with
  ``0 <= I_n <= log n``; narrow posteriors saturate the bound).
* **realism** (:mod:`.realism`): the Fréchet distance between the first ``realism_examples`` (5000)
  held-out images and their reconstructions (the held-out pass's draw), and between them and as
  many prior samples (given the same contexts), in a registered feature network for the data
  (MNIST family: ``digits``, from geco-cla); absent, with the reason, where none is registered.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from geco_core.errors import ConfigError
from geco_core.evaluation.realism import feature_network_for, frechet_distances
from geco_core.models.base import VAE, DiagonalGaussian, Posterior
from geco_core.training import Experiment, Run, build, evaluating, strict_json, write_atomic
from geco_core.training.experiment import PassMeasures, passes
from geco_core.training.summary import constraint_rows

__all__ = [
    "quantised_normal_log_prob",
    "sigma_opt",
    "nll_per_pixel",
    "average_kl",
    "log_density_matrix",
    "log_aggregate_density",
    "marginal_kl",
    "evaluate_run",
    "format_report",
    "MARGINAL_EXAMPLES",
]

LEVELS = 256
#: default n of the marginal KL by posterior: the n x n matrix costs a matrix product per block for
#: Gaussians, a pass of the flow or of ConvDraw's encoder per pair of examples otherwise
MARGINAL_EXAMPLES = {"DiagonalGaussian": 10_000, "FlowPosterior": 1000, "DrawPosterior": 200}
PAIRS_PER_BLOCK = 8192
#: held-out images (and as many prior samples) of the Fréchet distances
REALISM_EXAMPLES = 5000


def quantised_normal_log_prob(x: Tensor, mu: Tensor, sigma: float | Tensor) -> Tensor:
    """``log P(x)`` per pixel, nats, of pixels ``x = k / 255`` under N(mu, sigma^2) quantised to 256
    bins of width 1/255 centred on the levels, the outer bins open (module docstring).

    Computed as a difference of ``log Phi`` on the side of the mean where it does not cancel."""
    k = (x.double() * (LEVELS - 1)).round()
    x, mu = k / (LEVELS - 1), mu.double()  # the exact level: float32 pixels miss k/255 by up to 3e-8
    h = 0.5 / (LEVELS - 1)
    upper = torch.where(k >= LEVELS - 1, math.inf, (x + h - mu) / sigma)
    lower = torch.where(k <= 0, -math.inf, (x - h - mu) / sigma)
    # Phi(b) - Phi(a) = Phi(-a) - Phi(-b): use the form whose terms are small (no cancellation)
    flip = lower > 0
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi).clamp(max=1.0))


def sigma_opt(exp: Experiment, data, index: Tensor) -> float:
    """Eq. 3: ``sqrt(mean_(i, pixels) (x_i - g(z_i))^2)``, ``z_i ~ q(z|x_i)``; a per-pixel std."""
    sq = count = 0.0
    for batch, out in passes(exp, data, index):
        sq += float((batch.x.double() - out.x_hat.double()).square().sum())
        count += batch.x.numel()
    return math.sqrt(sq / count)


def nll_per_pixel(exp: Experiment, data, index: Tensor, sigma: float) -> float:
    """``-mean log P(x)`` in nats per pixel under the quantised normal with mean ``g(z)``, ``z ~ q``."""
    total = count = 0.0
    for batch, out in passes(exp, data, index):
        total -= float(quantised_normal_log_prob(batch.x, out.x_hat, sigma).sum())
        count += batch.x.numel()
    return total / count


def average_kl(exp: Experiment, data, index: Tensor, batch_size: int = 500) -> float:
    """``1/n sum_i KL[q(z|x_i) || p(z)]`` over ``index``, nats, from the model's :meth:`VAE.kl` (the
    encoder alone where the model allows)."""
    total = 0.0
    with evaluating(exp.model):
        for start in range(0, len(index), batch_size):
            batch = data.batch(index[start : start + batch_size], exp.device)
            total += float(exp.model.kl(batch.x, batch.context).double().sum())
    return total / len(index)


def _gaussian_factors(q: DiagonalGaussian, z: Tensor) -> tuple[Tensor, Tensor]:
    """``rows (n, 2D + 1)`` and ``columns (m, 2D + 1)``, float64, whose products are the densities::

    log q(z_j | x_i) = [-1/2 p_i | mu_i p_i | c_i] . [z_j^2 | z_j | 1],   p = 1 / sigma^2 (per dimension),
    c_i = -1/2 (sum_d mu_id^2 p_id + log sigma_id^2 + log 2 pi)"""
    mu, log_var, z = q.mu.double(), q.log_var.double(), z.double()
    precision = torch.exp(-log_var)
    const = -0.5 * ((mu.square() * precision + log_var).sum(1, keepdim=True) + mu.shape[1] * math.log(2 * math.pi))
    rows = torch.cat([-0.5 * precision, mu * precision, const], dim=1)
    return rows, torch.cat([z.square(), z, torch.ones_like(z[:, :1])], dim=1)


def log_density_matrix(posterior: Posterior, n: int, z: Tensor) -> Tensor:
    """``log q(z_j | x_i)`` for the n examples of ``posterior`` and every row of ``z``: ``(n, m)``, nats,
    float64 (one matrix product for diagonal Gaussians, pairs of examples otherwise)."""
    if isinstance(posterior, DiagonalGaussian):
        rows, columns = _gaussian_factors(posterior, z)
        return rows @ columns.T
    m = len(z)
    rows = max(1, PAIRS_PER_BLOCK // m)
    out = []
    for i0 in range(0, n, rows):
        i = torch.arange(i0, min(n, i0 + rows), device=z.device)
        pairs = posterior.take(i.repeat_interleave(m))
        out.append(pairs.log_prob(z.repeat(len(i), 1)).view(len(i), m).double())
    return torch.cat(out)


#: terms more than this many nats below their row's largest are dropped from a log-mean-exp: each
#: is under e^-60 = 9e-27 of the sum, so even 10^6 of them stay below float64's round-off (1.1e-16)
NEGLIGIBLE_NATS = 60.0
#: examples per block of the screen (see :func:`log_aggregate_density`)
BLOCK = 64


def log_aggregate_density(posterior: Posterior, n: int, z: Tensor, tile: int = 64) -> tuple[Tensor, Tensor]:
    """``log q_n(z_j) = log (1/n) sum_i q(z_j | x_i)`` and ``log q(z_j | x_j)`` for one draw ``z_j`` per
    example (row j drawn from ``q(z | x_j)``): two ``(n,)`` float64 tensors, nats.

    The ``n x n`` matrix ``log q(z_j | x_i)`` is made ``tile`` draws at a time (one matrix product
    per tile for diagonal Gaussians, small enough to stay in the cache) and never kept whole. The
    exponentials are the costly part (float64, far dearer than the products), and with narrow
    posteriors almost every term is negligible: a tile's examples are screened in blocks of
    :data:`BLOCK` by their largest entry, and only the blocks holding a term within
    :data:`NEGLIGIBLE_NATS` of ``log q(z_j | x_j)`` (a lower bound on the row's largest) are kept
    and exponentiated, which changes nothing at float64 precision (tested). Where most blocks count
    (wide posteriors), the tile is reduced whole."""
    blocks = -(-n // BLOCK)
    pad = blocks * BLOCK - n  # examples of density 0 (log -inf) make the blocks whole
    if isinstance(posterior, DiagonalGaussian):
        rows, columns = _gaussian_factors(posterior, z)
        own = (rows * columns).sum(1)
        padding = torch.zeros(pad, rows.shape[1], dtype=rows.dtype, device=rows.device)
        padding[:, -1] = -math.inf
        rows = torch.cat([rows, padding]).T.contiguous()
        buffer = torch.empty(tile, blocks * BLOCK, dtype=torch.float64, device=z.device)

        def tile_of(j0: int, t: int) -> Tensor:
            return torch.mm(columns[j0 : j0 + t], rows, out=buffer[:t])
    else:
        own = posterior.log_prob(z).double()

        def tile_of(j0: int, t: int) -> Tensor:
            matrix = log_density_matrix(posterior, n, z[j0 : j0 + t]).T
            return torch.nn.functional.pad(matrix, (0, pad), value=-math.inf)

    threshold = own - NEGLIGIBLE_NATS
    out = torch.full((n,), -math.inf, dtype=torch.float64, device=z.device)
    kept, kept_rows = [], []
    for j0 in range(0, n, tile):
        t = min(tile, n - j0)
        matrix = tile_of(j0, t)
        by_block = matrix.view(t * blocks, BLOCK)
        hit = (by_block.amax(1).view(t, blocks) > threshold[j0 : j0 + t, None]).view(-1).nonzero().squeeze(1)
        if len(hit) * 4 > t * blocks:  # wide posteriors: most terms count
            out[j0 : j0 + t] = torch.logsumexp(matrix, 1)
        else:
            kept.append(by_block[hit])
            kept_rows.append(hit.div(blocks, rounding_mode="floor") + j0)
    if kept:
        values, j = torch.cat(kept), torch.cat(kept_rows)
        top = torch.full_like(out, -math.inf).scatter_reduce_(0, j, values.amax(1), "amax")
        total = torch.zeros_like(out).index_add_(0, j, (values - top[j, None]).exp_().sum(1))
        sparse = top > -math.inf  # the rows of the screened tiles
        out[sparse] = total[sparse].log() + top[sparse]
    return out.sub_(math.log(n)), own


def marginal_kl(
    model: VAE, x: Tensor, context: Tensor | None = None, samples_per_example: int = 1, columns: int = 64
) -> dict[str, float]:
    """``KL[q_n(z) || p(z)]`` for the aggregate posterior of the n examples ``x`` (module docstring).

    Returns ``marginal_kl`` and its Monte Carlo standard error, the average KL estimated from the
    same draws (``average_kl_mc``), their difference ``mutual_information`` (the n-sample I(x; z),
    at most ``log n``) and the sample sizes. Nats. ``columns``: draws per tile of the matrix."""
    n = len(x)
    with torch.no_grad():
        posterior = model.posterior(x, context)
        terms, own = [], []
        for _ in range(samples_per_example):
            z = posterior.sample()
            log_p = model.prior_log_prob(z, context).double()
            log_q, log_q_own = log_aggregate_density(posterior, n, z, columns)
            terms.append(log_q - log_p)
            own.append(log_q_own - log_p)
    t, o = torch.cat(terms), torch.cat(own)
    m = len(t)
    return {
        "marginal_kl": float(t.mean()),
        "stderr": float(t.std() / math.sqrt(m)) if m > 1 else float("nan"),
        "average_kl_mc": float(o.mean()),
        "mutual_information": float(o.mean() - t.mean()),
        "log_n": math.log(n),
        "examples": n,
        "samples": m,
    }


def _subset(size: int, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=g)[: min(n, size)]


def evaluate_run(
    run_dir: str | Path,
    examples: int = 10_000,
    sigma_examples: int = 1000,
    marginal_examples: int | None = None,
    samples_per_example: int = 1,
    seed: int = 0,
    write: bool = True,
    realism_examples: int = REALISM_EXAMPLES,
) -> dict[str, Any]:
    """Evaluate the run's latest checkpoint; the report (also ``run_dir/eval.json``) is a dict."""
    options = {
        "realism_examples": realism_examples,
        "examples": examples,
        "sigma_examples": sigma_examples,
        "marginal_examples": marginal_examples,
        "samples_per_example": samples_per_example,
        "seed": seed,
    }
    for key in ("examples", "sigma_examples", "samples_per_example", "realism_examples"):
        value = options[key]
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if marginal_examples is not None and marginal_examples < 2:
        raise ConfigError(f"marginal_examples must be >= 2, got {marginal_examples}")
    run = Run.open(run_dir)
    config = run.config
    state = run.load_checkpoint()
    with torch.random.fork_rng(devices=[]):
        exp = build(config)
        step = exp.load_state_dict(state)
        train = exp.data
        split, heldout = exp.heldout
        # each measure draws from its own seed, so that none depends on what ran before it
        torch.manual_seed(seed)
        sigma = sigma_opt(exp, train, _subset(len(train), sigma_examples, seed))
        torch.manual_seed(seed + 1)
        # one pass over the held-out data, one draw: NLL, RMSE, KL, constraints, reconstructions for realism
        log_p_sum, pixels = 0.0, 0
        n_real = min(examples, realism_examples, len(heldout))
        recon: list[Tensor] = []
        measures = PassMeasures(exp)
        for batch, out in passes(exp, heldout, torch.arange(min(examples, len(heldout)))):
            measures.add(batch, out)
            log_p_sum += float(quantised_normal_log_prob(batch.x, out.x_hat, sigma).sum())
            pixels += batch.x.numel()
            kept = sum(len(r) for r in recon)
            if kept < n_real:
                recon.append(out.x_hat[: n_real - kept].cpu())
        held = measures.result()
        nats = -log_p_sum / pixels
        torch.manual_seed(seed + 2)
        kl_index = _subset(len(train), examples, seed + 1)
        mean_kl = average_kl(exp, train, kl_index)
        report: dict[str, Any] = {
            "run": str(run.path),
            "step": step,
            "objective": config.objective.name,
            "model": config.model.name,
            "data": config.data.name,
            "kappas": [c.kappa for c in exp.stack.constraints] if exp.stack is not None else [],
            "options": options,
            "sigma_opt": {"value": sigma, "split": "train", "examples": min(sigma_examples, len(train))},
            "nll": {
                "nats_per_pixel": nats,
                "bits_per_dim": nats / math.log(2),
                "split": split,
                "examples": held["examples"],
                "sigma": sigma,
            },
            "heldout": {"split": split, "examples": held["examples"], "rmse": held["rmse"], "kl": held["kl"]},
            "constraints": constraint_rows(exp, held),
            "average_kl": {"nats": mean_kl, "split": "train", "examples": len(kl_index)},
        }
        torch.manual_seed(seed + 3)
        report["marginal_kl"] = _marginal(exp, train, marginal_examples, samples_per_example, seed)
        torch.manual_seed(seed + 4)
        report["realism"] = _realism(exp, heldout, recon, n_real)
    if write:
        text = strict_json(report, indent=2).encode()
        write_atomic(run.eval_path, lambda f: f.write(text))
    return report


def _marginal(exp: Experiment, train, n: int | None, samples: int, seed: int) -> dict[str, Any]:
    model = exp.model
    if model.conditional:
        return {"nats": None, "reason": "conditional model: its prior depends on the context"}
    with evaluating(model):
        probe = model.posterior(train.batch(torch.arange(1), exp.device).x)
        if probe is None:
            return {"nats": None, "reason": f"model {model.name!r} does not expose its posterior"}
        kind = type(probe).__name__
        n = n or MARGINAL_EXAMPLES.get(kind, 1000)
        batch = train.batch(_subset(len(train), n, seed + 2), exp.device)
        result = marginal_kl(model, batch.x, samples_per_example=samples)
    return {
        "nats": result.pop("marginal_kl"),
        **result,
        "posterior": kind,
        "split": "train",
        "estimator": "mean_j [log (1/n) sum_i q(z_j|x_i) - log p(z_j)], z_j ~ q(z|x_j); upward bias <= log n",
    }


def _realism(exp: Experiment, heldout, recon: list[Tensor], n: int, batch_size: int = 500) -> dict[str, Any]:
    """Fréchet distances of the held-out reconstructions and of ``n`` prior samples to the first
    ``n`` held-out images, in a registered feature network for the data (:mod:`.realism`)."""
    found = feature_network_for(exp.config.data.name, tuple(heldout.images.shape[1:]))
    if found is None:
        return {"reason": f"no feature network is registered for data {exp.config.data.name!r}"}
    name, net = found
    net = net.to(exp.device)
    index = torch.arange(n)

    def real():
        for start in range(0, n, batch_size):
            yield heldout.batch(index[start : start + batch_size], exp.device).x

    def samples():
        with evaluating(exp.model):
            for start in range(0, n, batch_size):
                context = heldout.batch(index[start : start + batch_size], exp.device).context
                yield exp.model.sample(min(batch_size, n - start), context)

    distances = frechet_distances(net, real(), reconstructions=(r.to(exp.device) for r in recon), samples=samples())
    return {"features": name, "examples": n, "split": "test", **distances}


def format_report(report: dict[str, Any]) -> str:
    """The lines ``geco eval`` prints."""
    nll, mk = report["nll"], report["marginal_kl"]
    lines = [
        f"run {report['run']} at step {report['step']}: {report['objective']} · {report['model']} · {report['data']}",
        f"sigma_opt      {report['sigma_opt']['value']:.4f}  (eq. 3, {report['sigma_opt']['examples']} train examples)",
        f"NLL            {nll['nats_per_pixel']:.4f} nats/pixel = {nll['bits_per_dim']:.4f} bits/dim "
        f"(quantised normal, {nll['examples']} {nll['split']} examples)",
        f"RMSE           {report['heldout']['rmse']:.4f}  ({report['heldout']['split']})",
        f"average KL     {report['average_kl']['nats']:.2f} nats  ({report['average_kl']['examples']} train examples)",
    ]
    if mk["nats"] is None:
        lines.append(f"marginal KL    -  ({mk['reason']})")
    else:
        lines.append(
            f"marginal KL    {mk['nats']:.2f} ± {mk['stderr']:.2f} nats  (n = {mk['examples']}, m = {mk['samples']}; "
            f"I(x;z) = {mk['mutual_information']:.2f} <= log n = {mk['log_n']:.2f})"
        )
    realism = report.get("realism") or {}
    if "reconstructions" in realism:
        lines.append(
            f"Fréchet dist.  reconstructions {realism['reconstructions']:.3g}, samples {realism['samples']:.3g}  "
            f"({realism['features']} features, {realism['examples']} {realism['split']} images; 0 = indistinguishable)"
        )
    elif realism:
        lines.append(f"Fréchet dist.  -  ({realism['reason']})")
    for row in report["constraints"]:
        if row.heldout is not None:
            mine = f"{row.heldout:.4f}{row.second('heldout_reached')}"
            kappa = f"{row.kappa}{row.second('kappa')}"
            lines.append(f"{row.component:<14} {mine}  vs kappa {kappa}  ({row.status or '-'})")
        lines += [line for line in (row.data_line(), row.judges_line()) if line]
    return "\n".join(lines)
