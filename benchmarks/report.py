"""The results section of docs/results.md, its chart, and the README's headline, from benchmarks/results.json."""

import json
import pathlib
import sys
import textwrap

import keras
import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # Run as a script, it finds its sibling modules as the benchmarks package.

from benchmarks import readme  # noqa: E402
from trainer.training import models  # noqa: E402
from trainer.training import progress  # noqa: E402
from trainer import recipes  # noqa: E402

FAST_CHART = "benchmarks/fast.png"
TARGETS = (0.90, 0.94)


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [f"Rows come from several sessions on shared 2-core VMs, whose CPU differs between sessions: each row "
             "says its date, commit (`+changes`: with uncommitted changes) and CPU; compare times within one CPU. "
             f"Latest run: {describe_machine(machine)}; TensorFlow {machine['tensorflow']}, Keras {machine['keras']}. "
             "Regenerate with `python benchmarks/run.py --update_readme` (or `--only=SECTION,...`; "
             "`python benchmarks/run.py --help` lists them).", ""]
    lines += _throughput_rows(results) + [""] + _accuracy_rows(results) + _ablation_rows(results)
    lines += folder_rows(results)
    if "fast" in results:
        # The block lives in docs/results.md, one folder below the chart's path from the root.
        lines += ["", f"![Test accuracy of --recipe=fast against wall time](../{FAST_CHART})"]
    return "\n".join(lines) + "\n"


def headline(results: dict) -> str:
    """The README's few lines: the seed recipe (the notebook's CNN) and the fast recipe's seeds, then a folder of
    one's own images against Keras's reader, with the goals it was set."""
    lines = ["| Recipe (full CIFAR-10 test set) | Test accuracy | Time on 2 CPU cores | Command |", "|---|---|---|---|"]
    if "seed" in results:
        run = results["seed"]
        lines.append(f"| `--recipe=seed`: the notebook's CNN, trained by this job | {run['test_accuracy']:.2%} | "
                     f"{progress.format_duration(run['wall_seconds'])} ({short_cpu(run['measured']['cpu'])}) | "
                     f"`{run['command']}` |")
    parity = [run for run in results.get("fast", {}).get("runs", []) if run["name"].startswith("fast-10-epochs-parity")
              and not is_ablation(run)]
    for run in parity:
        reached = time_to(run, 0.94)
        when = f"94% after {progress.format_duration(reached)}" if reached else "94% not reached"
        lines.append(f"| `--recipe=fast`, airbench94's network and 10 epochs | {run['test_accuracy']:.2%} | {when} "
                     f"({short_cpu(run['measured']['cpu'])}) | `{run['command']}` |")
    return "\n".join(lines + folder_rows(results)) + "\n"


def describe_machine(machine: dict) -> str:
    features = [name for name, present in (("AVX-512", machine.get("avx512")), ("AVX-512 BF16", machine.get("bf16")),
                                           ("AMX", machine.get("amx"))) if present]
    return (f"{machine['cpu']}, {machine['cores']} cores ({', '.join(features) or 'no AVX-512'}), "
            f"{machine['gpus']} GPUs")


def _when(section: dict) -> str:
    measured = section["measured"]
    return f"{measured['date']}, `{measured['commit']}`, {short_cpu(measured['cpu'])}"


def short_cpu(cpu: str) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'Intel Xeon': enough to tell this workplace's machines apart."""
    return " ".join(word for word in cpu.replace("(R)", "").replace("(TM)", "").split() if word != "Processor")


def is_ablation(run: dict) -> bool:
    """A fast run that undoes one parity option; it goes to its own table, not to the chart."""
    return "-without-" in run["name"]


