"""Serves a finished run on Kubernetes (GKE): `python -m launch.gke serve`.

    python -m launch.gke serve --image=IMAGE --model_dir=gs://BUCKET/runs/JOB/model --replicas=2 --max_replicas=8 \\
        [--accelerator=gpu] [-- --max_batch_size=64]

It renders a Deployment of `python -m trainer.serve` pods, a Service in front of them and a HorizontalPodAutoscaler
that adds pods when their CPU use passes --target_cpu, and applies them with kubectl. Each pod downloads the run
from --model_dir (it needs read access to the bucket: Workload Identity through --service_account). Kubernetes
sends a pod traffic once its health route says the model is loaded (readiness probe), gives a slow load time to
finish (startup probe) and restarts a pod that stops answering (liveness probe). Flags after `--` go to
trainer.serve. With --dry_run the manifests are printed, so `... --dry_run | kubectl apply -f -` works too.
"""

import json
import math
import re

from absl import flags
from absl import logging

from launch import cloud
from launch import forwarded_flags
from trainer import cli

SUBCOMMAND = "serve"
CONTAINER = "server"
HEALTH_ROUTE = "/healthz"
MANAGED_SERVE_FLAGS = ("model_dir", "host", "port")
SERVICE_TYPES = ("ClusterIP", "LoadBalancer", "NodePort")
QUANTITY = (r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?", "a Kubernetes quantity such as 2, 1500m or 4Gi")
# How long a pod may take to download and load its model before Kubernetes gives up on it.
STARTUP_SECONDS = 600
PROBE_PERIOD_SECONDS = 5

USAGE = __doc__
FLAGS = cli.flag_registry()
flags.DEFINE_string("image", None, "Our image with its tag, as printed by `python -m launch.build`.",
                    flag_values=FLAGS)
flags.DEFINE_string("model_dir", None, "gs:// directory of a finished run (its export/, metrics.json, config.json).",
                    flag_values=FLAGS)
flags.DEFINE_string("name", "cifar-serve", "Name of the Deployment, Service and autoscaler.", flag_values=FLAGS)
flags.DEFINE_string("namespace", "default", "Kubernetes namespace.", flag_values=FLAGS)
flags.DEFINE_string("context", None, "kubectl context (cluster). Default: kubectl's current context.",
                    flag_values=FLAGS)
flags.DEFINE_integer("replicas", 1, "Pods always running (the autoscaler's minimum).", flag_values=FLAGS)
flags.DEFINE_integer("max_replicas", 4, "Most pods the autoscaler scales out to.", flag_values=FLAGS)
flags.DEFINE_integer("target_cpu", 70, "CPU use (percent of the request) above which the autoscaler adds pods.",
                     flag_values=FLAGS)
flags.DEFINE_enum("accelerator", "cpu", ("cpu", "gpu"), "What each pod predicts on.", flag_values=FLAGS)
flags.DEFINE_integer("gpus", 1, "GPUs per pod with --accelerator=gpu.", flag_values=FLAGS)
flags.DEFINE_string("gpu_type", "nvidia-tesla-t4", "GKE GPU node label cloud.google.com/gke-accelerator.",
                    flag_values=FLAGS)
flags.DEFINE_string("cpu", "2", "CPU request (and limit) per pod.", flag_values=FLAGS)
flags.DEFINE_string("memory", "4Gi", "Memory request (and limit) per pod.", flag_values=FLAGS)
flags.DEFINE_integer("port", 8080, "Port trainer.serve listens on in the pod.", flag_values=FLAGS)
flags.DEFINE_enum("service_type", "ClusterIP", SERVICE_TYPES, "ClusterIP: inside the cluster (kubectl "
                  "port-forward to try it); LoadBalancer: an external IP address.", flag_values=FLAGS)
flags.DEFINE_integer("service_port", 80, "Port of the Service.", flag_values=FLAGS)
flags.DEFINE_string("service_account", None, "Kubernetes service account of the pods, e.g. one bound to a Google "
                    "service account that may read the bucket (Workload Identity).", flag_values=FLAGS)
flags.DEFINE_multi_string("env", [], "Environment variable for the server, NAME=VALUE; repeat for several.",
                          flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "Print the manifests (JSON) and the kubectl command, and call nothing.",
                  flag_values=FLAGS)


# trainer.serve's --shutdown_grace_s default. Kubernetes kills a pod terminationGracePeriodSeconds after SIGTERM;
# the pod must outlive the server's grace, its 5 s backstop and the last answers going out, or the 503s it owes
# requests cut off at the end of the grace are never sent.
SERVER_SHUTDOWN_GRACE_SECONDS = 30.0
TERMINATION_MARGIN_SECONDS = 10


def labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": "cifar-serve", "app.kubernetes.io/instance": FLAGS.name}


def serve_flags(arguments: list[str]) -> list[str]:
    """trainer.serve's flags (after `--`), each one --name=value argument; the launcher sets the ones it manages."""
    for argument in arguments:
        match = re.fullmatch(r"--([A-Za-z][A-Za-z0-9_]*)(=.*)?", argument, re.DOTALL)
        cloud.require(match is not None, f"trainer.serve flags after -- must each be one --name=value argument; "
                      f"got {argument!r}.")
        cloud.require(match.group(1) not in MANAGED_SERVE_FLAGS, f"trainer.serve flag --{match.group(1)}: the "
                      "launcher sets it (from --model_dir and --port); leave it out.")
    return list(arguments)


def probe(failure_threshold: int, period_seconds: int = PROBE_PERIOD_SECONDS) -> dict:
    return {"httpGet": {"path": HEALTH_ROUTE, "port": "http"}, "periodSeconds": period_seconds,
            "timeoutSeconds": 2, "failureThreshold": failure_threshold}


def container(serve_args: list[str], environment: dict[str, str]) -> dict:
    resources = {"cpu": FLAGS.cpu, "memory": FLAGS.memory}
    limits = dict(resources)
    if FLAGS.accelerator == "gpu":
        limits["nvidia.com/gpu"] = str(FLAGS.gpus)
    spec = {"name": CONTAINER, "image": FLAGS.image, "command": ["python", "-m", "trainer.serve"],
            "args": ["--host=0.0.0.0", f"--port={FLAGS.port}", f"--model_dir={FLAGS.model_dir}", *serve_args],
            "ports": [{"name": "http", "containerPort": FLAGS.port}],
            # The server answers at once and says 503 until its model is loaded: the startup probe waits for that
            # (up to STARTUP_SECONDS), then readiness gates traffic and liveness restarts a pod that hangs.
            "startupProbe": probe(STARTUP_SECONDS // PROBE_PERIOD_SECONDS),
            "readinessProbe": probe(2),
            "livenessProbe": probe(6, period_seconds=10),
            "resources": {"requests": resources, "limits": limits},
            "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False}}
    if environment:
        spec["env"] = [{"name": name, "value": value} for name, value in environment.items()]
    return spec


def termination_grace_seconds(serve_args: list[str]) -> int:
    """How long Kubernetes waits after SIGTERM: the server's own --shutdown_grace_s (checked already) plus a margin."""
    grace = SERVER_SHUTDOWN_GRACE_SECONDS
    for argument in serve_args:
        name, _, value = argument.removeprefix("--").partition("=")
        if name == "shutdown_grace_s":
            grace = float(value)
    return math.ceil(grace) + TERMINATION_MARGIN_SECONDS


def deployment(serve_args: list[str], environment: dict[str, str]) -> dict:
    pod_spec = {"containers": [container(serve_args, environment)],
                # trainer.serve finishes the requests in flight on SIGTERM, answers the rest with a 503, then exits 0.
                "terminationGracePeriodSeconds": termination_grace_seconds(serve_args)}
    if FLAGS.accelerator == "gpu":
        pod_spec["nodeSelector"] = {"cloud.google.com/gke-accelerator": FLAGS.gpu_type}
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if FLAGS.service_account:
        pod_spec["serviceAccountName"] = FLAGS.service_account
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": FLAGS.name, "namespace": FLAGS.namespace, "labels": labels()},
            # No replica count: the autoscaler owns it (from --replicas up), and a count here would reset it at
            # every apply.
            "spec": {"selector": {"matchLabels": labels()},
                     # Never fewer ready pods than asked for while a new version rolls out.
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                     "template": {"metadata": {"labels": labels()}, "spec": pod_spec}}}


def service() -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": FLAGS.name, "namespace": FLAGS.namespace, "labels": labels()},
            "spec": {"type": FLAGS.service_type, "selector": labels(),
                     "ports": [{"name": "http", "port": FLAGS.service_port, "targetPort": "http"}]}}


def autoscaler() -> dict:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": FLAGS.name, "namespace": FLAGS.namespace, "labels": labels()},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": FLAGS.name},
                     "minReplicas": FLAGS.replicas, "maxReplicas": FLAGS.max_replicas,
                     "metrics": [{"type": "Resource", "resource": {
                         "name": "cpu", "target": {"type": "Utilization", "averageUtilization": FLAGS.target_cpu}}}]}}


