"""Shared by the cloud launchers: checking flag values, trainer flags and environment, and running cloud CLIs."""

import dataclasses
import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from launch import forwarded_flags
from trainer.errors import Failure
from trainer.errors import UsageError

# Set by the launchers from their own flags; a trainer flag or --env entry may not override them.
MANAGED_TRAINER_FLAGS = ("strategy", "accelerator", "tpu", "model_dir")
MANAGED_ENVIRONMENT = ("AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR", "AIP_TENSORBOARD_LOG_DIR", "CLUSTER_SPEC", "TF_CONFIG",
                       "WORKER_HOSTS", "JOB_COMPLETION_INDEX", "KUBERNETES_JOB_UID")
ACCELERATORS = ("cpu", "gpu", "tpu")

INSTALL_HINTS = {
    "gcloud": "install the Google Cloud CLI: https://cloud.google.com/sdk/docs/install",
    "kubectl": "install it with `gcloud components install kubectl` or https://kubernetes.io/docs/tasks/tools/",
    "docker": "install Docker (https://docs.docker.com/get-docker/), or build with --builder=cloud_build",
    "git": "install git; the image is tagged with the commit it was built from",
}


class CommandError(Failure):
    """A command-line tool is missing, has no credentials, or failed."""


# Provider naming rules: (regular expression, the rule in words).
DNS_1035_LABEL = (r"[a-z]([-a-z0-9]*[a-z0-9])?", "lowercase letters, digits and '-', starting with a letter and "
                  "ending with a letter or digit (a Kubernetes DNS-1035 label)")
DNS_1123_LABEL = (r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", "lowercase letters, digits and '-', starting and ending with a "
                  "letter or digit (a Kubernetes DNS-1123 label)")
DNS_1123_SUBDOMAIN = (r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", "lowercase letters, "
                      "digits, '-' and '.', starting and ending with a letter or digit (a Kubernetes DNS-1123 "
                      "subdomain)")
KUBERNETES_LABEL_VALUE = (r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?", "letters, digits, '-', '_' and '.', "
                          "starting and ending with a letter or digit (a Kubernetes label value)")
VERTEX_NAME = (r"[a-z][-a-z0-9_]*", "lowercase letters, digits, '-' and '_', starting with a letter (it names "
               "the job and its output folder)")
VERTEX_LABEL_KEY = (r"[a-z][-a-z0-9_]*", "lowercase letters, digits, '-' and '_', starting with a letter "
                    "(a Google Cloud label key)")
VERTEX_LABEL_VALUE = (r"[-a-z0-9_]*", "lowercase letters, digits, '-' and '_' (a Google Cloud label value)")
PROJECT_ID = (r"([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]", "a Google Cloud project ID: 6 to 30 lowercase "
              "letters, digits and '-', starting with a letter")
REGION = (r"[a-z]+(-[a-z]+)+[0-9]+", "a Google Cloud region such as us-central1 or europe-west4")
GCS_URI = (r"gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/[-A-Za-z0-9_.=]+)*/?",
           "gs://BUCKET/PATH with a valid bucket name and a path of letters, digits, '-', '_', '.', '=' and '/'")
SERVICE_ACCOUNT = (r"[a-z0-9][-a-z0-9._]*@[a-z0-9][-a-z0-9.]*\.[a-z]{2,}", "a service account e-mail such as "
                   "trainer@PROJECT.iam.gserviceaccount.com")
# Docker's reference grammar: [HOST[:PORT]/]PATH, lowercase path components joined by '.', '_', '__' or dashes.
_IMAGE_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_HOST_LABEL = r"[A-Za-z0-9](?:[-A-Za-z0-9]*[A-Za-z0-9])?"
_IMAGE_HOST = rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*(?::[0-9]+)?/)?"
IMAGE_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
IMAGE_REPOSITORY = (_IMAGE_HOST + _IMAGE_PATH, "an image repository without tag, such as "
                    "us-central1-docker.pkg.dev/PROJECT/REPOSITORY/cifar-trainer")
IMAGE_REFERENCE = (_IMAGE_HOST + _IMAGE_PATH + rf"(?::{IMAGE_TAG}|@sha256:[a-f0-9]{{64}})",
                   "an image with a tag or digest, such as us-central1-docker.pkg.dev/PROJECT/REPOSITORY/"
                   "cifar-trainer:1a2b3c4d5e6f-gpu (python -m launch.build prints it)")


