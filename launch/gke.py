"""Runs the training job on Kubernetes (GKE): renders a JobSet, or an Indexed Job and a headless Service, and applies
them.

    python -m launch.gke --image=IMAGE --output_dir=gs://BUCKET/runs --workers=2 --gpus=1 -- --model=resnet50

By default (--api=jobset) the job is a JobSet: its pods restart together, it owns its Service, and it is deleted
--ttl_hours after it ends (launch/gke_jobset.py). --api=job renders the Indexed Job described below instead.

The Job runs --workers pods, one per index. The headless Service gives pod i the stable DNS name
JOB-i.JOB (its hostname and subdomain), and every pod gets WORKER_HOSTS, the list of all those names with --port;
Kubernetes sets JOB_COMPLETION_INDEX, so the trainer knows the cluster and its own place in it. The strategy follows
the shape: several pods run multi_worker_mirrored, one pod mirrored (several GPUs), one_device (one GPU), tpu
(--accelerator=tpu, one single-host TPU slice) or default (CPU).

A failed pod is replaced up to --restarts times per pod, and the replacement resumes from the latest checkpoint. A
preempted pod (exit status 42 after it saved a checkpoint, or evicted by Kubernetes) does not count against that,
a usage error (exit status 2) fails the Job at once, and a transient failure (exit status 75: storage unreachable
past --storage_retry_seconds) is retried like any other failure, never failing the Job at once. Outputs go to
--output_dir/JOB_NAME, in the layout of a
Vertex AI job (model/, checkpoints/, logs/); the pods need write access to the bucket (Workload Identity through
--service_account). With --dry_run the manifests are printed, so `... --dry_run | kubectl apply -f -` works too.

`python -m launch.gke serve ...` serves a finished run instead (Deployment, Service, autoscaler): see
launch/gke_serve.py.
"""

import datetime
import json
import time

from absl import flags
from absl import logging

from launch import cloud
from launch import gke_jobset
from launch import gke_serve
from trainer import cli
from trainer.training import run_lock

CONTAINER = "trainer"
SHARED_MEMORY = "dshm"
# The Job controller's label on its pods: the Job's uid.
JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"

FLAGS = cli.flag_registry()
flags.DEFINE_string("image", None, "Training image with its tag, as printed by `python -m launch.build`.",
                    flag_values=FLAGS)
flags.DEFINE_string("job_name", None, "Name of the Job and its Service, and of its output folder. Default: "
                    "cifar-<time>.", flag_values=FLAGS)
flags.DEFINE_string("namespace", "default", "Kubernetes namespace.", flag_values=FLAGS)
flags.DEFINE_string("context", None, "kubectl context (cluster). Default: kubectl's current context.",
                    flag_values=FLAGS)
flags.DEFINE_string("output_dir", None, "gs:// folder; the job writes to OUTPUT_DIR/JOB_NAME.",
                    flag_values=FLAGS)
flags.DEFINE_integer("workers", 1, "Pods; more than one trains with multi_worker_mirrored.",
                     flag_values=FLAGS)
flags.DEFINE_enum("accelerator", "gpu", cloud.ACCELERATORS, "What each pod trains on.", flag_values=FLAGS)
flags.DEFINE_integer("gpus", 1, "GPUs per pod (nvidia.com/gpu).", flag_values=FLAGS)
flags.DEFINE_string("gpu_type", "nvidia-tesla-t4", "GKE GPU node label cloud.google.com/gke-accelerator, e.g. "
                    "nvidia-tesla-t4, nvidia-l4, nvidia-tesla-a100.", flag_values=FLAGS)
flags.DEFINE_string("tpu_type", "tpu-v5-lite-podslice", "GKE TPU node label cloud.google.com/gke-tpu-accelerator.",
                    flag_values=FLAGS)
flags.DEFINE_string("tpu_topology", "2x4", "GKE TPU node label cloud.google.com/gke-tpu-topology (one host).",
                    flag_values=FLAGS)
flags.DEFINE_integer("tpu_chips", 8, "TPU chips per pod (google.com/tpu); the whole single-host slice.",
                     flag_values=FLAGS)
