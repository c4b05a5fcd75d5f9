"""launch.gke's default manifest, a JobSet: the JobSet CRD's schema, restarts as a unit, clean-up, Spot and Kueue."""

import json
import pathlib
import re
import subprocess
import time

import jsonschema
import pytest

import kubernetes_api
from helpers import run_task
from trainer.training import distribution

IMAGE = "us-central1-docker.pkg.dev/my-project/training/cifar-trainer:0123456789ab-gpu"
BASE = [f"--image={IMAGE}", "--output_dir=gs://my-bucket/runs", "--job_name=cifar-test"]
# The JobSet CRD's openAPIV3Schema (kubernetes-sigs/jobset v0.12.0), vendored: see its $comment.
CRD_SCHEMA = pathlib.Path(__file__).parent / "schemas" / "jobset-v0.12.0.json"


def dry_run(*flags: str, trainer: tuple[str, ...] = ("--model=resnet50",)) -> dict:
    result = run_task(*BASE, *flags, "--dry_run", "--", *trainer, module="launch.gke", timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def validate(jobset: dict) -> None:
    vendored = json.loads(CRD_SCHEMA.read_text())
    assert jobset["apiVersion"] == vendored["apiVersion"] and jobset["kind"] == "JobSet"
    jsonschema.Draft7Validator(kubernetes_api.strict_schema(vendored["openAPIV3Schema"])).validate(jobset)


def pod_spec(jobset: dict) -> dict:
    (replicated,) = jobset["spec"]["replicatedJobs"]
    return replicated["template"]["spec"]["template"]["spec"]


SHAPES = {
    "one_gpu": ("--gpus=1",),
    "multi_worker_spot_queue": ("--workers=3", "--gpus=2", "--spot", "--queue=team-a", "--timeout_hours=2"),
    "tpu": ("--image=us-central1-docker.pkg.dev/my-project/training/cifar-trainer:0123456789ab-tpu",
            "--accelerator=tpu"),
    "cpu": ("--accelerator=cpu", "--image=us-docker.pkg.dev/p/r/cifar-trainer:abc-cpu", "--cpu=4", "--memory=16Gi"),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_jobsets_follow_the_jobset_crd_schema(shape):
    validate(dry_run(*SHAPES[shape]))


def test_the_schema_check_catches_a_misspelled_or_misplaced_field():
    jobset = dry_run()
    misspelled = json.loads(json.dumps(jobset))
    misspelled["spec"]["ttlSecondAfterFinished"] = misspelled["spec"].pop("ttlSecondsAfterFinished")
    misplaced = json.loads(json.dumps(jobset))
    misplaced["spec"]["maxRestarts"] = misplaced["spec"]["failurePolicy"].pop("maxRestarts")
    wrong_enum = json.loads(json.dumps(jobset))
    wrong_enum["spec"]["failurePolicy"]["rules"][0]["action"] = "FailJobset"
    for broken in (misspelled, misplaced, wrong_enum):
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


def test_workers_restart_as_a_unit_and_preemptions_do_not_count():
    jobset = dry_run("--workers=2", "--restarts=5")
    (replicated,) = jobset["spec"]["replicatedJobs"]
    job = replicated["template"]["spec"]
    # One failed pod fails the attempt; the JobSet then restarts every pod.
    assert job["backoffLimit"] == 0 and job["completionMode"] == "Indexed" and job["completions"] == 2
    rules = job["podFailurePolicy"]["rules"]
    assert [rule["action"] for rule in rules] == ["FailJob"] * 3
    assert rules[0]["onExitCodes"]["values"] == [2] and rules[1]["onExitCodes"]["values"] == [42]
    assert rules[2]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    policy = jobset["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 5
    timed_out, usage, preempted = policy["rules"]
    assert timed_out == {"name": "TimedOut", "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]}
    # Kubernetes' message when a FailJob rule fires names the rule's index; each JobSet rule matches its own.
    message = "Container trainer for pod default/cifar-test-workers-0-1-x failed with exit code {} matching FailJob " \
              "rule at index {}"
    assert usage["action"] == "FailJobSet"
    assert any(re.search(pattern, message.format(2, 0)) for pattern in usage["onJobFailureMessagePatterns"])
    assert not any(re.search(pattern, message.format(42, 1)) for pattern in usage["onJobFailureMessagePatterns"])
    assert preempted["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    assert all(any(re.search(pattern, text) for pattern in preempted["onJobFailureMessagePatterns"]) for text in (
        message.format(42, 1), "Pod default/p has condition DisruptionTarget matching FailJob rule at index 2"))


def test_pods_find_each_other_by_the_names_jobset_gives_them():
    jobset = dry_run("--workers=3", "--port=2345", "--namespace=research")
    assert jobset["spec"]["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True,
                                         "subdomain": "cifar-test"}
    (container,) = pod_spec(jobset)["containers"]
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    hosts = env["WORKER_HOSTS"].split(",")
    # JobSet names pod i JOBSET-REPLICATEDJOB-0-i in the JobSet's subdomain.
    assert hosts == [f"cifar-test-workers-0-{index}.cifar-test:2345" for index in range(3)]
    for index in range(3):
        with pytest.MonkeyPatch.context() as patch:
            for name in ("TF_CONFIG", "CLUSTER_SPEC"):
                patch.delenv(name, raising=False)
            patch.setenv("WORKER_HOSTS", env["WORKER_HOSTS"])
            patch.setenv("JOB_COMPLETION_INDEX", str(index))
            assert distribution.cluster_environment()["task"] == {"type": "worker", "index": index}


def test_cleanup_grace_spot_and_kueue():
    jobset = dry_run("--workers=2", "--ttl_hours=6", "--grace_seconds=600", "--spot", "--queue=team-a")
    assert jobset["spec"]["ttlSecondsAfterFinished"] == 6 * 3600
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    pod = pod_spec(jobset)
    assert pod["terminationGracePeriodSeconds"] == 600
    assert pod["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
    assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
            "effect": "NoSchedule"} in pod["tolerations"]
    assert "subdomain" not in pod  # JobSet sets it from spec.network.


def test_the_default_grace_period_outlasts_kubernetes_default():
    assert pod_spec(dry_run())["terminationGracePeriodSeconds"] > 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The Kubernetes API stand-in the real kubectl talks to (tests/kubernetes_api.py)."""
    yield from kubernetes_api.serve_for_tests(tmp_path_factory)


def applied_jobset(cluster, tmp_path, token: str, *flags: str) -> dict:
    """launch.gke run with the real kubectl against the stand-in: the JobSet that arrived, checked against the CRD."""
    result = run_task(*BASE, *flags, module="launch.gke", env=cluster.kubeconfig(tmp_path, token), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "jobset.jobset.x-k8s.io/cifar-test"
    assert cluster.access_reviews(token) == [{"namespace": "default", "verb": "create", "group": "jobset.x-k8s.io",
                                              "resource": "jobsets"}]
    (request,) = cluster.created(token)
    assert (request["method"], request["path"]) == ("POST", "/apis/jobset.x-k8s.io/v1alpha2/namespaces/default/jobsets")
    assert request["query"]["fieldValidation"] == ["Strict"]
    jobset = request["body"]
    jobset["metadata"].pop("annotations")  # kubectl's last-applied-configuration.
    validate(jobset)
    return jobset


@pytest.mark.parametrize("flags", [("--workers=2", "--gpus=2"), SHAPES["tpu"]], ids=["gpus", "tpu_slice"])
def test_applies_the_jobset_through_kubectl(cluster, tmp_path, flags):
    token = f"jobset-{flags[0]}"
    jobset = applied_jobset(cluster, tmp_path, token, *flags, "--", "--model=cnn")
    assert jobset == dry_run(*flags, trainer=("--model=cnn",))
    (container,) = pod_spec(jobset)["containers"]
    (uid,) = [item for item in container["env"] if item["name"] == "KUBERNETES_JOB_UID"]
    assert uid["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['jobset.sigs.k8s.io/jobset-uid']"


def test_timeout_caps_the_whole_run_across_restarts(cluster, tmp_path):
    """A restart makes a new Job, whose activeDeadlineSeconds counts afresh: the container's command counts down
    to one deadline fixed at submission, so each attempt gets only what is left, and none after it."""
    before = time.time()
    jobset = applied_jobset(cluster, tmp_path, "timeout", "--timeout_hours=2", "--", "--model=cnn")
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated["template"]["spec"]["activeDeadlineSeconds"] == 7200
    (container,) = pod_spec(jobset)["containers"]
    shell, flag, script, name, *args = [*container["command"], *container["args"]]
    assert (shell, flag, args[-1]) == ("/bin/sh", "-c", "--model=cnn")
    deadline = int(re.search(r"remaining=\$\(\( (\d+) - ", script).group(1))
    assert before + 7200 - 1 <= deadline <= time.time() + 7200
    # The image's entrypoint, run by the script.
    assert "python -m trainer.task" in script and '"$@"' in script
    for remaining, status in ((-5, 2), (3600, 0)):
        run = subprocess.run(["/bin/sh", "-c", script.replace(str(deadline), str(int(time.time()) + remaining))
                              .replace("python -m trainer.task", "echo"), name, *args],
                             capture_output=True, text=True, timeout=10)
        assert run.returncode == status, run.stderr
        if status == 0:
            assert run.stdout.split() == args  # The trainer's arguments arrive unchanged.
        else:
            assert "--timeout_hours" in run.stderr


def test_a_job_name_too_long_for_jobset_pod_names_is_refused():
    result = run_task(*BASE[:2], "--job_name=" + "a" * 52, "--workers=2", "--dry_run", module="launch.gke",
                      timeout=60)
    assert result.returncode == 2 and "--job_name" in result.stderr and "at most 51" in result.stderr
