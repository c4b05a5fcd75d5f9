"""Reliability benchmark: a 2-worker job killed (SIGKILL) or preempted (SIGTERM) several times, restarted each time.

    python benchmarks/reliability.py [--interruptions=5] [--epochs=4] [--update_readme]

It runs the same `launch.local` job three times: uninterrupted, with SIGKILLs of a random worker,
and with SIGTERMs of a random worker, each interruption at a random time after the attempt starts
training, and `--restarts` enough to survive them all. Per interruption it reports the step the
worker was signalled at, the last step the cluster finished before stopping, the step the next
attempt resumed from, and the lost steps (finished minus resumed). Per scenario it reports the
wall time, final test accuracy and final weights (their fingerprint) against the uninterrupted run's;
resumption is exact, so the weights should be identical. A SIGTERM must lose no step:
if one does, the report says so and the script exits with status 1.

Results go to benchmarks/reliability.json and, with --update_readme, to the README's block between
`<!-- reliability:start -->` and `<!-- reliability:end -->`.
"""

import dataclasses
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # Run as a script, it finds its sibling modules as the benchmarks package.

from benchmarks import readme  # noqa: E402
from trainer import cli  # noqa: E402
from trainer.errors import UsageError  # noqa: E402

FLAGS = cli.flag_registry()
# Flags of the job that the report describes, recorded with the results.
JOB_FLAGS = ("interruptions", "epochs", "train_split", "eval_split", "checkpoint_steps", "steps_per_loop", "min_delay",
             "max_delay", "seed")
flags.DEFINE_integer("interruptions", 5, "Interruptions per interrupted scenario.", flag_values=FLAGS)
flags.DEFINE_integer("epochs", 4, "Epochs of the job.", flag_values=FLAGS)
flags.DEFINE_string("train_split", "train", "Training split (a slice such as train[:2000] for a quick check).",
                    flag_values=FLAGS)
flags.DEFINE_string("eval_split", "test", "Split the final test accuracy is measured on.", flag_values=FLAGS)
flags.DEFINE_integer("checkpoint_steps", 50, "The job's --checkpoint_steps: what a SIGKILL can lose at most.",
                     flag_values=FLAGS)
flags.DEFINE_integer("steps_per_loop", 10, "The job's --steps_per_loop.", flag_values=FLAGS)
flags.DEFINE_float("min_delay", 3.0, "Seconds an attempt trains at least before it is interrupted.",
                   flag_values=FLAGS)
flags.DEFINE_float("max_delay", 20.0, "Seconds an attempt trains at most before it is interrupted.",
                   flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed for when and which worker is interrupted.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", os.environ.get("TFDS_DATA_DIR") or
                    str(ROOT.parent / "shared" / "tensorflow_datasets"), "TFDS data dir holding cifar10.",
                    flag_values=FLAGS)
flags.DEFINE_string("runs_dir", str(ROOT / "runs"), "Where the jobs' model directories go (replaced each run).",
                    flag_values=FLAGS)
flags.DEFINE_string("output", str(ROOT / "benchmarks" / "reliability.json"), "Where the results go (JSON).",
                    flag_values=FLAGS)
flags.DEFINE_bool("update_readme", False, "Replace the README's reliability block with this run's table.",
                  flag_values=FLAGS)

WORKERS = 2
# An attempt that has not trained after this long is stuck; the benchmark gives up on it.
ATTEMPT_TIMEOUT_SECONDS = 1800

STARTED = re.compile(r"Started worker (\d+) \(pid (\d+)\)")
RESUMED = re.compile(r"\[worker \d+\].*Resumed from .*ckpt-(\d+)")
FINISHED_STEP = re.compile(r"\[worker \d+\].*\] step (\d+) \(epoch")


@dataclasses.dataclass
class Attempt:
    """One start of the cluster, as its log shows it."""

    pids: dict = dataclasses.field(default_factory=dict)
    resumed_from: int | None = None  # None: it logged no resume line, so it started fresh at step 0.
    last_step: int | None = None  # The last step a worker logged as finished.


class RunLog:
    """A launch.local job's output, parsed line by line into the cluster's attempts."""

    def __init__(self):
        self.lines, self.attempts = [], []

    def add(self, line: str) -> None:
        self.lines.append(line)
        if match := STARTED.search(line):
            worker, pid = int(match.group(1)), int(match.group(2))
            if worker == 0:  # The launcher starts worker 0 first in every attempt.
                self.attempts.append(Attempt())
            self.attempts[-1].pids[worker] = pid
        elif (match := RESUMED.search(line)) and self.attempts[-1].resumed_from is None:
            self.attempts[-1].resumed_from = int(match.group(1))
        elif match := FINISHED_STEP.search(line):
            attempt = self.attempts[-1]
            attempt.last_step = max(attempt.last_step or 0, int(match.group(1)))


