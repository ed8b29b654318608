"""DDPM with guided-diffusion parity: the gaussian_diffusion path, the ddpm objective, ancestral and DDIM
solvers with timestep respacing, importance sampling of steps, and the bits-per-dimension metric.

DDPM step ``k`` (0 = least noisy, T-1 = pure noise) is flowforge time ``t = 1 - (k + 1) / T``; see
`plugins.ddpm.diffusion`. Coming from guided-diffusion's flags:

====================================  ==========================================================
guided-diffusion                      flowforge
====================================  ==========================================================
``noise_schedule``, ``diffusion_steps``  ``[path] schedule``, ``steps``
``predict_xstart``                    ``[path] prediction = "x_start"`` (also ``"v"``)
``learn_sigma`` / ``sigma_small``     ``[path] variance = "learned_range"`` / ``"fixed_small"``
                                      (default ``"fixed_large"``); learned: backbone 2x channels
``use_kl``, ``rescale_learned_sigmas``  ``[objective] loss_type = "kl"`` / ``"rescaled_mse"``
``schedule_sampler``                  ``[objective] schedule_sampler`` (``history_per_term``, ``uniform_prob``)
``timestep_respacing``, ``use_ddim``  ``[solver] respacing``, ``plugin = "ddim"`` (``eta``)
``clip_denoised``                     ``[solver] clip_denoised``
``image_nll.py`` (``calc_bpd_loop``)  ``[[metrics]] plugin = "ddpm_bpd"``
``classifier_train.py``               ``[objective] plugin = "noisy_classifier"`` (backbone ``unet_classifier``)
``classifier_sample.py``              ``[objective] classifier = "RUN_DIR"``, ``classifier_scale``
====================================  ==========================================================
"""

from registry import hookimpl

FLOWFORGE_API = 1

_M = "plugins.ddpm."


@hookimpl
def flowforge_register(register):
    """Register this family's components."""
    register("path", "gaussian_diffusion", _M + "path:make_gaussian_diffusion", _M + "path:DiffusionConfig",
             doc="DDPM's discrete Gaussian process (linear/cosine betas; epsilon, x_start or v; fixed or learned variance)")
    register("objective", "ddpm", _M + "objective:make_ddpm", _M + "objective:DDPMConfig",
             doc="guided-diffusion's losses (mse, rescaled_mse hybrid, kl, rescaled_kl) with importance-sampled steps")
    register("objective", "noisy_classifier", _M + "noisy_classifier:make_noisy_classifier",
             _M + "noisy_classifier:NoisyClassifierConfig",
             doc="guided-diffusion's classifier training: cross entropy on q_sample states at uniform steps")
    register("solver", "ddpm_ancestral", _M + "solver:make_ddpm_ancestral", _M + "solver:AncestralConfig",
             doc="ancestral DDPM sampling p(x_{k-1} | x_k), optionally over respaced steps")
    register("solver", "ddim", _M + "solver:make_ddim", _M + "solver:DDIMConfig",
             doc="DDIM sampling with eta over respaced steps (e.g. respacing = \"ddim50\")")
    register("solver", "dpm_solver", _M + "dpm_solver:make_dpm_solver", _M + "dpm_solver:DPMSolverConfig",
             doc="DPM-Solver++ 2M / 3M / 2S and SDE variants in log-SNR, with dynamic thresholding (diffusers' numbers)")
    register("solver", "unipc", _M + "unipc:make_unipc", _M + "unipc:UniPCConfig",
             doc="UniPC predictor-corrector (bh1 / bh2), data prediction (diffusers' UniPCMultistepScheduler)")
    register("solver", "euler", _M + "edm:make_euler", _M + "edm:EDMConfig",
             doc="EDM Euler with churn (S_churn, S_noise, S_tmin, S_tmax) in sigma space (Karras et al. Algorithm 2)")
    register("solver", "heun", _M + "edm:make_heun", _M + "edm:EDMConfig",
             doc="EDM Heun (2nd order) with churn, Karras et al. Algorithm 2")
    register("solver", "euler_ancestral", _M + "edm:make_euler_ancestral", _M + "edm:AncestralEulerConfig",
             doc="Euler ancestral (k-diffusion / diffusers' EulerAncestralDiscreteScheduler), eta")
    register("metric", "ddpm_bpd", _M + "metrics:make_ddpm_bpd", _M + "metrics:BpdConfig",
             doc="variational bound in bits per dimension over every diffusion step; lower is better")
    register("metric", "noisy_accuracy", _M + "metrics:make_noisy_accuracy", _M + "metrics:NoisyAccuracyConfig",
             doc="held-out top-1 accuracy of a noisy classifier at noise levels of the run's process")
