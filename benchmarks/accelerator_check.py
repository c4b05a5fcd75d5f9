"""One command that proves the job on a GPU or TPU machine: `python benchmarks/accelerator_check.py`.

Whoever first gets an accelerator runs it once. It
- asserts that TensorFlow sees the accelerator (the trainer's --accelerator check, with its one-line diagnosis);
- measures cnn, airbench and resnet50 training images/s in float32 vs mixed precision (float16 on GPU, bfloat16 on
  TPU), XLA on vs off (TPUs always compile), real CIFAR-10 batches vs one in-memory batch;
- with several GPUs, mirrored scaling efficiency: images/s on N devices / (N x images/s on one);
- trains --recipe=fast for 10 epochs and reports test accuracy and wall time (airbench94's anchor: 94.0% in 3.8 s
  on one A100, with its own PyTorch code);
- writes JSON (--output) and README rows in benchmarks/run.py's form, marked with the device's name.
It is sized for about 8 minutes on one modern GPU. --smoke runs the same code on this machine's CPU (two logical
devices for the scaling path, tiny sizes) in under a minute; tests/test_accelerator_check.py runs it.
"""

import dataclasses
import datetime
import json
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import readme  # noqa: E402
from benchmarks.synthetic import synthetic_iterator  # noqa: E402
from trainer.training import accelerators  # noqa: E402
from trainer import cli  # noqa: E402
from trainer import config as config_lib  # noqa: E402
from trainer.training import distribution  # noqa: E402
from trainer.training import train  # noqa: E402

USAGE = __doc__
FLAGS = cli.flag_registry()
flags.DEFINE_bool("smoke", False, "Run every code path on the CPU with tiny sizes, in under a minute.",
                  flag_values=FLAGS)
flags.DEFINE_enum("accelerator", None, ("gpu", "tpu"), "What to check. Default: gpu when TensorFlow sees one, tpu "
                  "with the tensorflow-tpu build, else gpu (which then fails, naming why).", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "TFDS data directory holding CIFAR-10 (default: TFDS's, or $TFDS_DATA_DIR).",
                    flag_values=FLAGS)
flags.DEFINE_string("output", str(ROOT / "benchmarks" / "accelerator_check.json"), "Where the JSON results go; the "
                    "README rows go beside it (.md).", flag_values=FLAGS)
flags.DEFINE_bool("update_readme", False, "Also put the rows in README.md's accelerator check section.",
                  flag_values=FLAGS)

AIRBENCH_ANCHOR = "airbench94: 94.0% in 3.8 s on one A100 (its own PyTorch code)"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How big each measurement is: the full check, or the smoke run's tiny version of the same code."""

    batch_per_device: dict  # model -> training images per device and step
    image_size: dict  # model -> side length (None: the model's default)
    steps_per_call: int
    rounds: int
    round_seconds: float
    fast_flags: dict  # The --recipe=fast run's overrides.
    train_split: str  # What the real-data rows read (each build reads it once into its cache).
    xla_models: tuple  # Models measured with XLA on (all, on an accelerator).
    mixed_models: tuple  # Models measured in mixed precision too (all, on an accelerator).
    scaling_model: str  # The model of the mirrored scaling measurement...
    scaling_xla: bool  # ...and whether it compiles: XLA cannot run a mirrored step over logical CPU devices.


FULL = Plan(batch_per_device={"cnn": 256, "airbench": 256, "resnet50": 128}, image_size={}, steps_per_call=20,
            rounds=3, round_seconds=2.0, fast_flags={}, train_split="train",
            xla_models=("cnn", "airbench", "resnet50"), mixed_models=("cnn", "airbench", "resnet50"),
            scaling_model="airbench", scaling_xla=True)
# Every path once, cheaply, with the cnn (the fast recipe trains airbench): each model's build would add tens of
# seconds on a CPU and XLA compiles resnet50 there for minutes.
SMOKE = Plan(batch_per_device={"cnn": 16}, image_size={},
             steps_per_call=2, rounds=1, round_seconds=0.0,
             fast_flags=dict(epochs=1, warmup_epochs=0.2, train_split="train[:128]", eval_split="test[:64]",
                             batch_size=64, tta=False, tta_translate=0),
             train_split="train[:512]", xla_models=("cnn",), mixed_models=("cnn",), scaling_model="cnn",
             scaling_xla=False)


