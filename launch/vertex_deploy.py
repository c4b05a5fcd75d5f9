"""Deploys a finished run to a Vertex AI endpoint for online predictions: `python -m launch.vertex deploy`.

    python -m launch.vertex deploy --model_dir=gs://BUCKET/runs/JOB/model --image=IMAGE --min_replicas=1 \\
        --max_replicas=3 [--accelerator_type=NVIDIA_TESLA_T4] [-- --max_batch_size=64]

It uploads a Model and deploys it to an endpoint (a new one, or --endpoint). By default the Model runs our image
with `python -m trainer.serve`: Vertex AI mounts nothing, it passes the run directory as $AIP_STORAGE_URI, the port
as $AIP_HTTP_PORT and the routes below, and sends predictions to /v1/models/NAME:predict and health checks to
/healthz. Flags after `--` go to trainer.serve. With --prebuilt it serves the run's export/ with Vertex AI's
prebuilt TensorFlow container instead, through the export's image-bytes signature (no code of ours runs).
Either way a request is {"instances": [{"image_bytes": {"b64": "..."}}]} (our server also takes {"b64": "..."}).
With --dry_run the three gcloud commands are printed (stderr) with the REST bodies they send (stdout).
"""

import datetime
import json
import os
import re

from absl import flags
from absl import logging

from launch import cloud
from launch import forwarded_flags
from trainer import cli

SERVE_COMMAND = ("python", "-m", "trainer.serve")
SERVING_PORT = 8080
HEALTH_ROUTE = "/healthz"
MANAGED_SERVE_FLAGS = ("model_dir", "host", "port", "model_name")
# Vertex AI's prebuilt TensorFlow prediction images; the newest TensorFlow they carry reads our SavedModels (the
# export uses long-standing ops only: image decoding, einsum, map_fn).
PREBUILT_IMAGE = "{host}/vertex-ai/prediction/tf2-{device}.{version}:latest"
PREBUILT_HOSTS = {"us": "us-docker.pkg.dev", "europe": "europe-docker.pkg.dev", "asia": "asia-docker.pkg.dev"}
ACCELERATOR_COUNTS = (1, 2, 4, 8)
# The GPUs Vertex AI offers for online prediction (fewer than for training).
SERVING_GPU_TYPES = ("NVIDIA_TESLA_P4", "NVIDIA_TESLA_T4", "NVIDIA_L4", "NVIDIA_TESLA_V100", "NVIDIA_TESLA_P100",
                     "NVIDIA_TESLA_A100", "NVIDIA_A100_80GB", "NVIDIA_H100_80GB")
