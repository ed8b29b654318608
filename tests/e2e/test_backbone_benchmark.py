"""benchmarks/backbones.py: the --quick run prints its table and JSON; forward FLOPs match the DiT paper."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import backbones
from core.interfaces import DataSpec

#: The DiT paper's Table 4 forward "Gflops" (multiply-adds) at 32x32x4; FlopCounterMode counts 2 per multiply-add.
PAPER_GFLOPS = {"DiT-S/8": 0.36, "DiT-S/2": 6.06, "DiT-B/4": 5.56, "DiT-L/8": 5.01, "DiT-L/2": 80.71,
                "DiT-XL/4": 29.05, "DiT-XL/2": 118.64}


def test_quick_benchmark_prints_a_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert backbones.main(["--quick", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    print(table)
    assert "speedup" in table and "DiT-digits" in table and "digits" in table
    doc = json.loads(path.read_text())
    rows = {r["preset"]: r for r in doc["rows"]}
    assert set(rows) == {"digits", "DiT-digits"}
    for row in rows.values():
        assert row["params"] > 1e6 and row["gflop_per_sample"] > 0
        assert row["ours_samples_per_s"] > 0 and row["ref_samples_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["ours_samples_per_s"] / row["ref_samples_per_s"])


@pytest.mark.parametrize("preset", sorted(PAPER_GFLOPS))
def test_forward_flops_match_the_dit_paper(preset):
    model = backbones.build("dit", preset, {"learn_sigma": True}, backbones.LATENT, "meta")
    gflops = backbones.forward_flops(model, backbones.LATENT) / 2e9
    assert gflops == pytest.approx(PAPER_GFLOPS[preset], rel=0.01)


def test_flop_count_includes_attention():
    spec = DataSpec(shape=(4, 32, 32))
    ours = backbones.build("dit", "DiT-S/2", {}, spec, "meta")
    with torch.device("meta"):
        from ..reference.backbones import RefDiT

        ref = RefDiT(32, 2, 4, 384, 12, 6)
    # the fused attention kernel is counted like the reference's explicit matrix products
    assert backbones.forward_flops(ours, spec) == pytest.approx(backbones.forward_flops(ref, spec), rel=1e-3)
