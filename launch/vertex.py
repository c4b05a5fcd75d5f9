"""Submits the training job to Vertex AI as a CustomJob, on one of four topologies.

    python -m launch.vertex --image=IMAGE --output_dir=gs://BUCKET/runs --topology=multi_gpu --gpus=4 \\
        -- --model=resnet50 --epochs=10

- one_gpu: one machine with one GPU, --strategy=one_device;
- multi_gpu: one machine with --gpus GPUs, --strategy=mirrored;
- multi_worker: --machines machines with --gpus GPUs each, --strategy=multi_worker_mirrored; worker pool 0 is the
  chief (one replica), pool 1 the other machines, and the trainer reads the cluster from Vertex AI's CLUSTER_SPEC;
- tpu: one TPU host, --strategy=tpu --tpu=local: by default TPU v5e with 8 chips (ct5lp-hightpu-8t, tpuTopology 2x4;
  --tpu_topology=1x1 or 2x2 for 1 or 4 chips), or a TPU v2-8/v3-8 VM (cloud-tpu) with --tpu_type.

Every job passes --accelerator=gpu or tpu to the trainer, so a job on a machine without one stops in one line.

Everything lands under --output_dir/JOB_NAME (the job's baseOutputDirectory): Vertex AI gives the trainer
AIP_MODEL_DIR=.../model, AIP_CHECKPOINT_DIR=.../checkpoints and AIP_TENSORBOARD_LOG_DIR=.../logs. When a machine is
restarted (maintenance, a Spot VM's preemption), the whole job restarts (scheduling.restartJobOnWorkerRestart) and
the trainer resumes from its latest checkpoint. Flags after `--` go to the trainer unchanged.

`python -m launch.vertex deploy ...` deploys a finished run to an endpoint instead: see launch/vertex_deploy.py.
`python -m launch.vertex tune ...` tunes hyperparameters over trials of this job: see launch/vertex_tune.py.
"""

import datetime
import json
import os

from absl import flags
from absl import logging

from launch import cloud
from launch import vertex_deploy
from launch import vertex_tune
from trainer import cli

TOPOLOGIES = {"one_gpu": "one_device", "multi_gpu": "mirrored", "multi_worker": "multi_worker_mirrored",
              "tpu": "tpu"}
# Vertex AI's MachineSpec.acceleratorType values.
GPU_TYPES = ("NVIDIA_TESLA_P100", "NVIDIA_TESLA_V100", "NVIDIA_TESLA_P4", "NVIDIA_TESLA_T4", "NVIDIA_TESLA_A100",
             "NVIDIA_A100_80GB", "NVIDIA_L4", "NVIDIA_H100_80GB", "NVIDIA_H100_MEGA_80GB", "NVIDIA_H200_141GB",
             "NVIDIA_B200")
