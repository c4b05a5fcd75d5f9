"""A local stand-in of the Google Cloud APIs the launchers call through gcloud (Vertex AI, Cloud Build, the OAuth
token endpoint), on 127.0.0.1, recording every request.

Run it by hand to see the exact requests a launcher makes, without a cloud project:

    python tests/gcloud_standin.py --port=8089 --config_dir=/tmp/standin-gcloud
    # it prints the environment to export, then one JSON line per request it receives

Tests start it with `start()` and read the requests back from GET /_standin/requests. It answers as the API does,
and its long-running operations are done at once, with their response.
"""

import argparse
import contextlib
import datetime
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer

V1 = "type.googleapis.com/google.cloud.aiplatform.v1."
LOCATION = r"/v1/(projects/[^/]+/locations/[^/]+)"
ACCOUNT = "launcher-test@standin-project.iam.gserviceaccount.com"


class StandInState:
    """The resources created so far and every request received."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.resources: dict[str, dict] = {}
        self.ids = itertools.count(1000)

    def new_id(self) -> str:
        return str(next(self.ids))


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def operation(state: StandInState, parent: str, response_type: str, response: dict, metadata_type: str) -> dict:
    """A long-running operation that is already done."""
    name = f"{parent}/operations/{state.new_id()}"
    result = {"name": name, "done": True, "metadata": {"@type": V1 + metadata_type,
                                                       "genericMetadata": {"createTime": now(), "updateTime": now()}},
              "response": {"@type": V1 + response_type, **response}}
    state.resources[name] = result
    return result


def create_job(state: StandInState, parent: str, collection: str, body: dict) -> dict:
    name = f"{parent}/{collection}/{state.new_id()}"
    job = {**body, "name": name, "state": "JOB_STATE_PENDING", "createTime": now(), "updateTime": now()}
    state.resources[name] = job
    return job


def upload_model(state: StandInState, parent: str, body: dict, query: dict) -> dict:
    model_id = query.get("modelId") or body.get("modelId") or state.new_id()
    name = f"{parent}/models/{model_id}"
    model = {**body["model"], "name": name, "versionId": "1", "createTime": now(), "updateTime": now(),
             # Models with a container of their own take dedicated resources (deploy-model reads this field).
             "supportedDeploymentResourcesTypes": ["DEDICATED_RESOURCES"]}
    state.resources[name] = model
    return operation(state, name, "UploadModelResponse", {"model": name, "modelVersionId": "1"},
                     "UploadModelOperationMetadata")


def create_endpoint(state: StandInState, parent: str, body: dict, query: dict) -> dict:
    name = f"{parent}/endpoints/{query.get('endpointId') or state.new_id()}"
    endpoint = {**body, "name": name, "createTime": now(), "updateTime": now()}
    state.resources[name] = endpoint
    return operation(state, name, "Endpoint", endpoint, "CreateEndpointOperationMetadata")


def deploy_model(state: StandInState, endpoint_name: str, body: dict) -> dict:
    deployed = {**body["deployedModel"], "id": state.new_id(), "createTime": now()}
    endpoint = state.resources.setdefault(endpoint_name, {"name": endpoint_name, "displayName": "existing"})
    endpoint.setdefault("deployedModels", []).append(deployed)
    return operation(state, endpoint_name, "DeployModelResponse", {"deployedModel": deployed},
                     "DeployModelOperationMetadata")


def create_build(state: StandInState, project: str, body: dict) -> dict:
    build_id = state.new_id()
    name = f"projects/{project}/locations/global/builds/{build_id}"
    build = {**body, "id": build_id, "name": name, "projectId": project, "status": "SUCCESS", "createTime": now(),
             "startTime": now(), "finishTime": now(), "logUrl": f"http://127.0.0.1/builds/{build_id}"}
    state.resources[name] = build
    state.resources[f"projects/{project}/builds/{build_id}"] = build
    result = {"name": f"projects/{project}/locations/global/operations/{state.new_id()}", "done": True,
              "metadata": {"@type": "type.googleapis.com/google.devtools.cloudbuild.v1.BuildOperationMetadata",
                           "build": build},
              "response": {"@type": "type.googleapis.com/google.devtools.cloudbuild.v1.Build", **build}}
    state.resources[result["name"]] = result
    return result


# (method, path pattern, handler(state, match, body, query)) in the order they are tried.
ROUTES = [
    ("POST", r"/token", lambda state, match, body, query: {"access_token": "ya29.standin-token",
                                                            "expires_in": 3600, "token_type": "Bearer"}),
    ("POST", LOCATION + r"/customJobs", lambda s, m, b, q: create_job(s, m.group(1), "customJobs", b)),
    ("POST", LOCATION + r"/hyperparameterTuningJobs",
     lambda s, m, b, q: create_job(s, m.group(1), "hyperparameterTuningJobs", b)),
    ("POST", LOCATION + r"/models:upload", lambda s, m, b, q: upload_model(s, m.group(1), b, q)),
    ("POST", LOCATION + r"/endpoints", lambda s, m, b, q: create_endpoint(s, m.group(1), b, q)),
    ("POST", r"/v1/(projects/[^/]+/locations/[^/]+/endpoints/[^/:]+):deployModel",
     lambda s, m, b, q: deploy_model(s, m.group(1), b)),
    ("POST", r"/v1/projects/([^/]+)(?:/locations/[^/]+)?/builds", lambda s, m, b, q: create_build(s, m.group(1), b)),
]


class Handler(BaseHTTPRequestHandler):
    """Answers the API's routes from StandInState; GET /_standin/requests returns what was received."""

    state: StandInState
    echo = False

    def log_message(self, *args) -> None:  # The requests are recorded, not logged.
        pass

    def reply(self, status: int, document) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_request(self, method: str) -> None:
        path, _, query_text = self.path.partition("?")
        query = dict(urllib.parse.parse_qsl(query_text))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode(errors="replace") if length else ""
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            body = dict(urllib.parse.parse_qsl(raw))  # The token endpoint's form body.
        if path == "/_standin/requests":
            with self.state.lock:
                return self.reply(200, self.state.requests)
        record = {"method": method, "path": path, "query": query, "body": body}
        with self.state.lock:
            self.state.requests.append(record)
            if self.echo and path != "/token":  # The token requests carry signed assertions, and are many.
                print(json.dumps(record), flush=True)
            for route_method, pattern, handler in ROUTES:
                match = re.fullmatch(pattern, path)
                if match and route_method == method:
                    return self.reply(200, handler(self.state, match, body, query))
            resource = self.state.resources.get(path.removeprefix("/v1/"))
        if method == "GET" and resource is not None:
            return self.reply(200, resource)
        self.reply(404, {"error": {"code": 404, "message": f"{method} {path} is not served by the stand-in",
                                   "status": "NOT_FOUND"}})

    def do_GET(self) -> None:
        self.handle_request("GET")

    def do_POST(self) -> None:
        self.handle_request("POST")


