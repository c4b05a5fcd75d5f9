"""Deploying the server: `launch.vertex deploy` (Model, endpoint, deployment) and `launch.gke serve` (Deployment,
Service, autoscaler): dry-run output parsed and checked, manifests schema-validated, bad flags, fake cloud tools."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import kubernetes_api
from helpers import fails_in_process
from helpers import run_task
from helpers import single_error_line
from launch_fakes import GCLOUD_UNKNOWN_FIELDS
from launch_fakes import FakeTools
from launch_fakes import printed_commands
from launch import gke_serve
from launch import vertex_deploy
from trainer.serving import serve

CPU_IMAGE = "us-central1-docker.pkg.dev/my-project/training/cifar-trainer:0123456789ab-cpu"
GPU_IMAGE = "us-central1-docker.pkg.dev/my-project/training/cifar-trainer:0123456789ab-gpu"
RUN = "gs://my-bucket/runs/cifar-job/model"
VERTEX = ["deploy", "--project=my-project", f"--model_dir={RUN}", "--name=cifar-cnn"]
GKE = ["serve", f"--image={CPU_IMAGE}", f"--model_dir={RUN}"]
GCLOUD_LIB = pathlib.Path("/usr/lib/google-cloud-sdk/lib")
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")


def test_a_bad_flag_of_the_subcommand_is_one_error_line_from_the_command_line():
    result = launch("launch.vertex", *VERTEX, "--max_replicas=0", "--image=" + CPU_IMAGE, "--dry_run")
    assert result.returncode == 2 and "--max_replicas=0 must be at least" in single_error_line(result)


def launch(module: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_task(*argv, module=module, env=env, timeout=60)


def vertex_dry_run(*flags: str, serve_flags: tuple[str, ...] = ()):
    result = launch("launch.vertex", *VERTEX, *flags, "--dry_run", *(["--", *serve_flags] if serve_flags else []))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), printed_commands(result.stderr)


def serve_flags_parse(args: list[str]) -> None:
    """The container's arguments are trainer.serve flags it accepts."""
    serve.FLAGS.unparse_flags()
    try:
        assert serve.FLAGS(["trainer.serve", *args]) == ["trainer.serve"]
    finally:
        serve.FLAGS.unparse_flags()


def test_vertex_deploys_our_server_with_its_routes():
    bodies, commands = vertex_dry_run(f"--image={GPU_IMAGE}", "--accelerator_type=NVIDIA_TESLA_T4",
                                      "--min_replicas=2", "--max_replicas=5", "--env=TF_CPP_MIN_LOG_LEVEL=1",
                                      serve_flags=("--max_batch_size=64", "--batch_timeout_ms=5"))
    model, deploy = bodies["model"], bodies["deployModel"]
    container = model["containerSpec"]
    assert model["artifactUri"] == RUN  # Vertex AI hands it to the server as $AIP_STORAGE_URI.
    assert container["command"] == ["python", "-m", "trainer.serve"]
    assert container["args"] == ["--host=0.0.0.0", "--model_name=cifar-cnn", "--max_batch_size=64",
                                 "--batch_timeout_ms=5"]
    serve_flags_parse(container["args"])
    assert container["predictRoute"] == "/v1/models/cifar-cnn:predict" and container["healthRoute"] == "/healthz"
    assert container["ports"] == [{"containerPort": serve.DEFAULT_PORT}]
    assert container["env"] == [{"name": "TF_CPP_MIN_LOG_LEVEL", "value": "1"}]
    assert bodies["endpoint"] == {"displayName": "cifar-cnn"}
    resources = deploy["deployedModel"]["dedicatedResources"]
    assert resources == {"machineSpec": {"machineType": "n1-standard-4", "acceleratorType": "NVIDIA_TESLA_T4",
                                         "acceleratorCount": 1}, "minReplicaCount": 2, "maxReplicaCount": 5}
    assert deploy["deployedModel"]["model"] == "projects/my-project/locations/us-central1/models/cifar-cnn"
    upload, create, deploy_model = commands
    where = ["--project=my-project", "--region=us-central1"]
    assert upload[:4] == ["gcloud", "ai", "models", "upload"] and upload[4:6] == where
    assert {"--model-id=cifar-cnn", f"--artifact-uri={RUN}", f"--container-image-uri={GPU_IMAGE}",
            "--container-command=python,-m,trainer.serve", "--container-ports=8080",
            "--container-args=--host=0.0.0.0,--model_name=cifar-cnn,--max_batch_size=64,--batch_timeout_ms=5",
            "--container-predict-route=/v1/models/cifar-cnn:predict", "--container-health-route=/healthz",
            "--container-env-vars=TF_CPP_MIN_LOG_LEVEL=1"} <= set(upload)
    assert create == ["gcloud", "ai", "endpoints", "create", *where, "--endpoint-id=cifar-cnn",
                      "--display-name=cifar-cnn"]
    assert deploy_model[:5] == ["gcloud", "ai", "endpoints", "deploy-model", "cifar-cnn"]
    assert {"--model=cifar-cnn", "--machine-type=n1-standard-4", "--min-replica-count=2", "--max-replica-count=5",
            "--accelerator=type=nvidia-tesla-t4,count=1", "--traffic-split=0=100"} <= set(deploy_model)


