"""launch.vertex: the CustomJob request per topology, its schema, hostile input, and missing tools or credentials."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from helpers import run_task
from helpers import single_error_line
from launch_fakes import GCLOUD_UNKNOWN_FIELDS
from launch_fakes import FakeTools
from launch_fakes import printed_commands
import vertex_api
from trainer.training import distribution

IMAGE = "us-central1-docker.pkg.dev/my-project/training/cifar-trainer:0123456789ab-gpu"
TPU_IMAGE = "us-central1-docker.pkg.dev/my-project/training/cifar-trainer:0123456789ab-tpu"
BASE = ["--project=my-project", f"--image={IMAGE}", "--output_dir=gs://my-bucket/runs", "--job_name=cifar-test"]
GCLOUD_LIB = pathlib.Path("/usr/lib/google-cloud-sdk/lib")


def dry_run(*flags: str, trainer: tuple[str, ...] = ("--model=resnet50", "--epochs=3")):
    result = run_task(*BASE, *flags, "--dry_run", "--", *trainer, module="launch.vertex", timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), printed_commands(result.stderr)


def test_one_gpu_job():
    body, commands = dry_run("--topology=one_gpu")
    (pool,) = body["jobSpec"]["workerPoolSpecs"]
    assert pool["machineSpec"] == {"machineType": "n1-standard-8", "acceleratorType": "NVIDIA_TESLA_T4",
                                   "acceleratorCount": 1}
    assert pool["replicaCount"] == 1
    assert pool["containerSpec"] == {"imageUri": IMAGE, "args": ["--strategy=one_device", "--accelerator=gpu",
                                                                 "--model=resnet50", "--epochs=3"]}
    assert body["displayName"] == "cifar-test"
    assert body["jobSpec"]["baseOutputDirectory"] == {"outputUriPrefix": "gs://my-bucket/runs/cifar-test"}
    assert body["jobSpec"]["scheduling"]["restartJobOnWorkerRestart"] is True
    assert commands == [["gcloud", "ai", "custom-jobs", "create", "--project=my-project", "--region=us-central1",
                         "--display-name=cifar-test", "--labels=topology=one_gpu", "--config=-",
                         "--format=value(name)"]]


def test_multi_gpu_job_on_l4():
    body, _ = dry_run("--topology=multi_gpu", "--gpus=4", "--gpu_type=NVIDIA_L4")
    (pool,) = body["jobSpec"]["workerPoolSpecs"]
    assert pool["machineSpec"] == {"machineType": "g2-standard-48", "acceleratorType": "NVIDIA_L4",
                                   "acceleratorCount": 4}
    assert pool["containerSpec"]["args"][0] == "--strategy=mirrored"


def test_multi_worker_job_has_a_chief_pool_and_a_worker_pool():
    body, _ = dry_run("--topology=multi_worker", "--machines=3", "--gpus=2", "--machine_type=n1-highmem-16",
                      "--spot", "--timeout_hours=1.5", "--env=TFDS_DATA_DIR=gs://my-bucket/tfds")
    chief, workers = body["jobSpec"]["workerPoolSpecs"]
    assert (chief["replicaCount"], workers["replicaCount"]) == (1, 2)
    for pool in (chief, workers):
        assert pool["machineSpec"] == {"machineType": "n1-highmem-16", "acceleratorType": "NVIDIA_TESLA_T4",
                                       "acceleratorCount": 2}
        assert pool["containerSpec"]["args"][0] == "--strategy=multi_worker_mirrored"
        assert pool["containerSpec"]["env"] == [{"name": "TFDS_DATA_DIR", "value": "gs://my-bucket/tfds"}]
    assert body["jobSpec"]["scheduling"] == {"restartJobOnWorkerRestart": True, "timeout": "5400s",
                                             "strategy": "SPOT"}


def test_multi_worker_pools_give_the_trainer_one_cluster():
    """Vertex AI lists each pool's replicas in CLUSTER_SPEC; the trainer must see all machines, one chief."""
    body, _ = dry_run("--topology=multi_worker", "--machines=4")
    pools = body["jobSpec"]["workerPoolSpecs"]
    cluster = {f"workerpool{index}": [f"workerpool{index}-{replica}:2222" for replica in range(pool["replicaCount"])]
               for index, pool in enumerate(pools)}
    tf_config = distribution.tf_config_from_cluster_spec({"cluster": cluster, "task": {"type": "workerpool1",
                                                                                        "index": 2}})
    assert len(tf_config["cluster"]["chief"]) == 1 and len(tf_config["cluster"]["worker"]) == 3
    assert tf_config["task"] == {"type": "worker", "index": 2}


