"""The ``ddpm`` objective: guided-diffusion's training losses over the ``gaussian_diffusion`` path.

Per (micro-)batch of data ``x_start (B, ...)``:

1. draw steps ``k (B,)`` and importance weights ``w (B,)`` from the schedule sampler;
2. draw the source ``noise ~ N(0, I)`` through ``path.sample_source`` (plus ``noise_offset``
   offset noise) and build ``x_k = sqrt(abar_k) x_start + sqrt(1 - abar_k) noise`` (from
   ``noise + gamma n'`` with ``input_perturbation = gamma``; the target keeps ``noise``),
   see `plugins.ddpm.weighting`;
3. call ``model(x_k, t_k, y)`` with ``t_k = 1 - (k + 1) / T`` (labels replaced by the
   null label ``num_classes`` with probability ``label_dropout``);
4. per-example losses of `GaussianDiffusion.training_losses` for ``loss_type``
   (mse, rescaled_mse, kl, rescaled_kl; the bound term of learned variances
   trains only the variance), fed to the schedule sampler, and
   ``loss = mean(w * losses)``; with ``weighting`` (min_snr, snr) the mse term of each
   example is multiplied by its SNR weight first.

Logged: ``mse`` and ``vb`` (batch means, unweighted) where they apply.

Sampling with classifier-free guidance: the runner wraps the model in
`core.guidance.ClassifierFreeGuidance` before handing it to the solver. With a
fixed variance the guided output ``(1 + w) cond - w uncond`` is used as is
(epsilon, x_start and v are affine in one another at fixed ``(x_k, k)``, so
guiding any of them is the same; ``guidance_rescale`` is not affine and acts on
the model's own output, as diffusers'). With a learned variance `sampling_model`
replaces that wrapper by `MeanGuidance`, which guides only the mean channels
and keeps the conditional model's variance channels (as GLIDE does).
``guidance_interval`` and ``guidance_rescale`` are `core.guidance`'s.

Classifier guidance: with ``classifier = "RUN_DIR"`` (a run of the ``noisy_classifier`` objective on the same
process) `sampling_model` wraps that field in `ClassifierGuidance` (``eps - s sigma grad log p(y | x_t)``,
``s = classifier_scale``; ``ddpm_ancestral`` shifts its mean by ``s Sigma grad log p(y | x_t)`` instead), on top
of any classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs
import torch
from torch import Tensor, nn

from core import rng
from core.guidance import ClassifierFreeGuidance, check_options, configured, drop_labels, guide
from core.interfaces import Batch, DataSpec, Field, Objective
from core.nn import model_device
from registry import ConfigError

from .classifier_guidance import ClassifierGuidance, Unconditional, load_classifier
from .path import diffusion_of
from .resample import create_schedule_sampler
from .weighting import loss_weights, perturbed_noise, snr


@attrs.define
class DDPMConfig:
    """Options of the ddpm objective.

    Attributes:
        loss_type: "mse" (plain MSE; plus the unscaled bound term for learned variances), "rescaled_mse"
            (MSE plus the bound term times T/1000: improved-diffusion's hybrid loss), "kl" (the variational
            bound, use_kl) or "rescaled_kl" (the bound times T).
        schedule_sampler: "uniform" or "loss-second-moment" (importance sampling of steps).
        history_per_term: losses kept per step by loss-second-moment.
        uniform_prob: weight of the uniform distribution mixed into loss-second-moment sampling.
        label_dropout: probability of replacing a label by the null label (classifier-free guidance).
        weighting: weight of the mean-squared error per step: "none", "snr" or "min_snr" (Hang et al.;
            see `plugins.ddpm.weighting`); needs loss_type mse or rescaled_mse.
        snr_gamma: the clamp gamma of min_snr (5 in the paper).
        noise_offset: offset noise: a per-channel N(0, offset^2) shift of the noise, broadcast over space.
        input_perturbation: Ning et al.'s gamma: x_k is built from noise + gamma * N(0, I), the target
            keeps the noise.
        guidance_interval: [lo, hi]: classifier-free guidance only for t in it (Kynkaanniemi et al.).
        guidance_rescale: CFG rescale phi (Lin et al.), see `core.guidance`.
        classifier: classifier guidance (Dhariwal and Nichol): the directory of a run trained with the
            noisy_classifier objective on this [path] and data ("": none); see `plugins.ddpm.classifier_guidance`.
        classifier_scale: the classifier scale s: eps' = eps - s sigma grad log p(y | x_t).
        classifier_unconditional: sample the model's unconditional branch (null label) and let the classifier
            alone steer to the drawn class.
    """

    loss_type: Literal["mse", "rescaled_mse", "kl", "rescaled_kl"] = "mse"
    schedule_sampler: Literal["uniform", "loss-second-moment"] = "uniform"
    history_per_term: int = 10
    uniform_prob: float = 1e-3
    label_dropout: float = 0.0
    weighting: Literal["none", "snr", "min_snr"] = "none"
    snr_gamma: float = 5.0
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    guidance_rescale: float = 0.0
    classifier: str = ""
    classifier_scale: float = 1.0
    classifier_unconditional: bool = False

    def __attrs_post_init__(self) -> None:
        check_options(self.guidance_interval, self.guidance_rescale)
        checks = [
            (self.snr_gamma > 0, "snr_gamma", "a positive clamp"),
            (self.noise_offset >= 0, "noise_offset", "a non-negative offset"),
            (self.input_perturbation >= 0, "input_perturbation", "a non-negative gamma"),
            (self.weighting == "none" or self.loss_type in ("mse", "rescaled_mse"), "weighting",
             "weighting = \"none\" with loss_type kl / rescaled_kl (SNR weights apply to the mse term)"),
            (self.history_per_term >= 1, "history_per_term", "a positive integer"),
            (0.0 <= self.uniform_prob <= 1.0, "uniform_prob", "a probability in [0, 1]"),
            (0.0 <= self.label_dropout <= 1.0, "label_dropout", "a probability in [0, 1]"),
            (self.classifier_scale >= 0, "classifier_scale", "a non-negative classifier scale"),
            (bool(self.classifier) or not self.classifier_unconditional, "classifier_unconditional",
             "a classifier (classifier = \"RUN_DIR\") to steer the unconditional model"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"expected {expected}, got {getattr(self, key)!r}", (key,))


class MeanGuidance(ClassifierFreeGuidance):
    """Classifier-free guidance of the first half of the output channels (the mean part);
    the second half (the learned variance) is the conditional model's."""

    def combine(self, cond: Tensor, uncond: Tensor) -> Tensor:
        """Guide the mean channels ``[:C]`` of ``(B, 2C, ...)``; keep the conditional variance channels ``[C:]``."""
        (cond_mean, cond_var), uncond_mean = cond.chunk(2, dim=1), uncond.chunk(2, dim=1)[0]
        return torch.cat([guide(cond_mean, uncond_mean, self.scale, self.rescale), cond_var], dim=1)


