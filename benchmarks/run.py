"""Benchmarks behind the README's results table: `python benchmarks/run.py [--only=...] [--update_readme]`.

Every figure is measured here, in this run, and printed with how it was measured. Throughput
numbers time whole `steps_per_loop` calls after one warm-up call (which traces and compiles).
"""

import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# First: importing the trainer package sets the job's TensorFlow environment before TF loads.
from trainer import config as config_lib  # noqa: E402  (isort: skip)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer import data  # noqa: E402
from trainer import distribution  # noqa: E402
from trainer import progress  # noqa: E402
from trainer import train  # noqa: E402
from trainer.steps import Trainer  # noqa: E402

SECTIONS = ("pipeline", "throughput", "fit", "accuracy")
flags.DEFINE_list("only", list(SECTIONS), f"Sections to run: {', '.join(SECTIONS)}.")
flags.DEFINE_integer("timed_steps", 200, "Training steps timed per throughput figure.")
flags.DEFINE_string("output", str(ROOT / "benchmarks" / "results.json"), "Where the raw results go (JSON).")
flags.DEFINE_bool("update_readme", False, "Rewrite the README's results section from this run.")
FLAGS = flags.FLAGS

BATCH_SIZE = 128
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    cpu_flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    return {"date": datetime.date.today().isoformat(), "commit": commit.strip(), "cpu": cpu,
            "cores": os.cpu_count(), "avx512": any(flag.startswith("avx512") for flag in cpu_flags),
            "amx": any(flag.startswith("amx") for flag in cpu_flags),
            "gpus": len(tf.config.list_physical_devices("GPU")),
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__}


def benchmark_pipeline() -> dict:
    """Host input pipeline alone: cached uint8 CIFAR-10 training batches, shuffled, sharded, batched."""
    builder = data.load_builder("cifar10", FLAGS.data_dir)
    count = data.num_examples(builder, "train", "--train_split")
    steps = count // BATCH_SIZE
    batches = data.training_batches(
        data.decoded_examples(builder, "train"), num_examples=count, input_context=tf.distribute.InputContext(),
        global_batch_size=BATCH_SIZE, steps_per_epoch=steps, start_epoch=0, end_epoch=6, start_step=0, seed=0)
    iterator = iter(batches)
    for _ in range(steps):  # Epoch 1 decodes the PNGs and fills the cache.
        next(iterator)
    began = time.perf_counter()
    for _ in range(5 * steps):
        next(iterator)
    seconds = time.perf_counter() - began
    return {"images_per_second": 5 * steps * BATCH_SIZE / seconds,
            "how": f"5 epochs of cached uint8 batches of {BATCH_SIZE} after a decoding epoch, read in Python"}


def make_trainer(model: str, precision: str, augment: bool, **overrides) -> Trainer:
    config = config_lib.build_config(
        model=model, data_dir=FLAGS.data_dir, precision=precision, batch_size=BATCH_SIZE, epochs=100,
        random_flip=augment, brightness=0.2 if augment else 0.0, model_dir="/tmp/unused", **overrides)
    strategy = distribution.create_strategy(config)
    precision = distribution.resolve_precision(config, strategy)
    keras.mixed_precision.set_dtype_policy(precision)
    return train.build_trainer(config, strategy, precision)


def synthetic_iterator(trainer: Trainer):
    """The same batch over and over, already in memory: the input pipeline costs nothing."""
    def batches(context):
        per_replica = context.get_per_replica_batch_size(trainer.config.batch_size)
        random = np.random.default_rng(0)
        images = random.integers(0, 256, (per_replica, *trainer.info.image_shape), dtype=np.uint8)
        labels = random.integers(0, trainer.info.num_classes, (per_replica,), dtype=np.int32)
        return tf.data.Dataset.from_tensors((images, labels)).repeat()
    return iter(trainer.strategy.distribute_datasets_from_function(batches))


def timed_rounds(runners: dict, rounds: int = 5) -> dict:
    """Median images/s of each runner, timed in alternating rounds so machine noise hits all alike."""
    for run in runners.values():
        run(50)  # Traces, compiles, and fills caches.
    samples = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            began = time.perf_counter()
            images = run(FLAGS.timed_steps)
            samples[name].append(images / (time.perf_counter() - began))
    return {name: float(np.median(values)) for name, values in samples.items()}


