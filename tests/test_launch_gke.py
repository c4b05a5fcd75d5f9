"""launch.gke: the manifests per shape, their schema, the cluster each pod sees, hostile input, missing tools."""

import json
import shutil

import pytest

import image_folders
import kubernetes_api
from helpers import run_task
from helpers import single_error_line
from launch_fakes import FakeTools
from launch_fakes import printed_commands
from trainer.training import distribution
from trainer.training import run_lock

IMAGE = "us-central1-docker.pkg.dev/my-project/training/cifar-trainer:0123456789ab-gpu"
TPU_IMAGE = "us-central1-docker.pkg.dev/my-project/training/cifar-trainer:0123456789ab-tpu"
# The Indexed Job and its Service (--api=job); tests/test_launch_gke_jobset.py tests the default, a JobSet.
BASE = [f"--image={IMAGE}", "--output_dir=gs://my-bucket/runs", "--job_name=cifar-test", "--api=job"]
# GKE's oldest and newest supported Kubernetes minor versions, as bundled with kubernetes-validate.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
CONTEXT = "gke_my-project_us-central1_cifar"
COLLECTIONS = {"Service": "/api/v1/namespaces/{namespace}/services",
               "Job": "/apis/batch/v1/namespaces/{namespace}/jobs",
               "JobSet": "/apis/jobset.x-k8s.io/v1alpha2/namespaces/{namespace}/jobsets"}


def dry_run(*flags: str, trainer: tuple[str, ...] = ("--model=resnet50",)):
    result = run_task(*BASE, *flags, "--dry_run", "--", *trainer, module="launch.gke", timeout=60)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["kind"] == "List"
    service, job = document["items"]
    assert (service["kind"], job["kind"]) == ("Service", "Job")
    return service, job, printed_commands(result.stderr)


def pod_container(job: dict) -> dict:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def env_of(job: dict) -> dict:
    return {item["name"]: item["value"] for item in pod_container(job)["env"] if "value" in item}