def manifests(serve_args: list[str], environment: dict[str, str]) -> dict:
    """The three objects as one v1 List, which `kubectl apply -f -` accepts as JSON."""
    return {"apiVersion": "v1", "kind": "List",
            "items": [deployment(serve_args, environment), service(), autoscaler()]}


def check_flags() -> None:
    cloud.check_image(FLAGS.image, FLAGS.accelerator)
    cloud.require(FLAGS.model_dir is not None, "--model_dir is required: the gs:// directory of a finished run.")
    cloud.check_name("model_dir", FLAGS.model_dir, cloud.GCS_URI, 900)
    cloud.check_name("name", FLAGS.name, cloud.DNS_1035_LABEL, 63)
    cloud.check_kubernetes_target(FLAGS.namespace, FLAGS.context, FLAGS.service_account)
    cloud.require(FLAGS.replicas >= 1, f"--replicas={FLAGS.replicas} must be at least 1.")
    cloud.require(FLAGS.max_replicas >= FLAGS.replicas, f"--max_replicas={FLAGS.max_replicas} must be at least "
                  f"--replicas={FLAGS.replicas}.")
    cloud.require(1 <= FLAGS.target_cpu <= 100, f"--target_cpu={FLAGS.target_cpu} must be a percentage, 1 to 100.")
    for flag in ("port", "service_port"):
        cloud.require(1 <= FLAGS[flag].value <= 65535, f"--{flag}={FLAGS[flag].value} must be 1 to 65535.")
    for flag in ("cpu", "memory"):
        cloud.check_name(flag, FLAGS[flag].value, QUANTITY, 20)
    if FLAGS.accelerator == "gpu":
        cloud.require(FLAGS.gpus >= 1, f"--gpus={FLAGS.gpus} must be at least 1 with --accelerator=gpu.")
        cloud.check_name("gpu_type", FLAGS.gpu_type, cloud.KUBERNETES_LABEL_VALUE, 63)


