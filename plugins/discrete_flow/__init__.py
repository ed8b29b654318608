"""Discrete flow matching (Gat et al. 2024): mixture paths over token ids, their losses and sampler.

Components:

* path ``mixture_discrete``: ``x_t`` keeps each source token with probability
  ``1 - kappa_t`` and takes the data token otherwise; mask or uniform source; any
  convex scheduler (``cond_ot``, ``polynomial`` from flow_matching: ``kappa_t = t^n``);
* path ``metric_discrete``: metric-induced paths ``p_t(x | x_1) ~ exp(-beta_t d(x, x_1))``
  with the kinetic-optimal velocity (Shaul et al. 2024); absolute, squared or Hamming distance;
* objective ``discrete_fm``: generalized KL (the path's ELBO integrand) or cross-entropy, on either path;
* solver ``discrete_euler``: the CTMC Euler sampler with an optional divergence-free
  term, float64 categorical sampling and infilling (positions held fixed);
* metrics ``discrete_elbo`` (NLL bound per token), ``discrete_infill`` (infilling
  accuracy and examples) and ``dequantized`` (continuous sample metrics on bin centres);
* data ``with_mask_token``: adds a mask token to any discrete data source's vocabulary.
"""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    """Register this family's components."""
    here = "plugins.discrete_flow"
    register("path", "mixture_discrete", f"{here}.path:make_mixture_discrete", f"{here}.path:MixturePathConfig",
             doc="mixture discrete path over token ids: mask or uniform source, any convex scheduler")
    register("path", "metric_discrete", f"{here}.metric_path:make_metric_discrete",
             f"{here}.metric_path:MetricPathConfig",
             doc="metric-induced discrete path exp(-beta_t d(x, x_1)) with its kinetic-optimal velocity")
    register("objective", "discrete_fm", f"{here}.objective:make_discrete_fm", f"{here}.objective:DiscreteFMConfig",
             doc="discrete flow matching: generalized KL or cross-entropy of the posterior p(x_1 | x_t)")
    register("solver", "discrete_euler", f"{here}.solver:make_discrete_euler", f"{here}.solver:DiscreteEulerConfig",
             doc="discrete (CTMC) Euler sampler: divergence-free term, float64 sampling, infilling")
    register("metric", "discrete_elbo", f"{here}.metrics:make_discrete_elbo", f"{here}.metrics:ELBOConfig",
             doc="upper bound on the negative log-likelihood per token (nats, bits) on held-out data")
    register("metric", "discrete_infill", f"{here}.metrics:make_discrete_infill", f"{here}.metrics:InfillConfig",
             doc="infill hidden spans of held-out data; accuracy of the restored tokens")
    register("metric", "dequantized", f"{here}.metrics:make_dequantized", f"{here}.metrics:DequantizedConfig",
             doc="a continuous sample metric applied to the bin centres of quantised data")
    register("data", "with_mask_token", f"{here}.data:make_with_mask_token", f"{here}.data:WithMaskTokenConfig",
             doc="a discrete data source with a mask token added to its vocabulary")