class Job:
    """One launch.local job, with its log parsed into attempts as it streams."""

    def __init__(self, model_dir: pathlib.Path, restarts: int):
        command = [sys.executable, "-m", "launch.local", f"--workers={WORKERS}", f"--restarts={restarts}", "--",
                   *trainer_flags(model_dir)]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.log = RunLog()
        self.changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self.changed:
                self.log.add(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_until_training(self, index: int) -> bool:
        """Waits until attempt `index` has finished a step; False if the job ended first."""
        def ready():
            attempts = self.log.attempts
            return (len(attempts) > index and attempts[index].last_step is not None) or not self._reader.is_alive()

        with self.changed:
            if not self.changed.wait_for(ready, timeout=ATTEMPT_TIMEOUT_SECONDS):
                raise SystemExit(f"attempt {index + 1} did not start training within {ATTEMPT_TIMEOUT_SECONDS}s")
            return self._reader.is_alive()

    def interrupt(self, index: int, signum: int, rng: random.Random) -> dict | None:
        """Lets attempt `index` train for a random while, then signals a random worker of it."""
        if not self.wait_until_training(index):
            return None
        time.sleep(rng.uniform(FLAGS.min_delay, FLAGS.max_delay))
        worker = rng.randrange(WORKERS)
        with self.changed:
            attempt = self.log.attempts[index]
            try:
                os.kill(attempt.pids[worker], signum)
            except ProcessLookupError:  # The attempt ended (the job finished) during the wait.
                return None
            return {"attempt": index + 1, "worker": worker, "signal": signal.Signals(signum).name,
                    "signalled_at_step": attempt.last_step}

    def wait(self) -> int:
        code = self.process.wait()
        self._reader.join(timeout=30)
        return code


def trainer_flags(model_dir: pathlib.Path) -> list[str]:
    return [f"--data_dir={FLAGS.data_dir}", f"--model_dir={model_dir}", "--model=cnn", f"--epochs={FLAGS.epochs}",
            f"--train_split={FLAGS.train_split}", f"--eval_split={FLAGS.eval_split}",
            f"--steps_per_loop={FLAGS.steps_per_loop}", f"--checkpoint_steps={FLAGS.checkpoint_steps}",
            "--early_stopping_patience=0", "--heartbeat_timeout=10", "--v=1"]


def scenario(name: str, signum: int | None, rng: random.Random) -> dict:
    """Runs the job with `FLAGS.interruptions` interruptions by `signum` (None: none)."""
    model_dir = pathlib.Path(FLAGS.runs_dir) / f"reliability-{name}"
    shutil.rmtree(model_dir, ignore_errors=True)
    count = FLAGS.interruptions if signum else 0
    began = time.perf_counter()
    job = Job(model_dir, restarts=count)
    events = []
    for index in range(count):
        event = job.interrupt(index, signum, rng)
        if event is None:
            print(f"  {name}: the job finished before interruption {index + 1}; shorten --max_delay or add --epochs.",
                  flush=True)
            break
        events.append(event)
    code = job.wait()
    wall = time.perf_counter() - began
    if code != 0:
        sys.stderr.write("".join(job.log.lines[-60:]))
        raise SystemExit(f"the {name} job failed with status {code}")
    for event in events:
        account_for(event, job.log.attempts)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    return {"wall_seconds": wall, "test_accuracy": metrics["test_accuracy"], "attempts": len(job.log.attempts),
            "weights_fingerprint": metrics["weights_fingerprint"], "events": events}


def account_for(event: dict, attempts: list[Attempt]) -> None:
    """Adds what the interruption cost: the steps finished by its attempt that the next one redid."""
    interrupted = attempts[event["attempt"] - 1]
    event["last_finished_step"] = interrupted.last_step
    if event["attempt"] < len(attempts):
        event["resumed_from"] = attempts[event["attempt"]].resumed_from or 0
        event["lost_steps"] = interrupted.last_step - event["resumed_from"]
    else:  # The signal came as the job was finishing; it exited without a restart.
        event["resumed_from"], event["lost_steps"] = None, 0


def commit() -> str:
    """HEAD, marked +changes when code differs from it (as benchmarks/run.py marks its results)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    # The files this script and others regenerate do not count as changes.
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!README.md",
                            ":!benchmarks/*.json"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return head.strip() + ("+changes" if dirty else "")


def describe(event: dict) -> str:
    resumed = "no restart (the job was finishing)" if event["resumed_from"] is None else \
        f"resumed from step {event['resumed_from']}"
    return (f"{event['signal']} of worker {event['worker']} at step {event['signalled_at_step']}: last finished "
            f"step {event['last_finished_step']}, {resumed}, {event['lost_steps']} lost steps")


def sigterm_losses(results: dict) -> int:
    return sum(max(0, event["lost_steps"]) for event in results["sigterm"]["events"])


def markdown(results: dict) -> str:
    base, job = results["uninterrupted"], results["flags"]
    lines = [f"{WORKERS} workers on this machine, `cnn`, {job['epochs']} epochs of CIFAR-10 `{job['train_split']}`, "
             f"`--checkpoint_steps={job['checkpoint_steps']} --steps_per_loop={job['steps_per_loop']}`; each "
             f"interruption {job['min_delay']:g}–{job['max_delay']:g} s after its attempt starts training. Measured "
             f"{results['date']} at `{results['commit']}` with `python benchmarks/reliability.py`.", "",
             "| Scenario | Lost steps per interruption (finished → resumed from) | Wall time | "
             f"Test accuracy (`{job['eval_split']}`) | Final weights |", "|---|---|---|---|---|",
             f"| Uninterrupted | – | {base['wall_seconds']:.0f} s | {base['test_accuracy']:.2%} | "
             f"fingerprint `{base['weights_fingerprint']}` |"]
    for name in ("sigkill", "sigterm"):
        run = results[name]
        label = f"{len(run['events'])} × {name.upper()} of a random worker"
        lost = ", ".join(f"{event['lost_steps']} ({event['last_finished_step']} → "
                         f"{'job finished' if event['resumed_from'] is None else event['resumed_from']})"
                         for event in run["events"]) or "–"
        slowdown = run["wall_seconds"] / base["wall_seconds"]
        accuracy_change = (run["test_accuracy"] - base["test_accuracy"]) * 100
        # Resumption is exact, so a job that lost steps and redid them still ends on the same weights.
        weights = "identical" if run["weights_fingerprint"] == base["weights_fingerprint"] else \
            f"**differ** (`{run['weights_fingerprint']}`)"
        lines.append(f"| {label} | {lost} | {run['wall_seconds']:.0f} s ({slowdown:.2f}×) | "
                     f"{run['test_accuracy']:.2%} ({accuracy_change:+.2f} points) | {weights} |")
    lost = sigterm_losses(results)
    lines += ["", f"**SIGTERM lost {lost} finished steps: preemption checkpoints are broken.**" if lost else
              "SIGTERM lost no finished step, as required."]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if not 0 <= FLAGS.min_delay <= FLAGS.max_delay:
        raise UsageError(f"--min_delay={FLAGS.min_delay} must be between 0 and --max_delay={FLAGS.max_delay}.")
    if FLAGS.interruptions < 1:
        raise UsageError(f"--interruptions={FLAGS.interruptions} must be at least 1.")
    rng = random.Random(FLAGS.seed)
    results = {"date": time.strftime("%Y-%m-%d"), "commit": commit(),
               "flags": {name: getattr(FLAGS, name) for name in JOB_FLAGS}}
    for name, signum in (("uninterrupted", None), ("sigkill", signal.SIGKILL), ("sigterm", signal.SIGTERM)):
        print(f"Running {name}...", flush=True)
        results[name] = scenario(name, signum, rng)
        report_scenario(name, results)
    pathlib.Path(FLAGS.output).write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    print(table)
    if FLAGS.update_readme:
        readme.replace_block("reliability", table)
    if sigterm_losses(results):
        raise SystemExit(f"error: SIGTERM lost {sigterm_losses(results)} finished steps; it must lose none.")


def report_scenario(name: str, results: dict) -> None:
    run, base = results[name], results["uninterrupted"]
    for event in run["events"]:
        print(f"  {describe(event)}", flush=True)
    print(f"  {name}: wall time {run['wall_seconds']:.0f} s ({run['wall_seconds'] / base['wall_seconds']:.2f}× the "
          f"uninterrupted run), test accuracy {run['test_accuracy']:.4f} (uninterrupted "
          f"{base['test_accuracy']:.4f}), {run['attempts']} attempt(s).", flush=True)


if __name__ == "__main__":
    cli.start(main, FLAGS, __doc__)