def test_vertex_prebuilt_serves_the_export_with_no_code_of_ours():
    bodies, commands = vertex_dry_run("--prebuilt", "--region=europe-west4", "--endpoint=shared-endpoint")
    model = bodies["model"]
    assert model["artifactUri"] == f"{RUN}/export"
    assert model["containerSpec"] == {"imageUri": "europe-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"}
    assert bodies["endpoint"] is None  # An existing endpoint: nothing created.
    upload, deploy_model = commands
    assert not any(argument.startswith("--container-command") for argument in upload)
    assert deploy_model[4] == "shared-endpoint"


VALIDATE_WITH_GCLOUD = GCLOUD_UNKNOWN_FIELDS + """
kinds = {"model": messages.GoogleCloudAiplatformV1Model, "endpoint": messages.GoogleCloudAiplatformV1Endpoint,
         "deployModel": messages.GoogleCloudAiplatformV1DeployModelRequest}
for bodies in json.load(sys.stdin):
    print(json.dumps([problem for name, kind in kinds.items() if bodies[name] is not None
                      for problem in unknown(encoding.DictToMessage(bodies[name], kind), name)]))
"""


@pytest.mark.skipif(not (GCLOUD_LIB / "googlecloudsdk").is_dir(), reason="the Google Cloud SDK's libraries (with "
                    f"Vertex AI's API schema) are not in {GCLOUD_LIB}")
def test_vertex_request_bodies_match_the_api_schema():
    bodies = [vertex_dry_run(f"--image={GPU_IMAGE}", "--accelerator_type=NVIDIA_L4", "--env=A=b",
                             "--service_account=server@my-project.iam.gserviceaccount.com")[0],
              vertex_dry_run("--prebuilt")[0]]
    env = {**os.environ, "PYTHONPATH": f"{GCLOUD_LIB / 'third_party'}{os.pathsep}{GCLOUD_LIB}"}
    result = subprocess.run([sys.executable, "-c", VALIDATE_WITH_GCLOUD], input=json.dumps(bodies), text=True,
                            capture_output=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(line) for line in result.stdout.splitlines()] == [[], []]


@pytest.mark.parametrize("flags, message", [
    ((f"--image={CPU_IMAGE}", "--min_replicas=3", "--max_replicas=2"), "--max_replicas=2 must be at least"),
    (("--prebuilt", f"--image={CPU_IMAGE}"), "leave out --image"),
    ((), "--image is required"),
    ((f"--image={CPU_IMAGE}", "--accelerator_type=NVIDIA_TESLA_T4"), "was built for cpu"),
    ((f"--image={CPU_IMAGE}", "--name=Cifar CNN"), "--name='Cifar CNN' is not valid"),
    ((f"--image={CPU_IMAGE}", "--model_dir=/local/run"), "--model_dir='/local/run' is not valid"),
    ((f"--image={CPU_IMAGE}", "--", "--port=9000"), "trainer.serve flag --port: the launcher sets it"),
    ((f"--image={CPU_IMAGE}", "--", "--top_k=3,5"), "without commas"),
])
def test_vertex_deploy_refuses_bad_flags_in_one_line(capsys, flags, message):
    assert message in fails_in_process(capsys, vertex_deploy, *VERTEX[1:], *flags, "--dry_run")