def _throughput_rows(results: dict) -> list[str]:
    lines = ["| Throughput | Result | How | Measured |", "|---|---|---|---|"]
    if "pipeline" in results:
        pipeline = results["pipeline"]
        lines.append(f"| Host input pipeline | {pipeline['images_per_second']:,.0f} img/s | {pipeline['how']} | "
                     f"{_when(pipeline)} |")
    throughput = results.get("throughput", {})
    for row in throughput.get("rows", []):
        lines.append(f"| `{row['model']}` {row['precision']}, XLA {'on' if row['jit_compile'] else 'off'} | "
                     f"{row['real']:,.0f} img/s real, {row['synthetic']:,.0f} synthetic ({row['ratio']:.0%}) | "
                     f"batch {row['batch_size']}, {row['steps_per_loop']} steps per call, flip + brightness on the "
                     f"device; synthetic = one in-memory batch | {_when(row)} |")
    for model, reason in throughput.get("skipped", {}).items():
        lines.append(f"| `{model}`, XLA on | not measured | {reason} | {_when(throughput)} |")
    for row in results.get("sweep", {}).get("rows", []):
        lines.append(f"| `cnn` batch {row['batch_size']}, steps_per_loop {row['steps_per_loop']} | "
                     f"{row['images_per_second']:,.0f} img/s | {row['precision']}, XLA off, real data | "
                     f"{_when(results['sweep'])} |")
    for row in results.get("fit", {}).get("rows", []):
        lines.append(f"| Our loop vs Keras `model.fit`, `{row['model']}` | {row['ratio']:.2f}x ({row['ours']:,.0f} vs "
                     f"{row['fit']:,.0f} img/s) | same process, model, batch {row['batch_size']}, precision "
                     f"{row['precision']} and pipeline, no augmentation | {_when(results['fit'])} |")
    return lines


def _accuracy_rows(results: dict) -> list[str]:
    lines = ["| Accuracy (full CIFAR-10 test set) | Result | Command | Measured |", "|---|---|---|---|"]
    for key, label in (("seed", "`--recipe=seed` (notebook: 56%)"),
                       ("features", "`cnn` + translate, one-cycle, label smoothing (10 epochs)")):
        if key in results:
            run = results[key]
            lines.append(f"| {label} | {run['test_accuracy']:.2%} in {progress.format_duration(run['wall_seconds'])}, "
                         f"{run['precision']} | `{run['command']}` | {_when(run)} |")
    # Builds the network to count its FLOPs: once for all runs, which share the recipe's model.
    gflops = training_gflops_per_image(recipes.RECIPES["fast"]["flags"]["model"]) if "fast" in results else 0.0
    for run in (run for run in results.get("fast", {}).get("runs", []) if not is_ablation(run)):
        reached = {target: time_to(run, target) for target in TARGETS}
        times = ", ".join(f"{target:.0%} after {progress.format_duration(seconds)}" if seconds else
                          f"{target:.0%} not reached" for target, seconds in reached.items())
        wall = progress.format_duration(run["wall_seconds"])
        speed = _training_speed(run["train_images_per_second"], gflops)
        lines.append(f"| `{_flags(run)}`, {run['epochs']} epochs | {run['test_accuracy']:.2%} in {wall} ({times}), "
                     f"{run['precision']}; {speed} | `{run['command']}` | {_when(run)} |")
    if "cache" in results:
        cache = results["cache"]
        uncached, cached = cache["uncached"]["epoch_seconds"], cache["cached"]["epoch_seconds"]
        lines.append(f"| Feature caching, frozen resnet50 phase | epochs {', '.join(f'{s:.0f}s' for s in uncached)}"
                     f" uncached vs {', '.join(f'{s:.0f}s' for s in cached)} cached "
                     f"({np.mean(uncached[1:]) / max(np.mean(cached[1:]), 1e-9):.0f}x on epochs after the first) | "
                     f"`{cache['command']}` | {_when(cache)} |")
    return lines


def _ablation_rows(results: dict) -> list[str]:
    """Each parity option's price: the 10-epoch run with all of them against the same run with one undone."""
    runs = {run["name"]: run for run in results.get("fast", {}).get("runs", [])}
    undone = [run for name, run in runs.items() if is_ablation(run) or name == "fast-10-epochs-none-of-the-three"]
    if not undone or "fast-10-epochs-parity" not in runs:
        return []
    reference = runs["fast-10-epochs-parity"]["test_accuracy"]
    lines = ["", "| Parity option undone (10 epochs, seed 0) | Test accuracy | Against all three on "
             f"({reference:.2%}) | Command | Measured |", "|---|---|---|---|---|"]
    for run in undone:
        what = run["name"].removeprefix("fast-10-epochs-").removeprefix("without-").replace("-", " ")
        lines.append(f"| {what} | {run['test_accuracy']:.2%} | {100 * (run['test_accuracy'] - reference):+.2f} "
                     f"points | `{run['command']}` | {_when(run)} |")
    return lines