def test_tpu_job_defaults_to_one_v5e_host_of_8_chips():
    body, _ = dry_run("--topology=tpu", f"--image={TPU_IMAGE}")
    (pool,) = body["jobSpec"]["workerPoolSpecs"]
    assert pool["machineSpec"] == {"machineType": "ct5lp-hightpu-8t", "tpuTopology": "2x4"}
    assert pool["replicaCount"] == 1 and "diskSpec" not in pool
    assert pool["containerSpec"]["args"][:3] == ["--strategy=tpu", "--accelerator=tpu", "--tpu=local"]
    assert pool["containerSpec"]["imageUri"] == TPU_IMAGE


@pytest.mark.parametrize("topology, machine_type", [("1x1", "ct5lp-hightpu-1t"), ("2x2", "ct5lp-hightpu-4t")])
def test_smaller_v5e_hosts(topology, machine_type):
    body, _ = dry_run("--topology=tpu", f"--image={TPU_IMAGE}", f"--tpu_topology={topology}")
    assert body["jobSpec"]["workerPoolSpecs"][0]["machineSpec"] == {"machineType": machine_type,
                                                                    "tpuTopology": topology}


def test_tpu_v2_vm():
    body, _ = dry_run("--topology=tpu", f"--image={TPU_IMAGE}", "--tpu_type=TPU_V2")
    (pool,) = body["jobSpec"]["workerPoolSpecs"]
    assert pool["machineSpec"] == {"machineType": "cloud-tpu", "acceleratorType": "TPU_V2", "acceleratorCount": 8}
    assert pool["containerSpec"]["args"][:3] == ["--strategy=tpu", "--accelerator=tpu", "--tpu=local"]


def test_tpu_topology_is_refused_for_a_v3_vm():
    result = run_task(*BASE, f"--image={TPU_IMAGE}", "--topology=tpu", "--tpu_type=TPU_V3", "--tpu_topology=2x2",
                      "--dry_run", module="launch.vertex", timeout=60)
    assert "--tpu_topology applies to TPU v5e" in single_error_line(result) and result.returncode == 2


def test_tensorboard_and_labels():
    tensorboard = "projects/my-project/locations/us-central1/tensorboards/123"
    body, commands = dry_run(f"--tensorboard={tensorboard}", "--service_account=trainer@my-project.iam.gserviceaccount"
                             ".com", "--labels=team=vision,experiment=lr_sweep")
    assert body["jobSpec"]["tensorboard"] == tensorboard
    assert body["jobSpec"]["serviceAccount"] == "trainer@my-project.iam.gserviceaccount.com"
    assert body["labels"] == {"topology": "one_gpu", "team": "vision", "experiment": "lr_sweep"}
    assert "--labels=topology=one_gpu,team=vision,experiment=lr_sweep" in commands[0]


VALIDATE_WITH_GCLOUD = GCLOUD_UNKNOWN_FIELDS + """
for body in json.load(sys.stdin):
    print(json.dumps(unknown(encoding.DictToMessage(body, messages.GoogleCloudAiplatformV1CustomJob), "customJob")))
"""


@pytest.mark.skipif(not (GCLOUD_LIB / "googlecloudsdk").is_dir(), reason="the Google Cloud SDK's libraries (with "
                    f"Vertex AI's API schema) are not in {GCLOUD_LIB}")
def test_requests_match_the_vertex_api_schema():
    """Each topology's request decodes into Vertex AI's v1 CustomJob message (the gcloud SDK's copy) with no unknown
    field and only known enum values."""
    variants = [("--topology=one_gpu",), ("--topology=multi_worker", "--spot", "--timeout_hours=2"),
                ("--topology=tpu", f"--image={TPU_IMAGE}"),
                ("--tensorboard=projects/p/locations/us-central1/tensorboards/1",
                 "--service_account=a@p.iam.gserviceaccount.com", "--env=A=b", "--labels=a=b")]
    bodies = [dry_run(*flags)[0] for flags in variants]
    env = {**os.environ, "PYTHONPATH": f"{GCLOUD_LIB / 'third_party'}{os.pathsep}{GCLOUD_LIB}"}
    result = subprocess.run([sys.executable, "-c", VALIDATE_WITH_GCLOUD], input=json.dumps(bodies), text=True,
                            capture_output=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(line) for line in result.stdout.splitlines()] == [[]] * len(variants)


