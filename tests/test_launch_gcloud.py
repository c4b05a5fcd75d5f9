"""The launchers through the real Google Cloud CLI: launch.vertex, tune and deploy against a local stand-in of Vertex
AI's REST API, launch.build --builder=cloud_build against the stand-in and the Cloud Storage emulator.

gcloud runs unmodified, with its own configuration folder and a service account whose key is made here and whose
tokens come from the stand-in (tests/gcloud_standin.py). Each test checks what arrived at the API: the resource
path, and a body that parses into google-cloud-aiplatform's types and equals what --dry_run prints.
"""

import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest

import gcloud_standin
import image_folders
import vertex_api
from helpers import ROOT
from helpers import run_task
from helpers import single_error_line

pytestmark = pytest.mark.skipif(shutil.which("gcloud") is None, reason="the Google Cloud CLI (gcloud) is not "
                                "installed")

IMAGE = "us-central1-docker.pkg.dev/my-project/training/cifar-trainer:0123456789ab-gpu"
TPU_IMAGE = IMAGE.replace("-gpu", "-tpu")
BASE = ["--project=my-project", "--output_dir=gs://my-bucket/runs", "--job_name=cifar-test"]
LOCATION = "/v1/projects/my-project/locations/us-central1"
MODEL_DIR = "gs://my-bucket/runs/cifar-test/model"


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The stand-in server, and gcloud's environment with an activated service account."""
    with gcloud_standin.activated(tmp_path_factory.mktemp("gcloud") / "config") as standin_and_environment:
        yield standin_and_environment