flags.DEFINE_string("cpu", None, "CPU request per pod, e.g. 8 or 7500m.", flag_values=FLAGS)
flags.DEFINE_string("memory", None, "Memory request per pod, e.g. 32Gi.", flag_values=FLAGS)
flags.DEFINE_integer("port", 2222, "Port the workers talk to each other on.", flag_values=FLAGS)
flags.DEFINE_integer("restarts", 3, "JobSet: restarts of the whole job, preemptions aside, before it fails. Job: "
                     "failed attempts per pod, preemptions aside, before the Job fails "
                     "(backoffLimit = restarts x workers: one worker's failure stops all of them).",
                     flag_values=FLAGS)
flags.DEFINE_float("timeout_hours", 0, "Stop the whole run this many hours after submission, restarts included; "
                   "0: no limit (docs/cloud.md, \"Run on GKE\").", flag_values=FLAGS)
flags.DEFINE_bool("spot", False, "Schedule on Spot VMs (node label cloud.google.com/gke-spot=true, and its taint "
                  "tolerated).", flag_values=FLAGS)
flags.DEFINE_enum("api", "jobset", ("jobset", "job"), "jobset: a JobSet, whose pods restart together and which owns "
                  "its Service (needs the JobSet controller); job: an Indexed Job and a headless Service that outlives "
                  "it (delete it with kubectl delete service JOB_NAME).", flag_values=FLAGS)
flags.DEFINE_float("ttl_hours", 24, "Delete the finished JobSet or Job (with its pods and logs) this many hours after "
                   "it ends (ttlSecondsAfterFinished).", flag_values=FLAGS)
flags.DEFINE_integer("grace_seconds", 300, "terminationGracePeriodSeconds of the pods: how long a drained or "
                     "preempted pod may take to save its checkpoint and upload it before it is killed.",
                     flag_values=FLAGS)
flags.DEFINE_string("queue", None, "Kueue LocalQueue to submit to (label kueue.x-k8s.io/queue-name); Kueue then "
                    "admits the job when its quota allows.", flag_values=FLAGS)
flags.DEFINE_string("service_account", None, "Kubernetes service account of the pods, e.g. one bound to a Google "
                    "service account that may write to the bucket (Workload Identity).", flag_values=FLAGS)
flags.DEFINE_multi_string("env", [], "Environment variable for the trainer, NAME=VALUE; repeat for several.",
                          flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "Print the manifests (JSON) and the kubectl command, and call nothing.",
                  flag_values=FLAGS)

