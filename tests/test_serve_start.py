"""What trainer.serve refuses or warns about as it starts: labels that do not match the model's outputs (predict
refuses them too), a metrics.json of the wrong types, a host beyond loopback, a connection cap beyond ulimit -n."""

import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT
from helpers import fails_in_process
from helpers import single_error_line
from test_serve import GOOD
from test_serve import served_run  # noqa: F401 (a fixture)
from trainer.results import predict
from trainer.serving import serve


def copy_of_run(run_dir: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
    """The run's export and its records, to damage without touching the shared run."""
    shutil.copytree(run_dir / "export", destination / "export")
    for name in ("metrics.json", "config.json"):
        shutil.copy(run_dir / name, destination / name)
    return destination


@pytest.mark.parametrize("count", [5, 12])
def test_labels_that_do_not_match_the_outputs_are_refused_by_the_server_and_predict(
        served_run, tmp_path, capsys, count):  # noqa: F811
    run = copy_of_run(served_run, tmp_path / "run")
    (run / "export" / "assets.extra" / "labels.txt").write_text("".join(f"class{index}\n" for index in range(count)))
    expected = f"labels.txt names {count} classes but the model has 10 outputs"
    assert expected in fails_in_process(capsys, serve, f"--model_dir={run}", "--port=0")
    image = tmp_path / "image.png"
    image.write_bytes(GOOD)
    assert expected in fails_in_process(capsys, predict, f"--model_dir={run}", str(image))


def test_a_metrics_json_with_wrong_types_is_refused_naming_the_file(served_run, tmp_path, capsys):  # noqa: F811
    run = copy_of_run(served_run, tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "test_accuracy": "0.9"}))
    message = fails_in_process(capsys, serve, f"--model_dir={run}", "--port=0")
    assert f"{run / 'metrics.json'} is damaged: its 'test_accuracy' is \"0.9\", not a number." in message


def test_the_default_max_connections_fits_the_open_files_limit(tmp_path):
    """Under `ulimit -n 512` the default --max_connections shrinks to fit, with a warning (an explicit one that
    does not fit is one error line naming the range: test_flags_and_vertex_environment)."""
    by_default = subprocess.run([sys.executable, "-m", "trainer.serve", f"--model_dir={tmp_path}", "--port=0"],
                                capture_output=True, text=True, timeout=120, cwd=str(ROOT),
                                env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"},
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512)))
    assert "--max_connections=448 by default, the most the open-files limit (ulimit -n) allows." in by_default.stderr
    assert "has no export/ folder" in single_error_line(by_default)  # Past the flags: they were accepted.


def test_a_server_beyond_loopback_warns_that_it_shows_model_dir():
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        assert "show the model's directory (gs://b/run)" in serve.exposure_warning(host, 8080, "gs://b/run")
    for host in ("127.0.0.1", "127.0.0.2", "::1"):
        assert serve.exposure_warning(host, 8080, "gs://b/run") is None


@pytest.mark.parametrize("flag, message", [
    ("--batch_timeout_ms=inf", "--batch_timeout_ms=inf must be from 0 to 1000."),
    ("--batch_timeout_ms=nan", "--batch_timeout_ms=nan must be from 0 to 1000."),
    ("--header_timeout_s=inf", "--header_timeout_s=inf must be from 0.1 to 3600."),
    ("--shutdown_grace_s=-1", "--shutdown_grace_s=-1 must be from 0 to 3600."),
    ("--max_request_bytes=99999999999", "--max_request_bytes=99,999,999,999 must be from 1024 to 1,073,741,824."),
    ("--max_connections=100000000", "--max_connections=100,000,000 must be from 1 to "),
    ("--max_inflight_bytes=2048", "--max_inflight_bytes=2,048 must be at least --max_request_bytes=16,777,216"),
])
def test_non_finite_and_absurd_numbers_are_one_line_naming_the_range(tmp_path, capsys, flag, message):
    assert message in fails_in_process(capsys, serve, f"--model_dir={tmp_path}", flag)
