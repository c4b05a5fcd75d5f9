"""The prediction server's web application: the page, the TF Serving / Vertex AI prediction API, health, metrics."""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import threading
import time
from typing import Callable

from absl import logging
from fastapi import FastAPI
from fastapi import Request
from fastapi.responses import FileResponse
from fastapi.responses import JSONResponse
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette import convertors
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from trainer.serving import batching
from trainer.serving import inflight_requests
from trainer.serving import prediction_requests
from trainer.serving import served_model
from trainer.serving import serving_metrics
from trainer.errors import one_line
from trainer.serving.prediction_requests import RequestError

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
HEALTH_ROUTE = "/healthz"
# nginx's status for a request whose client went away before its answer: counted, but not as the server's error.
CLIENT_CLOSED_REQUEST = 499


class ModelNameConvertor(convertors.StringConvertor):
    """A model name in a path: no ':' or '/', so /v1/models/NAME:predict is never read as a model named NAME:predict."""

    regex = served_model.MODEL_NAME.pattern


convertors.register_url_convertor("model", ModelNameConvertor())


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """How the server answers; the entry point builds it from its flags and Vertex AI's environment."""

    model_dir: str
    model_name: str | None
    limits: prediction_requests.Limits
    top_k: int = 3
    batching: bool = True
    max_batch_size: int = 32
    batch_timeout_ms: float = 2.0
    model_threads: int = 2
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 1000
    max_inflight_bytes: int = 256 * 1024 * 1024
    shutdown_grace_s: float = 30.0
    # Vertex AI's custom-container contract: the routes it sends predictions and health checks to.
    predict_route: str | None = None
    health_route: str | None = None


class _State:
    """What the routes share; `model` is set by the loading thread once the model answers."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.model: served_model.ServedModel | None = None
        self.runner = None
        self.metrics = serving_metrics.ServingMetrics()
        self.body_budget = inflight_requests.BodyBudget(settings.max_inflight_bytes)
        self.grace = inflight_requests.ShutdownGrace(settings.shutdown_grace_s)
        self.decoder = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="decode")


def create_app(settings: ServerSettings, load_model: Callable[[], served_model.ServedModel],
               on_load_failure: Callable[[Exception], None]) -> FastAPI:
    """The application. The model loads on a thread of its own once the server runs, so the health route can say
    "not yet" (503) meanwhile; a failed load is handed to `on_load_failure`, which stops the server."""
    state = _State(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        state.grace.loop = asyncio.get_running_loop()
        state.runner = _model_runner(settings, state)
        state.runner.start()
        threading.Thread(target=_load, args=(state, load_model, on_load_failure), name="load-model",
                         daemon=True).start()
        yield
        await state.runner.stop()
        state.decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="CIFAR trainer prediction server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.serving = state
    # The last added is the outermost: the metrics see the 503 of a request cut off at shutdown.
    app.add_middleware(inflight_requests.ShutdownGraceMiddleware, grace=state.grace)
    app.add_middleware(_RequestMetrics, metrics=state.metrics)
    _add_error_handlers(app)
    _add_prediction_routes(app, state)
    _add_status_routes(app, state)
    app.add_api_route("/", lambda: FileResponse(os.path.join(STATIC_DIR, "index.html")), methods=["GET"],
                      include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _model_runner(settings: ServerSettings, state: _State):
    def probabilities(images):
        return state.model.probabilities(images)

    if settings.batching:
        return batching.DynamicBatcher(probabilities, max_batch_size=settings.max_batch_size,
                                       timeout_seconds=settings.batch_timeout_ms / 1000,
                                       observe=state.metrics.observe_batch)
    return batching.UnbatchedModel(probabilities, threads=settings.model_threads, observe=state.metrics.observe_batch)


def _load(state: _State, load_model, on_load_failure) -> None:
    try:
        state.model = load_model()
    except Exception as error:  # Any failure to load ends the server; the entry point reports it in one line.
        on_load_failure(error)
        return
    state.metrics.ready.set(1)
    logging.info("Ready: POST /v1/models/%s:predict%s; the page is at /.", state.model.name,
                 f" and {state.settings.predict_route}" if state.settings.predict_route else "")


def _add_prediction_routes(app: FastAPI, state: _State) -> None:
    async def predict_named(request: Request, name: str):
        return await _predict(request, state, _ready_model(state, name))

    async def predict_vertex(request: Request):
        return await _predict(request, state, _ready_model(state, None))

    app.add_api_route("/v1/models/{name:model}:predict", predict_named, methods=["POST"])
    if state.settings.predict_route:
        app.add_api_route(state.settings.predict_route, predict_vertex, methods=["POST"])


async def _predict(request: Request, state: _State, model: served_model.ServedModel) -> JSONResponse:
    limits = state.settings.limits
    prediction_requests.check_content_type(request.headers.get("content-type"))
    prediction_requests.check_length(request.headers.get("content-length"), limits)
    with state.body_budget.hold() as holding:
        body = await _read_body(request, limits, holding, state.settings.body_timeout_s)
        # JSON parsing, base64 and image decoding take real time for large images: off the event loop, which keeps
        # answering other requests meanwhile.
        images, top_k = await asyncio.get_running_loop().run_in_executor(
            state.decoder, _parse_and_decode, body, model, limits, state.settings.top_k)
        del body
    probabilities = await state.runner.predict(images)
    return JSONResponse({"predictions": [model.prediction(row, top_k) for row in probabilities]})


def _parse_and_decode(body: bytes, model: served_model.ServedModel, limits, default_top_k: int):
    files, top_k = prediction_requests.parse_body(body, limits, len(model.class_names), default_top_k)
    return prediction_requests.decode_images(files, model.image_shape, limits), top_k


async def _read_body(request: Request, limits: prediction_requests.Limits, holding, timeout_seconds: float) -> bytes:
    """The body, refused as soon as it grows past the limit (a chunked body declares no length beforehand), or
    past the server's budget for bodies in flight, or when it takes longer than `timeout_seconds` to arrive."""
    chunks, size = [], 0
    declared = request.headers.get("content-length", "")
    holding.grow_to(int(declared) if declared.isdigit() else 0)  # A body too many to hold is refused before reading.
    try:
        async with asyncio.timeout(timeout_seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_request_bytes:
                    raise prediction_requests.too_large(size, limits, complete=False)
                holding.grow_to(size)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within --body_timeout_s={timeout_seconds:g} "
                                f"({size:,} bytes came).") from None
    return b"".join(chunks)