def check_name(flag: str, value: str, rule: tuple[str, str], max_length: int | None = None) -> str:
    """Returns `value` if it matches the naming rule, else raises a UsageError naming the flag and the rule."""
    pattern, words = rule
    if max_length is not None and len(value) > max_length:
        raise UsageError(f"--{flag}={value!r} is {len(value)} characters long; at most {max_length} are allowed "
                         f"({words}).")
    if not re.fullmatch(pattern, value):
        raise UsageError(f"--{flag}={value!r} is not valid: use {words}.")
    return value


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def parse_labels(flag: str, items: list[str]) -> dict[str, str]:
    """KEY=VALUE items as Google Cloud labels (keys and values at most 63 characters)."""
    labels = {}
    for item in items:
        key, separator, value = item.partition("=")
        require(bool(separator), f"--{flag}: {item!r} is not KEY=VALUE.")
        labels[check_name(flag, key, VERTEX_LABEL_KEY, 63)] = check_name(flag, value, VERTEX_LABEL_VALUE, 63)
    return labels


def parse_environment(flag: str, items: list[str]) -> dict[str, str]:
    """NAME=VALUE items for the container's environment; the launcher's own variables are refused."""
    environment = {}
    for item in items:
        name, separator, value = item.partition("=")
        require(bool(separator) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None,
                f"--{flag}: {item!r} is not NAME=VALUE with NAME made of letters, digits and '_'.")
        require(name not in MANAGED_ENVIRONMENT,
                f"--{flag}: {name} is set by the launcher ({', '.join(MANAGED_ENVIRONMENT)} are).")
        environment[name] = value
    return environment


def trainer_flags(arguments: list[str], strategy: str) -> list[str]:
    """The trainer's flags (the arguments after `--`), each one --name=value argument passed on unchanged."""
    for argument in arguments:
        match = re.fullmatch(r"--([A-Za-z][A-Za-z0-9_]*)(=.*)?", argument, re.DOTALL)
        require(match is not None, f"trainer flags after -- must each be one --name=value argument; got {argument!r}.")
        name = match.group(1)
        require(name not in MANAGED_TRAINER_FLAGS,
                f"trainer flag --{name}: the launcher sets it (--strategy={strategy}, --accelerator and --tpu from the "
                "machines it asks for, and the output directory from --output_dir); leave it out.")
    forwarded_flags.check_trainer_flags(arguments, launcher_trainer_flags(strategy))
    return list(arguments)


def launcher_trainer_flags(strategy: str) -> list[str]:
    """The managed trainer flags as the launchers set them, for checking the user's trainer flags beside them."""
    return [f"--strategy={strategy}", *(["--accelerator=tpu", "--tpu=local"] if strategy == "tpu" else [])]


def check_image_accelerator(image: str, accelerator: str) -> None:
    """Refuses an image whose launch.build tag names another accelerator than the job's machines have: a CPU
    image on GPU machines would train, slowly, without a word."""
    tag = image.rpartition(":")[2] if "@" not in image else ""
    built_for = next((name for name in ACCELERATORS if tag.endswith(f"-{name}")), None)
    require(built_for in (None, accelerator), f"--image={image} was built for {built_for}, but the job runs on "
            f"{accelerator}; build it with `python -m launch.build --accelerator={accelerator}`.")


def check_image(image: str | None, accelerator: str) -> None:
    """--image: given, a valid tagged reference, and built for the machines the job runs on."""
    require(image is not None, "--image is required: the tagged image `python -m launch.build` printed.")
    check_name("image", image, IMAGE_REFERENCE, 255)
    check_image_accelerator(image, accelerator)


# Kubernetes (launch.gke and launch.gke serve).

GET_CREDENTIALS = "`gcloud container clusters get-credentials CLUSTER --location=LOCATION`"


def check_kubernetes_target(namespace: str, context: str | None, service_account: str | None) -> None:
    """--namespace, --context and --service_account: names Kubernetes and kubectl accept."""
    check_name("namespace", namespace, DNS_1123_LABEL, 63)
    if context is not None:
        require(re.fullmatch(r"[^\s=]+", context) is not None, f"--context={context!r} is not a kubectl context name.")
    if service_account is not None:
        check_name("service_account", service_account, DNS_1123_SUBDOMAIN, 253)


def kubectl(context: str | None, *arguments: str) -> tuple[str, ...]:
    """A kubectl command line, in --context when one was given, else in kubectl's current context."""
    return ("kubectl", *([f"--context={context}"] if context else []), *arguments)


def check_kubectl_access(context: str | None, namespace: str, resource: str, kind: str) -> None:
    """Before anything is applied: kubectl has a cluster, and its credentials may create `resource` (`kind` in
    words, e.g. Jobs) in the namespace."""
    check_context = ["kubectl", "config", "get-contexts", context, "--output=name"] if context else \
        ["kubectl", "config", "current-context"]
    current = check_output(check_context, f"kubectl has no context {context or '(no current context)'}; "
                           f"run {GET_CREDENTIALS} and try again.")
    failure = f"kubectl cannot check its permissions in context {current}"
    result = run_check(list(kubectl(context, "auth", "can-i", "create", resource, f"--namespace={namespace}")),
                       f"{failure}; run {GET_CREDENTIALS} and try again.")
    answer = result.stdout.strip()
    if answer == "yes":
        return
    if answer.startswith("no"):
        raise CommandError(f"kubectl's credentials in context {current} may not create {kind} in "
                           f"--namespace={namespace} (`kubectl auth can-i create {resource}` says no); ask the "
                           "cluster's admin for a role that may (on GKE: roles/container.developer).")
    reason = last_line(result.stderr) or f"exit status {result.returncode}"
    raise CommandError(f"{failure} ({reason}); its credentials may have expired: run {GET_CREDENTIALS} "
                       "and try again.")