def launch(standin, *flags: str) -> tuple[str, list[dict]]:
    """Runs launch.vertex with the real gcloud; returns its stdout and the API requests it made."""
    server, environment = standin
    before = len(server.requests())
    result = run_task(*flags, module="launch.vertex", env=environment, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip(), server.api_requests(before)


def dry_run(*flags: str) -> dict:
    """What the same command line prints with --dry_run (given before the trainer's flags)."""
    position = flags.index("--") if "--" in flags else len(flags)
    result = run_task(*flags[:position], "--dry_run", *flags[position:], module="launch.vertex", timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("flags", [
    ("--topology=one_gpu", "--spot", f"--image={IMAGE}"),
    ("--topology=multi_gpu", "--gpus=8", "--gpu_type=NVIDIA_H200_141GB", f"--image={IMAGE}"),
    ("--topology=multi_worker", "--machines=3", "--timeout_hours=2", "--env=A=b", "--labels=team=vision",
     "--service_account=trainer@my-project.iam.gserviceaccount.com",
     "--tensorboard=projects/my-project/locations/us-central1/tensorboards/1", f"--image={IMAGE}"),
    ("--topology=tpu", f"--image={TPU_IMAGE}"),
], ids=["one_gpu-spot", "multi_gpu-h200", "multi_worker", "tpu"])
def test_custom_job_reaches_the_api_as_printed(standin, flags):
    trainer = ("--", "--model=cnn", "--epochs=3")
    name, requests = launch(standin, *BASE, *flags, *trainer)
    (request,) = requests
    assert (request["method"], request["path"]) == ("POST", f"{LOCATION}/customJobs")
    received = vertex_api.parse(request["body"], "CustomJob")
    assert received == vertex_api.parse(dry_run(*BASE, *flags, *trainer), "CustomJob")
    assert name == f"projects/my-project/locations/us-central1/customJobs/{name.rsplit('/', 1)[1]}"
    pools = request["body"]["jobSpec"]["workerPoolSpecs"]
    assert pools[0]["containerSpec"]["args"][-2:] == ["--model=cnn", "--epochs=3"]
    if "--topology=multi_worker" in flags:
        assert request["body"]["jobSpec"]["serviceAccount"] == "trainer@my-project.iam.gserviceaccount.com"
        assert [pool["replicaCount"] for pool in pools] == ["1", "2"]  # gcloud sends int64 as a string.
    if "--spot" in flags:
        assert request["body"]["jobSpec"]["scheduling"]["strategy"] == "SPOT"
    if "--gpu_type=NVIDIA_H200_141GB" in flags:
        # A3 Ultra machines boot from Hyperdisk only.
        assert pools[0]["machineSpec"]["machineType"] == "a3-ultragpu-8g"
        assert pools[0]["diskSpec"]["bootDiskType"] == "hyperdisk-balanced"


def test_tuning_job_reaches_the_api_as_printed(standin):
    """`hp-tuning-jobs create` reads its config from a file (it does not read --config=- from stdin)."""
    flags = ("tune", *BASE, f"--image={IMAGE}", "--parameter=learning_rate:log:1e-4:1e-1",
             "--parameter=batch_size:discrete:128,256", "--parameter=optimizer:categorical:adam,sgd",
             "--max_trials=6", "--parallel_trials=2", "--max_failed_trials=1", "--", "--model=cnn", "--epochs=5")
    name, requests = launch(standin, *flags)
    (request,) = requests
    assert (request["method"], request["path"]) == ("POST", f"{LOCATION}/hyperparameterTuningJobs")
    received = vertex_api.parse(request["body"], "HyperparameterTuningJob")
    assert received == vertex_api.parse(dry_run(*flags), "HyperparameterTuningJob")
    assert (received.max_trial_count, received.parallel_trial_count, received.max_failed_trial_count) == (6, 2, 1)
    assert "/hyperparameterTuningJobs/" in name


def deploy_requests(standin, *flags: str) -> tuple[dict, list[dict]]:
    arguments = ("deploy", "--project=my-project", f"--model_dir={MODEL_DIR}", "--name=cifar-model", *flags)
    resource, requests = launch(standin, *arguments)
    printed = dry_run(*arguments)
    calls = [(request["method"], request["path"]) for request in requests]
    return printed, requests, calls, resource


def test_deploy_our_server_to_a_new_endpoint(standin):
    image = "us-central1-docker.pkg.dev/my-project/training/cifar-trainer:0123456789ab-gpu"
    printed, requests, calls, resource = deploy_requests(standin, f"--image={image}", "--accelerator_type=NVIDIA_L4",
                                                         "--env=LOG_LEVEL=info", "--max_replicas=2")
    upload = requests[calls.index(("POST", f"{LOCATION}/models:upload"))]
    assert upload["body"]["modelId"] == "cifar-model"
    assert vertex_api.parse(upload["body"]["model"], "Model") == vertex_api.parse(printed["model"], "Model")
    create = requests[calls.index(("POST", f"{LOCATION}/endpoints"))]
    assert create["query"]["endpointId"] == "cifar-model"
    assert vertex_api.parse(create["body"], "Endpoint") == vertex_api.parse(printed["endpoint"], "Endpoint")
    deploy = requests[calls.index(("POST", f"{LOCATION}/endpoints/cifar-model:deployModel"))]
    received = vertex_api.parse(deploy["body"], "DeployModelRequest")
    assert received == vertex_api.parse(printed["deployModel"], "DeployModelRequest")
    # An L4 attaches to G2 machines only.
    assert received.deployed_model.dedicated_resources.machine_spec.machine_type == "g2-standard-4"
    assert resource == "projects/my-project/locations/us-central1/endpoints/cifar-model"


def test_deploy_prebuilt_to_an_existing_endpoint(standin):
    printed, requests, calls, resource = deploy_requests(standin, "--prebuilt", "--endpoint=shared",
                                                         "--service_account=server@my-project.iam.gserviceaccount.com")
    upload = requests[calls.index(("POST", f"{LOCATION}/models:upload"))]
    model = vertex_api.parse(upload["body"]["model"], "Model")
    assert model == vertex_api.parse(printed["model"], "Model")
    assert model.container_spec.image_uri == "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"
    assert model.artifact_uri == f"{MODEL_DIR}/export"
    assert ("POST", f"{LOCATION}/endpoints") not in calls
    # deploy-model reads the Model first (its supportedDeploymentResourcesTypes), then deploys it.
    assert calls.index(("GET", f"{LOCATION}/models/cifar-model")) < calls.index(
        ("POST", f"{LOCATION}/endpoints/shared:deployModel"))
    deploy = requests[calls.index(("POST", f"{LOCATION}/endpoints/shared:deployModel"))]
    received = vertex_api.parse(deploy["body"], "DeployModelRequest")
    assert received == vertex_api.parse(printed["deployModel"], "DeployModelRequest")
    assert received.deployed_model.service_account == "server@my-project.iam.gserviceaccount.com"
    assert resource == "projects/my-project/locations/us-central1/endpoints/shared"


@pytest.mark.parametrize("trainer", ["--modle=cnn", "--epochs=abc", "--model=cnnx"])
def test_a_bad_trainer_flag_is_refused_before_gcloud_is_called(standin, trainer):
    server, environment = standin
    before = len(server.requests())
    result = run_task(*BASE, f"--image={IMAGE}", "--", trainer, module="launch.vertex", env=environment, timeout=60)
    assert result.returncode == 2 and trainer.split("=")[0].lstrip("-") in single_error_line(result)
    assert server.requests()[before:] == []


def git(checkout, *arguments: str) -> str:
    environment = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                   "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-C", str(checkout), *arguments], check=True, capture_output=True, text=True,
                          env=environment).stdout.strip()


