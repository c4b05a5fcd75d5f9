"""trainer.serve's flags and their checks, without TensorFlow, so that the launchers can check them in a second."""

import math
import os
import re
import resource

from absl import flags
from absl import logging

from trainer.serving import prediction_requests
from trainer.errors import UsageError

DEFAULT_PORT = 8080
MEBIBYTE = 1024 * 1024
# File descriptors kept free beyond --max_connections: the model's files, logs, the listening socket, threads.
RESERVED_FILES = 64
# Model names go into URL paths (/v1/models/NAME:predict), so they keep to characters that need no escaping.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

# Each numeric flag's valid range: a value outside it (or inf, nan) is refused before anything starts.
FLAG_RANGES = {"top_k": (1, 1000), "max_batch_size": (1, 4096), "batch_timeout_ms": (0, 1000),
               "model_threads": (1, 256), "max_request_bytes": (1024, 1024 * MEBIBYTE), "max_instances": (1, 10_000),
               "max_image_pixels": (1, 1_000_000_000), "header_timeout_s": (0.1, 3600), "body_timeout_s": (0.1, 3600),
               "max_inflight_bytes": (1024, 64 * 1024 * MEBIBYTE), "shutdown_grace_s": (0, 3600)}


def define_flags(flag_values: flags.FlagValues) -> flags.FlagValues:
    """Defines trainer.serve's flags in `flag_values` (the entry point's registry, or a launcher's check's) and
    returns it."""
    def define(kind, name, default, help_text):
        kind(name, default, help_text, flag_values=flag_values, module_name="trainer.serve")

    define(flags.DEFINE_string, "model_dir", None, "Directory of a finished run of trainer.task, local or gs://. "
           "Default: $AIP_STORAGE_URI (set by Vertex AI).")
    define(flags.DEFINE_string, "model_name", None, "Name in the API's paths (/v1/models/NAME:predict). Default: "
           "the run's network (cnn, airbench, resnet50).")
    define(flags.DEFINE_string, "host", "127.0.0.1", "Address to listen on; 0.0.0.0 in a container.")
    define(flags.DEFINE_integer, "port", None, f"Port to listen on (0: any free port). Default: $AIP_HTTP_PORT, "
           f"else {DEFAULT_PORT}.")
    define(flags.DEFINE_integer, "top_k", 3, "Classes ranked per image when a request does not say "
           "(parameters.top_k).")
    define(flags.DEFINE_bool, "batching", True, "Merge concurrent requests into one model call (dynamic batching).")
    define(flags.DEFINE_integer, "max_batch_size", 32, "Most images in one model call with --batching.")
    define(flags.DEFINE_float, "batch_timeout_ms", 2.0, "With --batching, how long a batch waits at most for more "
           "images before the model runs it (a full batch runs at once).")
    define(flags.DEFINE_integer, "model_threads", os.cpu_count() or 2, "Model calls that run at once with "
           "--nobatching.")
    define(flags.DEFINE_integer, "max_request_bytes", 16 * MEBIBYTE, "Largest request body accepted (base64 makes "
           "a file a third larger).")
    define(flags.DEFINE_integer, "max_instances", 64, "Most images in one request.")
    define(flags.DEFINE_integer, "max_image_pixels", 50_000_000, "Largest image accepted, in pixels (width x "
           "height), checked from its header before decoding.")
    define(flags.DEFINE_float, "header_timeout_s", 10.0, "Seconds a connection has to send a request's line and "
           "headers, from when it opens or its last answer was sent (408 after).")
    define(flags.DEFINE_float, "body_timeout_s", 60.0, "Seconds a request's whole body has to arrive once its "
           "headers have (408 after).")
    define(flags.DEFINE_integer, "max_connections", 1000, "Most connections open at once. Beyond it the one that "
           "has waited longest for a request is closed; when all are busy, the new one gets a 503.")
    define(flags.DEFINE_integer, "max_inflight_bytes", 256 * MEBIBYTE, "Most bytes of request bodies held at once, "
           "all requests together (503 beyond it).")
    define(flags.DEFINE_float, "shutdown_grace_s", 30.0, "On SIGTERM, seconds the requests in flight have to "
           "finish; those still running then are answered 503.")
    return flag_values


def settings_from_flags(flag_values: flags.FlagValues) -> dict:
    """The server's settings (trainer.server.ServerSettings' fields) from the flags and Vertex AI's environment,
    each value checked."""
    options = flag_values
    model_dir = options.model_dir or os.environ.get("AIP_STORAGE_URI")
    if not model_dir:
        raise UsageError("--model_dir is required (or $AIP_STORAGE_URI): the directory of a finished run of "
                         "trainer.task.")
    for flag, (minimum, maximum) in FLAG_RANGES.items():
        check_range(flag, options[flag].value, minimum, maximum)
    max_connections = options.max_connections
    allowed = max_connections_allowed(max_connections)
    if not options["max_connections"].present and max_connections > allowed:
        logging.warning("--max_connections=%d by default, the most the open-files limit (ulimit -n) allows.",
                        allowed)
        max_connections = allowed
    check_range("max_connections", max_connections, 1, allowed,
                " (the open-files limit, ulimit -n, less what the server keeps for itself)")
    if options.max_inflight_bytes < options.max_request_bytes:
        raise UsageError(f"--max_inflight_bytes={options.max_inflight_bytes:,} must be at least --max_request_bytes="
                         f"{options.max_request_bytes:,}, or a request of the largest size could never be answered.")
    limits = prediction_requests.Limits(max_request_bytes=options.max_request_bytes,
                                        max_instances=options.max_instances,
                                        max_image_pixels=options.max_image_pixels)
    return dict(
        model_dir=model_dir, limits=limits,
        model_name=check_model_name(options.model_name) if options.model_name else None,
        top_k=options.top_k, batching=options.batching, max_batch_size=options.max_batch_size,
        batch_timeout_ms=options.batch_timeout_ms, model_threads=options.model_threads,
        header_timeout_s=options.header_timeout_s, body_timeout_s=options.body_timeout_s,
        max_connections=max_connections, max_inflight_bytes=options.max_inflight_bytes,
        shutdown_grace_s=options.shutdown_grace_s,
        predict_route=_route_from_environment("AIP_PREDICT_ROUTE"),
        health_route=_route_from_environment("AIP_HEALTH_ROUTE"))


def check_model_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name):
        raise UsageError(f"--model_name={name!r} is not valid: use 1 to 63 letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit (it goes into the URL /v1/models/NAME:predict).")
    return name


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


def listening_port(flag_values: flags.FlagValues) -> int:
    """--port, else $AIP_HTTP_PORT (Vertex AI's), else DEFAULT_PORT; checked."""
    if flag_values.port is not None:
        port, source = flag_values.port, f"--port={flag_values.port}"
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
