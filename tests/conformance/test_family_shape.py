"""One shape per family: module names, the factory naming rule, and the objective's source draw.

* Every first-party family package has one module per kind it registers, named after the kind
  (``scheduler``, ``path``, ``objective``, ``solver``, ``metrics``, ``data``; backbones ``model``).
* Every registered factory of flowforge's own plugins is a function named ``make_<plugin>`` (the
  registered name), and its config class, when it has one, is named ``...Config``.
* Every objective draws its source ``x_0`` through ``path.sample_source(..., draw=<the batch's draw>)``:
  replacing the path's draw changes the loss, and wrapping it without change keeps the loss bitwise.
"""

from __future__ import annotations

import importlib
import inspect
import re
import typing

import pytest
import torch

import registry
from core.interfaces import DataSpec

#: kind -> the module of a family package that holds it
KIND_MODULE = {"scheduler": "scheduler", "path": "path", "objective": "objective", "solver": "solver",
               "metric": "metrics", "data": "data", "backbone": "model",
              "importer": "importer", "diffusers_exporter": "to_diffusers"}
FAMILIES = ("flow_matching", "rectified_flow", "ddpm", "discrete_flow", "unet", "dit", "mlp")


def components(packages=None):
    """The registered components of the given first-party packages (all of flowforge's own when None)."""
    every = [registry.get(kind, name) for kind in registry.kinds() for name in registry.available(kind)]
    return [c for c in every if (c.plugin in packages if packages is not None else c.distribution == "flowforge")]


@pytest.mark.parametrize("package", FAMILIES)
def test_family_has_a_module_per_kind_it_registers(package):
    kinds = {c.kind for c in components([package])}
    assert kinds, f"plugins.{package} registers nothing"
    for kind in kinds:
        module = f"plugins.{package}.{KIND_MODULE[kind]}"
        importlib.import_module(module)  # raises when missing
        assert any(c.factory_ref.startswith(module + ":") for c in components([package]) if c.kind == kind), (
            f"no {kind} of plugins.{package} is registered from {module}")


@pytest.mark.parametrize("component", components(), ids=lambda c: f"{c.kind}-{c.name}")
def test_factory_follows_the_naming_rule(component):
    factory = component.factory()
    want = "make_" + re.sub(r"\W", "_", component.name)
    assert inspect.isfunction(factory) and factory.__name__ == want, (
        f"{component.kind} {component.name!r} is made by {component.factory_ref!r}; expected a function {want}")
    assert component.factory_ref.endswith(":" + want)
    config = component.config_class()
    assert config is None or config.__name__.endswith("Config"), config


def _continuous(shape=(2,)):
    return DataSpec(shape=shape, kind="continuous", num_classes=0)


def _objective_cases():
    """(name, objective factory, model factory, batch factory) for every first-party objective's source draw."""
    def fm(plugin, path_plugin="affine", scheduler="cosine", backbone=None, **opts):
        def make():
            spec = _continuous()
            path = registry.build("path", {"plugin": path_plugin},
                                  scheduler=registry.build("scheduler", {"plugin": scheduler}))
            obj = registry.build("objective", {"plugin": plugin, **opts}, spec=spec, path=path)
            model = registry.build("backbone", {"plugin": "mlp", "hidden": 16, "depth": 2, **(backbone or {})},
                                   spec=spec)
            return obj, path, model, {"x": torch.randn(6, 2, generator=torch.Generator().manual_seed(1))}
        return make

    def ddpm():
        spec = _continuous((1, 2, 2))
        path = registry.build("path", {"plugin": "gaussian_diffusion", "steps": 50}, spec=spec)
        obj = registry.build("objective", {"plugin": "ddpm"}, spec=spec, path=path)
        model = registry.build("backbone", {"plugin": "mlp", "hidden": 16, "depth": 2}, spec=spec)
        return obj, path, model, {"x": torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(1))}

    def noisy_classifier():
        spec = DataSpec(shape=(1, 2, 2), kind="continuous", num_classes=3)
        path = registry.build("path", {"plugin": "gaussian_diffusion", "steps": 50}, spec=spec)
        obj = registry.build("objective", {"plugin": "noisy_classifier"}, spec=spec, path=path)
        model = registry.build("backbone", {"plugin": "mlp", "hidden": 16, "depth": 2, "classifier": True}, spec=spec)
        g = torch.Generator().manual_seed(1)
        return obj, path, model, {"x": torch.randn(6, 1, 2, 2, generator=g), "y": torch.randint(3, (6,), generator=g)}

    def discrete():
        spec = DataSpec(shape=(5,), kind="discrete", vocab_size=4, num_classes=0)
        path = registry.build("path", {"plugin": "mixture_discrete", "source": "uniform"}, spec=spec,
                              scheduler=registry.build("scheduler", {"plugin": "cond_ot"}))
        obj = registry.build("objective", {"plugin": "discrete_fm"}, spec=spec, path=path)
        model = registry.build("backbone", {"plugin": "mlp", "hidden": 16, "depth": 2}, spec=spec)
        return obj, path, model, {"x": torch.randint(4, (6, 5), generator=torch.Generator().manual_seed(1))}

    return {"flow_matching": fm("flow_matching", prediction="epsilon"), "velocity_mse": fm("velocity_mse"),
            "flow_matching/interpolant": fm("flow_matching", "interpolant"),
            "flow_matching/schrodinger_bridge": fm("flow_matching", "schrodinger_bridge", "cond_ot"),
            "ddpm": ddpm, "noisy_classifier": noisy_classifier, "discrete_fm": discrete,
            "meanflow": fm("meanflow", "affine", "cond_ot", backbone={"interval_input": True})}


