"""``flowforge new-plugin NAME [--kind KIND] [--dir DIR]``: write a ready-to-install plugin package.

The package registers one working component of the chosen kind through the
``flowforge.plugins`` entry point, tests it with the conformance kit
(`core.testing`) and ships a small experiment file that uses it::

    flowforge new-plugin flowforge-poly --kind scheduler
    cd flowforge-poly && pip install -e . && flowforge plugins && pytest

Layout of the package (``DIR/NAME``)::

    pyproject.toml                  entry point  PACKAGE = "PACKAGE"  in the group flowforge.plugins
    README.md
    src/PACKAGE/__init__.py         FLOWFORGE_API and the flowforge_register hook
    src/PACKAGE/KIND.py             the component: an attrs config class and the factory ``make_COMPONENT``
    tests/test_PACKAGE.py           registration, the conformance kit, a short run of the experiment
    experiments/COMPONENT.toml      a small 2D experiment using the component

``NAME`` is the distribution name (``flowforge-poly``); the import package is
its underscored form (``flowforge_poly``) and the component, unless
``--component`` says otherwise, is the name without a ``flowforge-`` prefix
(``poly``).
"""

from __future__ import annotations

import argparse
import keyword
import re
import sys
from pathlib import Path
from typing import Any

import attrs

from registry import ConfigError

NAME = "new-plugin"
HELP = "write a ready-to-install plugin package (one working component, its tests, an experiment)"


@attrs.frozen
class KindTemplate:
    """What the template writes for one kind."""

    doc: str
    section: str                  # the experiment-file section the component goes in
    context: str                  # the context keywords its factory may receive
    example_options: str          # option lines shown in the README
    test_imports: tuple[str, ...] = ()  # modules its conformance test needs besides registry


KINDS: dict[str, KindTemplate] = {
    "scheduler": KindTemplate("a polynomial convex schedule, alpha_t = t^n and sigma_t = 1 - t^n",
                              "scheduler", "`spec`", "exponent = 2.0", ("pytest", "torch")),
    "solver": KindTemplate("Euler's method from noise (t = 0) to data (t = 1), one model evaluation per step",
                           "solver", "`spec`, `scheduler`, `path`", "steps = 50"),
    "backbone": KindTemplate("a residual MLP conditioned on time and class labels",
                             "backbone", "`spec`", "hidden = 256\ndepth = 3", ("pytest",)),
    "objective": KindTemplate("flow matching with the pseudo-Huber loss",
                              "objective", "`spec`, `scheduler`, `path`", "c = 0.03", ("torch",)),
    "path": KindTemplate("the affine Gaussian path with a minimum noise level sigma_min at t = 1",
                         "path", "`spec`, `scheduler`", "sigma_min = 0.001", ("pytest",)),
    "metric": KindTemplate("the distance between the means and covariances of generated and reference samples",
                           "metrics", "`spec`, `data`", "covariance = true", ("torch",)),
    "data": KindTemplate("a ring of Gaussian blobs in 2D, drawn fresh for every batch",
                         "data", "none", "modes = 8\nradius = 3.0"),
    "launcher": KindTemplate("runs training in this process on the CPU with a chosen number of threads",
                             "launcher", "none", "threads = 2"),
}

#: Import names a plugin package must not shadow.
RESERVED = {"core", "registry", "plugins", "tests", "examples", "experiments", "docs", "benchmarks",
            "torch", "accelerate", "flowforge"}

#: The core sections of the experiment every generated package starts from (a small 2D run).
BASE_EXPERIMENT: dict[str, Any] = {
    "experiment": {"name": "", "seed": 0},
    "trainer": {"steps": 2000, "batch_size": 512, "lr": 1e-3, "log_every": 100},
    "eval": {"num_samples": 2000, "num_pictures": 2000},
}
#: Its component sections and their kinds. Each holds the installed component that declares itself
#: its kind's default (``register(..., default=True)``, `registry.default_of`); the section of the
#: chosen kind holds the new component instead.
NEIGHBOURS: tuple[tuple[str, str], ...] = (("data", "data"), ("backbone", "backbone"), ("scheduler", "scheduler"),
                                           ("path", "path"), ("objective", "objective"), ("solver", "solver"),
                                           ("launcher", "launcher"), ("metrics", "metric"))


