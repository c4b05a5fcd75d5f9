"""Helpers the tests share: running the entry points as a user would, reading a run's outputs, tiny configs."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_TFDS = ROOT.parent / "shared" / "tensorflow_datasets"


def cifar10_data_dir() -> str | None:
    """The prepared CIFAR-10 copy: $TFDS_DATA_DIR if it has one, else ../shared next to the repo."""
    for candidate in (os.environ.get("TFDS_DATA_DIR"), str(SHARED_TFDS)):
        if candidate and (pathlib.Path(candidate) / "cifar10").is_dir():
            return candidate
    return None


def run_task(*flags: str, module: str = "trainer.task", env: dict | None = None, timeout: float = 300,
             cwd: str | None = None) -> subprocess.CompletedProcess:
    """Runs an entry point in a fresh Python process, as a user would."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or str(ROOT))


def start_task(*flags: str, output: pathlib.Path, module: str = "trainer.task",
               env: dict | None = None) -> subprocess.Popen:
    """Starts an entry point in a fresh Python process like run_task, without waiting for it (to signal it mid-run,
    say); its stdout and stderr go to `output`."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), **(env or {})}
    with open(output, "w") as sink:
        return subprocess.Popen([sys.executable, "-m", module, *flags], stdout=sink, stderr=subprocess.STDOUT,
                                env=full_env, cwd=str(ROOT))


def run_in_process(module, *argv: str) -> None:
    """Runs an entry point module (trainer.task, trainer.evaluate, ...) in this process, as its command line
    would; it always ends in SystemExit, with the entry point's exit status."""
    from trainer import cli

    cli.run(module.main, cli.parse_flags(module.FLAGS, [module.__name__, *argv], module.USAGE))


def read_metrics(model_dir) -> dict:
    return json.loads((pathlib.Path(model_dir) / "metrics.json").read_text())


def single_error_line(result: subprocess.CompletedProcess) -> str:
    """Checks the one-line failure contract: non-zero exit, no traceback, one final 'error:' line."""
    assert result.returncode != 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-2000:]
    return errors[0]


def fails_in_process(capsys, module, *argv: str) -> str:
    """Runs an entry point in this process; returns its one stderr line after checking the contract."""
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(module, *argv)
    stderr = capsys.readouterr().err
    return single_error_line(subprocess.CompletedProcess([], exit_info.value.code, "", stderr))


def tiny_flags(cifar_dir: str, model_dir, *extra: str) -> list[str]:
    """Flags for a run of a few seconds on real CIFAR-10 slices."""
    return [f"--data_dir={cifar_dir}", f"--model_dir={model_dir}", "--train_split=train[:1024]",
            "--eval_split=test[:256]", "--batch_size=64", "--epochs=1", "--early_stopping_patience=0", *extra]


def make_config(data_dir: str, model_dir, **overrides):
    """A validated Config for a run of a few seconds on real CIFAR-10 slices."""
    from trainer import config as config_lib

    # float32 unless a test asks: --precision=auto means bfloat16 on CPUs that have it, so the tests' numbers would
    # otherwise depend on the machine.
    values = dict(data_dir=data_dir, model_dir=str(model_dir), train_split="train[:1024]", eval_split="test[:256]",
                  batch_size=64, epochs=1, early_stopping_patience=0, steps_per_loop=8, precision="float32")
    values.update(overrides)
    return config_lib.build_config(**values)


def bucket_files(bucket: str, prefix: str) -> list[str]:
    from google.cloud import storage

    return sorted(blob.name[len(prefix):].lstrip("/") for blob in storage.Client().list_blobs(bucket, prefix=prefix))


def run_with_read_only(directory, *flags: str, module: str, how: str = "mount") -> subprocess.CompletedProcess:
    """Runs an entry point like run_task with `directory` read-only for it, in a way that stops root too:

    - how="mount": a read-only bind mount in a mount namespace of its own, so writing fails as on a read-only disk
      (EROFS);
    - how="permissions": the directory is chmod 555 and, as root, the process runs without the capabilities that
      let root write anyway (CAP_DAC_OVERRIDE), so writing fails as for any user without permission (EACCES).

    Skips the test where the machine allows neither.
    """
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", module, *flags]
    if how == "mount":
        probe = subprocess.run(["unshare", "--mount", "--map-root-user", "mount", "--bind", "-o", "ro",
                                str(directory), str(directory)], capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.strip()[:200]}")
        script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
        command = ["unshare", "--mount", "--map-root-user", "sh", "-c", script, str(directory), *command]
    elif os.geteuid() == 0:
        capabilities = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={capabilities}", f"--bounding-set={capabilities}", "--", *command]
    mode = os.stat(directory).st_mode
    if how == "permissions":
        os.chmod(directory, 0o555)
    try:
        return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=300, cwd=str(ROOT))
    finally:
        os.chmod(directory, mode)