def private_key_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def gcloud_environment(url: str, config_dir: pathlib.Path, storage_url: str | None = None) -> dict[str, str]:
    """gcloud's environment: its own configuration folder, and the APIs sent to the stand-in."""
    environment = {"CLOUDSDK_CONFIG": str(config_dir), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
                   "CLOUDSDK_API_ENDPOINT_OVERRIDES_AIPLATFORM": f"{url}/",
                   "CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDBUILD": f"{url}/",
                   "CLOUDSDK_AUTH_TOKEN_HOST": f"{url}/token",
                   "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false", "CLOUDSDK_METRICS_ENVIRONMENT": "standin",
                   "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1", "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "1"}
    if storage_url:
        environment["CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE"] = f"{storage_url}/storage/v1/"
    return environment


def activate_service_account(url: str, environment: dict[str, str]) -> None:
    """Activates a service account whose key was made here and whose tokens come from the stand-in."""
    config_dir = pathlib.Path(environment["CLOUDSDK_CONFIG"])
    config_dir.mkdir(parents=True, exist_ok=True)
    key_file = config_dir / "standin-key.json"
    key_file.write_text(json.dumps({
        "type": "service_account", "project_id": "standin-project", "private_key_id": "standin",
        "private_key": private_key_pem(), "client_email": ACCOUNT, "client_id": "1",
        "token_uri": f"{url}/token"}))
    subprocess.run(["gcloud", "auth", "activate-service-account", f"--key-file={key_file}", "--quiet"],
                   env={**os.environ, **environment}, check=True, capture_output=True, text=True, timeout=120)


class StandIn:
    """A stand-in server process started by `start()`."""

    def __init__(self, process: subprocess.Popen, url: str):
        self.process, self.url = process, url

    def requests(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/_standin/requests", timeout=10) as response:
            return json.load(response)

    def api_requests(self, since: int = 0) -> list[dict]:
        """Requests to the cloud APIs (not the token endpoint), from the `since`-th request on."""
        return [request for request in self.requests()[since:] if request["path"] != "/token"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start() -> StandIn:
    """Starts the stand-in in its own process on a free port of 127.0.0.1."""
    process = subprocess.Popen([sys.executable, __file__, "--port=0", "--quiet"], stdout=subprocess.PIPE, text=True)
    url = process.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        process.kill()
        raise RuntimeError(f"the gcloud stand-in did not start (it said {url!r})")
    return StandIn(process, url)


@contextlib.contextmanager
def activated(config_dir: pathlib.Path):
    """A running stand-in, and gcloud's environment with a service account activated against it: (server,
    environment). The stand-in stops on exit."""
    server = start()
    try:
        environment = gcloud_environment(server.url, config_dir)
        activate_service_account(server.url, environment)
        yield server, environment
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--config_dir", help="Also activate a stand-in service account in this gcloud "
                        "configuration folder, and print the environment that sends gcloud here.")
    parser.add_argument("--quiet", action="store_true", help="Print only the URL (for tests).")
    options = parser.parse_args()
    Handler.state = StandInState()
    Handler.echo = not options.quiet
    server = ThreadingHTTPServer(("127.0.0.1", options.port), Handler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    if options.quiet:
        print(url, flush=True)
    else:
        print(f"# The stand-in listens on {url}.", flush=True)
        if options.config_dir:
            environment = gcloud_environment(url, pathlib.Path(options.config_dir))
            # Activation asks the stand-in for a token, so it runs once the server serves.
            threading.Thread(target=announce_activation, args=(url, environment), daemon=True).start()
    server.serve_forever()


def announce_activation(url: str, environment: dict[str, str]) -> None:
    activate_service_account(url, environment)
    print(f"# Activated {ACCOUNT}. Export this, then run a launcher (without --dry_run) in that shell:")
    for name, value in environment.items():
        print(f"export {name}={value}", flush=True)


if __name__ == "__main__":
    main()