def neighbours(kind: str) -> dict[str, Any]:
    """The component sections next to a new component of `kind`: each kind's default, from the registry.

    A section whose kind has no default is left out, unless an experiment needs it (ConfigError).
    """
    import registry
    from core.config import REQUIRED_SECTIONS

    sections: dict[str, Any] = {}
    for section, of in NEIGHBOURS:
        name = registry.default_of(of)
        if name is None:
            if section in REQUIRED_SECTIONS and of != kind:
                raise ConfigError(f"no installed {of} declares itself the default (register(..., default=True)), "
                                  f"and the experiment of a new {kind} needs a [{section}] section")
            continue
        sections[section] = [{"plugin": name}] if section == "metrics" else {"plugin": name}
    return sections


@attrs.frozen
class Names:
    dist: str
    package: str
    component: str
    class_name: str


def names(name: str, component: str | None = None) -> Names:
    """Normalise and validate the distribution, package and component names (ConfigError if invalid)."""
    dist = re.sub(r"[-_.]+", "-", name.strip()).lower()
    if not re.fullmatch(r"[a-z][a-z0-9-]*[a-z0-9]", dist):
        raise ConfigError(f"invalid package name {name!r}: use letters, digits and '-', starting with a letter "
                          f"(e.g. flowforge-myscheduler)")
    package = dist.replace("-", "_")
    if package in RESERVED or package in sys.stdlib_module_names or keyword.iskeyword(package):
        raise ConfigError(f"package name {name!r} would shadow the module {package!r}; pick another name "
                          f"(e.g. flowforge-{dist})")
    if component is None:
        component = re.sub(r"^flowforge-", "", dist).replace("-", "_")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", component or ""):
        raise ConfigError(f"invalid component name {component!r}: use lower-case letters, digits and '_', "
                          f"starting with a letter (set it with --component)")
    class_name = "".join(part.capitalize() for part in component.split("_") if part)
    return Names(dist, package, component, class_name)


def _flowforge_requirement() -> str:
    from importlib import metadata

    try:
        version = metadata.version("flowforge")
    except metadata.PackageNotFoundError:
        return "flowforge"
    major_minor = ".".join(version.split(".")[:2])
    return f"flowforge>={major_minor}"


def experiment_toml(n: Names, kind: str) -> str:
    """The generated experiment file: BASE_EXPERIMENT with the component in its section."""
    import copy

    import tomli_w

    spec = KINDS[kind]
    exp = copy.deepcopy(BASE_EXPERIMENT)
    exp["experiment"]["name"] = f"{n.component.replace('_', '-')}-2d"
    around = neighbours(kind)
    others = ", ".join(f"{section} = {value[0]['plugin'] if isinstance(value, list) else value['plugin']}"
                       for section, value in around.items() if section != spec.section)
    if spec.section == "metrics":
        around["metrics"] = [*around.get("metrics", []), {"plugin": n.component}]
    else:
        around[spec.section] = {"plugin": n.component}
    exp = {"experiment": exp["experiment"], **{section: around[section] for section, _ in NEIGHBOURS if section in around},
           "trainer": exp["trainer"], "eval": exp["eval"]}
    header = (
        f"# A small experiment that uses the {kind} \"{n.component}\" from {n.dist}.\n"
        f"#\n"
        f"#   python -m core.run experiments/{n.component}.toml\n"
        f"#\n"
        f"# The [{spec.section}] section holds {n.component}; every other section holds the installed\n"
        f"# default of its kind ({others}).\n"
        f"# summary.json in the run directory (runs/{exp['experiment']['name']}) reports the metrics of\n"
        f"# generated samples against held-out data. Every other section can name any installed plugin:\n"
        f"# `flowforge plugins` lists them, `flowforge plugins --options NAME` shows their options.\n\n"
    )
    metrics = exp.pop("metrics")
    text = tomli_w.dumps(exp)
    for entry in metrics:  # as [[metrics]] tables, the way the shipped experiments write them
        text += "\n[[metrics]]\n" + tomli_w.dumps(entry)
    return header + text