VARIANTS = [("--topology=one_gpu",), ("--topology=multi_gpu", "--gpus=8", "--gpu_type=NVIDIA_H100_80GB"),
            ("--topology=multi_worker", "--spot", "--timeout_hours=2", "--env=A=b", "--labels=a=b"),
            ("--topology=tpu", f"--image={TPU_IMAGE}"), ("--topology=tpu", f"--image={TPU_IMAGE}", "--tpu_type=TPU_V3"),
            ("--tensorboard=projects/p/locations/us-central1/tensorboards/1",
             "--service_account=a@p.iam.gserviceaccount.com")]


@pytest.mark.parametrize("flags", VARIANTS, ids=lambda flags: " ".join(flags))
def test_requests_parse_into_the_aiplatform_custom_job_message(flags):
    job = vertex_api.parse(dry_run(*flags)[0], "CustomJob")
    assert job.job_spec.worker_pool_specs[0].container_spec.image_uri.endswith(("-gpu", "-tpu"))


@pytest.mark.parametrize("flags", [("--image=us-docker.pkg.dev/p/r/cifar-trainer:abc-cpu",),
                                   ("--image=us-docker.pkg.dev/p/r/cifar-trainer:abc-gpu",
                                    "--accelerator_type=NVIDIA_L4", "--endpoint=shared"),
                                   ("--prebuilt",)], ids=["cpu", "gpu-existing-endpoint", "prebuilt"])
def test_deploy_bodies_parse_into_the_aiplatform_messages(flags):
    """launch.vertex deploy's model upload, endpoint and deployModel requests (launch/vertex_deploy.py)."""
    result = run_task("deploy", "--project=my-project", "--model_dir=gs://my-bucket/runs/job/model", *flags,
                      "--dry_run", module="launch.vertex", timeout=60)
    assert result.returncode == 0, result.stderr
    bodies = json.loads(result.stdout)
    vertex_api.parse({"model": bodies["model"]}, "UploadModelRequest")
    vertex_api.parse(bodies["deployModel"], "DeployModelRequest")
    if bodies["endpoint"] is not None:
        vertex_api.parse(bodies["endpoint"], "Endpoint")


def test_the_message_check_catches_a_misplaced_field():
    body, _ = dry_run("--topology=tpu", f"--image={TPU_IMAGE}")
    body["jobSpec"]["workerPoolSpecs"][0]["tpuTopology"] = body["jobSpec"]["workerPoolSpecs"][0]["machineSpec"].pop(
        "tpuTopology")
    with pytest.raises(Exception, match="tpuTopology"):
        vertex_api.parse(body, "CustomJob")


@pytest.mark.parametrize("flag, rule", [
    ("--job_name=Cifar Run", "lowercase letters"),
    ("--job_name=x;touch pwned", "lowercase letters"),
    ("--job_name=" + "a" * 64, "at most 63"),
    ("--labels=team=$(id)", "label value"),
    ("--labels=Team=vision", "label key"),
    ("--output_dir=/local/path", "gs://BUCKET/PATH"),
    ("--output_dir=gs://bucket/a b", "gs://BUCKET/PATH"),
    ("--image=us-docker.pkg.dev/p/r/cifar-trainer", "with a tag or digest"),
    ("--image=cifar-trainer:latest;rm -rf ~", "with a tag or digest"),
    ("--region=us central1", "region"),
    ("--env=BAD NAME=1", "NAME=VALUE"),
    ("--env=AIP_MODEL_DIR=gs://elsewhere", "set by the launcher"),
])
def test_bad_values_are_refused_naming_the_flag(flag, rule):
    result = run_task(*BASE, flag, "--dry_run", module="launch.vertex", timeout=60)
    line = single_error_line(result)
    assert result.returncode == 2
    assert flag.split("=")[0] in line and rule in line, line
    assert result.stdout == ""


@pytest.mark.parametrize("flags, expected", [
    (("--topology=one_gpu", "--gpus=2"), "--topology=multi_gpu"),
    (("--topology=multi_gpu",), "--gpus=2 or more"),
    (("--topology=multi_worker", "--machines=1"), "--machines=2 or more"),
    (("--topology=multi_gpu", "--gpus=3"), "--gpus=3 must be one of"),
    (("--gpu_type=NVIDIA_H100_80GB",), "give --machine_type"),
    (("--topology=tpu",), "was built for gpu"),
    (("--tensorboard=projects/p/locations/europe-west4/tensorboards/1",), "same region"),
    (("--tensorboard=projects/p/locations/us-central1/tensorboards/1",), "needs --service_account"),
    (("--epochs=3",), "trainer flags go after --"),
])
def test_inconsistent_topologies_are_refused(flags, expected):
    result = run_task(*BASE, *flags, "--dry_run", module="launch.vertex", timeout=60)
    assert result.returncode == 2
    assert expected in single_error_line(result)


