"""Serves a finished run's model: a web page to classify images, and a TF Serving / Vertex AI prediction API."""

import functools
import ipaddress
import signal
import socket

from absl import logging
import uvicorn

from trainer import cli
from trainer.serving import http_connections
from trainer.serving import serve_settings
from trainer.serving import served_model
from trainer.serving import server as server_lib
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
DEFAULT_PORT = serve_settings.DEFAULT_PORT
FLAGS = serve_settings.define_flags(cli.flag_registry())


def settings_from_flags() -> server_lib.ServerSettings:
    """The server's settings from the flags and Vertex AI's environment, each value checked."""
    return server_lib.ServerSettings(**serve_settings.settings_from_flags(FLAGS))


def listening_port() -> int:
    return serve_settings.listening_port(FLAGS)


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
    # its protocol, extended (trainer/serving/http_connections.py), adds them. Its own graceful-shutdown timeout is
    # only a backstop: the application answers what outlives --shutdown_grace_s itself, with a JSON 503.
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

