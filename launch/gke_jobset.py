"""The GKE training job as a JobSet (jobset.x-k8s.io): its pods restart together and it owns its DNS Service.

A multi-worker job cannot take one worker back mid-run: the others stop when a peer dies, and all must resume from
the same checkpoint. A JobSet restarts every pod as a unit (failurePolicy.maxRestarts), creates the headless Service
that gives pod i the name NAME-workers-0-i.NAME and deletes it with itself, and goes away ttlSecondsAfterFinished
after it ends. Each attempt is one Indexed Job that fails at the first failed pod (backoffLimit 0); its
podFailurePolicy tells the JobSet why, by rule index, so that
- a usage error (exit status 2) fails the JobSet at once: rerunning the same command cannot help;
- a preemption (exit status 42 after a checkpoint, or a Kubernetes disruption such as a Spot reclaim or a node
  drain) restarts it without counting against --restarts;
- any other failure restarts it, at most --restarts times.
Needs the JobSet controller in the cluster (docs/cloud.md, "Run on GKE"). The pure functions here build the manifest
from the pod template launch/gke.py makes.
"""

from trainer import cli

API_VERSION = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "workers"
# JobSet's label on its Jobs and pods: the JobSet's uid, the same for every restart.
UID_LABEL = "jobset.sigs.k8s.io/jobset-uid"
# Kueue reads the queue of a workload from this label.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The Job's podFailurePolicy rules, by index; the JobSet's rules match the message Kubernetes writes when a FailJob
# rule fires: "Container C for pod NS/P failed with exit code N matching FailJob rule at index I" (or "Pod NS/P has
# condition DisruptionTarget matching FailJob rule at index I").
USAGE_RULE, PREEMPTED_RULE, DISRUPTED_RULE = 0, 1, 2


def hostnames(name: str, workers: int) -> list[str]:
    """The DNS names of the pods: JobSet names them JOBSET-REPLICATEDJOB-JOBINDEX-PODINDEX in subdomain JOBSET."""
    return [f"{name}-{REPLICATED_JOB}-0-{index}.{name}" for index in range(workers)]


def pod_failure_policy(container: str) -> dict:
    def exit_codes(code: int) -> dict:
        return {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In", "values": [code]}}
    rules = {USAGE_RULE: exit_codes(cli.USAGE_EXIT_CODE), PREEMPTED_RULE: exit_codes(cli.PREEMPTED_EXIT_CODE),
             DISRUPTED_RULE: {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}}
    return {"rules": [rules[index] for index in sorted(rules)]}


def failure_policy(restarts: int) -> dict:
    def matching(*indices: int) -> list[str]:
        return [f"matching FailJob rule at index {index}$" for index in indices]
    return {"maxRestarts": restarts, "rules": [
        # An attempt that used up --timeout_hours (the Job's activeDeadlineSeconds) ends the run, never restarts it.
        {"name": "TimedOut", "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]},
        {"name": "UsageError", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
         "onJobFailureMessagePatterns": matching(USAGE_RULE)},
        {"name": "Preempted", "action": "RestartJobSetAndIgnoreMaxRestarts",
         "onJobFailureReasons": ["PodFailurePolicy"], "onJobFailureMessagePatterns": matching(PREEMPTED_RULE,
                                                                                             DISRUPTED_RULE)},
    ]}


# Runs the image's entrypoint (Dockerfile: python -m trainer.task) with what is left of the run's time: a restarted
# attempt gets the rest of --timeout_hours, not all of it again, and one that starts after the deadline exits with
# the usage status, which fails the JobSet at once (USAGE_RULE). `timeout` passes SIGTERM on to the trainer, so a
# preemption still saves its checkpoint; at the deadline it sends SIGTERM, and SIGKILL after the grace period.
DEADLINE_SCRIPT = (
    'remaining=$(( {deadline} - $(date +%s) )); '
    'if [ "$remaining" -le 0 ]; then echo "error: --timeout_hours: the run passed its deadline" >&2; exit {usage}; fi; '
    'exec timeout --kill-after={grace} "$remaining" python -m trainer.task "$@"')


def cap_the_run(container: dict, deadline: float, grace_seconds: int) -> None:
    """Makes the container stop at `deadline` (seconds since the epoch) however often the JobSet restarts it: each
    restart makes a new Job, whose activeDeadlineSeconds would start counting afresh."""
    script = DEADLINE_SCRIPT.format(deadline=int(deadline), usage=cli.USAGE_EXIT_CODE, grace=max(grace_seconds, 1))
    # The trainer's arguments stay arguments ("$@"), never part of the script.
    container["command"] = ["/bin/sh", "-c", script, "trainer.task"]


def jobset(name: str, namespace: str, labels: dict, pod_template: dict, container: str, workers: int, restarts: int,
           ttl_seconds: int, timeout_seconds: int, queue: str | None) -> dict:
    """The JobSet manifest: one ReplicatedJob of `workers` indexed pods made from `pod_template`."""
    job_spec = {"completionMode": "Indexed", "completions": workers, "parallelism": workers, "backoffLimit": 0,
                "podFailurePolicy": pod_failure_policy(container), "template": pod_template}
    if timeout_seconds:
        job_spec["activeDeadlineSeconds"] = timeout_seconds
    metadata = {"name": name, "namespace": namespace, "labels": {**labels, **({QUEUE_LABEL: queue} if queue else {})}}
    return {"apiVersion": API_VERSION, "kind": "JobSet", "metadata": metadata, "spec": {
        "failurePolicy": failure_policy(restarts),
        # Workers look each other up while they start, before any is ready.
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True, "subdomain": name},
        "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": {"spec": job_spec}}],
        "ttlSecondsAfterFinished": ttl_seconds}}