@pytest.mark.parametrize("trainer", [("--strategy=mirrored",), ("--model_dir=gs://x/y",), ("epochs=3",)])
def test_trainer_flags_the_launcher_owns_or_that_are_not_flags_are_refused(trainer):
    result = run_task(*BASE, "--dry_run", "--", *trainer, module="launch.vertex", timeout=60)
    assert result.returncode == 2
    assert trainer[0].split("=")[0] in single_error_line(result)


def fake_gcloud(tmp_path, account: str = "me@example.com", token: tuple[str, int] = ("ya29.fake-token\n", 0)
                ) -> FakeTools:
    tools = FakeTools(tmp_path / "bin")
    tools.add("gcloud", [(["auth", "list"], account + "\n", 0),
                         (["auth", "print-access-token"], *token),
                         (["ai", "custom-jobs", "create"], "projects/1/locations/us-central1/customJobs/42\n", 0)])
    return tools


def test_submits_with_gcloud_and_passes_hostile_trainer_values_as_data(tmp_path):
    tools = fake_gcloud(tmp_path)
    hostile = [f"--train_split=train; touch {tmp_path}/pwned", f"--eval_split=$(touch {tmp_path}/pwned2)",
               f"--dataset=`touch {tmp_path}/pwned3`", "--weights='quoted \"value\"'"]
    result = run_task(*BASE, "--topology=multi_worker", "--", *hostile, module="launch.vertex", env=tools.env(),
                      timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "projects/1/locations/us-central1/customJobs/42"
    auth, token, create = tools.calls()
    assert auth["argv"][:2] == ["auth", "list"] and token["argv"][:2] == ["auth", "print-access-token"]
    assert "fake-token" not in result.stdout + result.stderr
    assert create["argv"] == ["ai", "custom-jobs", "create", "--project=my-project", "--region=us-central1",
                              "--display-name=cifar-test", "--labels=topology=multi_worker", "--config=-",
                              "--format=value(name)"]
    job_spec = json.loads(create["stdin"])
    for pool in job_spec["workerPoolSpecs"]:
        assert pool["containerSpec"]["args"] == ["--strategy=multi_worker_mirrored", "--accelerator=gpu", *hostile]
    assert not list(tmp_path.glob("pwned*"))
    body, commands = dry_run("--topology=multi_worker", trainer=tuple(hostile))
    assert job_spec == body["jobSpec"] and commands == [["gcloud", *create["argv"]]]


def test_refused_value_never_reaches_gcloud(tmp_path):
    tools = fake_gcloud(tmp_path)
    result = run_task(*BASE, f"--job_name=x$(touch {tmp_path}/pwned)", module="launch.vertex", env=tools.env(),
                      timeout=60)
    assert result.returncode == 2 and "--job_name" in single_error_line(result)
    assert tools.calls() == [] and not list(tmp_path.glob("pwned*"))


def test_missing_gcloud_is_one_clear_line(tmp_path):
    tools = FakeTools(tmp_path / "empty")
    result = run_task(*BASE, module="launch.vertex", env=tools.env(only=True), timeout=60)
    assert result.returncode == 1
    assert "gcloud is not installed" in single_error_line(result)


def test_no_active_account_is_one_clear_line(tmp_path):
    tools = fake_gcloud(tmp_path, account="")
    result = run_task(*BASE, module="launch.vertex", env=tools.env(), timeout=60)
    assert result.returncode == 1
    assert "gcloud auth login" in single_error_line(result)
    assert [call["argv"][:2] for call in tools.calls()] == [["auth", "list"]]


def test_credentials_that_cannot_get_a_token_are_one_clear_line(tmp_path):
    """An expired or revoked login stays the active account; the launcher finds out before it submits."""
    tools = fake_gcloud(tmp_path, token=("", 1))
    result = run_task(*BASE, module="launch.vertex", env=tools.env(), timeout=60)
    assert result.returncode == 1
    line = single_error_line(result)
    assert "cannot get an access token for me@example.com" in line and "gcloud auth login" in line, line
    assert [call["argv"][:2] for call in tools.calls()] == [["auth", "list"], ["auth", "print-access-token"]]


def test_dry_run_calls_nothing(tmp_path):
    tools = fake_gcloud(tmp_path)
    result = run_task(*BASE, "--topology=multi_worker", "--dry_run", module="launch.vertex", env=tools.env(),
                      timeout=60)
    assert result.returncode == 0, result.stderr
    assert tools.calls() == []


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="the Google Cloud CLI is not installed")
def test_real_gcloud_without_credentials_is_one_clear_line(tmp_path):
    env = {"CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
    result = run_task(*BASE, module="launch.vertex", env=env, timeout=120)
    assert result.returncode == 1
    assert "gcloud has no active credentials" in single_error_line(result)


def test_help_lists_the_flags():
    result = run_task("--help", module="launch.vertex", timeout=60)
    assert result.returncode == 0
    assert "--topology" in result.stdout and "--output_dir" in result.stdout


@pytest.mark.parametrize("gpu_type, machine_type, disk", [("NVIDIA_B200", "a4-highgpu-8g", "hyperdisk-balanced"),
                                                         ("NVIDIA_H200_141GB", "a3-ultragpu-8g", "hyperdisk-balanced"),
                                                         ("NVIDIA_H100_80GB", "a3-highgpu-8g", "pd-ssd")])
def test_boot_disk_is_one_the_machine_family_accepts(gpu_type, machine_type, disk):
    """A3 Ultra and A4 machines boot from Hyperdisk only; they refuse pd-ssd."""
    body, _ = dry_run("--topology=multi_gpu", "--gpus=8", f"--gpu_type={gpu_type}")
    (pool,) = body["jobSpec"]["workerPoolSpecs"]
    assert pool["machineSpec"]["machineType"] == machine_type and pool["diskSpec"]["bootDiskType"] == disk
    vertex_api.parse(body, "CustomJob")


DEPLOY = ["deploy", "--project=my-project", "--model_dir=gs://my-bucket/runs/job/model", "--dry_run",
          "--image=us-docker.pkg.dev/p/r/cifar-trainer:abc-gpu"]


@pytest.mark.parametrize("gpu, count, machine_type", [("NVIDIA_L4", 1, "g2-standard-4"),
                                                      ("NVIDIA_L4", 4, "g2-standard-48"),
                                                      ("NVIDIA_TESLA_T4", 1, "n1-standard-4"),
                                                      ("NVIDIA_TESLA_A100", 2, "a2-highgpu-2g")])
def test_deploy_picks_a_machine_the_gpu_attaches_to(gpu, count, machine_type):
    result = run_task(*DEPLOY, f"--accelerator_type={gpu}", f"--accelerator_count={count}", module="launch.vertex",
                      timeout=60)
    assert result.returncode == 0, result.stderr
    machine = json.loads(result.stdout)["deployModel"]["deployedModel"]["dedicatedResources"]["machineSpec"]
    assert machine == {"machineType": machine_type, "acceleratorType": gpu, "acceleratorCount": count}


@pytest.mark.parametrize("flags, expected", [
    (("--accelerator_type=NVIDIA_L4", "--machine_type=n1-standard-8"), "give a g2-* machine type"),
    (("--accelerator_type=NVIDIA_H100_80GB",), "no default machine type; give a a3-highgpu-*"),
])
def test_deploy_refuses_a_machine_the_gpu_cannot_attach_to(flags, expected):
    result = run_task(*DEPLOY, *flags, module="launch.vertex", timeout=60)
    assert result.returncode == 2 and expected in single_error_line(result)


def test_readme_deploy_command_runs_as_written_with_the_guides_variables():
    """BUCKET=gs://my-bucket: the deploy section uses $BUCKET, never gs://$BUCKET (which gives gs://gs://)."""
    docs = pathlib.Path(__file__).parent.parent / "docs"
    readme = (docs / "cloud.md").read_text() + (docs / "serving.md").read_text()
    exports = [line for line in readme.splitlines() if line.startswith("export PROJECT=")]
    section = readme[readme.index("### Deploy to a Vertex AI endpoint"):readme.index("### Deploy to GKE")]
    command = re.search(r"python -m launch\.vertex deploy .*?(?=\ngcloud)", section, re.S).group(0)
    script = "\n".join([*exports, "CPU_IMAGE=us-docker.pkg.dev/p/r/cifar-trainer:abc-cpu",
                        command.replace("\\\n", " ").replace("deploy ", "deploy --dry_run ", 1)])
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parent.parent)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["artifactUri"] == "gs://my-bucket/runs/cifar-one-gpu/model"