# The TPU generations Vertex AI custom training offers (MachineSpec.acceleratorType), newest first. TPU v5e runs on
# ct5lp-hightpu machines, one host of 1, 4 or 8 chips named by the MachineSpec's tpuTopology; v2 and v3 on the
# cloud-tpu VM, one board of 8 cores. The API has no v6e (Trillium) accelerator type yet (google-cloud-aiplatform 2.7).
TPU_TYPES = ("TPU_V5_LITEPOD", "TPU_V3", "TPU_V2")
TPU_V5E_MACHINE_TYPES = {"1x1": "ct5lp-hightpu-1t", "2x2": "ct5lp-hightpu-4t", "2x4": "ct5lp-hightpu-8t"}
TPU_CORES = 8  # A cloud-tpu machine is one TPU v2-8 or v3-8 board.
GPU_COUNTS = (1, 2, 4, 8, 16)
# The machine type that takes N of a GPU, for the GPUs that only fit certain machine families.
DEFAULT_MACHINE_TYPES = {
    "NVIDIA_TESLA_T4": {1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32"},
    "NVIDIA_TESLA_V100": {1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32", 8: "n1-standard-64"},
    "NVIDIA_TESLA_P100": {1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32"},
    "NVIDIA_L4": {1: "g2-standard-8", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"},
    "NVIDIA_TESLA_A100": {1: "a2-highgpu-1g", 2: "a2-highgpu-2g", 4: "a2-highgpu-4g", 8: "a2-highgpu-8g",
                          16: "a2-megagpu-16g"},
    "NVIDIA_A100_80GB": {1: "a2-ultragpu-1g", 2: "a2-ultragpu-2g", 4: "a2-ultragpu-4g", 8: "a2-ultragpu-8g"},
    "NVIDIA_H100_80GB": {8: "a3-highgpu-8g"},
    "NVIDIA_H100_MEGA_80GB": {8: "a3-megagpu-8g"},
    "NVIDIA_H200_141GB": {8: "a3-ultragpu-8g"},
    "NVIDIA_B200": {8: "a4-highgpu-8g"},
}
# Machine families whose boot disk can only be Hyperdisk (A3 Ultra and A4, behind H200 and B200): Vertex AI's
# DiskSpec takes "hyperdisk-balanced" there and pd-ssd elsewhere.
HYPERDISK_ONLY_FAMILIES = ("a3-ultragpu", "a4-", "a4x-")

FLAGS = cli.flag_registry()
flags.DEFINE_string("project", os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT"),
                    "Google Cloud project. Default: $GOOGLE_CLOUD_PROJECT.", flag_values=FLAGS)
flags.DEFINE_string("region", "us-central1", "Vertex AI region.", flag_values=FLAGS)
flags.DEFINE_string("image", None, "Training image with its tag, as printed by `python -m launch.build`.",
                    flag_values=FLAGS)
flags.DEFINE_string("job_name", None, "Display name of the job and name of its output folder. Default: "
                    "cifar-<topology>-<time>.", flag_values=FLAGS)
flags.DEFINE_string("output_dir", None, "gs:// folder; the job writes to OUTPUT_DIR/JOB_NAME.",
                    flag_values=FLAGS)
flags.DEFINE_enum("topology", "one_gpu", tuple(TOPOLOGIES), "Machines and accelerators; see the module docstring.",
                  flag_values=FLAGS)
flags.DEFINE_enum("gpu_type", "NVIDIA_TESLA_T4", GPU_TYPES, "GPU model.", flag_values=FLAGS)
flags.DEFINE_integer("gpus", 1, "GPUs per machine (multi_gpu, multi_worker).", flag_values=FLAGS)
flags.DEFINE_integer("machines", 2, "Machines for --topology=multi_worker.", flag_values=FLAGS)
flags.DEFINE_string("machine_type", None, "Compute Engine machine type. Default: one that takes --gpus of "
                    "--gpu_type (n1 for T4/V100/P100, g2 for L4, a2 for A100, a3 for H100/H200, a4 for B200); "
                    "cloud-tpu for TPUs.", flag_values=FLAGS)
flags.DEFINE_enum("tpu_type", TPU_TYPES[0], TPU_TYPES, "TPU generation for --topology=tpu: TPU_V5_LITEPOD (v5e, "
                  "the newest Vertex AI training offers), or TPU_V3/TPU_V2 (a v3-8 or v2-8 VM).",
                  flag_values=FLAGS)
flags.DEFINE_enum("tpu_topology", "2x4", tuple(TPU_V5E_MACHINE_TYPES), "TPU v5e chips of the one host: 1x1, 2x2 "
                  "(4 chips) or 2x4 (8 chips).", flag_values=FLAGS)
flags.DEFINE_integer("boot_disk_gb", 100, "Boot disk per machine (the GPU image alone takes about 10 GB).",
                     flag_values=FLAGS)
flags.DEFINE_bool("spot", False, "Run on Spot VMs: cheaper, can be preempted; the job restarts and resumes.",
                  flag_values=FLAGS)
flags.DEFINE_float("timeout_hours", 0, "Stop the job after this many hours; 0 keeps Vertex AI's limit (7 days).",
                   flag_values=FLAGS)
flags.DEFINE_string("service_account", None, "Service account the job runs as (needed for --tensorboard).",
                    flag_values=FLAGS)
flags.DEFINE_string("tensorboard", None, "Vertex AI TensorBoard instance to stream the logs to: "
                    "projects/PROJECT/locations/REGION/tensorboards/ID.", flag_values=FLAGS)
flags.DEFINE_list("labels", [], "Extra job labels, KEY=VALUE,...", flag_values=FLAGS)
flags.DEFINE_multi_string("env", [], "Environment variable for the trainer, NAME=VALUE; repeat for several.",
                          flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "Print the CustomJob request and the gcloud command, and call nothing.",
                  flag_values=FLAGS)


def machine_spec(topology: str, gpu_type: str, gpus: int, machine_type: str | None, tpu_type: str,
                 tpu_topology: str) -> dict:
    if topology == "tpu" and tpu_type == "TPU_V5_LITEPOD":
        # As Vertex AI's TPU v5e examples: the machine type says the generation and chips, the topology their shape.
        return {"machineType": machine_type or TPU_V5E_MACHINE_TYPES[tpu_topology], "tpuTopology": tpu_topology}
    if topology == "tpu":
        return {"machineType": machine_type or "cloud-tpu", "acceleratorType": tpu_type,
                "acceleratorCount": TPU_CORES}
    if machine_type is None:
        machine_type = DEFAULT_MACHINE_TYPES.get(gpu_type, {}).get(gpus)
        cloud.require(machine_type is not None,
                      f"--gpu_type={gpu_type} --gpus={gpus}: no default machine type; give --machine_type (see "
                      "https://cloud.google.com/vertex-ai/docs/training/configure-compute#gpu-compatibility-table).")
    return {"machineType": machine_type, "acceleratorType": gpu_type, "acceleratorCount": gpus}


def boot_disk_type(machine_type: str) -> str:
    return "hyperdisk-balanced" if machine_type.startswith(HYPERDISK_ONLY_FAMILIES) else "pd-ssd"


def worker_pools(spec: dict, container: dict, topology: str, machines: int, boot_disk_gb: int) -> list[dict]:
    """Pool 0 is the chief; multi_worker adds pool 1 with the other machines, running the same container."""
    pool = {"machineSpec": spec, "replicaCount": 1, "containerSpec": container}
    if topology != "tpu":  # TPU VMs take no diskSpec.
        pool["diskSpec"] = {"bootDiskType": boot_disk_type(spec["machineType"]), "bootDiskSizeGb": boot_disk_gb}
    if topology != "multi_worker":
        return [pool]
    return [pool, {**pool, "replicaCount": machines - 1}]


def custom_job(job_name: str, trainer_args: list[str], environment: dict[str, str], labels: dict[str, str]) -> dict:
    """The body of projects.locations.customJobs.create, from the flags (already checked) and the parsed values."""
    topology = FLAGS.topology
    strategy = TOPOLOGIES[topology]
    accelerator = "tpu" if topology == "tpu" else "gpu"
    args = [f"--strategy={strategy}", f"--accelerator={accelerator}", *(["--tpu=local"] if topology == "tpu" else []),
            *trainer_args]
    container = {"imageUri": FLAGS.image, "args": args}
    if environment:
        container["env"] = [{"name": name, "value": value} for name, value in environment.items()]
    spec = machine_spec(topology, FLAGS.gpu_type, FLAGS.gpus, FLAGS.machine_type, FLAGS.tpu_type, FLAGS.tpu_topology)
    job_spec = {
        "workerPoolSpecs": worker_pools(spec, container, topology, FLAGS.machines, FLAGS.boot_disk_gb),
        "baseOutputDirectory": {"outputUriPrefix": cloud.join_gcs(FLAGS.output_dir, job_name)},
        "scheduling": scheduling(FLAGS.timeout_hours, FLAGS.spot),
    }
    if FLAGS.service_account:
        job_spec["serviceAccount"] = FLAGS.service_account
    if FLAGS.tensorboard:
        job_spec["tensorboard"] = FLAGS.tensorboard
    return {"displayName": job_name, "labels": {"topology": topology, **labels}, "jobSpec": job_spec}


def scheduling(timeout_hours: float, spot: bool) -> dict:
    # A restarted machine restarts the whole job: multi_worker_mirrored cannot take a worker back in mid-run, and the
    # trainer resumes from its latest checkpoint anyway.
    policy = {"restartJobOnWorkerRestart": True}
    if timeout_hours:
        policy["timeout"] = f"{round(timeout_hours * 3600)}s"
    if spot:
        policy["strategy"] = "SPOT"
    return policy


def submit_command(project: str, region: str, body: dict) -> cloud.Command:
    """gcloud builds the same request from the flags and the jobSpec it reads on stdin."""
    labels = ",".join(f"{key}={value}" for key, value in body["labels"].items())
    argv = ("gcloud", "ai", "custom-jobs", "create", f"--project={project}", f"--region={region}",
            f"--display-name={body['displayName']}", f"--labels={labels}", "--config=-", "--format=value(name)")
    return cloud.Command(argv, stdin=json.dumps(body["jobSpec"], indent=2),
                         stdin_description="the request's jobSpec, printed above")


def check_flags(topology: str) -> str:
    """Checks every flag that ends up in the request; returns the job name."""
    cloud.require(FLAGS.project is not None, "--project is required (or set $GOOGLE_CLOUD_PROJECT).")
    cloud.check_name("project", FLAGS.project, cloud.PROJECT_ID)
    cloud.check_name("region", FLAGS.region, cloud.REGION)
    cloud.check_image(FLAGS.image, "tpu" if topology == "tpu" else "gpu")
    cloud.require(FLAGS.output_dir is not None, "--output_dir is required: a gs:// folder for the job's outputs.")
    cloud.check_name("output_dir", FLAGS.output_dir, cloud.GCS_URI, 900)
    job_name = FLAGS.job_name or f"cifar-{topology.replace('_', '-')}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    cloud.check_name("job_name", job_name, cloud.VERTEX_NAME, 63)
    cloud.require(FLAGS.gpus in GPU_COUNTS, f"--gpus={FLAGS.gpus} must be one of {', '.join(map(str, GPU_COUNTS))}.")
    cloud.require(topology != "one_gpu" or FLAGS.gpus == 1,
                  f"--topology=one_gpu runs on one GPU, not --gpus={FLAGS.gpus}; use --topology=multi_gpu.")
    cloud.require(topology != "multi_gpu" or FLAGS.gpus >= 2,
                  "--topology=multi_gpu needs --gpus=2 or more (one GPU is --topology=one_gpu).")
    cloud.require(topology != "multi_worker" or FLAGS.machines >= 2,
                  f"--topology=multi_worker needs --machines=2 or more, not {FLAGS.machines}.")
    if FLAGS.machine_type is not None:
        cloud.check_name("machine_type", FLAGS.machine_type, (r"[a-z][-a-z0-9]*", "a machine type such as "
                                                              "n1-standard-8"), 63)
    cloud.require(topology != "tpu" or FLAGS.tpu_type == "TPU_V5_LITEPOD" or not FLAGS["tpu_topology"].present,
                  f"--tpu_topology applies to TPU v5e (--tpu_type=TPU_V5_LITEPOD); a {FLAGS.tpu_type} VM is one board "
                  "of 8 cores.")
    cloud.require(FLAGS.boot_disk_gb >= 100, f"--boot_disk_gb={FLAGS.boot_disk_gb} must be at least 100.")
    cloud.require(FLAGS.timeout_hours >= 0, f"--timeout_hours={FLAGS.timeout_hours} must be zero (no limit) or more.")
    if FLAGS.service_account is not None:
        cloud.check_name("service_account", FLAGS.service_account, cloud.SERVICE_ACCOUNT, 100)
    if FLAGS.tensorboard is not None:
        check_tensorboard(FLAGS.tensorboard, FLAGS.region, FLAGS.service_account)
    return job_name


def check_tensorboard(tensorboard: str, region: str, service_account: str | None) -> None:
    cloud.check_name("tensorboard", tensorboard, (r"projects/[-a-z0-9.:]+/locations/[a-z0-9-]+/tensorboards/[0-9]+",
                                                  "projects/PROJECT/locations/REGION/tensorboards/ID"))
    location = tensorboard.split("/")[3]
    cloud.require(location == region, f"--tensorboard is in {location}, but the job runs in --region={region}; "
                  "Vertex AI needs them in the same region.")
    cloud.require(service_account is not None, "--tensorboard needs --service_account: Vertex AI uploads the logs "
                  "with the job's service account, which needs the roles storage.admin and aiplatform.user.")


def custom_job_request(argv: list[str]) -> dict:
    """The CustomJob the flags and the trainer flags in `argv` ask for, checked (also each tuning trial's job)."""
    topology = FLAGS.topology
    job_name = check_flags(topology)
    trainer_args = cloud.trainer_flags(argv[1:], TOPOLOGIES[topology])
    environment = cloud.parse_environment("env", FLAGS.env)
    labels = cloud.parse_labels("labels", FLAGS.labels)
    return custom_job(job_name, trainer_args, environment, labels)


def main(argv: list[str]) -> None:
    body = custom_job_request(argv)
    command = submit_command(FLAGS.project, FLAGS.region, body)
    if FLAGS.dry_run:
        cloud.print_dry_run(body, [command])
        return
    cloud.require_gcloud_credentials()
    name = cloud.run(command, capture=True).strip()
    output = body["jobSpec"]["baseOutputDirectory"]["outputUriPrefix"]
    logging.info("Submitted %s. Follow it: gcloud ai custom-jobs stream-logs %s --region=%s", name, name, FLAGS.region)
    logging.info("Outputs: %s/model (export, metrics.json), %s/checkpoints; TensorBoard: tensorboard --logdir %s/logs",
                 output, output, output)
    print(name)


if __name__ == "__main__":
    if cli.take_subcommand(vertex_deploy.SUBCOMMAND):
        vertex_deploy.start()
    elif cli.take_subcommand(vertex_tune.SUBCOMMAND):
        vertex_tune.start(FLAGS, custom_job_request)
    else:
        cli.start(main, FLAGS, __doc__, unknown_flag_hint=" (trainer flags go after --)")
