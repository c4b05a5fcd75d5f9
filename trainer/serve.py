"""Serves a finished run's model: a web page to classify images, and a TF Serving / Vertex AI prediction API."""

import functools
import ipaddress
import math
import os
import resource
import signal
import socket

from absl import flags
from absl import logging
import uvicorn

from trainer import cli
from trainer import http_connections
from trainer import prediction_requests
from trainer import served_model
from trainer import server as server_lib
from trainer.errors import UsageError
from trainer.errors import one_line

USAGE = """Serves a finished run's model over HTTP: a page to drop images on at /, and the TF Serving / Vertex AI
prediction API with dynamic batching.

    python -m trainer.serve --model_dir=DIR [--host=127.0.0.1] [--port=8080]
    curl -H 'Content-Type: application/json' -d '{"instances": [{"b64": "'"$(base64 -w0 cat.png)"'"}]}' \\
        http://127.0.0.1:8080/v1/models/cnn:predict

DIR is a run of trainer.task, local or gs:// ($AIP_STORAGE_URI on Vertex AI). The port defaults to $AIP_HTTP_PORT,
else 8080; Vertex AI's $AIP_PREDICT_ROUTE and $AIP_HEALTH_ROUTE are served too. Exit status 2 when the run cannot be
served (no export/, unreadable) or a flag is wrong.
"""
DEFAULT_PORT = 8080
MEBIBYTE = 1024 * 1024
# File descriptors kept free beyond --max_connections: the model's files, logs, the listening socket, threads.
RESERVED_FILES = 64

FLAGS = cli.flag_registry()
flags.DEFINE_string("model_dir", None, "Directory of a finished run of trainer.task, local or gs://. Default: "
                    "$AIP_STORAGE_URI (set by Vertex AI).", flag_values=FLAGS)
flags.DEFINE_string("model_name", None, "Name in the API's paths (/v1/models/NAME:predict). Default: the run's "
                    "network (cnn, airbench, resnet50).", flag_values=FLAGS)
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on; 0.0.0.0 in a container.", flag_values=FLAGS)
flags.DEFINE_integer("port", None, f"Port to listen on (0: any free port). Default: $AIP_HTTP_PORT, else "
                     f"{DEFAULT_PORT}.", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 3, "Classes ranked per image when a request does not say (parameters.top_k).",
                     flag_values=FLAGS)
flags.DEFINE_bool("batching", True, "Merge concurrent requests into one model call (dynamic batching).",
                  flag_values=FLAGS)
flags.DEFINE_integer("max_batch_size", 32, "Most images in one model call with --batching.", flag_values=FLAGS)
flags.DEFINE_float("batch_timeout_ms", 2.0, "With --batching, how long a batch waits at most for more images "
                   "before the model runs it (a full batch runs at once).", flag_values=FLAGS)