def render(name: str, kind: str, component: str | None = None) -> dict[str, str]:
    """The files of the package, as {relative path: text}."""
    from core import templates
    from registry import API_VERSION

    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}; expected one of {', '.join(sorted(KINDS))}")
    n = names(name, component)
    spec = KINDS[kind]
    section = f"[[{spec.section}]]" if spec.section == "metrics" else f"[{spec.section}]"
    values = {
        "dist": n.dist, "package": n.package, "component": n.component, "class_name": n.class_name,
        "kind": kind, "doc": spec.doc, "api_version": str(API_VERSION), "context": spec.context,
        "flowforge_requirement": _flowforge_requirement(),
        "toml_example": f'{section}\nplugin = "{n.component}"\n{spec.example_options}',
        # one third-party block, sorted the way isort/ruff expect in a package outside flowforge
        "test_imports": "\n".join(f"import {m}" for m in sorted({"registry", *spec.test_imports})),
    }
    test = templates.read("plugin_test.py.txt").replace("{{conformance}}",
                                                        templates.read(f"conformance_{kind}.py.txt").rstrip("\n"))
    files = {
        "pyproject.toml": templates.read("plugin_pyproject.toml.txt"),
        "README.md": templates.read("plugin_readme.md"),
        f"src/{n.package}/__init__.py": templates.read("plugin_hooks.py.txt"),
        f"src/{n.package}/{kind}.py": templates.read(f"component_{kind}.py.txt"),
        f"tests/test_{n.package}.py": test,
    }
    out = {path: templates.render(text, **values) for path, text in files.items()}
    out[f"experiments/{n.component}.toml"] = experiment_toml(n, kind)
    return out


def _check_free(n: Names, kind: str) -> None:
    """Refuse a component name another installed distribution already provides for `kind`."""
    import registry

    if n.component in registry.available(kind):
        taken = registry.get(kind, n.component)
        if taken.distribution != n.dist:
            raise ConfigError(f"{kind} {n.component!r} is already provided by distribution {taken.distribution!r} "
                              f"(plugin {taken.plugin!r}); two plugins cannot register the same name: "
                              f"choose another with --component")


def write(name: str, kind: str, directory: str | Path = ".", component: str | None = None,
          force: bool = False) -> Path:
    """Write the package into ``directory/<distribution name>``; return that folder."""
    n = names(name, component)
    files = render(name, kind, component)
    _check_free(n, kind)
    root = Path(directory) / n.dist
    if root.exists() and any(root.iterdir()) and not force:
        raise ConfigError(f"{root} already exists and is not empty (pass --force to write into it)")
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="distribution name of the new package, e.g. flowforge-myscheduler")
    parser.add_argument("--kind", choices=list(KINDS), default="solver",
                        help="the kind of component to start from (default: solver)")
    parser.add_argument("--dir", default=".", help="folder to create the package in (default: the current one)")
    parser.add_argument("--component", help="the component's name in experiment files "
                                            "(default: NAME without a 'flowforge-' prefix, with '_' for '-')")
    parser.add_argument("--force", action="store_true", help="write into an existing, non-empty package folder")


def main(args: argparse.Namespace) -> int:
    root = write(args.name, args.kind, args.dir, args.component, args.force)
    n = names(args.name, args.component)
    print(f"wrote {root} ({n.dist}: the {args.kind} \"{n.component}\")")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(root)}")
    print("next:")
    print(f"  cd {root}")
    print("  pip install -e .           # registers it: flowforge plugins lists it")
    print(f"  flowforge plugins --options {args.kind} {n.component}")
    print("  pytest                     # the conformance kit and a short run of the experiment")
    print(f"  python -m core.run experiments/{n.component}.toml")
    return 0