QUANTITY = (r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?", "a Kubernetes quantity such as 8, 7500m or 32Gi")


def strategy_name(workers: int, accelerator: str, gpus: int) -> str:
    if workers > 1:
        return "multi_worker_mirrored"
    if accelerator == "tpu":
        return "tpu"
    if accelerator == "gpu":
        return "mirrored" if gpus > 1 else "one_device"
    return "default"


def worker_hosts(job_name: str, workers: int, port: int) -> str:
    """Pod i of an Indexed Job has hostname JOB-i; with subdomain JOB it resolves as JOB-i.JOB in the namespace.
    A JobSet names its pods itself (gke_jobset.hostnames)."""
    if FLAGS.api == "jobset":
        return ",".join(f"{host}:{port}" for host in gke_jobset.hostnames(job_name, workers))
    return ",".join(f"{job_name}-{index}.{job_name}:{port}" for index in range(workers))


def node_placement() -> tuple[dict, list[dict], dict]:
    """(nodeSelector, tolerations, resource limits) for the accelerator."""
    selector = {"cloud.google.com/gke-spot": "true"} if FLAGS.spot else {}
    # Spot node pools may be tainted so that only pods meant for them land there.
    spot = [{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}] \
        if FLAGS.spot else []
    if FLAGS.accelerator == "gpu":
        selector["cloud.google.com/gke-accelerator"] = FLAGS.gpu_type
        return selector, [_toleration("nvidia.com/gpu"), *spot], {"nvidia.com/gpu": str(FLAGS.gpus)}
    if FLAGS.accelerator == "tpu":
        selector.update({"cloud.google.com/gke-tpu-accelerator": FLAGS.tpu_type,
                         "cloud.google.com/gke-tpu-topology": FLAGS.tpu_topology})
        return selector, [_toleration("google.com/tpu"), *spot], {"google.com/tpu": str(FLAGS.tpu_chips)}
    return selector, spot, {}


def _toleration(key: str) -> dict:
    # GKE taints accelerator nodes with their resource name; a pod that asks for the resource must tolerate it.
    return {"key": key, "operator": "Exists", "effect": "NoSchedule"}


def container(job_name: str, trainer_args: list[str], environment: dict[str, str]) -> dict:
    strategy = strategy_name(FLAGS.workers, FLAGS.accelerator, FLAGS.gpus)
    # --accelerator: a pod scheduled without the device it asked for stops in one line instead of training on the CPU.
    args = [f"--strategy={strategy}", f"--accelerator={FLAGS.accelerator}",
            *(["--tpu=local"] if strategy == "tpu" else []), *trainer_args]
    run_dir = cloud.join_gcs(FLAGS.output_dir, job_name)
    # The layout Vertex AI gives a job, so both platforms leave the same folders in the bucket.
    env = {"AIP_MODEL_DIR": f"{run_dir}/model/", "AIP_CHECKPOINT_DIR": f"{run_dir}/checkpoints/",
           "AIP_TENSORBOARD_LOG_DIR": f"{run_dir}/logs/"}
    if FLAGS.workers > 1:
        env["WORKER_HOSTS"] = worker_hosts(job_name, FLAGS.workers, FLAGS.port)
    env.update(environment)
    variables = [{"name": name, "value": value} for name, value in env.items()]
    # The run lock lets a later attempt of this same job take over its lock (trainer/training/run_lock.py): the JobSet's
    # uid outlives its restarts, the Job's its pods' retries; Kubernetes sets both as labels on the pods.
    job_label = gke_jobset.UID_LABEL if FLAGS.api == "jobset" else JOB_UID_LABEL
    variables.append({"name": run_lock.KUBERNETES_JOB_UID, "valueFrom": {"fieldRef": {
        "fieldPath": f"metadata.labels['{job_label}']"}}})
    _, _, limits = node_placement()
    requests = dict(limits)
    for name, value in (("cpu", FLAGS.cpu), ("memory", FLAGS.memory)):
        if value:
            requests[name] = value
    resources = {key: value for key, value in (("limits", limits), ("requests", requests)) if value}
    spec = {"name": CONTAINER, "image": FLAGS.image, "args": args,
            "env": variables,
            "ports": [{"name": "workers", "containerPort": FLAGS.port}],
            "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False}}
    if resources:
        spec["resources"] = resources
    return spec


def shared_memory(pod_spec: dict) -> None:
    """Several GPUs in a pod talk through /dev/shm (NCCL's shared-memory transport), which Kubernetes makes 64 MiB;
    a memory-backed emptyDir there is bounded by the pod's memory instead."""
    if FLAGS.accelerator != "gpu" or FLAGS.gpus < 2:
        return
    pod_spec["volumes"] = [{"name": SHARED_MEMORY, "emptyDir": {"medium": "Memory"}}]
    for container_spec in pod_spec["containers"]:
        container_spec["volumeMounts"] = [{"name": SHARED_MEMORY, "mountPath": "/dev/shm"}]


def labels_of(job_name: str) -> dict:
    return {"app.kubernetes.io/name": "cifar-trainer", "app.kubernetes.io/instance": job_name}


def pod_template(job_name: str, trainer_args: list[str], environment: dict[str, str]) -> dict:
    """The workers' pod template, for the Job and the JobSet alike."""
    selector, tolerations, _ = node_placement()
    pod_spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": FLAGS.grace_seconds,
                "containers": [container(job_name, trainer_args, environment)]}
    shared_memory(pod_spec)
    for key, value in (("nodeSelector", selector), ("tolerations", tolerations),
                       ("serviceAccountName", FLAGS.service_account)):
        if value:
            pod_spec[key] = value
    return {"metadata": {"labels": labels_of(job_name)}, "spec": pod_spec}


def job(job_name: str, trainer_args: list[str], environment: dict[str, str]) -> dict:
    labels = labels_of(job_name)
    template = pod_template(job_name, trainer_args, environment)
    template["spec"] = {"subdomain": job_name, **template["spec"]}
    spec = {
        "completionMode": "Indexed", "completions": FLAGS.workers, "parallelism": FLAGS.workers,
        "backoffLimit": FLAGS.restarts * FLAGS.workers,
        "podFailurePolicy": {"rules": [
            # Evicted or preempted by Kubernetes (node drain, Spot reclaim): not the job's fault.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            # The trainer caught SIGTERM and saved a checkpoint: the replacement pod resumes from it.
            {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                 "values": [cli.PREEMPTED_EXIT_CODE]}},
            # Cloud Storage or the network stayed unreachable past --storage_retry_seconds: the world failed, not
            # the job, so a new pod retries (and resumes); it counts against backoffLimit, so an outage that never
            # ends still ends the Job.
            {"action": "Count", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                "values": [cli.TRANSIENT_EXIT_CODE]}},
            # A bad flag fails the same way on every attempt.
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                  "values": [cli.USAGE_EXIT_CODE]}},
        ]},
        "template": template,
        "ttlSecondsAfterFinished": round(FLAGS.ttl_hours * 3600),
    }
    if FLAGS.timeout_hours:
        spec["activeDeadlineSeconds"] = round(FLAGS.timeout_hours * 3600)
    if FLAGS.queue:
        labels = {**labels, gke_jobset.QUEUE_LABEL: FLAGS.queue}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": job_name, "namespace": FLAGS.namespace, "labels": labels}, "spec": spec}