def run_config(plan: Plan, model: str, accelerator: str, batch_size: int, **overrides) -> config_lib.Config:
    values = dict(model=model, accelerator=accelerator, data_dir=FLAGS.data_dir, batch_size=batch_size, epochs=100,
                  train_split=plan.train_split,
                  weights="none", image_size=plan.image_size.get(model),
                  model_dir=os.path.join(tempfile.gettempdir(), "accelerator-check-unused"))
    return config_lib.build_config(**{**values, **overrides})


def mixed_precision(strategy: tf.distribute.Strategy) -> str:
    kind = accelerators.device_kind(strategy)
    return {"GPU": "mixed_float16", "TPU": "mixed_bfloat16"}.get(kind, "mixed_bfloat16")



def images_per_second(steps, iterator, plan: Plan) -> float:
    """Median images/s over timed rounds, after one untimed call that traces (and compiles)."""
    phase = steps.phases[0]
    steps.train(phase, iterator, plan.steps_per_call)
    calls = 1
    if plan.round_seconds:  # Calibrate the calls per round on a compiled call.
        began = time.perf_counter()
        steps.train(phase, iterator, plan.steps_per_call)
        calls = max(1, round(plan.round_seconds / (time.perf_counter() - began)))
    samples = []
    for _ in range(plan.rounds):
        began = time.perf_counter()
        for _ in range(calls):
            steps.train(phase, iterator, plan.steps_per_call)
        samples.append(calls * plan.steps_per_call * steps.config.batch_size / (time.perf_counter() - began))
    return float(np.median(samples))


def measure(plan: Plan, strategy, accelerator: str, model: str, precision: str, jit_compile: bool | None,
            batch_size: int, synthetic_only: bool = False) -> dict:
    config = run_config(plan, model, accelerator, batch_size, precision=precision,
                        jit_compile=jit_compile if jit_compile is not None else None)
    with distribution.dtype_policy(precision):
        steps = train.build_steps(config, strategy, precision)
        synthetic = images_per_second(steps, synthetic_iterator(steps), plan)
        real = None if synthetic_only else images_per_second(steps, steps.training_iterator(steps.phases[0]), plan)
    row = {"model": model, "precision": precision, "xla": "always (TPU)" if jit_compile is None else jit_compile,
           "batch_size": batch_size, "replicas": strategy.num_replicas_in_sync, "synthetic": synthetic, "real": real}
    progress(f"{model} {precision} XLA {row['xla']} x{row['replicas']}: {synthetic:,.0f} img/s synthetic"
             + (f", {real:,.0f} real" if real is not None else ""))
    return row


def progress(message: str) -> None:
    """Progress on stderr: the trainer's log filter shows only the trainer's own INFO lines."""
    print(f"accelerator_check: {message}", file=sys.stderr, flush=True)


def throughput(plan: Plan, strategy, accelerator: str) -> list[dict]:
    rows = []
    tpu = accelerators.device_kind(strategy) == "TPU"
    for model, batch in plan.batch_per_device.items():
        for precision in ("float32", mixed_precision(strategy))[:2 if model in plan.mixed_models else 1]:
            for jit in ((None,) if tpu else (False, True) if model in plan.xla_models else (False,)):
                rows.append(measure(plan, strategy, accelerator, model, precision, jit,
                                    batch * strategy.num_replicas_in_sync))
    return rows


def scaling(plan: Plan, one_device, accelerator: str) -> dict | None:
    """Mirrored over every GPU (or, in the smoke run, two logical CPUs) against one device, same per-device batch."""
    devices = [device.name for device in tf.config.list_logical_devices("GPU" if not FLAGS.smoke else "CPU")]
    if len(devices) < 2:
        return None
    mirrored = tf.distribute.MirroredStrategy(devices)
    model = plan.scaling_model
    precision = mixed_precision(one_device) if model in plan.mixed_models else "float32"
    batch = plan.batch_per_device[model]
    jit = plan.scaling_xla
    single = measure(plan, one_device, accelerator, model, precision, jit, batch, synthetic_only=True)
    several = measure(plan, mirrored, accelerator, model, precision, jit, batch * len(devices), synthetic_only=True)
    return {"model": model, "precision": precision, "xla": jit, "devices": len(devices),
            "one_device": single["synthetic"], "all_devices": several["synthetic"],
            "efficiency": several["synthetic"] / (len(devices) * single["synthetic"])}