def join_gcs(*parts: str) -> str:
    return "/".join(part.strip("/") for part in parts)


@dataclasses.dataclass(frozen=True)
class Command:
    """One command line, and what goes to its standard input or to the file it reads (CONFIG_FILE in argv)."""

    argv: tuple[str, ...]
    stdin: str | None = None
    stdin_description: str | None = None
    config_file: str | None = None
    config_file_description: str | None = None

    def display(self) -> str:
        suffix = f"  # stdin: {self.stdin_description}" if self.stdin_description else ""
        if self.config_file_description:
            suffix += f"  # {CONFIG_FILE}: {self.config_file_description}"
        return "+ " + shlex.join(self.argv) + suffix


# Stands for the temporary file that holds a Command's config_file, in its argv and in what --dry_run prints.
CONFIG_FILE = "CONFIG_FILE.json"


def require_tool(name: str) -> None:
    if shutil.which(name) is None:
        raise CommandError(f"{name} is not installed or not on PATH; {INSTALL_HINTS[name]}.")


def run_check(argv: list[str], failure: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs a local, read-only check and returns its result for the caller to judge; `failure` is the error when
    the tool is missing or does not answer in time."""
    require_tool(argv[0])
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as error:
        raise CommandError(f"{failure} (`{shlex.join(argv)}` did not answer within {timeout:.0f}s).") from error


def check_output(argv: list[str], failure: str, timeout: float = 60) -> str:
    """Runs a local, read-only check and returns its output; `failure` is the error when it fails or says nothing."""
    result = run_check(argv, failure, timeout)
    if result.returncode != 0 or not result.stdout.strip():
        raise CommandError(failure)
    return result.stdout.strip()


def last_line(text: str, limit: int = 160) -> str:
    """The last non-empty line of a tool's messages, which usually says why it failed."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def require_gcloud_credentials() -> str:
    """The active gcloud account; none is a clear error rather than a failure deep inside a gcloud call."""
    account = check_output(["gcloud", "auth", "list", "--filter=status:ACTIVE", "--format=value(account)"],
                           "gcloud has no active credentials; run `gcloud auth login` (or activate a service account) "
                           "and try again.")
    require_access_token(account)
    return account


def require_access_token(account: str) -> None:
    """An account stays listed after its login expired or was revoked; only getting a token proves it works."""
    advice = "run `gcloud auth login` and try again."
    # The token is captured and dropped, never printed.
    result = run_check(["gcloud", "auth", "print-access-token", "--quiet"],
                       f"gcloud cannot get an access token for {account}; {advice}")
    if result.returncode != 0 or not result.stdout.strip():
        reason = last_line(result.stderr) or f"exit status {result.returncode}"
        raise CommandError(f"gcloud cannot get an access token for {account} ({reason}); {advice}")


def run(command: Command, capture: bool = False) -> str:
    """Runs a command (an argument list, never a shell); its messages go to stderr, so our stdout stays parseable.

    Returns its standard output when `capture` is set.
    """
    require_tool(command.argv[0])
    print(command.display(), file=sys.stderr, flush=True)
    # No terminal input otherwise: a tool that would prompt fails at once instead of waiting for an answer.
    stdin = {"input": command.stdin} if command.stdin is not None else {"stdin": subprocess.DEVNULL}
    with tempfile.TemporaryDirectory(prefix="launch-") as folder:
        argv = list(command.argv)
        if command.config_file is not None:
            path = pathlib.Path(folder, CONFIG_FILE)
            path.write_text(command.config_file)
            argv = [argument.replace(CONFIG_FILE, str(path)) for argument in argv]
        result = subprocess.run(argv, text=True, stdout=subprocess.PIPE if capture else sys.stderr, **stdin)
    if result.returncode != 0:
        raise CommandError(f"`{shlex.join(command.argv[:4])} ...` failed with exit status {result.returncode}; "
                           "its messages are above.")
    return result.stdout or ""


def print_dry_run(document, commands: list[Command]) -> None:
    """What a real run would send and run: the document on stdout (JSON, or a plain line), the commands on stderr."""
    print(document if isinstance(document, str) else json.dumps(document, indent=2))
    for command in commands:
        print(command.display(), file=sys.stderr)