def service(job_name: str) -> dict:
    """Headless: no virtual IP, just a DNS record per pod. Records exist before the pods are ready, because
    workers look each other up while they start."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": job_name, "namespace": FLAGS.namespace,
                         "labels": {"app.kubernetes.io/name": "cifar-trainer", "app.kubernetes.io/instance": job_name}},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"job-name": job_name},
                     "ports": [{"name": "workers", "port": FLAGS.port, "targetPort": FLAGS.port}]}}


def manifests(job_name: str, trainer_args: list[str], environment: dict[str, str]) -> dict:
    """What `kubectl apply -f -` gets: the JobSet (which makes its own Service), or the Job and its Service as one v1
    List."""
    if FLAGS.api == "jobset":
        template = pod_template(job_name, trainer_args, environment)
        timeout_seconds = round(FLAGS.timeout_hours * 3600)
        if timeout_seconds:
            gke_jobset.cap_the_run(template["spec"]["containers"][0], time.time() + timeout_seconds,
                                   FLAGS.grace_seconds)
        return gke_jobset.jobset(job_name, FLAGS.namespace, labels_of(job_name), template, CONTAINER, FLAGS.workers,
                                 FLAGS.restarts, round(FLAGS.ttl_hours * 3600), timeout_seconds, FLAGS.queue)
    return {"apiVersion": "v1", "kind": "List",
            "items": [service(job_name), job(job_name, trainer_args, environment)]}


def check_flags() -> str:
    """Checks every flag that ends up in a name, label or resource; returns the job name."""
    cloud.check_image(FLAGS.image, FLAGS.accelerator)
    cloud.require(FLAGS.output_dir is not None, "--output_dir is required: a gs:// folder for the job's outputs.")
    cloud.check_name("output_dir", FLAGS.output_dir, cloud.GCS_URI, 900)
    cloud.require(FLAGS.workers >= 1, f"--workers={FLAGS.workers} must be at least 1.")
    job_name = FLAGS.job_name or f"cifar-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    # Pod hostnames JOB-INDEX are DNS labels too, and the Service name must start with a letter.
    last_pod = f"-{gke_jobset.REPLICATED_JOB}-0-{FLAGS.workers - 1}" if FLAGS.api == "jobset" else \
        f"-{FLAGS.workers - 1}"
    cloud.check_name("job_name", job_name, cloud.DNS_1035_LABEL, 63 - len(last_pod))
    cloud.check_kubernetes_target(FLAGS.namespace, FLAGS.context, FLAGS.service_account)
    check_resources()
    return job_name


def check_resources() -> None:
    cloud.require(1 <= FLAGS.port <= 65535, f"--port={FLAGS.port} must be 1 to 65535.")
    cloud.require(FLAGS.restarts >= 0, f"--restarts={FLAGS.restarts} must be zero or more.")
    cloud.require(FLAGS.timeout_hours >= 0, f"--timeout_hours={FLAGS.timeout_hours} must be zero (no limit) or more.")
    cloud.require(FLAGS.ttl_hours >= 0, f"--ttl_hours={FLAGS.ttl_hours} must be zero (delete at once) or more.")
    cloud.require(FLAGS.grace_seconds >= 0, f"--grace_seconds={FLAGS.grace_seconds} must be zero or more.")
    if FLAGS.queue is not None:
        cloud.check_name("queue", FLAGS.queue, cloud.DNS_1123_SUBDOMAIN, 63)
    for flag in ("cpu", "memory"):
        if FLAGS[flag].value is not None:
            cloud.check_name(flag, FLAGS[flag].value, QUANTITY, 20)
    if FLAGS.accelerator == "gpu":
        cloud.require(FLAGS.gpus >= 1, f"--gpus={FLAGS.gpus} must be at least 1 with --accelerator=gpu.")
        cloud.check_name("gpu_type", FLAGS.gpu_type, cloud.KUBERNETES_LABEL_VALUE, 63)
    if FLAGS.accelerator == "tpu":
        cloud.require(FLAGS.workers == 1, "--accelerator=tpu runs one pod on a single-host slice; use --workers=1.")
        cloud.check_name("tpu_type", FLAGS.tpu_type, cloud.KUBERNETES_LABEL_VALUE, 63)
        cloud.check_name("tpu_topology", FLAGS.tpu_topology, (r"[1-9][0-9]*(x[1-9][0-9]*){1,2}", "AxB or AxBxC"))
        chips = 1
        for side in FLAGS.tpu_topology.split("x"):
            chips *= int(side)
        cloud.require(chips == FLAGS.tpu_chips, f"--tpu_topology={FLAGS.tpu_topology} has {chips} chips but "
                      f"--tpu_chips={FLAGS.tpu_chips}; one pod takes the whole single-host slice.")


def main(argv: list[str]) -> None:
    job_name = check_flags()
    strategy = strategy_name(FLAGS.workers, FLAGS.accelerator, FLAGS.gpus)
    trainer_args = cloud.trainer_flags(argv[1:], strategy)
    environment = cloud.parse_environment("env", FLAGS.env)
    document = manifests(job_name, trainer_args, environment)
    apply = cloud.Command(cloud.kubectl(FLAGS.context, "apply", "-f", "-"), stdin=json.dumps(document, indent=2),
                          stdin_description="the manifests, printed above")
    if FLAGS.dry_run:
        cloud.print_dry_run(document, [apply])
        return
    cloud.check_kubectl_access(FLAGS.context, FLAGS.namespace,
                               "jobsets.jobset.x-k8s.io" if FLAGS.api == "jobset" else "jobs", "Jobs")
    cloud.run(apply)
    selector = f"jobset.sigs.k8s.io/jobset-name={job_name}" if FLAGS.api == "jobset" else f"job-name={job_name}"
    logging.info("Follow it: kubectl logs --namespace=%s --follow --prefix --selector=%s "
                 "--max-log-requests=%d", FLAGS.namespace, selector, max(FLAGS.workers, 5))
    print(f"jobset.jobset.x-k8s.io/{job_name}" if FLAGS.api == "jobset" else f"job.batch/{job_name}")


if __name__ == "__main__":
    if cli.take_subcommand(gke_serve.SUBCOMMAND):
        gke_serve.start()
    else:
        cli.start(main, FLAGS, __doc__, unknown_flag_hint=" (trainer flags go after --)")