def fast_recipe(plan: Plan, accelerator: str) -> dict:
    """--recipe=fast as a user runs it (in this process: TensorFlow's start-up is not part of the wall time)."""
    model_dir = tempfile.mkdtemp(prefix="accelerator-check-fast-")
    # One device, as the anchor: --strategy=auto would mirror over every GPU.
    strategy = {"gpu": "one_device", "tpu": "tpu"}.get(accelerator, "default")
    config = config_lib.build_config(recipe="fast", accelerator=accelerator, strategy=strategy,
                                     data_dir=FLAGS.data_dir, model_dir=model_dir, **plan.fast_flags)
    began = time.perf_counter()
    metrics = train.run(config)
    flags_text = " ".join(f"--{name}={value}" for name, value in plan.fast_flags.items())
    return {"command": f"python -m trainer.task --recipe=fast {flags_text}", "test_accuracy": metrics["test_accuracy"],
            "wall_seconds": time.perf_counter() - began, "precision": metrics["precision"],
            "epochs": metrics["epochs_completed"], "anchor": AIRBENCH_ANCHOR}


def main(argv: list[str]) -> None:
    del argv
    plan = SMOKE if FLAGS.smoke else FULL
    if FLAGS.smoke:
        distribution.configure_host_devices(2)  # Before TensorFlow picks its devices.
    accelerator = "cpu" if FLAGS.smoke else FLAGS.accelerator or default_accelerator()
    # The trainer's own check: no GPU or TPU is one error line that names the likely cause, and the run stops.
    one_device = accelerators.create_strategy(run_config(plan, "cnn", accelerator, 128, strategy=(
        "tpu" if accelerator == "tpu" else "one_device"), devices=(() if accelerator == "tpu" else (
            "/gpu:0" if accelerator == "gpu" else "/cpu:0",))))
    device = accelerators.describe_devices(one_device)
    progress(f"checking {device}; {accelerators.tensorflow_distribution()}")
    results = {"device": device, "accelerator": accelerator, "smoke": FLAGS.smoke, "tensorflow":
               accelerators.tensorflow_distribution(), "date": datetime.date.today().isoformat(),
               "commit": commit(), "throughput": throughput(plan, one_device, accelerator),
               "scaling": None if accelerator == "tpu" else scaling(plan, one_device, accelerator)}
    results["fast"] = fast_recipe(plan, accelerator)
    output = pathlib.Path(FLAGS.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    rows = "\n".join(readme_rows(results)) + "\n"
    output.with_suffix(".md").write_text(rows)
    print(rows, end="")
    if FLAGS.update_readme:
        update_readme(rows)


def default_accelerator() -> str:
    if tf.config.list_physical_devices("GPU"):
        return "gpu"
    return "tpu" if accelerators.tensorflow_distribution().startswith("tensorflow-tpu") else "gpu"


def commit() -> str:
    head = ROOT / ".git" / "HEAD"
    try:
        reference = head.read_text().strip()
        if reference.startswith("ref: "):
            return (ROOT / ".git" / reference[5:]).read_text().strip()[:7]
        return reference[:7]
    except OSError:
        return "unknown"


def readme_rows(results: dict) -> list[str]:
    """Rows in the form of the README's results table (benchmarks/run.py), each naming the device."""
    device, when = results["device"], f"{results['date']}, `{results['commit']}`"
    rows = []
    for row in results["throughput"]:
        xla = row["xla"] if isinstance(row["xla"], str) else "on" if row["xla"] else "off"
        real = f"{row['real']:,.0f} img/s real, " if row["real"] is not None else ""
        ratio = f" ({row['real'] / row['synthetic']:.0%})" if row["real"] is not None else ""
        rows.append(f"| `{row['model']}` {row['precision']}, XLA {xla}, {device} | {real}{row['synthetic']:,.0f} "
                    f"synthetic{ratio} | batch {row['batch_size']}, python benchmarks/accelerator_check.py | {when} |")
    if results["scaling"]:
        scale = results["scaling"]
        rows.append(f"| Mirrored scaling, `{scale['model']}` {scale['precision']}, {scale['devices']} devices, "
                    f"{device} | {scale['efficiency']:.0%} ({scale['all_devices']:,.0f} vs {scale['devices']} x "
                    f"{scale['one_device']:,.0f} img/s) | same per-device batch, synthetic data | {when} |")
    fast = results["fast"]
    rows.append(f"| `--recipe=fast`, {fast['epochs']} epochs, {device} | {fast['test_accuracy']:.2%} in "
                f"{fast['wall_seconds']:.1f} s, {fast['precision']} ({fast['anchor']}) | `{fast['command']}` | "
                f"{when} |")
    return rows


def update_readme(rows: str) -> None:
    header = "| Accelerator check | Result | How | Measured |\n|---|---|---|---|\n"
    readme.replace_block("accelerator-check", header + rows)


if __name__ == "__main__":
    cli.start(main, FLAGS, USAGE)
