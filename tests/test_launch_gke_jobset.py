"""launch.gke's default manifest, a JobSet: the JobSet CRD's schema, restarts as a unit, clean-up, Spot and Kueue."""

import json
import pathlib
import re

import jsonschema
import pytest

from helpers import run_task
from launch_fakes import FakeTools
from trainer import distribution

IMAGE = "us-central1-docker.pkg.dev/my-project/training/cifar-trainer:0123456789ab-gpu"
BASE = [f"--image={IMAGE}", "--output_dir=gs://my-bucket/runs", "--job_name=cifar-test"]
# The JobSet CRD's openAPIV3Schema (kubernetes-sigs/jobset v0.12.0), vendored: see its $comment.
CRD_SCHEMA = pathlib.Path(__file__).parent / "schemas" / "jobset-v0.12.0.json"


def dry_run(*flags: str, trainer: tuple[str, ...] = ("--model=resnet50",)) -> dict:
    result = run_task(*BASE, *flags, "--dry_run", "--", *trainer, module="launch.gke", timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def strict(schema):
    """The CRD's structural schema as JSON Schema that, like `kubectl apply --validate=strict`, refuses fields the
    schema does not declare (the API server would silently drop them)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: strict(value) for key, value in schema.items()}
    if converted.pop("x-kubernetes-int-or-string", False):
        converted.pop("type", None)
        converted["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        converted["additionalProperties"] = False
    return converted


def validate(jobset: dict) -> None:
    vendored = json.loads(CRD_SCHEMA.read_text())
    assert jobset["apiVersion"] == vendored["apiVersion"] and jobset["kind"] == "JobSet"
    jsonschema.Draft7Validator(strict(vendored["openAPIV3Schema"])).validate(jobset)


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
    usage, preempted = policy["rules"]
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


def test_applies_the_jobset_and_checks_it_may(tmp_path):
    tools = FakeTools(tmp_path / "bin")
    tools.add("kubectl", [(["config", "current-context"], "gke_p_us-central1_c\n", 0),
                          (["auth", "can-i"], "yes\n", 0)])
    result = run_task(*BASE, "--workers=2", "--", "--model=cnn", module="launch.gke", env=tools.env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "jobset.jobset.x-k8s.io/cifar-test"
    calls = [call["argv"] for call in tools.calls()]
    assert ["auth", "can-i", "create", "jobsets.jobset.x-k8s.io", "--namespace=default"] in calls
    (apply,) = [call for call in tools.calls() if call["argv"][:1] == ["apply"]]
    assert json.loads(apply["stdin"]) == dry_run("--workers=2", trainer=("--model=cnn",))


def test_a_job_name_too_long_for_jobset_pod_names_is_refused():
    result = run_task(*BASE[:2], "--job_name=" + "a" * 52, "--workers=2", "--dry_run", module="launch.gke",
                      timeout=60)
    assert result.returncode == 2 and "--job_name" in result.stderr and "at most 51" in result.stderr