SHAPES = {
    "one_gpu": (("--gpus=1",), "one_device"),
    "multi_gpu": (("--gpus=4", "--gpu_type=nvidia-l4"), "mirrored"),
    "multi_worker": (("--workers=3", "--gpus=2", "--spot"), "multi_worker_mirrored"),
    "tpu": ((f"--image={TPU_IMAGE}", "--accelerator=tpu"), "tpu"),
    "cpu": (("--accelerator=cpu", "--image=us-docker.pkg.dev/p/r/cifar-trainer:abc-cpu", "--cpu=4",
             "--memory=16Gi"), "default"),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_manifests_follow_the_kubernetes_schema(shape):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    flags, strategy = SHAPES[shape]
    service, job, commands = dry_run(*flags)
    for version in KUBERNETES_VERSIONS:
        for manifest in (service, job):
            kubernetes_validate.validate(manifest, version, strict=True)
    assert pod_container(job)["args"][0] == f"--strategy={strategy}"
    assert commands == [["kubectl", "apply", "-f", "-"]]


def test_multi_worker_pods_see_one_cluster_through_the_service():
    """Every pod's WORKER_HOSTS lists the DNS names the headless Service gives the Job's pods, in index order,
    and the trainer turns it, with the index Kubernetes sets, into its own task of that cluster."""
    service, job, _ = dry_run("--workers=3", "--port=2345", "--namespace=research")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["metadata"]["namespace"] == job["metadata"]["namespace"] == "research"
    port = service["spec"]["ports"][0]["port"]
    assert pod_container(job)["ports"][0]["containerPort"] == port == 2345
    # An Indexed Job names pod i's host JOB-i; with the subdomain, JOB-i.SERVICE resolves in the namespace.
    expected = [f"{job['metadata']['name']}-{index}.{service['metadata']['name']}:{port}" for index in range(3)]
    hosts = env_of(job)["WORKER_HOSTS"]
    assert hosts.split(",") == expected
    for index in range(3):
        with pytest.MonkeyPatch.context() as patch:
            for variable in ("TF_CONFIG", "CLUSTER_SPEC"):
                patch.delenv(variable, raising=False)
            patch.setenv("WORKER_HOSTS", hosts)
            patch.setenv("JOB_COMPLETION_INDEX", str(index))
            tf_config = distribution.cluster_environment()
        assert tf_config == {"cluster": {"worker": expected}, "task": {"type": "worker", "index": index}}


def test_gpu_pods_ask_for_gpus_on_gpu_nodes():
    _, job, _ = dry_run("--workers=2", "--gpus=2", "--gpu_type=nvidia-l4", "--spot", "--restarts=2",
                        "--service_account=trainer", "--env=TFDS_DATA_DIR=gs://my-bucket/tfds")
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-spot": "true", "cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod_container(job)["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert pod["serviceAccountName"] == "trainer" and pod["restartPolicy"] == "Never"
    assert pod_container(job)["image"] == IMAGE
    assert job["spec"]["backoffLimit"] == 4
    env = env_of(job)
    assert env["TFDS_DATA_DIR"] == "gs://my-bucket/tfds"
    assert (env["AIP_MODEL_DIR"], env["AIP_CHECKPOINT_DIR"], env["AIP_TENSORBOARD_LOG_DIR"]) == (
        "gs://my-bucket/runs/cifar-test/model/", "gs://my-bucket/runs/cifar-test/checkpoints/",
        "gs://my-bucket/runs/cifar-test/logs/")


def test_tpu_pod_takes_a_whole_single_host_slice():
    _, job, _ = dry_run(f"--image={TPU_IMAGE}", "--accelerator=tpu", "--tpu_type=tpu-v6e-slice",
                        "--tpu_topology=2x2", "--tpu_chips=4")
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x2"}
    assert pod_container(job)["resources"]["limits"] == {"google.com/tpu": "4"}
    assert pod_container(job)["args"][:3] == ["--strategy=tpu", "--accelerator=tpu", "--tpu=local"]
    assert "WORKER_HOSTS" not in env_of(job)


def test_preemption_does_not_count_against_the_backoff_limit():
    _, job, _ = dry_run()
    rules = job["spec"]["podFailurePolicy"]["rules"]
    by_exit_code = {rule["onExitCodes"]["values"][0]: rule["action"] for rule in rules if "onExitCodes" in rule}
    assert by_exit_code == {42: "Ignore", 75: "Count", 2: "FailJob"}
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules


@pytest.mark.parametrize("flag, rule", [
    ("--job_name=Cifar", "DNS-1035"),
    ("--job_name=1cifar", "DNS-1035"),
    ("--job_name=cifar;rm -rf /", "DNS-1035"),
    ("--job_name=" + "a" * 62, "at most 61"),
    ("--namespace=$(whoami)", "DNS-1123"),
    ("--gpu_type=nvidia tesla", "label value"),
    ("--memory=lots", "quantity"),
    ("--output_dir=gs://b/x'y", "gs://BUCKET/PATH"),
    ("--image=cifar-trainer", "with a tag or digest"),
    ("--env=WORKER_HOSTS=a:1", "set by the launcher"),
])
def test_bad_values_are_refused_naming_the_flag(flag, rule):
    result = run_task(*BASE, "--workers=2", flag, "--dry_run", module="launch.gke", timeout=60)
    assert result.returncode == 2
    line = single_error_line(result)
    assert flag.split("=")[0] in line and rule in line, line


@pytest.mark.parametrize("flags, expected", [
    (("--accelerator=tpu", f"--image={TPU_IMAGE}", "--workers=2"), "--workers=1"),
    (("--accelerator=tpu", f"--image={TPU_IMAGE}", "--tpu_topology=2x4", "--tpu_chips=4"), "has 8 chips"),
    (("--accelerator=tpu",), "was built for gpu"),
    (("--workers=0",), "at least 1"),
])
def test_inconsistent_shapes_are_refused(flags, expected):
    result = run_task(*BASE, *flags, "--dry_run", module="launch.gke", timeout=60)
    assert result.returncode == 2
    assert expected in single_error_line(result)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The Kubernetes API stand-in the real kubectl talks to (tests/kubernetes_api.py)."""
    yield from kubernetes_api.serve_for_tests(tmp_path_factory)


def launch_on(cluster, tmp_path, token: str, *flags: str, contexts=(CONTEXT,)):
    """launch.gke with the real kubectl, whose kubeconfig reaches the stand-in with `token`."""
    env = cluster.kubeconfig(tmp_path, token, contexts)
    return run_task(*BASE, *flags, module="launch.gke", env=env, timeout=60)


def created_objects(cluster, token: str) -> list[dict]:
    """What `kubectl apply` created, as sent: each body without the annotation kubectl adds, checked to be a POST
    of the object's kind to its collection, asking the server for strict field validation."""
    objects = []
    for request in cluster.created(token):
        body = request["body"]
        assert request["method"] == "POST" and request["query"]["fieldValidation"] == ["Strict"], request
        assert request["path"] == COLLECTIONS[body["kind"]].format(namespace=body["metadata"]["namespace"])
        annotations = body["metadata"].pop("annotations")
        assert json.loads(annotations["kubectl.kubernetes.io/last-applied-configuration"])["kind"] == body["kind"]
        objects.append(body)
    return objects


def test_applies_the_job_and_service_through_kubectl_with_hostile_trainer_values_as_data(cluster, tmp_path):
    hostile = [f"--train_split=train; touch {tmp_path}/pwned", f"--eval_split=$(touch {tmp_path}/pwned2)"]
    result = launch_on(cluster, tmp_path, "job-api", "--workers=2", "--gpus=2", "--namespace=research", "--",
                       *hostile)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "job.batch/cifar-test"
    assert cluster.access_reviews("job-api") == [{"namespace": "research", "verb": "create", "group": "batch",
                                                  "resource": "jobs"}]
    service, job = created_objects(cluster, "job-api")
    assert pod_container(job)["args"] == ["--strategy=multi_worker_mirrored", "--accelerator=gpu", *hostile]
    assert not list(tmp_path.glob("pwned*"))
    assert [service, job] == list(dry_run("--workers=2", "--gpus=2", "--namespace=research",
                                          trainer=tuple(hostile))[:2])


def test_two_gpus_in_a_pod_get_a_memory_backed_dev_shm(cluster, tmp_path):
    assert launch_on(cluster, tmp_path, "shm", "--gpus=2").returncode == 0
    _, job = created_objects(cluster, "shm")
    pod = job["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    assert volume["emptyDir"] == {"medium": "Memory"}
    assert pod_container(job)["volumeMounts"] == [{"name": volume["name"], "mountPath": "/dev/shm"}]
    _, one_gpu, _ = dry_run("--gpus=1")
    assert "volumes" not in one_gpu["spec"]["template"]["spec"]


def test_the_job_passes_its_uid_to_the_run_lock(cluster, tmp_path):
    assert launch_on(cluster, tmp_path, "uid").returncode == 0
    _, job = created_objects(cluster, "uid")
    (variable,) = [item for item in pod_container(job)["env"] if item["name"] == run_lock.KUBERNETES_JOB_UID]
    assert variable["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/controller-uid']"}}


def test_context_flag_reaches_every_kubectl_call(cluster, tmp_path):
    other = "gke_my-project_europe-west4_cifar"
    result = launch_on(cluster, tmp_path, "context", f"--context={other}", contexts=(CONTEXT, other))
    assert result.returncode == 0, result.stderr
    assert [command[:2] for command in printed_commands(result.stderr)] == [["kubectl", f"--context={other}"]]
    assert len(created_objects(cluster, "context")) == 2
    result = launch_on(cluster, tmp_path, "context", "--context=gke_nowhere")
    assert result.returncode == 1 and "no context gke_nowhere" in single_error_line(result)


def test_missing_kubectl_is_one_clear_line(tmp_path):
    result = run_task(*BASE, module="launch.gke", env=FakeTools(tmp_path / "empty").env(only=True), timeout=60)
    assert result.returncode == 1
    assert "kubectl is not installed" in single_error_line(result)


def test_no_permission_to_create_jobs_is_one_clear_line(cluster, tmp_path):
    result = launch_on(cluster, tmp_path, "denied-jobs", "--namespace=research")
    line = single_error_line(result)
    assert result.returncode == 1
    assert "may not create Jobs in --namespace=research" in line and CONTEXT in line, line
    assert cluster.access_reviews("denied-jobs") and not cluster.created("denied-jobs")


def test_expired_cluster_credentials_are_one_clear_line(cluster, tmp_path):
    """The API server answers 401 to a token that expired; kubectl auth can-i then fails without an answer."""
    result = launch_on(cluster, tmp_path, "expired-token")
    line = single_error_line(result)
    assert result.returncode == 1
    assert "cannot check its permissions" in line and "Unauthorized" in line and "get-credentials" in line, line
    assert not cluster.created("expired-token")


def test_dry_run_calls_nothing(cluster, tmp_path):
    result = launch_on(cluster, tmp_path, "dry-run", "--workers=2", "--dry_run")
    assert result.returncode == 0, result.stderr
    assert cluster.requests("dry-run") == []


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_real_kubectl_without_a_cluster_is_one_clear_line(tmp_path):
    result = run_task(*BASE, module="launch.gke", env={"KUBECONFIG": str(tmp_path / "no-kubeconfig")}, timeout=60)
    assert result.returncode == 1
    assert "get-credentials" in single_error_line(result)


def test_help_lists_the_flags():
    result = run_task("--help", module="launch.gke", timeout=60)
    assert result.returncode == 0
    assert "--workers" in result.stdout and "--tpu_topology" in result.stdout


def test_a_bucket_folder_dataset_is_applied_without_the_launcher_reading_the_bucket(cluster, tmp_path):
    # The pods read the folder with their own account; this machine's account may not read it at all.
    trainer = ["--dataset=gs://my-bucket/pets", "--model=cnn", "--image_size=64"]
    with image_folders.forbidding_bucket() as (endpoint, asked):
        env = {**cluster.kubeconfig(tmp_path, "folder", (CONTEXT,)), "STORAGE_EMULATOR_HOST": endpoint}
        result = run_task(*BASE, "--workers=2", "--", *trainer, module="launch.gke", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not asked
    _, job = created_objects(cluster, "folder")
    assert pod_container(job)["args"][-3:] == trainer