def test_vertex_deploy_runs_the_three_gcloud_commands(tmp_path):
    tools = FakeTools(tmp_path / "bin")
    tools.add("gcloud", [(["auth", "list"], "me@example.com\n", 0), (["auth", "print-access-token"], "token\n", 0)])
    result = launch("launch.vertex", *VERTEX, f"--image={CPU_IMAGE}", env=tools.env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "projects/my-project/locations/us-central1/endpoints/cifar-cnn"
    calls = [call["argv"][:3] for call in tools.calls()[2:]]
    assert calls == [["ai", "models", "upload"], ["ai", "endpoints", "create"], ["ai", "endpoints", "deploy-model"]]


def gke_dry_run(*flags: str, serve_flags: tuple[str, ...] = ()):
    result = launch("launch.gke", *GKE, *flags, "--dry_run", *(["--", *serve_flags] if serve_flags else []))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    deployment, service, autoscaler = document["items"]
    assert (deployment["kind"], service["kind"], autoscaler["kind"]) == ("Deployment", "Service",
                                                                         "HorizontalPodAutoscaler")
    return deployment, service, autoscaler, printed_commands(result.stderr)


@pytest.mark.parametrize("flags", [(), ("--accelerator=gpu", f"--image={GPU_IMAGE}", "--gpus=2",
                                        "--service_type=LoadBalancer", "--service_account=server", "--env=A=b")])
def test_gke_manifests_follow_the_kubernetes_schema(flags):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    *manifests, commands = gke_dry_run(*flags)
    for version in KUBERNETES_VERSIONS:
        for manifest in manifests:
            kubernetes_validate.validate(manifest, version, strict=True)
    assert commands == [["kubectl", "apply", "-f", "-"]]


def test_gke_probes_service_and_autoscaler_point_at_the_server():
    deployment, service, autoscaler, _ = gke_dry_run("--name=cifar-api", "--namespace=serving", "--port=9000",
                                                     "--replicas=2", "--max_replicas=6", "--target_cpu=60",
                                                     serve_flags=("--max_batch_size=64",))
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python", "-m", "trainer.serve"]
    assert container["args"] == ["--host=0.0.0.0", "--port=9000", f"--model_dir={RUN}", "--max_batch_size=64"]
    serve_flags_parse(container["args"])
    assert container["ports"] == [{"name": "http", "containerPort": 9000}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    # A model may take minutes to download and load; liveness only starts once the startup probe passed.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}  # The autoscaler needs a CPU request.
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels == service["spec"]["selector"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http"}]
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                    "name": "cifar-api"}
    assert (autoscaler["spec"]["minReplicas"], autoscaler["spec"]["maxReplicas"]) == (2, 6)
    assert autoscaler["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    assert {item["metadata"]["namespace"] for item in (deployment, service, autoscaler)} == {"serving"}


def test_gke_pods_outlive_the_servers_shutdown_grace():
    """Kubernetes kills a pod terminationGracePeriodSeconds after SIGTERM: later than the server's own grace, so the
    requests it cuts off still get their 503."""
    from launch import gke_serve
    from trainer.serving import serve

    assert gke_serve.SERVER_SHUTDOWN_GRACE_SECONDS == serve.FLAGS["shutdown_grace_s"].default
    deployment, *_ = gke_dry_run()
    default_grace = serve.FLAGS["shutdown_grace_s"].default
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > default_grace + 5
    deployment, *_ = gke_dry_run(serve_flags=("--shutdown_grace_s=100",))
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 105


def test_gke_gpu_pods_land_on_gpu_nodes():
    deployment, *_ = gke_dry_run("--accelerator=gpu", f"--image={GPU_IMAGE}", "--gpu_type=nvidia-l4")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"


@pytest.mark.parametrize("flags, message", [
    (("--replicas=3", "--max_replicas=2"), "--max_replicas=2 must be at least --replicas=3"),
    (("--target_cpu=0",), "--target_cpu=0 must be a percentage"),
    (("--memory=lots",), "--memory='lots' is not valid"),
    (("--name=Cifar",), "--name='Cifar' is not valid"),
    (("--accelerator=gpu",), "was built for cpu"),
    (("--", "--model_dir=gs://other/run"), "trainer.serve flag --model_dir: the launcher sets it"),
])
def test_gke_serve_refuses_bad_flags_in_one_line(capsys, flags, message):
    assert message in fails_in_process(capsys, gke_serve, *GKE[1:], *flags, "--dry_run")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The Kubernetes API stand-in the real kubectl talks to (tests/kubernetes_api.py)."""
    yield from kubernetes_api.serve_for_tests(tmp_path_factory)


def test_gke_serve_applies_the_manifests_through_kubectl_after_checking_access(cluster, tmp_path):
    result = launch("launch.gke", *GKE, "--namespace=serving", env=cluster.kubeconfig(tmp_path, "serve"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "deployment.apps/cifar-serve"
    assert cluster.access_reviews("serve") == [{"namespace": "serving", "verb": "create", "group": "apps",
                                                "resource": "deployments"}]
    created = cluster.created("serve")
    assert [(request["method"], request["path"]) for request in created] == [
        ("POST", "/apis/apps/v1/namespaces/serving/deployments"), ("POST", "/api/v1/namespaces/serving/services"),
        ("POST", "/apis/autoscaling/v2/namespaces/serving/horizontalpodautoscalers")]
    bodies = []
    for request in created:
        assert request["query"]["fieldValidation"] == ["Strict"]  # The stand-in validated them as the API would.
        request["body"]["metadata"].pop("annotations")
        bodies.append(request["body"])
    assert bodies == list(gke_dry_run("--namespace=serving")[:3])


def test_gke_serve_without_permission_applies_nothing(cluster, tmp_path):
    result = launch("launch.gke", *GKE, env=cluster.kubeconfig(tmp_path, "denied-serve"))
    assert "may not create Deployments in --namespace=default" in single_error_line(result)
    assert cluster.access_reviews("denied-serve") and not cluster.created("denied-serve")
