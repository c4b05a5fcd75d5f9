"""benchmarks/accelerator_check.py: --smoke runs every path of the GPU/TPU check on this CPU; without an
accelerator the real check stops in one line."""

import json
import subprocess
import sys

import pytest

from benchmarks import accelerator_check
from helpers import ROOT
from helpers import fails_in_process


def test_without_an_accelerator_the_check_stops_in_one_line(capsys, tmp_path):
    line = fails_in_process(capsys, accelerator_check, f"--output={tmp_path / 'check.json'}")
    assert line.startswith("error: --accelerator=gpu: TensorFlow sees no GPU, only CPU:0. Likely cause: ")
    assert not (tmp_path / "check.json").exists()


def test_smoke_run_measures_every_row_and_writes_json_and_readme_rows(cifar_dir, tmp_path):
    output = tmp_path / "check.json"
    # As the README says to run it: the script, not a module.
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accelerator_check.py"), "--smoke",
                             f"--data_dir={cifar_dir}", f"--output={output}"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["smoke"] and results["accelerator"] == "cpu" and results["device"].startswith("1 x CPU (")
    rows = results["throughput"]
    assert {row["model"] for row in rows} == {"cnn"}  # On an accelerator: cnn, airbench and resnet50.
    assert set(accelerator_check.FULL.batch_per_device) == set(accelerator_check.FULL.xla_models) == {
        "cnn", "airbench", "resnet50"}
    cnn = {(row["precision"], row["xla"]) for row in rows if row["model"] == "cnn"}
    assert cnn == {(precision, xla) for precision in ("float32", "mixed_bfloat16") for xla in (False, True)}
    assert all(row["real"] > 0 and row["synthetic"] > 0 for row in rows)
    scaling = results["scaling"]  # Over the two logical CPU devices the smoke run makes.
    # No upper bound: two logical devices share the same cores, so on a loaded machine (a CI runner, the suite's
    # other worker) timing noise decides the ratio; what is checked is that it is the ratio of the two rates.
    assert scaling["devices"] == 2 and scaling["model"] == "cnn"
    assert scaling["efficiency"] == pytest.approx(scaling["all_devices"] / (2 * scaling["one_device"]))
    assert 0 <= results["fast"]["test_accuracy"] <= 1 and results["fast"]["epochs"] == 1
    readme_rows = output.with_suffix(".md").read_text().splitlines()
    assert readme_rows == result.stdout.splitlines()
    assert len(readme_rows) == len(rows) + 2  # Throughput rows, scaling, fast recipe.
    assert all(row.startswith("| `") or row.startswith("| Mirrored scaling") for row in readme_rows)
    assert all(results["device"] in row and row.count(" | ") == 3 for row in readme_rows)