CASES = _objective_cases()


def test_every_first_party_objective_is_covered_and_every_path_takes_the_draw():
    first_party = {c.name for c in components(FAMILIES) if c.kind == "objective"}
    assert first_party == {name.partition("/")[0] for name in CASES}
    for c in components(FAMILIES):
        if c.kind == "path":
            path_class = typing.get_type_hints(c.factory())["return"]
            params = inspect.signature(path_class.sample_source).parameters
            assert {"generator", "device", "dtype", "draw"} <= set(params), (c.name, list(params))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "global-rng"])
def test_objective_draws_its_source_through_path_sample_source(name, seeded, monkeypatch):
    objective, path, model, batch = CASES[name]()
    if seeded:
        batch["seeds"] = torch.arange(100, 106)

    def loss():
        torch.manual_seed(7)
        return objective.loss({"model": model}, dict(batch), 0)[0]

    plain = loss()
    original = path.sample_source
    calls = []

    def recorded(shape, *args, **kwargs):
        calls.append((tuple(shape), kwargs.get("draw")))
        return original(shape, *args, **kwargs)

    monkeypatch.setattr(path, "sample_source", recorded)
    wrapped = loss()
    assert len(calls) == 1 and calls[0][0] == tuple(batch["x"].shape), calls
    assert calls[0][1] is not None, "the objective passes the batch's draw (per-example randomness)"
    assert torch.equal(plain, wrapped), "the objective's source is the path's draw, nothing else"

    other = torch.Generator().manual_seed(99)

    def replaced(shape, *args, **kwargs):
        like = original(shape, *args, **kwargs)
        if like.dtype.is_floating_point:
            return torch.randn(like.shape, generator=other, dtype=like.dtype).to(like.device)
        return torch.randint(int(path.data_vocab), like.shape, generator=other).to(like.device)

    monkeypatch.setattr(path, "sample_source", replaced)
    assert not torch.equal(loss(), plain), "a different source draw changes the loss"


def test_objectives_say_what_the_model_predicts():
    """`objective.prediction` is where every consumer reads the prediction type, whichever section set it."""
    fm, _, _, _ = CASES["flow_matching"]()
    ddpm, path, _, _ = CASES["ddpm"]()
    discrete, _, _, _ = CASES["discrete_fm"]()
    assert fm.prediction == "epsilon" and ddpm.prediction == path.config.prediction == "epsilon"
    assert discrete.prediction == "x1"


def test_few_step_samples_the_runs_own_objective_and_path():
    """Inside a run, few_step takes its path and field from the run's objective; contradicting options are refused."""
    objective, path, model, _ = CASES["flow_matching"]()  # cosine scheduler, epsilon prediction
    spec = _continuous()
    metric = registry.build("metric", {"plugin": "few_step", "num_samples": 8, "batch_size": 8}, spec=spec,
                            objective=objective)
    assert metric.path is path
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.full((3,), 0.4, dtype=torch.float64)
    net = model.double().eval()
    assert torch.equal(metric.field(net)(x, t), objective.sampling_model(net)(x, t))
    for key, value in (("prediction", "velocity"), ("scheduler", "cond_ot")):
        with pytest.raises(registry.ConfigError, match=key):
            registry.build("metric", {"plugin": "few_step", key: value}, spec=spec, objective=objective)
    alone = registry.build("metric", {"plugin": "few_step"}, spec=spec)  # outside a run: cond_ot, velocity
    assert type(alone.path.scheduler).__name__ == "CondOTScheduler" and alone.field(net) is net


def test_evaluating_restores_the_training_flag_and_yields_the_device():
    from core.nn import evaluating, model_device

    net = torch.nn.Linear(2, 2).train()
    with evaluating(net) as device:
        assert not net.training and device == torch.device("cpu")
    assert net.training
    with pytest.raises(RuntimeError), evaluating(net):
        raise RuntimeError("boom")
    assert net.training, "restored on an error too"
    assert model_device(torch.nn.Identity()) == torch.device("cpu")  # no parameters
