"""A local stand-in of the Kubernetes API server for the real kubectl: discovery, access reviews, and a record of
what `kubectl apply` sends.

Run as a script it serves on 127.0.0.1 (a free port, printed first) and appends each request it gets to a JSON-lines
file: method, path, query, bearer token and body. The token a kubeconfig gives kubectl decides how it is answered,
so one server serves every test: a token starting with `denied` may do nothing (`kubectl auth can-i` says no), one
starting with `expired` is refused with 401 Unauthorized on every request, as an expired GKE token is; any other
token may do everything. Objects are not stored: a GET of one answers 404, so `kubectl apply` creates it (POST).
"""

import base64
import datetime
import http.server
import json
import pathlib
import shutil
import subprocess
import ssl
import sys
import urllib.parse
import uuid

JOBSET_CRD = pathlib.Path(__file__).parent / "schemas" / "jobset-v0.12.0.json"
VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.4-gke.1000", "platform": "linux/amd64"}
# group/version -> [(plural, kind, namespaced, short names)]: the kinds launch/gke*.py render, and what kubectl's
# `auth can-i` and `apply` look up.
RESOURCES = {
    "v1": [("services", "Service", True, ["svc"]), ("pods", "Pod", True, ["po"]),
           ("namespaces", "Namespace", False, ["ns"]), ("serviceaccounts", "ServiceAccount", True, ["sa"])],
    "batch/v1": [("jobs", "Job", True, [])],
    "apps/v1": [("deployments", "Deployment", True, ["deploy"])],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True, ["hpa"])],
    "jobset.x-k8s.io/v1alpha2": [("jobsets", "JobSet", True, [])],
    "authorization.k8s.io/v1": [("selfsubjectaccessreviews", "SelfSubjectAccessReview", False, [])],
}
# What the API server answers the protobuf OpenAPI v2 request with (the "@" of the Accept header is not a valid
# media type character).
OPENAPI_V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def resource_list(group_version: str) -> dict:
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": [
        {"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind, "shortNames": short,
         "verbs": ["create"] if kind == "SelfSubjectAccessReview" else VERBS}
        for plural, kind, namespaced, short in RESOURCES[group_version]]}


def group_list() -> dict:
    groups = [version.split("/")[0] for version in RESOURCES if "/" in version]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": group, "versions": [{"groupVersion": version, "version": version.split("/")[1]}
                                     for version in RESOURCES if version.startswith(group + "/")],
         "preferredVersion": {"groupVersion": next(v for v in RESOURCES if v.startswith(group + "/")),
                              "version": next(v for v in RESOURCES if v.startswith(group + "/")).split("/")[1]}}
        for group in groups]}


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


# Kubernetes' protobuf encoding: a magic prefix, then a runtime.Unknown whose field 1 is the TypeMeta (apiVersion 1,
# kind 2) and field 2 the object. kubectl sends built-in kinds such as SelfSubjectAccessReview this way.
PROTOBUF_MAGIC = b"k8s\x00"
# SelfSubjectAccessReview: spec is field 2; its resourceAttributes field 1, whose string fields are these.
RESOURCE_ATTRIBUTES = {1: "namespace", 2: "verb", 3: "group", 4: "version", 5: "resource", 6: "subresource",
                       7: "name"}


