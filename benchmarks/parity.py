"""Parity harness: our `airbench` model and `--recipe=fast` training against the reference airbench94 in PyTorch.

    python benchmarks/parity.py --reference=PATH/legacy/airbench94.py [--venv=DIR] [--output=FILE]

The reference is `legacy/airbench94.py` of https://github.com/KellerJordan/cifar10-airbench; it is not part
of this project: clone that repository and pass the file. PyTorch is not a dependency of the project either:
the harness makes its own virtual environment (`--venv`, by default ~/.cache/cifar-trainer/parity-venv) and
installs torch==2.13.0 there on first use (about a minute; where pip's default torch wheel is a CUDA build,
point PIP_INDEX_URL at a CPU-only torch index first, or the download is several GB). The reference runs in
that environment (benchmarks/parity_reference.py, on the CPU); our side runs here; they exchange .npz files.

Both sides start from the same weights (the reference's own initialisation, whitening fitted by the
reference's code on the first 5,000 training images, loaded into our model) and see the same batch of 1,024
unaugmented training images. The harness compares: every layer's forward output; the label-smoothed loss;
the gradients; one optimizer step at the schedule's peak; the BatchNorm running statistics and settings;
GELU; a whole run of each optimizer on synthetic gradients; the learning-rate schedule, step by step; the
Lookahead updates; the whitening initialisation and the steps its bias trains in; the TTA weighting; and
bfloat16 (ours on this CPU) against float16 (the reference on a GPU) as noise around float32.

It prints one table row per check (max abs and rel difference, tolerance, pass/mismatch) and writes them
to `--output` (JSON). Exit status 0 whatever the checks say: a mismatch is a finding, not a failure.
About 15 minutes on a shared 2-core machine, 7 of them for the reference; with --work_dir kept,
--reuse_reference reruns our side alone in about 3 (to check a change to the trainer).
"""

import contextlib
import datetime
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import flags
import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import parity_checks  # noqa: E402
from benchmarks import parity_forms  # noqa: E402
from benchmarks import parity_ours  # noqa: E402
from trainer import cli  # noqa: E402
from trainer.errors import Failure  # noqa: E402
from trainer.errors import UsageError  # noqa: E402
from trainer.errors import one_line  # noqa: E402

TORCH_REQUIREMENT = "torch==2.13.0"
USAGE = __doc__
FLAGS = cli.flag_registry()
flags.DEFINE_string("reference", None, "Path to airbench94.py: legacy/airbench94.py in a clone of "
                    "https://github.com/KellerJordan/cifar10-airbench.", flag_values=FLAGS)
flags.DEFINE_string("venv", str(pathlib.Path.home() / ".cache" / "cifar-trainer" / "parity-venv"),
                    "Virtual environment for PyTorch; made, with torch installed, when absent.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", os.environ.get("TFDS_DATA_DIR") or str(ROOT.parent / "shared" / "tensorflow_datasets"),
                    "TFDS data directory holding cifar10.", flag_values=FLAGS)
flags.DEFINE_integer("epochs", 10, "Our run's --epochs for the schedule and Lookahead comparison.", flag_values=FLAGS)
flags.DEFINE_float("warmup_epochs", 2.3, "Our run's --warmup_epochs (the README's 10-epoch command).",
                   flag_values=FLAGS)
flags.DEFINE_integer("tta_examples", 500, "Test images for the TTA comparison.", flag_values=FLAGS)
flags.DEFINE_string("output", str(ROOT / "benchmarks" / "parity.json"), "Where the checks go (JSON).",
                    flag_values=FLAGS)
flags.DEFINE_string("work_dir", None, "Keep the exchanged .npz/.json files here (default: a temporary directory, "
                    "deleted).", flag_values=FLAGS)
flags.DEFINE_bool("reuse_reference", False, "Reuse the reference's outputs already in --work_dir instead of running "
                  "it again (the reference does not change when ours does: rerun our side after a fix in seconds).",
                  flag_values=FLAGS)


def progress(message: str) -> None:
    """A progress line on stderr (the job's log filter keeps INFO messages to the trainer's own modules)."""
    print(f"parity: {message}", file=sys.stderr, flush=True)


def checked_reference(path: str | None) -> pathlib.Path:
    if not path:
        raise UsageError("--reference is required: the path to legacy/airbench94.py in a clone of "
                         "https://github.com/KellerJordan/cifar10-airbench.")
    reference = pathlib.Path(path).expanduser()
    if not reference.is_file():
        raise UsageError(f"--reference={path}: no such file; clone https://github.com/KellerJordan/cifar10-airbench "
                         "and pass its legacy/airbench94.py.")
    if "def make_net" not in reference.read_text(errors="replace"):
        raise UsageError(f"--reference={path} does not define make_net(); pass airbench94.py (legacy/airbench94.py).")
    return reference.resolve()


