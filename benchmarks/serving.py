"""Prediction server benchmark behind the README's serving table: `python benchmarks/serving.py [--update_readme]`.

For each network (cnn as the seed recipe exports it, airbench as the fast recipe exports it, with its test-time
views), it starts `python -m trainer.serve` twice on 127.0.0.1, with dynamic batching and without, and sends the same
32x32 PNG from 1, 8 and 32 concurrent clients: each client sends its next request when the last is answered, over
one keep-alive connection, for a fixed number of requests. It reports requests/s and p50/p99 latency per cell,
and the mean batch size the server's /metrics counted. Client and server share this machine's cores, as they would
on one serving VM with a local client.

Without --model_dirs it first trains a tiny run of each network (a few seconds each); the network's speed, not its
accuracy, is what is measured.
"""

import asyncio
import base64
import datetime
import io
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # Run as a script, it finds its sibling modules as the benchmarks package.

from benchmarks import readme  # noqa: E402

RESULTS = ROOT / "benchmarks" / "serving.json"
NETWORKS = {
    "cnn": ["--model=cnn"],
    # The fast recipe's export averages 6 views per image (flips and 1-pixel shifts): what its users serve.
    "airbench": ["--model=airbench", "--tta", "--tta_translate=1"],
}
CLIENTS = (1, 8, 32)
# Requests per cell (after 2 untimed ones per client): bounded, and enough for a p99 at each concurrency.
REQUESTS = {"cnn": {1: 400, 8: 800, 32: 1600}, "airbench": {1: 100, 8: 200, 32: 320}}
GOAL_SPEEDUP, GOAL_CNN_P50_MS = 2.0, 15.0


class ServerProcess:
    """`python -m trainer.serve` in a process of its own on 127.0.0.1 and a free port, until `stop`.

    Its log (stdout and stderr) goes to `log_path`; `url` is known once it logged the port it listens on.
    """

    def __init__(self, model_dir, *flags: str, log_path, env: dict | None = None):
        self.command = [sys.executable, "-m", "trainer.serve", f"--model_dir={model_dir}", "--host=127.0.0.1",
                        "--port=0", *flags]
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), **(env or {})}
        self.log_path = pathlib.Path(log_path)
        self.process, self.url = None, None

    def start(self, timeout: float = 180) -> "ServerProcess":
        """Starts it and waits until its health route says the model is loaded."""
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=str(ROOT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}:\n{self.log()[-3000:]}")
            if self.url is None:
                match = re.search(r"Serving on (http://127\.0\.0\.1:\d+)/", self.log())
                self.url = match.group(1) if match else None
            elif self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server was not ready within {timeout:.0f}s:\n{self.log()[-3000:]}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        """Stops it as Kubernetes would (SIGTERM), killing it if it does not exit within 20 s; its exit status."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def sample_png() -> bytes:
    """A 32x32 PNG of noise (it compresses like a photo, not like a flat colour)."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def predict_request(path: str, image: bytes) -> bytes:
    """A whole HTTP/1.1 request, built once and sent as is: the client's cost per request stays small."""
    body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _client(host: str, port: int, request: bytes, count: int, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for _ in range(count):
            start = time.perf_counter()
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
            body = await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the server answered {head.splitlines()[0]!r}: {body[:300]!r}")
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()


async def _load(url: str, request: bytes, clients: int, requests: int) -> tuple[list[float], float]:
    host, port = url.removeprefix("http://").split(":")
    await asyncio.gather(*(_client(host, int(port), request, 2, []) for _ in range(clients)))  # Untimed warm-up.
    latencies: list[float] = []
    start = time.perf_counter()
    counts = [requests // clients + (index < requests % clients) for index in range(clients)]
    await asyncio.gather(*(_client(host, int(port), request, count, latencies) for count in counts))
    return latencies, time.perf_counter() - start


def measure(url: str, path: str, image: bytes, clients: int, requests: int) -> dict:
    """One cell: `requests` requests from `clients` concurrent clients."""
    before = batch_counts(url)
    latencies, seconds = asyncio.run(_load(url, predict_request(path, image), clients, requests))
    after = batch_counts(url)
    latencies.sort()
    images, batches = after[0] - before[0], after[1] - before[1]
    return {"clients": clients, "requests": len(latencies), "seconds": round(seconds, 3),
            "requests_per_second": round(len(latencies) / seconds, 1),
            "p50_ms": round(1000 * percentile(latencies, 0.50), 2),
            "p99_ms": round(1000 * percentile(latencies, 0.99), 2),
            "mean_batch_size": round(images / batches, 2) if batches else None}


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The nearest-rank percentile."""
    return sorted_values[min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))]


def batch_counts(url: str) -> tuple[float, float]:
    """(images, model calls) so far, from the server's Prometheus metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {name: float(value) for name, value in re.findall(r"^(serving_batch_size_(?:sum|count)) (\S+)$",
                                                                text, re.M)}
    return values.get("serving_batch_size_sum", 0.0), values.get("serving_batch_size_count", 0.0)