def folder_rows(results: dict) -> list[str]:
    """The folder section: our preparation and epochs against one Keras epoch, training from the folder against
    synthetic data, each with the issue's goal and whether this run met it."""
    if "folder" not in results:
        return []
    section = results["folder"]
    keras_epoch, when = section["keras_epoch"], _when(section)
    size, goals = section["image_size"], section["goals"]
    lines = ["", f"| Folder of {section['images']:,} JPEGs ({section['source_size']}x{section['source_size']}), read "
             f"at {size}x{size} | Result | Goal | How | Measured |", "|---|---|---|---|---|",
             f"| One epoch of Keras `image_dataset_from_directory` | {_seconds_and_rate(keras_epoch)} | the "
             f"reference | listing and decoding every image, batch {section['batch_size']}, read to the end"
             f"{_median_of(keras_epoch)} | {when} |"]
    preparation = {**section["preparation"], "images_per_second":
                   section["preparation"]["images"] / section["preparation"]["seconds"]}
    lines.append(f"| Our preparation (`trainer.folder_dataset`) | {_seconds_and_rate(preparation)}, "
                 f"{_against_keras(preparation, keras_epoch)} | {_goal(preparation, keras_epoch, goals['preparation'])}"
                 f" | listing, decoding, resizing and writing the shards into an empty `--data_dir`"
                 f"{_median_of(preparation)} | {when} |")
    for number, epoch in enumerate(section["epochs"], 1):
        lines.append(f"| Our epoch {number} after preparing | {_seconds_and_rate(epoch)}, "
                     f"{_against_keras(epoch, keras_epoch)} | {_goal(epoch, keras_epoch, goals['epoch'])} | the "
                     f"training split's shuffled uint8 batches as a run reads them, from {epoch['from']}"
                     f"{_median_of(epoch)} | {when} |")
    for row in section["training"]:
        met = "met" if row["ratio"] >= goals["training"] else "**not met**"
        lines.append(f"| Training `{row['model']}` from the folder | {row['folder']:,.0f} img/s, synthetic "
                     f"{row['synthetic']:,.0f} ({row['ratio']:.0%}) | ≥ {goals['training']:.0%}: {met} | "
                     f"`--image_size={size}`, {row['precision']}, batch {section['batch_size']}, "
                     f"{row['steps_per_loop']} steps per call; synthetic = one in-memory batch | {when} |")
    return lines


def _median_of(timing: dict) -> str:
    """How many runs a timing is the median of, and their seconds (older results hold one run)."""
    runs = timing.get("runs_seconds")
    if not runs:
        return ""
    return f"; median of {len(runs)} runs ({', '.join(f'{seconds:.2f}s' for seconds in runs)})"


def _seconds_and_rate(timing: dict) -> str:
    return f"{timing['seconds']:.1f}s ({timing['images_per_second']:,.0f} img/s)"


def _against_keras(timing: dict, keras_epoch: dict) -> str:
    ratio = timing["images_per_second"] / keras_epoch["images_per_second"]
    # Two decimals near the goals of 1x and 10x: a ratio just under one must not print as the goal itself.
    return f"{ratio:.{2 if ratio < 10 else 1}f}x Keras's img/s"


def _goal(timing: dict, keras_epoch: dict, goal: float) -> str:
    met = timing["images_per_second"] >= goal * keras_epoch["images_per_second"]
    return f"≥ {goal:g}x: {'met' if met else '**not met**'}"


def _flags(run: dict) -> str:
    return run["command"].removeprefix("python -m trainer.task ")


def time_to(result: dict, target: float) -> float | None:
    """Wall time (set-up included) at the end of the first epoch whose evaluation reached `target`, else the
    whole command's, if its final evaluation (which adds --tta_translate's views) did."""
    reached = (entry["elapsed_seconds"] for entry in result["history"] if entry["eval_accuracy"] >= target)
    return next(reached, result["wall_seconds"] if result["test_accuracy"] >= target else None)


