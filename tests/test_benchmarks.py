"""Smoke test of benchmarks/bench.py in its CPU mode: tiny models, two steps; it runs every CPU section and writes
its table (markdown + JSON) with the hardware and the command. No timing is asserted: CI machines vary."""

import importlib.util
import json
import math

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_mode_writes_the_table(bench, reference_dir, tmp_path):
    path = bench.main(["--device", "cpu", "--models", "tiny", "--reference", str(reference_dir),
                       "--sd-steps", "2", "--ddpm-steps", "2,3", "--warmup", "0", "--repeats", "1",
                       "--component-calls", "1", "--out", str(tmp_path), "--name", "smoke"])
    assert path == tmp_path / "smoke.md"
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data["hardware"]["device"].startswith("CPU") and data["hardware"]["cores"] >= 1
    assert "bench.main" in data["command"] or "bench.py" in data["command"]
    assert not data["skipped"] and not [n for n in data["notes"] if "failed" in n]

    rows = {(r["section"].split(",")[0], r["metric"]): r for r in data["rows"]}
    for key in [("SD 64x64", "time per image"), ("SD 64x64", "UNet step, batch 2 (guidance)"),
                ("SD 64x64", "VAE decode"), ("SD 64x64", "text encoding (prompt + empty prompt)"),
                ("SD 64x64", "scheduler step (UniPC)"), ("SD 64x64", "time per image, every step captured"),
                ("DDPM 32x32 (ddpm-cat-256 architecture)", "time per image"),
                ("Switches", "UNet step, fused QKV"), ("Switches", "UNet step, channels_last")]:
        row = rows[key]
        for lib in ("minidiff", "diffusers"):
            assert isinstance(row[lib], float) and math.isfinite(row[lib]) and row[lib] > 0, (key, lib, row)
        assert row["ratio"] == pytest.approx(row["minidiff"] / row["diffusers"])
    # both libraries made the same picture from the same weights and latents
    assert rows[("SD 64x64", "max pixel difference of the two images")]["minidiff"] <= 1
    assert rows[("Switches", "minidiff fused QKV: max rel. difference to unfused")]["minidiff"] < 1e-5
    # the 3-step DDPM run is there too (the "long" section)
    assert any(r["section"].startswith("DDPM 32x32") and ", 3 steps" in r["section"] for r in data["rows"])

    md = path.read_text()
    assert md.startswith("# minidiff vs diffusers: CPU")
    assert "| time per image (s) |" in md and "| metric | minidiff | diffusers | ratio | target | met |" in md
    assert "command: `" in md


def test_budget_skips_sections_and_says_so(bench, reference_dir, tmp_path):
    bench.main(["--device", "cpu", "--models", "tiny", "--reference", str(reference_dir), "--sections", "sd,ddpm",
                "--budget-s", "0", "--out", str(tmp_path), "--name", "none"])
    data = json.loads((tmp_path / "none.json").read_text())
    assert not data["rows"] and len(data["skipped"]) == 2
    assert "## Skipped" in (tmp_path / "none.md").read_text()


def test_bad_options_are_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--dtypes", "fp8"])
    assert "unknown dtype 'fp8'" in capsys.readouterr().err