def _ready_model(state: _State, name: str | None) -> served_model.ServedModel:
    model = state.model
    if model is None:
        raise RequestError(503, f"the model is still loading from {state.settings.model_dir}; try again shortly.")
    if name is not None and name != model.name:
        raise RequestError(404, f"no model named {name!r}; this server serves {model.name!r} "
                                f"(POST /v1/models/{model.name}:predict).")
    return model


def _add_status_routes(app: FastAPI, state: _State) -> None:
    async def health():
        model = _ready_model(state, None)
        return {"status": "ready", "model": model.name}

    async def model_status(name: str):
        _ready_model(state, name)
        # TF Serving's answer to GET /v1/models/NAME, which its clients poll for readiness.
        return {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}

    async def metadata(name: str):
        model = _ready_model(state, name)
        settings = state.settings
        return {"model": model.description,
                "serving": {"top_k": min(settings.top_k, len(model.class_names)),
                            "max_instances": settings.limits.max_instances,
                            "max_request_bytes": settings.limits.max_request_bytes,
                            "max_image_pixels": settings.limits.max_image_pixels,
                            "batching": settings.batching, "max_batch_size": settings.max_batch_size,
                            "batch_timeout_ms": settings.batch_timeout_ms,
                            "header_timeout_s": settings.header_timeout_s,
                            "body_timeout_s": settings.body_timeout_s,
                            "max_connections": settings.max_connections,
                            "max_inflight_bytes": settings.max_inflight_bytes,
                            "predict_route": f"/v1/models/{model.name}:predict"}}

    async def metrics():
        return Response(state.metrics.exposition(), media_type=serving_metrics.CONTENT_TYPE)

    for route in dict.fromkeys([HEALTH_ROUTE, state.settings.health_route or HEALTH_ROUTE]):
        app.add_api_route(route, health, methods=["GET"])
    app.add_api_route("/v1/models/{name:model}", model_status, methods=["GET"])
    app.add_api_route("/v1/models/{name:model}/metadata", metadata, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])


def _add_error_handlers(app: FastAPI) -> None:
    async def request_error(request: Request, error: RequestError):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    async def http_error(request: Request, error: HTTPException):
        where = f"{request.method} {request.url.path}"
        if error.status_code == 404:
            message = (f"no route {where}; the routes are GET / (the page), POST /v1/models/NAME:predict, "
                       f"GET /v1/models/NAME, GET /v1/models/NAME/metadata, GET {HEALTH_ROUTE}, GET /metrics.")
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        else:
            message = f"{where}: {error.detail}"
        return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)

    async def client_disconnected(request: Request, error: ClientDisconnect):
        # Nobody reads this answer; its status is what /metrics counts.
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    async def unexpected_error(request: Request, error: Exception):
        logging.exception("Failed to answer %s %s.", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({one_line(error, 200)})."}, status_code=500)

    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, client_disconnected)
    app.add_exception_handler(Exception, unexpected_error)


class _RequestMetrics:
    """Counts and times every HTTP request, by route template (not raw path, which unknown routes would multiply)."""

    def __init__(self, app, metrics: serving_metrics.ServingMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            self.metrics.observe_request(getattr(route, "path", "unmatched"), status, time.perf_counter() - start)