class DDPMObjective(Objective):
    """See the module docstring."""

    def __init__(self, config: DDPMConfig, spec: DataSpec, path: Any = None):
        self.config, self.spec, self.path = config, spec, path
        self.diffusion = diffusion_of(path, "the ddpm objective")
        self.sampler = create_schedule_sampler(config.schedule_sampler, self.diffusion.num_timesteps,
                                               config.history_per_term, config.uniform_prob)
        self.classifier = None
        if config.classifier:
            if spec.num_classes < 1:
                raise ConfigError("classifier guidance steers to a class: it needs labelled data ([data] "
                                  "conditional = true)", ("classifier",))
            self.classifier = load_classifier(config.classifier, self.diffusion, spec)

    def loss(self, models: Mapping[str, nn.Module], batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        d = self.diffusion
        x_start = batch["x"]
        draw = rng.for_batch(batch)
        k, weights = self.sampler.sample(x_start.shape[0], x_start.device, draw=draw)
        c = self.config
        noise = self.path.sample_source(x_start.shape, device=x_start.device, dtype=x_start.dtype, draw=draw)
        noise, target_noise = perturbed_noise(noise, draw, c.noise_offset, c.input_perturbation)
        x_t = d.q_sample(x_start, k, noise)
        y = batch.get("y")
        if y is not None:
            y = drop_labels(y, self.config.label_dropout, self.spec.num_classes, draw)
        output = models["model"](x_t, d.model_time(k, x_t), y).float()
        terms = d.training_losses(output, x_start.float(), x_t.float(), k, target_noise.float(), c.loss_type)
        self.sampler.update_with_local_losses(k, terms["loss"].detach())
        logs = {name: terms[name].detach().mean() for name in ("mse", "vb") if name in terms}
        loss = terms["loss"]
        if c.weighting != "none":
            snr_w = loss_weights(snr(d, k), d.prediction, c.weighting, c.snr_gamma).to(loss)
            loss = snr_w * terms["mse"] + terms.get("vb", 0.0)
        return (loss * weights).mean(), logs

    @property
    def prediction(self) -> str:
        """What the model predicts: the process's ``[path] prediction`` (epsilon, x_start or v)."""
        return self.path.config.prediction

    def sampling_model(self, model: nn.Module) -> Field:
        c = self.config
        if self.classifier is not None and c.classifier_unconditional:
            model = Unconditional(model.model if isinstance(model, ClassifierFreeGuidance) else model,
                                  self.spec.num_classes)
        cls = MeanGuidance if self.diffusion.learned_variance else None
        field = configured(model, c.guidance_interval, c.guidance_rescale, cls)
        if self.classifier is None:
            return field
        self.classifier.to(model_device(model))
        return ClassifierGuidance(field, self.classifier, self.diffusion, c.classifier_scale)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def make_ddpm(config: DDPMConfig, spec: DataSpec, path: Any = None) -> DDPMObjective:
    """Objective factory for ``plugin = "ddpm"``."""
    return DDPMObjective(config, spec, path)