flags.DEFINE_integer("model_threads", os.cpu_count() or 2, "Model calls that run at once with --nobatching.",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_request_bytes", 16 * MEBIBYTE, "Largest request body accepted (base64 makes a file a "
                     "third larger).", flag_values=FLAGS)
flags.DEFINE_integer("max_instances", 64, "Most images in one request.", flag_values=FLAGS)
flags.DEFINE_integer("max_image_pixels", 50_000_000, "Largest image accepted, in pixels (width x height), checked "
                     "from its header before decoding.", flag_values=FLAGS)
flags.DEFINE_float("header_timeout_s", 10.0, "Seconds a connection has to send a request's line and headers, from "
                   "when it opens or its last answer was sent (408 after).", flag_values=FLAGS)
flags.DEFINE_float("body_timeout_s", 60.0, "Seconds a request's whole body has to arrive once its headers have "
                   "(408 after).", flag_values=FLAGS)
flags.DEFINE_integer("max_connections", 1000, "Most connections open at once. Beyond it the one that has waited "
                     "longest for a request is closed; when all are busy, the new one gets a 503.", flag_values=FLAGS)
flags.DEFINE_integer("max_inflight_bytes", 256 * MEBIBYTE, "Most bytes of request bodies held at once, all requests "
                     "together (503 beyond it).", flag_values=FLAGS)
flags.DEFINE_float("shutdown_grace_s", 30.0, "On SIGTERM, seconds the requests in flight have to finish; those "
                   "still running then are answered 503.", flag_values=FLAGS)

# Each numeric flag's valid range: a value outside it (or inf, nan) is refused before anything starts.
FLAG_RANGES = {"top_k": (1, 1000), "max_batch_size": (1, 4096), "batch_timeout_ms": (0, 1000),
               "model_threads": (1, 256), "max_request_bytes": (1024, 1024 * MEBIBYTE), "max_instances": (1, 10_000),
               "max_image_pixels": (1, 1_000_000_000), "header_timeout_s": (0.1, 3600), "body_timeout_s": (0.1, 3600),
               "max_inflight_bytes": (1024, 64 * 1024 * MEBIBYTE), "shutdown_grace_s": (0, 3600)}


def settings_from_flags() -> server_lib.ServerSettings:
    """The server's settings from the flags and Vertex AI's environment, each value checked."""
    model_dir = FLAGS.model_dir or os.environ.get("AIP_STORAGE_URI")
    if not model_dir:
        raise UsageError("--model_dir is required (or $AIP_STORAGE_URI): the directory of a finished run of "
                         "trainer.task.")
    for flag, (minimum, maximum) in FLAG_RANGES.items():
        check_range(flag, FLAGS[flag].value, minimum, maximum)
    max_connections = FLAGS.max_connections
    allowed = max_connections_allowed(max_connections)
    if not FLAGS["max_connections"].present and max_connections > allowed:
        logging.warning("--max_connections=%d by default, the most the open-files limit (ulimit -n) allows.",
                        allowed)
        max_connections = allowed
    check_range("max_connections", max_connections, 1, allowed,
                " (the open-files limit, ulimit -n, less what the server keeps for itself)")
    if FLAGS.max_inflight_bytes < FLAGS.max_request_bytes:
        raise UsageError(f"--max_inflight_bytes={FLAGS.max_inflight_bytes:,} must be at least --max_request_bytes="
                         f"{FLAGS.max_request_bytes:,}, or a request of the largest size could never be answered.")
    limits = prediction_requests.Limits(max_request_bytes=FLAGS.max_request_bytes, max_instances=FLAGS.max_instances,
                                        max_image_pixels=FLAGS.max_image_pixels)
    return server_lib.ServerSettings(
        model_dir=model_dir, limits=limits,
        model_name=served_model.check_name(FLAGS.model_name) if FLAGS.model_name else None,
        top_k=FLAGS.top_k, batching=FLAGS.batching, max_batch_size=FLAGS.max_batch_size,
        batch_timeout_ms=FLAGS.batch_timeout_ms, model_threads=FLAGS.model_threads,
        header_timeout_s=FLAGS.header_timeout_s, body_timeout_s=FLAGS.body_timeout_s,
        max_connections=max_connections, max_inflight_bytes=FLAGS.max_inflight_bytes,
        shutdown_grace_s=FLAGS.shutdown_grace_s,
        predict_route=_route_from_environment("AIP_PREDICT_ROUTE"),
        health_route=_route_from_environment("AIP_HEALTH_ROUTE"))


def check_range(flag: str, value: float, minimum: float, maximum: float, why: str = "") -> None:
    if not (math.isfinite(value) and minimum <= value <= maximum):
        raise UsageError(f"--{flag}={_number(value)} must be from {_number(minimum)} to {_number(maximum)}{why}.")


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) and abs(value) >= 10_000 else f"{value:g}"