def loop_runner(trainer: Trainer, iterator, steps_per_loop: int = 50):
    def run(steps):
        for _ in range(max(1, steps // steps_per_loop)):
            trainer.train_steps(trainer.phases[0], iterator, steps_per_loop)
        return max(1, steps // steps_per_loop) * steps_per_loop * trainer.config.batch_size
    return run


def benchmark_throughput() -> dict:
    rows = []
    for model, precision in (("cnn", "float32"), ("cnn", "mixed_bfloat16")):
        trainer = make_trainer(model, precision, augment=True)
        medians = timed_rounds({"real": loop_runner(trainer, trainer.training_iterator(trainer.phases[0])),
                                "synthetic": loop_runner(trainer, synthetic_iterator(trainer))},
                               rounds=5 if precision == "float32" else 2)
        rows.append({"model": model, "precision": precision, **medians,
                     "ratio": medians["real"] / medians["synthetic"]})
        logging.info("%s %s: %s", model, precision, rows[-1])
        keras.mixed_precision.set_dtype_policy("float32")
    return {"rows": rows}


def fit_runner(model: keras.Model, batches: tf.data.Dataset):
    def run(steps):
        model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
        return steps * BATCH_SIZE
    return run


def benchmark_fit() -> dict:
    """Our loop vs Keras model.fit: same model, batch, data (no augmentation in either), same process."""
    trainer = make_trainer("cnn", "float32", augment=False)
    model = make_trainer("cnn", "float32", augment=False).model
    model.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    builder = data.load_builder("cifar10", FLAGS.data_dir)
    count = data.num_examples(builder, "train", "--train_split")
    batches = data.training_batches(
        data.decoded_examples(builder, "train"), num_examples=count, input_context=tf.distribute.InputContext(),
        global_batch_size=BATCH_SIZE, steps_per_epoch=count // BATCH_SIZE, start_epoch=0, end_epoch=100,
        start_step=0, seed=0).map(lambda images, labels: (tf.cast(images, tf.float32), labels))
    medians = timed_rounds({"ours": loop_runner(trainer, trainer.training_iterator(trainer.phases[0])),
                            "fit": fit_runner(model, batches)})
    logging.info("ours %.0f img/s, fit %.0f img/s", medians["ours"], medians["fit"])
    return {**medians, "ratio": medians["ours"] / medians["fit"]}


def benchmark_accuracy() -> dict:
    """The notebook's recipe (cnn, Adam, 10 epochs, flip + brightness) as a user runs it."""
    model_dir = ROOT / "runs" / f"benchmark-cnn-{int(time.time())}"
    command = [sys.executable, "-m", "trainer.task", "--model=cnn", "--epochs=10", f"--data_dir={FLAGS.data_dir}",
               f"--model_dir={model_dir}"]
    began = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    wall = time.perf_counter() - began
    metrics = json.loads((model_dir / "metrics.json").read_text())
    return {"test_accuracy": metrics["test_accuracy"], "wall_seconds": wall, "epochs": metrics["epochs_completed"],
            "command": "python -m trainer.task --model=cnn --epochs=10", "model_dir": str(model_dir)}


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Measured {m['date']} at commit `{m['commit']}` on {m['cpu']}, {m['cores']} cores "
             f"(AVX-512: {'yes' if m['avx512'] else 'no'}, AMX: {'yes' if m['amx'] else 'no'}), "
             f"{m['gpus']} GPUs; TensorFlow {m['tensorflow']}, Keras {m['keras']}. "
             "Regenerate with `python benchmarks/run.py --update_readme`.", "",
             "| What | Result | How |", "|---|---|---|"]
    if "pipeline" in results:
        pipeline = results["pipeline"]
        lines.append(f"| Host input pipeline | {pipeline['images_per_second']:,.0f} img/s | {pipeline['how']} |")
    for row in results.get("throughput", {}).get("rows", []):
        lines.append(f"| Training `{row['model']}`, {row['precision']}, real data | {row['real']:,.0f} img/s "
                     f"({row['ratio']:.0%} of synthetic) | batch {BATCH_SIZE}, flip + brightness on device; "
                     f"median of rounds of {FLAGS.timed_steps} steps, alternating with synthetic |")
        lines.append(f"| Training `{row['model']}`, {row['precision']}, synthetic data | {row['synthetic']:,.0f} "
                     f"img/s | one in-memory batch repeated |")
    if "fit" in results:
        fit = results["fit"]
        lines.append(f"| Our loop vs Keras `model.fit` (`cnn`) | {fit['ratio']:.2f}x ({fit['ours']:,.0f} vs "
                     f"{fit['fit']:,.0f} img/s) | same process, model, batch {BATCH_SIZE} and pipeline, no "
                     f"augmentation; medians of 5 alternating rounds of {FLAGS.timed_steps} steps |")
    if "accuracy" in results:
        accuracy = results["accuracy"]
        lines.append(f"| `cnn`, Adam, 10 epochs, flip + brightness | {accuracy['test_accuracy']:.2%} test accuracy in "
                     f"{progress.format_duration(accuracy['wall_seconds'])} | `{accuracy['command']}` "
                     f"(full CIFAR-10, wall time of the whole command) |")
    stale = sorted({f"{results[name]['measured']['date']} at `{results[name]['measured']['commit']}`"
                    for name in SECTIONS if name in results and results[name]["measured"]["commit"] != m["commit"]})
    if stale:
        lines += ["", f"Some rows were measured earlier ({'; '.join(stale)}); see `benchmarks/results.json`."]
    return "\n".join(lines) + "\n"


def update_readme(table: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    readme.write_text(pattern.sub(lambda _: f"{README_START}\n{table}{README_END}", text))


def main(argv):
    del argv
    # --data_dir is the trainer's own flag; here it defaults to the prepared copy beside the repo.
    FLAGS.data_dir = FLAGS.data_dir or os.environ.get("TFDS_DATA_DIR") or str(
        ROOT.parent / "shared" / "tensorflow_datasets")
    unknown = set(FLAGS.only) - set(SECTIONS)
    if unknown:
        raise app.UsageError(f"--only: unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}.")
    previous = json.loads(pathlib.Path(FLAGS.output).read_text()) if os.path.exists(FLAGS.output) else {}
    results = {**previous, "machine": machine()}
    for section in SECTIONS:
        if section in FLAGS.only:
            logging.info("Running %s.", section)
            results[section] = {**globals()[f"benchmark_{section}"](),
                                "measured": {key: results["machine"][key] for key in ("date", "commit")}}
    pathlib.Path(FLAGS.output).write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    print(table)
    if FLAGS.update_readme:
        update_readme(table)


if __name__ == "__main__":
    app.run(main)