def torch_python(venv: pathlib.Path) -> pathlib.Path:
    """The venv's Python with torch importable; makes the venv and installs torch (CPU build) first if needed."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import numpy, torch; print(torch.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True, text=True).returncode == 0:
        return python
    progress(f"making the PyTorch environment in {venv} ({TORCH_REQUIREMENT}, once; a few minutes)")
    for command in ([sys.executable, "-m", "venv", str(venv)],
                    [str(python), "-m", "pip", "install", "--quiet", TORCH_REQUIREMENT, "numpy"]):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise Failure(f"could not make the PyTorch environment ({' '.join(command[:4])}...): "
                          f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    return python


def cifar_inputs(data_dir: str, tta_examples: int) -> dict:
    """The arrays both sides use: CIFAR-10 train and part of test, the batch, and the optimizer scenarios."""
    try:
        train = tfds.as_numpy(tfds.load("cifar10", split="train", batch_size=-1, data_dir=data_dir))
        test = tfds.as_numpy(tfds.load("cifar10", split="test", batch_size=-1, data_dir=data_dir))
    except Exception as error:  # TFDS raises several types for a missing or broken copy.
        raise UsageError(f"--data_dir={data_dir}: cannot read cifar10 there ({one_line(error)}).") from error
    batch = np.random.default_rng(0).choice(len(train["label"]), parity_forms.REFERENCE_BATCH, replace=False)
    total = parity_forms.reference_total_steps(len(train["label"]))
    return {"train_images": train["image"], "train_labels": train["label"], "test_images": test["image"][:2000],
            "test_labels": test["label"][:2000], "batch_images": train["image"][np.sort(batch)],
            "batch_labels": train["label"][np.sort(batch)], "tta_images": test["image"][:tta_examples],
            **parity_ours.optimizer_scenarios(total)}


def run_reference(python: pathlib.Path, reference: pathlib.Path, inputs: dict, directory: str,
                  reuse: bool) -> tuple[dict, dict]:
    if reuse:
        return read_reference(directory)
    np.savez(os.path.join(directory, "inputs.npz"), **inputs)
    command = [str(python), "-u", str(ROOT / "benchmarks" / "parity_reference.py"), f"--reference={reference}",
               f"--inputs={directory}/inputs.npz", f"--outputs={directory}/reference"]
    progress(f"running the reference (5-10 minutes on 2 cores): {' '.join(command)}")
    began = time.monotonic()
    # Its output (the reference's own per-epoch table, then each recorded step) is the progress of this part.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        for line in process.stdout:
            progress(f"  {line.rstrip()}")
        errors = process.stderr.read()
    if process.returncode:
        raise Failure(f"the reference run failed: {errors.strip()[-3000:]}")
    progress(f"reference done in {time.monotonic() - began:.0f}s")
    return read_reference(directory)


def read_reference(directory: str) -> tuple[dict, dict]:
    arrays_file, facts_file = pathlib.Path(directory, "reference.npz"), pathlib.Path(directory, "reference.json")
    if not arrays_file.is_file() or not facts_file.is_file():
        raise UsageError(f"--reuse_reference: {directory} holds no reference outputs; run once without it, "
                         "with --work_dir.")
    return dict(np.load(arrays_file)), json.loads(facts_file.read_text())


def file_digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def our_commit() -> str:
    """This tree's commit, with `+changes` when files differ from it (the README's convention)."""
    def git(*arguments):
        return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag (see --help).")
    if FLAGS.reuse_reference and not FLAGS.work_dir:
        raise UsageError("--reuse_reference needs --work_dir: the directory of an earlier run's reference outputs.")
    reference = checked_reference(FLAGS.reference)
    python = None if FLAGS.reuse_reference else torch_python(pathlib.Path(FLAGS.venv).expanduser())
    inputs = cifar_inputs(FLAGS.data_dir, FLAGS.tta_examples)
    with contextlib.ExitStack() as stack:
        directory = FLAGS.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="parity-"))
        os.makedirs(directory, exist_ok=True)
        arrays, facts = run_reference(python, reference, inputs, directory, FLAGS.reuse_reference)
        checks = parity_checks.all_checks(inputs, arrays, facts, data_dir=FLAGS.data_dir, epochs=FLAGS.epochs,
                                        warmup_epochs=FLAGS.warmup_epochs,
                                          model_dir=os.path.join(directory, "model"), progress=progress)
    print(parity_forms.table(checks))
    mismatches = [check.name for check in checks if check.status == "mismatch"]
    print(f"\n{len(checks)} checks: {sum(check.status == 'pass' for check in checks)} pass, {len(mismatches)} "
          f"mismatch, {sum(check.status == 'info' for check in checks)} info.")
    output = pathlib.Path(FLAGS.output)
    output.write_text(json.dumps({"reference": str(reference), "reference_sha256": file_digest(reference),
                                  "measured": {"date": datetime.date.today().isoformat(), "commit": our_commit()},
                                  "epochs": FLAGS.epochs,
                                  "warmup_epochs": FLAGS.warmup_epochs, "tensorflow": tf.__version__,
                                  "keras": keras.__version__, "checks": [check.as_dict() for check in checks]},
                                 indent=1) + "\n")
    progress(f"wrote {output}")


if __name__ == "__main__":
    cli.start(main, FLAGS, USAGE)