# The machine family each serving GPU attaches to, and the default machine type for 1, 2, 4 or 8 of them.
N1_MACHINES = {1: "n1-standard-4", 2: "n1-standard-8", 4: "n1-standard-16", 8: "n1-standard-32"}
SERVING_MACHINES = {
    "NVIDIA_TESLA_P4": ("n1-", N1_MACHINES), "NVIDIA_TESLA_T4": ("n1-", N1_MACHINES),
    "NVIDIA_TESLA_V100": ("n1-", N1_MACHINES), "NVIDIA_TESLA_P100": ("n1-", N1_MACHINES),
    "NVIDIA_L4": ("g2-", {1: "g2-standard-4", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"}),
    "NVIDIA_TESLA_A100": ("a2-highgpu-", {count: f"a2-highgpu-{count}g" for count in (1, 2, 4, 8)}),
    "NVIDIA_A100_80GB": ("a2-ultragpu-", {count: f"a2-ultragpu-{count}g" for count in (1, 2, 4, 8)}),
    "NVIDIA_H100_80GB": ("a3-highgpu-", {8: "a3-highgpu-8g"}),
}
DEFAULT_MACHINE_TYPE = "n1-standard-4"
SUBCOMMAND = "deploy"
# Model and endpoint IDs: Vertex AI allows [a-z0-9-_] starting with a letter; the ID also goes into the URL path
# /v1/models/NAME:predict.
MODEL_ID = cloud.DNS_1035_LABEL

USAGE = __doc__
FLAGS = cli.flag_registry()
flags.DEFINE_string("project", os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT"),
                    "Google Cloud project. Default: $GOOGLE_CLOUD_PROJECT.", flag_values=FLAGS)
flags.DEFINE_string("region", "us-central1", "Vertex AI region.", flag_values=FLAGS)
flags.DEFINE_string("model_dir", None, "gs:// directory of a finished run (its export/, metrics.json and "
                    "config.json), e.g. a Vertex AI job's OUTPUT_DIR/JOB_NAME/model.", flag_values=FLAGS)
flags.DEFINE_string("image", None, "Our image with its tag, as printed by `python -m launch.build` (not needed "
                    "with --prebuilt).", flag_values=FLAGS)
flags.DEFINE_bool("prebuilt", False, "Serve export/ with Vertex AI's prebuilt TensorFlow container instead of "
                  "trainer.serve.", flag_values=FLAGS)
flags.DEFINE_string("prebuilt_version", "2-15", "TensorFlow version of the prebuilt container (tf2-cpu.VERSION).",
                    flag_values=FLAGS)
flags.DEFINE_string("name", None, "ID of the Model and, when created, of the endpoint; the API's model name. "
                    "Default: cifar-<time>.", flag_values=FLAGS)
flags.DEFINE_string("endpoint", None, "ID of an existing endpoint to deploy to. Default: create one.",
                    flag_values=FLAGS)
flags.DEFINE_string("machine_type", None, "Compute Engine machine type of each replica. Default: "
                    f"{DEFAULT_MACHINE_TYPE}, or with --accelerator_type one of the family that GPU attaches to "
                    "(n1 for T4/P4/V100/P100, g2 for L4, a2 for A100, a3 for H100).", flag_values=FLAGS)
flags.DEFINE_enum("accelerator_type", None, SERVING_GPU_TYPES, "GPU per replica; default none.", flag_values=FLAGS)
flags.DEFINE_integer("accelerator_count", 1, "GPUs per replica with --accelerator_type.", flag_values=FLAGS)
flags.DEFINE_integer("min_replicas", 1, "Replicas always running.", flag_values=FLAGS)
flags.DEFINE_integer("max_replicas", 1, "Most replicas Vertex AI scales out to under load.", flag_values=FLAGS)
flags.DEFINE_string("service_account", None, "Service account the replicas run as (it must read --model_dir).",
                    flag_values=FLAGS)
flags.DEFINE_multi_string("env", [], "Environment variable for the server, NAME=VALUE; repeat for several.",
                          flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "Print the gcloud commands and the request bodies, and call nothing.",
                  flag_values=FLAGS)


def serve_flags(arguments: list[str]) -> list[str]:
    """trainer.serve's flags (after `--`), each one --name=value argument; the launcher sets the ones it manages."""
    for argument in arguments:
        match = re.fullmatch(r"--([A-Za-z][A-Za-z0-9_]*)(=[^,]*)?", argument)
        cloud.require(match is not None, f"trainer.serve flags after -- must each be one --name=value argument "
                      f"without commas; got {argument!r}.")
        cloud.require(match.group(1) not in MANAGED_SERVE_FLAGS, f"trainer.serve flag --{match.group(1)}: the "
                      "launcher sets it (--model_dir from --model_dir, --name, host and port from Vertex AI); "
                      "leave it out.")
    forwarded_flags.check_serve_flags(arguments)
    return list(arguments)


def prebuilt_image(region: str, accelerated: bool, version: str) -> str:
    host = PREBUILT_HOSTS.get(region.split("-")[0], PREBUILT_HOSTS["us"])
    return PREBUILT_IMAGE.format(host=host, device="gpu" if accelerated else "cpu", version=version)


def model_body(name: str, serve_args: list[str], environment: dict[str, str]) -> dict:
    """The Model of projects.locations.models.upload: our server on the run, or the prebuilt one on its export."""
    if FLAGS.prebuilt:
        return {"displayName": name, "artifactUri": cloud.join_gcs(FLAGS.model_dir, "export"),
                "containerSpec": {"imageUri": prebuilt_image(FLAGS.region, FLAGS.accelerator_type is not None,
                                                             FLAGS.prebuilt_version)}}
    container = {"imageUri": FLAGS.image, "command": list(SERVE_COMMAND),
                 "args": ["--host=0.0.0.0", f"--model_name={name}", *serve_args],
                 "ports": [{"containerPort": SERVING_PORT}],
                 "predictRoute": f"/v1/models/{name}:predict", "healthRoute": HEALTH_ROUTE}
    if environment:
        container["env"] = [{"name": key, "value": value} for key, value in environment.items()]
    # Vertex AI copies artifactUri's files for the container and names the copy in $AIP_STORAGE_URI.
    return {"displayName": name, "artifactUri": FLAGS.model_dir.rstrip("/"), "containerSpec": container}


def machine_type(given: str | None, accelerator_type: str | None, accelerator_count: int) -> str:
    """--machine_type, or the default for the GPUs; a machine of a family the GPU cannot attach to is refused."""
    if accelerator_type is None:
        return given or DEFAULT_MACHINE_TYPE
    family, defaults = SERVING_MACHINES[accelerator_type]
    if given is not None:
        cloud.require(given.startswith(family), f"--machine_type={given} cannot take --accelerator_type="
                      f"{accelerator_type}; give a {family}* machine type.")
        return given
    cloud.require(accelerator_count in defaults, f"--accelerator_type={accelerator_type} "
                  f"--accelerator_count={accelerator_count}: no default machine type; give a {family}* "
                  "--machine_type that takes that many.")
    return defaults[accelerator_count]


def deploy_body(name: str, model_resource: str) -> dict:
    """The body of projects.locations.endpoints.deployModel."""
    machine = {"machineType": machine_type(FLAGS.machine_type, FLAGS.accelerator_type, FLAGS.accelerator_count)}
    if FLAGS.accelerator_type:
        machine.update(acceleratorType=FLAGS.accelerator_type, acceleratorCount=FLAGS.accelerator_count)
    deployed = {"model": model_resource, "displayName": name,
                "dedicatedResources": {"machineSpec": machine, "minReplicaCount": FLAGS.min_replicas,
                                       "maxReplicaCount": FLAGS.max_replicas}}
    if FLAGS.service_account:
        deployed["serviceAccount"] = FLAGS.service_account
    return {"deployedModel": deployed, "trafficSplit": {"0": 100}}


def commands(name: str, endpoint: str, model: dict, deploy: dict, create_endpoint: bool) -> list[cloud.Command]:
    """gcloud commands that send the bodies above, in order: upload, create the endpoint, deploy."""
    where = (f"--project={FLAGS.project}", f"--region={FLAGS.region}")
    container = model["containerSpec"]
    upload = ["gcloud", "ai", "models", "upload", *where, f"--model-id={name}", f"--display-name={name}",
              f"--artifact-uri={model['artifactUri']}", f"--container-image-uri={container['imageUri']}"]
    if not FLAGS.prebuilt:
        upload += [f"--container-command={','.join(container['command'])}",
                   f"--container-args={','.join(container['args'])}",
                   f"--container-ports={container['ports'][0]['containerPort']}",
                   f"--container-predict-route={container['predictRoute']}",
                   f"--container-health-route={container['healthRoute']}"]
        if "env" in container:
            upload.append("--container-env-vars=" + ",".join(f"{item['name']}={item['value']}"
                                                             for item in container["env"]))
    result = [cloud.Command(tuple(upload))]
    if create_endpoint:
        result.append(cloud.Command(("gcloud", "ai", "endpoints", "create", *where, f"--endpoint-id={endpoint}",
                                     f"--display-name={endpoint}")))
    resources = deploy["deployedModel"]["dedicatedResources"]
    machine = resources["machineSpec"]
    deploy_command = ["gcloud", "ai", "endpoints", "deploy-model", endpoint, *where, f"--model={name}",
                      f"--display-name={name}", f"--machine-type={machine['machineType']}",
                      f"--min-replica-count={resources['minReplicaCount']}",
                      f"--max-replica-count={resources['maxReplicaCount']}", "--traffic-split=0=100"]
    if "acceleratorType" in machine:
        deploy_command.append(f"--accelerator=type={machine['acceleratorType'].lower().replace('_', '-')},"
                              f"count={machine['acceleratorCount']}")
    if "serviceAccount" in deploy["deployedModel"]:
        deploy_command.append(f"--service-account={deploy['deployedModel']['serviceAccount']}")
    result.append(cloud.Command(tuple(deploy_command)))
    return result


def check_flags() -> str:
    """Checks every flag that ends up in a request; returns the Model's ID."""
    cloud.require(FLAGS.project is not None, "--project is required (or set $GOOGLE_CLOUD_PROJECT).")
    cloud.check_name("project", FLAGS.project, cloud.PROJECT_ID)
    cloud.check_name("region", FLAGS.region, cloud.REGION)
    cloud.require(FLAGS.model_dir is not None, "--model_dir is required: the gs:// directory of a finished run.")
    cloud.check_name("model_dir", FLAGS.model_dir, cloud.GCS_URI, 900)
    if FLAGS.prebuilt:
        cloud.require(FLAGS.image is None, "--prebuilt serves with Vertex AI's own image; leave out --image.")
        cloud.check_name("prebuilt_version", FLAGS.prebuilt_version, (r"2-[0-9]{1,2}", "2-N, e.g. 2-15"))
    else:
        cloud.require(FLAGS.image is not None, "--image is required (the tagged image `python -m launch.build` "
                      "printed), or --prebuilt.")
        cloud.check_name("image", FLAGS.image, cloud.IMAGE_REFERENCE, 255)
        # The cpu image runs anywhere without GPUs; a gpu image wastes its CUDA libraries there but works.
        if FLAGS.accelerator_type:
            cloud.check_image_accelerator(FLAGS.image, "gpu")
    name = FLAGS.name or f"cifar-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    cloud.check_name("name", name, MODEL_ID, 63)
    if FLAGS.endpoint is not None:
        cloud.check_name("endpoint", FLAGS.endpoint, MODEL_ID, 63)
    if FLAGS.machine_type is not None:
        cloud.check_name("machine_type", FLAGS.machine_type, (r"[a-z][-a-z0-9]*", "a machine type such as "
                                                              "n1-standard-4"), 63)
    cloud.require(FLAGS.accelerator_count in ACCELERATOR_COUNTS, f"--accelerator_count={FLAGS.accelerator_count} "
                  f"must be one of {', '.join(map(str, ACCELERATOR_COUNTS))}.")
    cloud.require(FLAGS.min_replicas >= 1, f"--min_replicas={FLAGS.min_replicas} must be at least 1 (Vertex AI "
                  "keeps at least one replica of a deployed model).")
    cloud.require(FLAGS.max_replicas >= FLAGS.min_replicas, f"--max_replicas={FLAGS.max_replicas} must be at least "
                  f"--min_replicas={FLAGS.min_replicas}.")
    if FLAGS.service_account is not None:
        cloud.check_name("service_account", FLAGS.service_account, cloud.SERVICE_ACCOUNT, 100)
    return name


def main(argv: list[str]) -> None:
    name = check_flags()
    serve_args = serve_flags(argv[1:])
    cloud.require(not (FLAGS.prebuilt and serve_args), "--prebuilt runs Vertex AI's server; trainer.serve flags "
                  "after -- do not apply.")
    environment = cloud.parse_environment("env", FLAGS.env)
    cloud.require(not (FLAGS.prebuilt and environment), "--prebuilt runs Vertex AI's server; --env does not apply.")
    endpoint = FLAGS.endpoint or name
    model_resource = f"projects/{FLAGS.project}/locations/{FLAGS.region}/models/{name}"
    model, deploy = model_body(name, serve_args, environment), deploy_body(name, model_resource)
    steps = commands(name, endpoint, model, deploy, create_endpoint=FLAGS.endpoint is None)
    endpoint_body = {"displayName": endpoint} if FLAGS.endpoint is None else None
    if FLAGS.dry_run:
        cloud.print_dry_run({"model": model, "endpoint": endpoint_body, "deployModel": deploy}, steps)
        return
    cloud.require_gcloud_credentials()
    for step in steps:
        cloud.run(step)
    resource = f"projects/{FLAGS.project}/locations/{FLAGS.region}/endpoints/{endpoint}"
    logging.info("Deployed %s to %s. Ask it: gcloud ai endpoints predict %s --region=%s --json-request=request.json "
                 "with request.json = %s", name, resource, endpoint, FLAGS.region,
                 json.dumps({"instances": [{"image_bytes": {"b64": "<base64 of an image file>"}}]}))
    print(resource)



def start() -> None:
    """Runs `python -m launch.vertex deploy ...` (the word already taken out by cli.take_subcommand)."""
    cli.start(main, FLAGS, USAGE, unknown_flag_hint=" (trainer.serve flags go after --)")
