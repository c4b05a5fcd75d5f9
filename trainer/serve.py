"""Serves a finished run's model: a web page to classify images, and a TF Serving / Vertex AI prediction API."""

import os
import signal
import socket

from absl import flags
from absl import logging
import uvicorn

from trainer import cli
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


def settings_from_flags() -> server_lib.ServerSettings:
    """The server's settings from the flags and Vertex AI's environment, each value checked."""
    model_dir = FLAGS.model_dir or os.environ.get("AIP_STORAGE_URI")
    if not model_dir:
        raise UsageError("--model_dir is required (or $AIP_STORAGE_URI): the directory of a finished run of "
                         "trainer.task.")
    for flag, minimum in (("top_k", 1), ("max_batch_size", 1), ("model_threads", 1), ("max_request_bytes", 1024),
                          ("max_instances", 1), ("max_image_pixels", 1)):
        if FLAGS[flag].value < minimum:
            raise UsageError(f"--{flag}={FLAGS[flag].value} must be at least {minimum}.")
    if FLAGS.batch_timeout_ms < 0:
        raise UsageError(f"--batch_timeout_ms={FLAGS.batch_timeout_ms} must be zero or more.")
    limits = prediction_requests.Limits(max_request_bytes=FLAGS.max_request_bytes, max_instances=FLAGS.max_instances,
                                        max_image_pixels=FLAGS.max_image_pixels)
    return server_lib.ServerSettings(
        model_dir=model_dir, limits=limits,
        model_name=served_model.check_name(FLAGS.model_name) if FLAGS.model_name else None,
        top_k=FLAGS.top_k, batching=FLAGS.batching, max_batch_size=FLAGS.max_batch_size,
        batch_timeout_ms=FLAGS.batch_timeout_ms, model_threads=FLAGS.model_threads,
        predict_route=_route_from_environment("AIP_PREDICT_ROUTE"),
        health_route=_route_from_environment("AIP_HEALTH_ROUTE"))


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
    server = uvicorn.Server(uvicorn.Config(application, log_config=None, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=10))
    host, port = listener.getsockname()[:2]
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
    if failures:
        error = failures[0]
        if isinstance(error, UsageError):
            raise error
        raise UsageError(f"cannot load the model from {settings.model_dir} ({one_line(error, 200)}).") from error


def _stopped_by_sigterm(signal_number, frame) -> None:
    logging.info("Stopped on SIGTERM after answering the requests in flight.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag (see --help).")
    settings = settings_from_flags()
    port = listening_port()
    served_model.check_model_dir(settings.model_dir)
    serve(settings, open_socket(FLAGS.host, port))


if __name__ == "__main__":
    cli.start(main, FLAGS, USAGE)