def training_gflops_per_image(model_name: str) -> float:
    """Multiply-adds of the convolutions and dense layers for one 32x32 image, x2 FLOPs, x3 for forward + backward."""
    network = models.build(model_name, image_shape=(32, 32, 3), num_classes=10, image_size=None, dropout=0.0,
                           weights="none")
    multiply_adds = 0
    for layer in network.model.layers:
        if isinstance(layer, keras.layers.Conv2D) or type(layer).__name__ == "PatchWhitening":
            multiply_adds += int(np.prod(layer.output.shape[1:3])) * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Dense):
            multiply_adds += int(np.prod(layer.kernel.shape))
    return 3 * 2 * multiply_adds / 1e9


def _training_speed(images_per_second: float, gflops: float) -> str:
    """Training img/s and the arithmetic rate it means, which shows how close to the CPU's limit it runs."""
    return (f"{images_per_second:,.0f} img/s x {gflops:.2f} GFLOP per training image = "
            f"{images_per_second * gflops:,.0f} GFLOP/s")


def _added_flags(command: str) -> str:
    """The flags a fast run adds beyond the recipe as it is now, its epochs and warmup, as further legend lines
    ('' if none)."""
    recipe = {f"--{flag}={value}" for flag, value in recipes.RECIPES["fast"]["flags"].items()}
    recipe |= {f"--{flag}" for flag, value in recipes.RECIPES["fast"]["flags"].items() if value is True}
    added = [argument for argument in command.split()[3:]
             if argument.split("=")[0] not in ("--recipe", "--epochs", "--warmup_epochs") and argument not in recipe]
    return "\n" + textwrap.fill("+ " + " ".join(added), 48, subsequent_indent="  ") if added else ""


def plot_fast(results: dict, path: pathlib.Path) -> None:
    """Evaluation accuracy after each epoch of the fast recipe against wall time, with the final (TTA) result."""
    figure, axes = pyplot.subplots(figsize=(7, 4))
    for run in (run for run in results.get("fast", {}).get("runs", []) if not is_ablation(run)):
        minutes = [entry["elapsed_seconds"] / 60 for entry in run["history"]]
        line, = axes.plot(minutes, [entry["eval_accuracy"] for entry in run["history"]], marker="o", markersize=4,
                          label=f"--recipe=fast, {run['epochs']} epochs: {run['test_accuracy']:.2%} "
                                f"({short_cpu(run['measured']['cpu'])}){_added_flags(run['command'])}")
        axes.plot([run["wall_seconds"] / 60], [run["test_accuracy"]], marker="*", markersize=12,
                  color=line.get_color(), linestyle="none")
    # One legend entry says what the stars are, rather than one per run.
    axes.plot([], [], marker="*", markersize=12, color="black", linestyle="none",
              label="final evaluation (flip + shift TTA);\ndots: after each epoch (flip TTA)")
    for target, goal_minutes in zip(TARGETS, (15, 30)):
        axes.axhline(target, color="grey", linewidth=0.8, linestyle="--")
        axes.axvline(goal_minutes, color="grey", linewidth=0.8, linestyle=":")
        axes.annotate(f"{target:.0%} goal: {goal_minutes} min", (goal_minutes, target), fontsize=8,
                      xytext=(4, -12), textcoords="offset points")
    # Room on the right for the goals' labels.
    longest = max((run["wall_seconds"] / 60 for run in results.get("fast", {}).get("runs", [])), default=0)
    axes.set_xlim(0, max(36, 1.1 * longest))
    axes.set(xlabel="wall time (minutes, set-up included)", ylabel="test accuracy", ylim=(0.5, 0.96),
             title="CIFAR-10 from scratch on 2 CPU cores")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def update_readme(results: dict) -> None:
    if "fast" in results:
        plot_fast(results, ROOT / FAST_CHART)
    readme.replace_block("results", markdown(results))
    readme.replace_block("headline", headline(results))


if __name__ == "__main__":
    results_file = ROOT / "benchmarks" / "results.json"
    update_readme(json.loads(results_file.read_text()))