def test_cloud_build_uploads_the_git_files_and_creates_the_build(standin, gcs_bucket, tmp_path):
    """As far as gcloud can be pointed at local stand-ins: the source upload (to the Cloud Storage emulator) and
    the build request. gcloud then tails the build's log from storage.googleapis.com, a host no override moves, so
    the stand-in leaves logsBucket out and gcloud stops there, after the request, with an error."""
    from google.cloud import storage

    server, environment = standin
    checkout = tmp_path / "repo"
    (checkout / "trainer" / "runs").mkdir(parents=True)
    shutil.copy(ROOT / "Dockerfile", checkout / "Dockerfile")
    (checkout / ".gitignore").write_text("runs/\n")
    (checkout / "trainer" / "task.py").write_text("print('train')\n")
    (checkout / "trainer" / "runs" / "mine.txt").write_text("git-ignored")
    git(checkout, "init", "--quiet")
    git(checkout, "add", ".")
    git(checkout, "commit", "--quiet", "-m", "image")
    commit = git(checkout, "rev-parse", "HEAD")
    before = len(server.requests())
    storage_override = {"CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/"}
    result = run_task("--image=us-central1-docker.pkg.dev/my-project/training/cifar-trainer", "--builder=cloud_build",
                      "--project=my-project", "--accelerator=cpu", f"--context={checkout}", module="launch.build",
                      env={**environment, **storage_override}, timeout=240)
    assert result.returncode == 1 and "unable to stream logs" in result.stderr, result.stderr[-3000:]
    create, *_ = server.api_requests(before)
    assert (create["method"], create["path"]) == ("POST", "/v1/projects/my-project/locations/global/builds")
    image = f"us-central1-docker.pkg.dev/my-project/training/cifar-trainer:{commit[:12]}-cpu"
    assert create["body"]["substitutions"] == {"_IMAGE": image, "_ACCELERATOR": "cpu", "_REVISION": commit}
    assert create["body"]["steps"][0]["name"] == "gcr.io/cloud-builders/docker"
    assert create["body"]["timeout"] == "3600s" and create["body"]["options"]["machineType"] == "E2_HIGHCPU_8"
    source = create["body"]["source"]["storageSource"]
    blob = storage.Client().bucket(source["bucket"]).blob(source["object"])
    with tarfile.open(fileobj=io.BytesIO(blob.download_as_bytes())) as archive:
        uploaded = sorted(member.name for member in archive.getmembers() if member.isfile())
    # gcloud's default .gcloudignore leaves out .gitignore itself.
    assert uploaded == ["Dockerfile", "trainer/task.py"]


def test_a_bucket_folder_dataset_is_submitted_without_the_launcher_reading_the_bucket(standin):
    # The job reads the folder with its own account; this machine's account may not read it at all.
    server, environment = standin
    with image_folders.forbidding_bucket() as (endpoint, asked):
        trainer = ("--", "--dataset=gs://my-bucket/pets", "--model=cnn", "--image_size=64")
        name, requests = launch((server, {**environment, "STORAGE_EMULATOR_HOST": endpoint}), *BASE,
                                "--topology=multi_worker", "--machines=2", f"--image={IMAGE}", *trainer)
    assert not asked
    (request,) = requests
    assert (request["method"], request["path"]) == ("POST", f"{LOCATION}/customJobs")
    for pool in request["body"]["jobSpec"]["workerPoolSpecs"]:
        assert pool["containerSpec"]["args"][-3:] == list(trainer[1:])
