"""Runs an N-worker MultiWorkerMirroredStrategy job on this machine, as a cluster would run its pods.

    python -m launch.local --workers=2 [--restarts=1] -- --model=cnn --epochs=2 --model_dir=runs/mw

Each worker is a process with its own TF_CONFIG on free localhost ports; their logs are streamed
with a `[worker i]` prefix. If a worker fails, the others get a grace period to notice and stop on
their own (the trainer's heartbeat and collective timeouts), then are killed; with --restarts the
whole cluster is started again, like a cluster's restart policy, and resumes from the last
checkpoint. The exit status is non-zero when the job fails.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags
from absl import logging

from launch import forwarded_flags
from trainer import cli
from trainer.errors import UsageError

FLAGS = cli.flag_registry()
flags.DEFINE_integer("workers", 2, "Number of worker processes.", flag_values=FLAGS)
flags.DEFINE_integer("restarts", 0, "Restart the whole cluster after a failure up to this many times.",
                     flag_values=FLAGS)
flags.DEFINE_enum(
    "cluster_env", "tf_config", ("tf_config", "cluster_spec"),
    "How workers learn the cluster: TF_CONFIG (Kubernetes, Kubeflow), or CLUSTER_SPEC as Vertex AI sets it "
    "(worker pool 0 is the chief, pool 1 the other workers).", flag_values=FLAGS)
flags.DEFINE_float(
    "grace_seconds", 90.0,
    "After one worker fails, how long the others may take to stop on their own before they are killed.",
                   flag_values=FLAGS)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def cluster_environments(num_workers: int, style: str = "tf_config") -> list[dict]:
    """Per worker, the environment variables a cluster would set: the same cluster, its own task."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(num_workers)]
    environments = []
    for index in range(num_workers):
        if style == "cluster_spec":
            pool, pool_index = ("workerpool0", 0) if index == 0 else ("workerpool1", index - 1)
            spec = {"cluster": {"workerpool0": addresses[:1], "workerpool1": addresses[1:]},
                    "environment": "cloud", "task": {"type": pool, "index": pool_index}}
            environments.append({"CLUSTER_SPEC": json.dumps(spec)})
        else:
            tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
            environments.append({"TF_CONFIG": json.dumps(tf_config)})
    return environments


def _stream(prefix: str, pipe, sink) -> None:
    for line in iter(pipe.readline, ""):
        sink.write(f"{prefix} {line}")
        sink.flush()
    pipe.close()


class Cluster:
    """The worker processes of one attempt."""

    def __init__(self, trainer_args: list[str], num_workers: int, style: str):
        self.processes = []
        self.threads = []
        for index, cluster_env in enumerate(cluster_environments(num_workers, style)):
            env = {key: value for key, value in os.environ.items() if key not in ("TF_CONFIG", "CLUSTER_SPEC")}
            env.update(cluster_env, PYTHONUNBUFFERED="1")
            command = [sys.executable, "-m", "trainer.task", "--strategy=multi_worker_mirrored", *trainer_args]
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       bufsize=1, start_new_session=True)
            thread = threading.Thread(target=_stream, args=(f"[worker {index}]", process.stdout, sys.stdout),
                                      daemon=True)
            thread.start()
            self.processes.append(process)
            self.threads.append(thread)
            logging.info("Started worker %d (pid %d) with %s", index, process.pid, cluster_env)

    def wait(self, grace_seconds: float) -> list[int]:
        """Waits for every worker; once one fails, the rest get `grace_seconds` before being killed."""
        reported, failed_at = set(), None
        while len(reported) < len(self.processes):
            for index, process in enumerate(self.processes):
                code = process.poll()
                if code is None or index in reported:
                    continue
                reported.add(index)
                self.threads[index].join(timeout=5)  # Its last lines come before the news of its exit.
                since = f", {time.monotonic() - failed_at:.1f}s after the first failure" if failed_at else ""
                logging.info("Worker %d exited with status %d%s.", index, code, since)
                if code != 0 and failed_at is None:
                    failed_at = time.monotonic()
                    if len(reported) < len(self.processes):
                        logging.warning("The other workers have %.0fs to stop on their own.", grace_seconds)
            if failed_at is not None and time.monotonic() - failed_at > grace_seconds:
                self.kill()
            time.sleep(0.1)
        for thread in self.threads:
            thread.join(timeout=5)
        return [process.returncode for process in self.processes]

    def signal_all(self, signum: int) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signum)

    def kill(self) -> None:
        self.signal_all(signal.SIGKILL)


def run(trainer_args: list[str], num_workers: int, restarts: int, grace_seconds: float,
        style: str = "tf_config") -> int:
    """Runs the job, restarting the cluster after failures; returns the exit status."""
    for attempt in range(restarts + 1):
        if attempt:
            logging.warning("Restarting the cluster (restart %d of %d).", attempt, restarts)
        cluster = Cluster(trainer_args, num_workers, style)
        # Forward a SIGTERM to the workers, as a cluster does to its pods; they checkpoint and exit.
        previous = signal.signal(signal.SIGTERM, lambda *_: cluster.signal_all(signal.SIGTERM))
        try:
            codes = cluster.wait(grace_seconds)
        except KeyboardInterrupt:
            cluster.kill()
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
        if all(code == 0 for code in codes):
            return 0
        if any(code == cli.USAGE_EXIT_CODE for code in codes):
            logging.error("A worker rejected its flags; restarting would not help.")
            return cli.USAGE_EXIT_CODE
    logging.error("The job failed after %d attempt(s).", restarts + 1)
    # The last attempt's reason, so that whoever runs this launcher can retry a preempted or transient failure.
    for retryable in (cli.PREEMPTED_EXIT_CODE, cli.TRANSIENT_EXIT_CODE):
        if retryable in codes:
            return retryable
    return cli.FAILURE_EXIT_CODE


def main(argv: list[str]) -> int:
    if FLAGS.workers < 1:
        raise UsageError(f"--workers={FLAGS.workers} must be at least 1.")
    if FLAGS.restarts < 0:
        raise UsageError(f"--restarts={FLAGS.restarts} must be zero or more.")
    forwarded_flags.check_trainer_flags(argv[1:], ["--strategy=multi_worker_mirrored"], local_files=True)
    return run(argv[1:], FLAGS.workers, FLAGS.restarts, FLAGS.grace_seconds, FLAGS.cluster_env)


if __name__ == "__main__":
    cli.start(main, FLAGS, __doc__)