def protobuf_fields(data: bytes) -> dict[int, list]:
    """The fields of one protobuf message by number: varints as ints, length-delimited ones as bytes."""
    fields, position = {}, 0

    def varint() -> int:
        nonlocal position
        value, shift = 0, 0
        while True:
            byte = data[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while position < len(data):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value = varint()
        elif wire_type == 2:
            length = varint()
            value, position = data[position:position + length], position + length
        else:
            raise ValueError(f"protobuf wire type {wire_type} is not expected in these messages")
        fields.setdefault(number, []).append(value)
    return fields


def access_review(data: bytes) -> dict:
    """A protobuf SelfSubjectAccessReview as the JSON the API server would read from it."""
    envelope = protobuf_fields(data[len(PROTOBUF_MAGIC):])
    type_meta = protobuf_fields(envelope[1][0])
    spec = protobuf_fields(protobuf_fields(envelope[2][0]).get(2, [b""])[0])
    attributes = protobuf_fields(spec.get(1, [b""])[0])
    return {"apiVersion": type_meta[1][0].decode(), "kind": type_meta[2][0].decode(), "spec": {"resourceAttributes": {
        name: attributes[number][0].decode() for number, name in RESOURCE_ATTRIBUTES.items()
        if attributes.get(number, [b""])[0]}}}


def decode(raw: bytes, content_type: str) -> dict | str | None:
    if not raw:
        return None
    if content_type.startswith("application/json") or content_type.endswith("patch+json"):
        return json.loads(raw)
    if content_type == "application/vnd.kubernetes.protobuf" and raw.startswith(PROTOBUF_MAGIC):
        return access_review(raw)
    return raw.hex()


def strict_schema(schema):
    """A CRD's structural schema as JSON Schema that, like the API server asked for fieldValidation=Strict, refuses
    fields the schema does not declare."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: strict_schema(value) for key, value in schema.items()}
    if converted.pop("x-kubernetes-int-or-string", False):
        converted.pop("type", None)
        converted["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        converted["additionalProperties"] = False
    return converted


def invalid_field(body: dict) -> str | None:
    """What the API server would refuse in an object sent with fieldValidation=Strict: the JobSet against its CRD's
    schema (vendored), the built-in kinds against Kubernetes' own (kubernetes-validate, when installed)."""
    import jsonschema

    if body.get("kind") == "JobSet":
        crd = json.loads(JOBSET_CRD.read_text())
        errors = list(jsonschema.Draft7Validator(strict_schema(crd["openAPIV3Schema"])).iter_errors(body))
        return "; ".join(f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in errors) or None
    try:
        import kubernetes_validate
    except ImportError:
        return None
    try:
        kubernetes_validate.validate(body, f"{VERSION['major']}.{VERSION['minor']}.0", strict=True)
    except kubernetes_validate.ValidationError as error:
        return f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
    return None


def self_signed_certificate() -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 and its key (PEM): kubectl sends credentials only over TLS."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes-api-stand-in")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    return (certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers as the API server does, for the requests kubectl makes; logs each one."""

    log_path: pathlib.Path

    def log_message(self, *_):  # The record in log_path is the log.
        pass

    def do_GET(self):
        self.handle_request()

    def do_POST(self):
        self.handle_request()

    def do_PATCH(self):
        self.handle_request()

    def do_PUT(self):
        self.handle_request()

    def handle_request(self):
        url = urllib.parse.urlsplit(self.path)
        self.query = urllib.parse.parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        body = decode(raw, self.headers.get("Content-Type") or "")
        with open(self.log_path, "a") as log:
            log.write(json.dumps({"method": self.command, "path": url.path, "query": urllib.parse.parse_qs(url.query),
                                  "token": token, "content_type": self.headers.get("Content-Type"), "body": body})
                      + "\n")
        code, answer = self.answer(url.path, token, body)
        data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", OPENAPI_V2_PROTOBUF if isinstance(answer, bytes) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def answer(self, path: str, token: str, body: dict | None) -> tuple[int, dict]:
        if token.startswith("expired") or not token:
            return 401, status(401, "Unauthorized", "Unauthorized")
        if path == "/version":
            return 200, VERSION
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
        if path == "/apis":
            return 200, group_list()
        if path == "/openapi/v2":
            return 200, b""
        group_version = path.removeprefix("/api/").removeprefix("/apis/")
        if group_version in RESOURCES:
            return 200, resource_list(group_version)
        if path.endswith("/selfsubjectaccessreviews") and self.command == "POST":
            allowed = not token.startswith("denied")
            return 201, {**body, "status": {"allowed": allowed, **({} if allowed else {"reason": "no RBAC policy"})}}
        return self.object_request(path, body)

    def object_request(self, path: str, body: dict | None) -> tuple[int, dict]:
        if self.command == "GET":
            return 404, status(404, "NotFound", f"{path.rsplit('/', 1)[-1]} not found")
        if self.command == "POST" and body is not None:
            problem = invalid_field(body) if "Strict" in self.query.get("fieldValidation", []) else None
            if problem:
                return 400, status(400, "BadRequest", f"{body.get('kind')} in version {body.get('apiVersion')} cannot "
                                   f"be handled as a {body.get('kind')}: strict decoding error: {problem}")
            metadata = {**body.get("metadata", {}), "uid": str(uuid.uuid4()), "resourceVersion": "1", "generation": 1,
                        "creationTimestamp": datetime.datetime.now(datetime.timezone.utc).strftime(
                            "%Y-%m-%dT%H:%M:%SZ")}
            return 201, {**body, "metadata": metadata}
        return 405, status(405, "MethodNotAllowed", f"the stand-in does not {self.command} {path}")


class KubernetesApi:
    """The stand-in running in its own process, and what it received."""

    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        self.log_path = folder / "requests.jsonl"
        self.process = subprocess.Popen([sys.executable, __file__, str(self.log_path)], stdout=subprocess.PIPE,
                                        text=True)
        self.url = f"https://127.0.0.1:{int(self.process.stdout.readline())}"
        self.certificate = (folder / "server.crt").read_bytes()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def requests(self, token: str) -> list[dict]:
        """What arrived with this token, in order."""
        if not self.log_path.exists():
            return []
        return [request for request in map(json.loads, self.log_path.read_text().splitlines())
                if request["token"] == token]

    def created(self, token: str) -> list[dict]:
        """The objects `kubectl apply` created with this token: method, path, query and body of each POST."""
        return [request for request in self.requests(token)
                if request["method"] != "GET" and not request["path"].endswith("/selfsubjectaccessreviews")]

    def access_reviews(self, token: str) -> list[dict]:
        """The resourceAttributes of each SelfSubjectAccessReview (`kubectl auth can-i`) sent with this token."""
        return [request["body"]["spec"]["resourceAttributes"] for request in self.requests(token)
                if request["path"] == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"]

    def kubeconfig(self, folder: pathlib.Path, token: str, contexts=("gke_my-project_us-central1_cifar",)) -> dict:
        """A kubeconfig in `folder` whose contexts (the first current) reach this server with `token`; returns the
        environment that points kubectl at it."""
        config = {"apiVersion": "v1", "kind": "Config", "current-context": contexts[0],
                  "clusters": [{"name": "stand-in", "cluster": {
                      "server": self.url, "certificate-authority-data": base64.b64encode(self.certificate).decode()}}],
                  "users": [{"name": "user", "user": {"token": token}}],
                  "contexts": [{"name": name, "context": {"cluster": "stand-in", "user": "user"}}
                               for name in contexts]}
        path = folder / "kubeconfig"
        path.write_text(json.dumps(config))
        # A cache of discovery outside the user's home, so nothing from another cluster or test is reused.
        return {"KUBECONFIG": str(path), "KUBECACHEDIR": str(folder / "kube-cache"), "HOME": str(folder)}


def serve_for_tests(tmp_path_factory):
    """The body of a pytest fixture: the stand-in for a module's tests, or a skip when kubectl is missing."""
    import pytest

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the launchers' kubectl commands are tested through the real client")
    pytest.importorskip("cryptography", reason="the stand-in's TLS certificate needs the cryptography package")
    api = KubernetesApi(tmp_path_factory.mktemp("kubernetes-api"))
    try:
        yield api
    finally:
        api.stop()


def serve(log_path: str) -> None:
    Handler.log_path = pathlib.Path(log_path)
    certificate, key = self_signed_certificate()
    folder = Handler.log_path.parent
    (folder / "server.crt").write_bytes(certificate)
    (folder / "server.key").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "server.crt", folder / "server.key")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1])
