"""docs/api.md's example runs as written on a trained run."""

import re
from pathlib import Path

from core.run import main as run_main

ROOT = Path(__file__).resolve().parents[2]


def test_api_example_runs(tmp_path):
    out = tmp_path / "run"
    assert run_main(["experiments/rectified_flow_2d.toml", "--out", str(out), "--set", "trainer.steps=3",
                     "--set", "trainer.batch_size=64", "--set", "metrics=[]", "--set", "eval.num_pictures=4"]) == 0
    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/api.md", "exec"), {"RUN": out, "tmp": tmp_path})


def test_every_path_the_readme_names_is_in_the_repository():
    import re

    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`((?:docs|tests|benchmarks|experiments|core|plugins|registry|examples|\.ci)/[^` ]*)`", readme))
    named |= {m for m in re.findall(r"\]\(([^)#]+)", readme) if "://" not in m}
    assert named, "the README names no file"
    missing = [p for p in sorted(named) if not (ROOT / p.split(":")[0]).exists()]
    assert not missing, f"README points at files that are not in the repository: {missing}"
    assert "../" not in readme and "steering repository" not in readme
