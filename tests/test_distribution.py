"""What --strategy=auto and --precision=auto pick, and what the multi-worker strategy is built with."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf

from helpers import ROOT, make_config
from trainer.training import distribution
from trainer.errors import Failure

IMPLEMENTATION = tf.distribute.experimental.CommunicationImplementation

# Builds the real strategy for each --communication in a fresh process (outside a cluster it runs
# one local worker): creating it configures collective ops for the whole process, which the other
# tests' strategies must not inherit. Prints what the strategy will all-reduce with.
STRATEGY_OPTIONS_SCRIPT = """
import json
from trainer import config
from trainer.training import distribution
built = {}
for name in ("auto", "ring", "nccl"):
    strategy = distribution.create_strategy(config.build_config(
        data_dir="unused", model_dir="unused", strategy="multi_worker_mirrored", communication=name,
        collective_timeout=45))
    options = strategy.extended._communication_options
    built[name] = [options.implementation.name, options.timeout_seconds]
print(json.dumps(built))
"""


@pytest.mark.parametrize("flag, implementation", [
    ("auto", IMPLEMENTATION.AUTO), ("ring", IMPLEMENTATION.RING), ("nccl", IMPLEMENTATION.NCCL)])
def test_communication_flag_picks_the_all_reduce_implementation(flag, implementation):
    config = make_config("unused", "unused", strategy="multi_worker_mirrored", communication=flag)
    options = distribution.communication_options(config)
    assert options.implementation == implementation


def test_collective_timeout_bounds_each_collective_and_zero_waits_forever():
    bounded = make_config("unused", "unused", strategy="multi_worker_mirrored", collective_timeout=45)
    unbounded = make_config("unused", "unused", strategy="multi_worker_mirrored", collective_timeout=0)
    assert distribution.communication_options(bounded).timeout_seconds == 45
    assert distribution.communication_options(unbounded).timeout_seconds is None


def test_the_multi_worker_strategy_is_built_with_the_requested_communication():
    cluster_variables = ("TF_CONFIG", "CLUSTER_SPEC", "WORKER_HOSTS", "JOB_COMPLETION_INDEX")
    env = {key: value for key, value in os.environ.items() if key not in cluster_variables}
    result = subprocess.run([sys.executable, "-c", STRATEGY_OPTIONS_SCRIPT], capture_output=True, text=True,
                            cwd=ROOT, env={**env, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "auto": ["AUTO", 45], "ring": ["RING", 45], "nccl": ["NCCL", 45]}


def test_auto_strategy_follows_the_machine(monkeypatch):
    config = make_config("unused", "unused")
    gpus = []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("CLUSTER_SPEC", raising=False)
    assert distribution.resolve_strategy_name(config) == "default"
    gpus.append("gpu:0")
    assert distribution.resolve_strategy_name(config) == "one_device"
    gpus.append("gpu:1")
    assert distribution.resolve_strategy_name(config) == "mirrored"
    assert distribution.resolve_strategy_name(make_config("unused", "unused", tpu="local")) == "tpu"
    monkeypatch.setenv("TPU_NAME", "my-tpu")
    assert distribution.resolve_strategy_name(make_config("unused", "unused")) == "tpu"
    monkeypatch.delenv("TPU_NAME")
    cluster = {"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    assert distribution.resolve_strategy_name(make_config("unused", "unused")) == "multi_worker_mirrored"
    assert distribution.resolve_strategy_name(make_config("unused", "unused", strategy="default")) == "default"


@pytest.mark.parametrize("flags, expected", [
    ("fpu avx2 avx512f avx512_bf16 fma", True), ("fpu amx_bf16 amx_tile", True), ("fpu avx2 avx512f fma", False)])
def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    assert distribution.cpu_has_native_bfloat16(str(cpuinfo)) is expected
    assert distribution.cpu_has_native_bfloat16(str(tmp_path / "missing")) is False


def test_auto_precision_follows_the_accelerator(monkeypatch):
    config = make_config("unused", "unused", precision="auto")
    strategy = tf.distribute.get_strategy()
    gpus = []
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    for native, expected in ((False, "float32"), (True, "mixed_bfloat16")):
        monkeypatch.setattr(distribution, "cpu_has_native_bfloat16", lambda native=native: native)
        assert distribution.resolve_precision(config, strategy) == expected
    gpus.append("gpu:0")
    assert distribution.resolve_precision(config, strategy) == "mixed_float16"
    assert distribution.resolve_jit_compile(None, strategy) is True
    assert distribution.resolve_precision(make_config("unused", "unused", precision="float32"), strategy) == "float32"
    gpus.clear()
    assert distribution.resolve_jit_compile(None, strategy) is False


def test_workers_waiting_for_each_other_see_each_other_and_a_missing_one_is_named(tmp_path):
    """Before TensorFlow's servers exist, each waiting task listens on its own port, so two tasks that start
    seconds apart both stop waiting; a task that never comes is named when the wait times out."""
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    ports = [server.getsockname()[1] for server in sockets]
    for server in sockets:
        server.close()
    cluster = {"chief": [f"localhost:{ports[0]}"], "worker": [f"127.0.0.1:{ports[1]}"]}
    finished = []

    def wait(task_type):
        distribution.wait_for_peers({"cluster": cluster, "task": {"type": task_type, "index": 0}}, timeout=30)
        finished.append(task_type)

    chief = threading.Thread(target=wait, args=("chief",))
    chief.start()
    time.sleep(2)  # The worker starts later, as pods do.
    wait("worker")
    chief.join(timeout=30)
    assert sorted(finished) == ["chief", "worker"]
    lonely = {"cluster": {"worker": [f"localhost:{ports[0]}", f"localhost:{ports[2]}"]},
              "task": {"type": "worker", "index": 0}}
    with pytest.raises(Failure, match=rf"worker 1 \(localhost:{ports[2]}\) of the cluster did not start within "
                                      r"--cluster_start_timeout=1 seconds"):
        distribution.wait_for_peers(lonely, timeout=1)
