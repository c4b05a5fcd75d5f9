"""Reliability benchmark: a 2-worker job killed (SIGKILL) or preempted (SIGTERM) 5 times, restarted each time.

    python benchmarks/reliability.py [--interruptions=5] [--epochs=4] [--update_readme]

For each scenario it reports, against an uninterrupted run of the same job: steps lost per
interruption (steps finished before it minus the step the restarted job resumed from), total wall
time, and final test accuracy. Workers run with -v=1 so every finished step is logged.
"""

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

from absl import app
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
flags.DEFINE_integer("interruptions", 5, "Interruptions per scenario.")
flags.DEFINE_integer("epochs", 4, "Epochs of the job (full CIFAR-10 train split).")
flags.DEFINE_integer("seed", 0, "Seed for when and which worker is interrupted.")
flags.DEFINE_string("data_dir", os.environ.get("TFDS_DATA_DIR") or str(ROOT.parent / "shared" / "tensorflow_datasets"),
                    "TFDS data dir holding cifar10.")
flags.DEFINE_string("output", str(ROOT / "benchmarks" / "reliability.json"), "Where the results go (JSON).")
flags.DEFINE_bool("update_readme", False, "Rewrite the README's reliability section from this run.")
FLAGS = flags.FLAGS
README_START, README_END = "<!-- reliability:start -->", "<!-- reliability:end -->"


class Job:
    """One launch.local job, with its output parsed as it streams."""

    def __init__(self, model_dir: pathlib.Path, interruptions: int):
        trainer_flags = [f"--data_dir={FLAGS.data_dir}", f"--model_dir={model_dir}", "--model=cnn",
                         f"--epochs={FLAGS.epochs}", "--eval_split=test", "--steps_per_loop=10",
                         "--checkpoint_steps=50", "--early_stopping_patience=0", "--heartbeat_timeout=10", "--v=1"]
        command = [sys.executable, "-m", "launch.local", "--workers=2", f"--restarts={interruptions}", "--",
                   *trainer_flags]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines, self.training = [], threading.Event()
        self.last_step, self.pids, self.resumed, self.attempts = 0, {}, [], 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)
            if match := re.search(r"Started worker (\d+) \(pid (\d+)\)", line):
                self.pids[int(match.group(1))] = int(match.group(2))
                self.attempts += int(match.group(1)) == 0
            elif match := re.search(r"\] step (\d+) \(epoch", line):
                self.last_step = max(self.last_step, int(match.group(1)))
                if self.attempts == self.expected_attempt:
                    self.training.set()
            elif match := re.search(r"\[worker 0\].*Resumed from .*ckpt-(\d+)", line):
                self.resumed.append(int(match.group(1)))

    expected_attempt = 1

    def interrupt(self, signum: int, rng: random.Random) -> dict:
        """Waits until the current attempt trains, lets it go on a while, then signals a random worker."""
        self.training.wait()
        time.sleep(rng.uniform(3, 20))
        worker = rng.randrange(2)
        step = self.last_step
        self.training.clear()
        self.expected_attempt += 1
        os.kill(self.pids[worker], signum)
        return {"worker": worker, "signal": signal.Signals(signum).name, "steps_finished": step}

    def wait(self) -> int:
        return self.process.wait()


def scenario(name: str, signum: int | None, rng: random.Random) -> dict:
    model_dir = ROOT / "runs" / f"reliability-{name}"
    shutil.rmtree(model_dir, ignore_errors=True)
    count = FLAGS.interruptions if signum else 0
    began = time.perf_counter()
    job = Job(model_dir, count)
    events = [job.interrupt(signum, rng) for _ in range(count)]
    code = job.wait()
    wall = time.perf_counter() - began
    if code != 0:
        sys.stderr.write("".join(job.lines[-60:]))
        raise SystemExit(f"the {name} job failed with status {code}")
    for event, resumed in zip(events, job.resumed):
        event["resumed_from"] = resumed
        # A SIGTERM checkpoint is taken at the next loop boundary, which may come after the signal.
        event["lost_steps"] = max(0, event["steps_finished"] - resumed)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    return {"wall_seconds": wall, "test_accuracy": metrics["test_accuracy"], "events": events}


def markdown(results: dict) -> str:
    base = results["uninterrupted"]
    lines = [f"2 workers on this machine, `cnn`, {FLAGS.epochs} epochs of full CIFAR-10, checkpoints every 50 "
             f"steps; measured {results['date']} at `{results['commit']}` with `python benchmarks/reliability.py`.",
             "", "| Scenario | Lost steps per interruption | Wall time | Test accuracy |", "|---|---|---|---|",
             f"| Uninterrupted | – | {base['wall_seconds']:.0f}s | {base['test_accuracy']:.2%} |"]
    for name, label in (("sigkill", "5 × SIGKILL of a random worker"), ("sigterm", "5 × SIGTERM of a random worker")):
        run = results[name]
        lost = [event["lost_steps"] for event in run["events"]]
        lines.append(f"| {label} | {', '.join(map(str, lost))} | {run['wall_seconds']:.0f}s "
                     f"({run['wall_seconds'] / base['wall_seconds']:.2f}×) | {run['test_accuracy']:.2%} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    rng = random.Random(FLAGS.seed)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    results = {"date": time.strftime("%Y-%m-%d"), "commit": commit.stdout.strip()}
    for name, signum in (("uninterrupted", None), ("sigkill", signal.SIGKILL), ("sigterm", signal.SIGTERM)):
        print(f"Running {name}...", flush=True)
        results[name] = scenario(name, signum, rng)
        print(json.dumps(results[name]), flush=True)
    pathlib.Path(FLAGS.output).write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    print(table)
    if FLAGS.update_readme:
        readme = ROOT / "README.md"
        pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
        readme.write_text(pattern.sub(lambda _: f"{README_START}\n{table}{README_END}", readme.read_text()))


if __name__ == "__main__":
    app.run(main)