def main(argv: list[str]) -> None:
    check_flags()
    serve_args = serve_flags(argv[1:])
    forwarded_flags.check_serve_flags(serve_args)
    environment = cloud.parse_environment("env", FLAGS.env)
    document = manifests(serve_args, environment)
    apply = cloud.Command(cloud.kubectl(FLAGS.context, "apply", "-f", "-"), stdin=json.dumps(document, indent=2),
                          stdin_description="the manifests, printed above")
    if FLAGS.dry_run:
        cloud.print_dry_run(document, [apply])
        return
    cloud.check_kubectl_access(FLAGS.context, FLAGS.namespace, "deployments", "Deployments")
    cloud.run(apply)
    logging.info("Follow it: kubectl rollout status --namespace=%s deployment/%s; try it: kubectl port-forward "
                 "--namespace=%s service/%s 8080:%d, then open http://127.0.0.1:8080/", FLAGS.namespace, FLAGS.name,
                 FLAGS.namespace, FLAGS.name, FLAGS.service_port)
    print(f"deployment.apps/{FLAGS.name}")



def start() -> None:
    """Runs `python -m launch.gke serve ...` (the word already taken out by cli.take_subcommand)."""
    cli.start(main, FLAGS, USAGE, unknown_flag_hint=" (trainer.serve flags go after --)")