def train_tiny_run(network: str, model_dir: pathlib.Path, data_dir: str) -> None:
    command = [sys.executable, "-m", "trainer.task", *NETWORKS[network], f"--data_dir={data_dir}",
               f"--model_dir={model_dir}", "--train_split=train[:1024]", "--eval_split=test[:256]", "--batch_size=64",
               "--epochs=1", "--early_stopping_patience=0"]
    print(f"Training a tiny {network} run: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True, cwd=str(ROOT),
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if result.returncode != 0:
        raise SystemExit(f"error: training {network} failed:\n{result.stderr[-3000:]}")


def benchmark(model_dirs: dict[str, str], work_dir: pathlib.Path) -> list[dict]:
    image, rows = sample_png(), []
    for network, model_dir in model_dirs.items():
        for batching in (False, True):
            flags = [f"--model_name={network}", "--batching" if batching else "--nobatching"]
            with ServerProcess(model_dir, *flags, log_path=work_dir / f"{network}-{batching}.log") as server:
                for clients in CLIENTS:
                    row = {"model": network, "batching": batching,
                           **measure(server.url, f"/v1/models/{network}:predict", image, clients,
                                     REQUESTS[network][clients])}
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    rows.append(row)
    return rows


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "trainer", "benchmarks",
                            ":!benchmarks/*.json"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"date": datetime.date.today().isoformat(), "commit": head.strip() + ("+changes" if dirty else ""),
            "cpu": cpu, "cores": os.cpu_count()}


def markdown(results: dict) -> str:
    measured = results["machine"]
    lines = [f"Measured {measured['date']} at `{measured['commit']}` on this machine ({measured['cores']} cores of "
             f"{measured['cpu']}), client and server on 127.0.0.1, with `python benchmarks/serving.py`: one 32×32 "
             "PNG per request, each client sending its next request when the last is answered. Batching on is the "
             "default (`--max_batch_size=32 --batch_timeout_ms=2`); off is `--nobatching` (each request its own "
             "model call, two at once).", "",
             "| Model | Clients | Off: requests/s | Off: p50 / p99 | On: requests/s | On: p50 / p99 | On: mean batch "
             "| Speed-up |", "|---|---|---|---|---|---|---|---|"]
    cells = {(row["model"], row["batching"], row["clients"]): row for row in results["rows"]}
    for network in dict.fromkeys(row["model"] for row in results["rows"]):
        for clients in CLIENTS:
            off, on = cells.get((network, False, clients)), cells.get((network, True, clients))
            if not (off and on):
                continue
            lines.append(f"| `{network}` | {clients} | {off['requests_per_second']:,.0f} | {off['p50_ms']:.1f} / "
                         f"{off['p99_ms']:.1f} ms | {on['requests_per_second']:,.0f} | {on['p50_ms']:.1f} / "
                         f"{on['p99_ms']:.1f} ms | {on['mean_batch_size'] or 0:.1f} | "
                         f"{on['requests_per_second'] / off['requests_per_second']:.2f}× |")
    lines += ["", *goal_lines(cells)]
    return "\n".join(lines) + "\n"


def goal_lines(cells: dict) -> list[str]:
    lines = []
    for network in dict.fromkeys(key[0] for key in cells):
        off, on = cells.get((network, False, 32)), cells.get((network, True, 32))
        if off and on:
            speedup = on["requests_per_second"] / off["requests_per_second"]
            verdict = "met" if speedup >= GOAL_SPEEDUP else "**not met**"
            lines.append(f"- `{network}` at 32 clients: batching gives {speedup:.2f}× the requests/s "
                         f"(goal ≥ {GOAL_SPEEDUP:g}×: {verdict}).")
    for batching in (True, False):
        cell = cells.get(("cnn", batching, 1))
        if cell:
            verdict = "met" if cell["p50_ms"] <= GOAL_CNN_P50_MS else "**not met**"
            lines.append(f"- `cnn` at 1 client, batching {'on' if batching else 'off'}: p50 {cell['p50_ms']:.1f} ms "
                         f"(goal ≤ {GOAL_CNN_P50_MS:g} ms: {verdict}).")
    return lines


def parse_arguments(argv: list[str]) -> dict:
    options = {"update_readme": False, "model_dirs": {}, "data_dir": os.environ.get("TFDS_DATA_DIR") or str(
        ROOT.parent / "shared" / "tensorflow_datasets")}
    for argument in argv:
        name, _, value = argument.partition("=")
        if name == "--update_readme":
            options["update_readme"] = True
        elif name == "--data_dir" and value:
            options["data_dir"] = value
        elif name == "--model_dirs" and value:
            # network=DIR,...: runs to serve instead of tiny ones trained here.
            for item in value.split(","):
                network, _, model_dir = item.partition("=")
                if network not in NETWORKS or not model_dir:
                    raise SystemExit(f"error: --model_dirs takes NETWORK=DIR items with NETWORK in "
                                     f"{', '.join(NETWORKS)}; got {item!r}.")
                options["model_dirs"][network] = model_dir
        else:
            raise SystemExit(f"error: unknown argument {argument!r}; usage: python benchmarks/serving.py "
                             "[--model_dirs=cnn=DIR,airbench=DIR] [--data_dir=DIR] [--update_readme]")
    return options


def main(argv: list[str]) -> None:
    options = parse_arguments(argv)
    with tempfile.TemporaryDirectory(prefix="serving-benchmark-") as work:
        work_dir = pathlib.Path(work)
        model_dirs = {}
        for network in NETWORKS:
            model_dirs[network] = options["model_dirs"].get(network)
            if model_dirs[network] is None:
                model_dirs[network] = str(work_dir / network)
                train_tiny_run(network, work_dir / network, options["data_dir"])
        results = {"machine": machine(), "rows": benchmark(model_dirs, work_dir)}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    print(table)
    if options["update_readme"]:
        readme.replace_block("serving", table)


if __name__ == "__main__":
    main(sys.argv[1:])