def max_connections_allowed(wanted: int) -> int:
    """The most connections the open-files limit leaves room for, once the soft limit is raised as far as the
    hard limit allows towards `wanted` (a container's soft limit is often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(raised, soft), hard))
        soft = max(raised, soft)
    return (1 << 30 if soft == resource.RLIM_INFINITY else soft) - RESERVED_FILES


def _route_from_environment(variable: str) -> str | None:
    route = os.environ.get(variable)
    if route is not None and not route.startswith("/"):
        raise UsageError(f"${variable}={route!r} must be a path starting with '/'.")
    return route or None


def listening_port() -> int:
    if FLAGS.port is not None:
        port, source = FLAGS.port, f"--port={FLAGS.port}"
    elif os.environ.get("AIP_HTTP_PORT"):
        value = os.environ["AIP_HTTP_PORT"]
        if not value.isdigit():
            raise UsageError(f"$AIP_HTTP_PORT={value!r} is not a port number.")
        port, source = int(value), f"$AIP_HTTP_PORT={value}"
    else:
        return DEFAULT_PORT
    if not 0 <= port <= 65535:
        raise UsageError(f"{source} must be 0 to 65535 (0: any free port).")
    return port


def open_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port or bad address is one clear error before anything runs."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as error:
        raise UsageError(f"cannot listen on --host={host} --port={port} ({one_line(error, 120)}); is another server "
                         "using the port?") from error
    return listener


def serve(settings: server_lib.ServerSettings, listener: socket.socket) -> None:
    """Runs the server until it is stopped (SIGINT, SIGTERM); a model that fails to load stops it with a UsageError."""
    failures = []

    def on_load_failure(error: Exception) -> None:
        failures.append(error)
        server.should_exit = True

    warm_up = tuple(sorted({1, *(2 ** power for power in range(1, settings.max_batch_size.bit_length())),
                            settings.max_batch_size})) if settings.batching else (1,)
    application = server_lib.create_app(
        settings, lambda: served_model.load(settings.model_dir, settings.model_name, warm_up), on_load_failure)
    # No access log: a line per request would cost more than a small model's prediction. uvicorn's warnings go
    # through the job's own log handler (log_config=None leaves logging as absl set it up).
    grace = application.state.serving.grace
    # uvicorn has no deadline for a request's head and no cap on connections that spares the health route:
    # its protocol, extended (trainer/http_connections.py), adds them. Its own graceful-shutdown timeout is only a
    # backstop: the application answers what outlives --shutdown_grace_s itself, with a JSON 503.
    protocol = functools.partial(http_connections.LimitedHttpProtocol, header_timeout=settings.header_timeout_s,
                                 max_connections=settings.max_connections)
    # ws="none": the server has no WebSocket route, and an upgraded connection would escape the limits above.
    server = _Server(uvicorn.Config(application, http=protocol, ws="none", log_config=None, log_level="warning",
                                    access_log=False, timeout_keep_alive=5,
                                    timeout_graceful_shutdown=settings.shutdown_grace_s + 5), grace)
    host, port = listener.getsockname()[:2]
    warning = exposure_warning(host, port, settings.model_dir)
    if warning:
        logging.warning(warning)
    logging.info("Serving on http://%s:%d/ (%s); loading the model from %s.", host, port,
                 f"dynamic batching up to {settings.max_batch_size} images, {settings.batch_timeout_ms:g} ms"
                 if settings.batching else "no batching", settings.model_dir)
    # uvicorn shuts down gracefully on SIGTERM (answering the requests in flight), then raises the signal again for
    # the handler that was there before; this one makes that a normal exit (status 0), as Kubernetes and Vertex AI
    # stop a server on purpose.
    previous_handler = signal.signal(signal.SIGTERM, _stopped_by_sigterm)
    try:
        server.run(sockets=[listener])
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if server.stop_signal:
        logging.info("Stopped on %s: %s.", server.stop_signal, grace.summary())
    if failures:
        error = failures[0]
        if isinstance(error, UsageError):
            raise error
        raise UsageError(f"cannot load the model from {settings.model_dir} ({one_line(error, 200)}).") from error


def exposure_warning(bound_host: str, port: int, model_dir: str) -> str | None:
    """What a server listening beyond loopback shows to the network, or None on loopback."""
    if ipaddress.ip_address(bound_host).is_loopback:
        return None
    return (f"--host={bound_host} serves beyond this machine: the page and /v1/models/NAME/metadata show the "
            f"model's directory ({model_dir}) to anyone who can reach port {port}. Use --host=127.0.0.1 unless other "
            "machines must reach the server.")


def _stopped_by_sigterm(signal_number, frame) -> None:
    pass  # serve() logs how the requests in flight ended.


class _Server(uvicorn.Server):
    """uvicorn's server, which also starts the application's shutdown grace when a signal stops it."""

    def __init__(self, config: uvicorn.Config, grace):
        super().__init__(config)
        self.grace, self.stop_signal = grace, None

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self.stop_signal = self.stop_signal or signal.Signals(sig).name
        self.grace.begin()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag (see --help).")
    settings = settings_from_flags()
    port = listening_port()
    served_model.check_model_dir(settings.model_dir)
    serve(settings, open_socket(FLAGS.host, port))


if __name__ == "__main__":
    cli.start(main, FLAGS, USAGE)
