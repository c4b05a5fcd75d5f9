"""The "Run on Google Cloud" guide: its launcher commands run as written (with --dry_run, and without it through the
real gcloud and kubectl to the local stand-ins of the cloud APIs), its gcloud ones parse, and the image's and
launchers' pointers to documentation lead somewhere."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import gcloud_standin
import kubernetes_api
import vertex_api
from helpers import ROOT

GUIDE_HEADING = "## Run on Google Cloud"


def guide_text() -> str:
    """docs/cloud.md's "Run on Google Cloud" section."""
    readme = (ROOT / "docs" / "cloud.md").read_text()
    section = readme[readme.index(GUIDE_HEADING):]
    following = section.find("\n## ", 1)
    return section if following < 0 else section[:following]


def bash_commands(text: str) -> list[str]:
    """Every command of the text's bash blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def guide_commands() -> list[str]:
    """Every command of the guide's bash blocks, in order."""
    return bash_commands(guide_text())


def with_dry_run(command: str) -> str:
    return re.sub(r"(python -m launch\.\w+)", r"\1 --dry_run", command)


def test_launcher_commands_run_as_written(tmp_path):
    """The setup exports and every `python -m launch...` line, in order, as one bash script with --dry_run added,
    in a clean git checkout (launch.build tags by commit)."""
    commands = [command for command in guide_commands()
                if command.startswith("export ") or "python -m launch." in command]
    assert sum("python -m launch." in command for command in commands) >= 9, commands
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(ROOT / "Dockerfile", checkout / "Dockerfile")
    for arguments in (["init", "--quiet"], ["add", "Dockerfile"], ["-c", "user.name=t", "-c", "user.email=t@t",
                                                                     "commit", "--quiet", "-m", "image"]):
        subprocess.run(["git", "-C", str(checkout), *arguments], check=True, capture_output=True)
    script = "set -euo pipefail\n" + "\n".join(with_dry_run(command) for command in commands)
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    review = json.loads((checkout / "cifar-review.json").read_text())
    assert (review["kind"], review["metadata"]["name"]) == ("JobSet", "cifar-review")


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="the Google Cloud CLI is not installed")
def test_gcloud_commands_parse(tmp_path):
    """gcloud checks its arguments before it looks for credentials: without any, a well-formed command fails for
    want of an account (status 1), a malformed one with a usage error (status 2)."""
    exports = [command for command in guide_commands() if command.startswith("export ")]
    commands = [command for command in guide_commands() if command.startswith("gcloud ")]
    assert commands
    env = {**os.environ, "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
           "DOCKER_CONFIG": str(tmp_path / "docker"), "HOME": str(tmp_path)}
    # Side by side: gcloud takes seconds to start.
    processes = [subprocess.Popen(["bash", "-c", "\n".join([*exports, command])], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for command in commands]
    for command, process in zip(commands, processes):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode != 2 and "unrecognized arguments" not in stderr, (command, stderr)


# What the guide leaves to the user: the references `python -m launch.build` prints (REPOSITORY:<commit>-<accelerator>).
BUILT_IMAGES = ("IMAGE=$REPOSITORY:0123456789ab-gpu TPU_IMAGE=$REPOSITORY:0123456789ab-tpu "
                "CPU_IMAGE=$REPOSITORY:0123456789ab-cpu")
# The guide's stand-in recipe writes a kubeconfig of the reader's own here; the test gives each command its own.
GUIDE_KUBECONFIG = "/tmp/k8s/kubeconfig"


def launcher_commands(module: str) -> list[str]:
    """The `python -m <module>` commands of the guide and of docs/serving.md's deployment sections, as written."""
    serving = bash_commands((ROOT / "docs" / "serving.md").read_text())
    return [command for command in [*guide_commands(), *serving] if f"python -m {module} " in command]


def guide_variables() -> dict[str, str]:
    """The guide's exports and the built image references, as bash sets them."""
    names = ("PROJECT", "REGION", "BUCKET", "IMAGE", "TPU_IMAGE", "CPU_IMAGE")
    script = "\n".join([*guide_exports(), BUILT_IMAGES, *(f'echo "${name}"' for name in names)])
    values = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    return dict(zip(names, values))


def image_of(command: str, variables: dict[str, str]) -> str:
    """The image reference the command names, as bash expands it."""
    (name,) = re.findall(r"--image=\$(\w+)", command)
    return variables[name]


def guide_exports() -> list[str]:
    return [command for command in guide_commands() if command.startswith("export ")]


def start_as_written(command: str, folder: pathlib.Path, environment: dict[str, str]) -> subprocess.Popen:
    """The command in bash after the guide's exports, in `folder`; unless it is a dry run itself, the same command
    with --dry_run follows, its output in printed.json."""
    folder.mkdir()
    lines = ["set -euo pipefail", *guide_exports(), BUILT_IMAGES, command]
    if "--dry_run" not in command:
        lines.append(f"{with_dry_run(command)} > printed.json")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **environment,
           "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(["bash", "-c", "\n".join(lines)], cwd=folder, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(command: str, process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, (command, stderr[-3000:])
    return stdout.strip()


@pytest.fixture(scope="module")
def gcloud_standin_environment(tmp_path_factory):
    """The gcloud stand-in (tests/gcloud_standin.py), and gcloud's environment with an activated service account."""
    if shutil.which("gcloud") is None:
        pytest.skip("the Google Cloud CLI (gcloud) is not installed")
    with gcloud_standin.activated(tmp_path_factory.mktemp("gcloud") / "config") as standin_and_environment:
        yield standin_and_environment


def without_job_name(body: dict) -> dict:
    """The body with its default job name (which has the second it was made in) replaced by JOB."""
    return json.loads(json.dumps(body).replace(body["displayName"], "JOB"))


def test_vertex_commands_reach_the_gcloud_standin_as_written(gcloud_standin_environment, tmp_path):
    """Every `launch.vertex` command of the guide and of docs/serving.md, as written after the guide's exports, goes
    through the real gcloud to the stand-in: a request to the exports' project and region whose body parses into
    Vertex AI's types and equals what the same command prints with --dry_run."""
    server, environment = gcloud_standin_environment
    variables = guide_variables()
    location = f"/v1/projects/{variables['PROJECT']}/locations/{variables['REGION']}"
    commands = launcher_commands("launch.vertex")
    assert sum(" deploy " in command for command in commands) == 1 and len(commands) >= 7, commands
    before = len(server.requests())
    # Side by side: each gcloud call takes seconds to start.
    processes = [start_as_written(command, tmp_path / str(index), environment)
                 for index, command in enumerate(commands)]
    outputs = [finished(command, process) for command, process in zip(commands, processes)]
    requests = server.api_requests(before)
    messages = {"customJobs": "CustomJob", "hyperparameterTuningJobs": "HyperparameterTuningJob"}
    received = {collection: [vertex_api.parse(without_job_name(request["body"]), message) for request in requests
                             if (request["method"], request["path"]) == ("POST", f"{location}/{collection}")]
                for collection, message in messages.items()}
    for index, (command, output) in enumerate(zip(commands, outputs)):
        printed = json.loads((tmp_path / str(index) / "printed.json").read_text())
        if " deploy " in command:
            check_deploy(printed, requests, location, output)
            assert printed["model"]["containerSpec"]["imageUri"] == image_of(command, variables)
            continue
        collection = "hyperparameterTuningJobs" if " tune " in command else "customJobs"
        assert output.startswith(f"{location.removeprefix('/v1/')}/{collection}/"), (command, output)
        # gcloud builds the body from its flags and the config the launcher gives it: compared as Vertex AI reads it.
        expected = vertex_api.parse(without_job_name(printed), messages[collection])
        assert expected in received[collection], command
        received[collection].remove(expected)
        assert f'"imageUri": "{image_of(command, variables)}"' in json.dumps(printed), command
        assert f'"outputUriPrefix": "{variables["BUCKET"]}/runs/' in json.dumps(printed), command
    assert received == {key: [] for key in received}, "requests no command of the guide accounts for"


def check_deploy(printed: dict, requests: list[dict], location: str, resource: str) -> None:
    """models:upload, endpoints create and deployModel, with the bodies --dry_run printed."""
    calls = [(request["method"], request["path"]) for request in requests]
    upload = requests[calls.index(("POST", f"{location}/models:upload"))]
    assert vertex_api.parse(upload["body"]["model"], "Model") == vertex_api.parse(printed["model"], "Model")
    endpoint_id = upload["body"]["modelId"]
    create = requests[calls.index(("POST", f"{location}/endpoints"))]
    assert create["query"]["endpointId"] == endpoint_id
    assert vertex_api.parse(create["body"], "Endpoint") == vertex_api.parse(printed["endpoint"], "Endpoint")
    deploy = requests[calls.index(("POST", f"{location}/endpoints/{endpoint_id}:deployModel"))]
    assert (vertex_api.parse(deploy["body"], "DeployModelRequest")
            == vertex_api.parse(printed["deployModel"], "DeployModelRequest"))
    assert resource == f"{location.removeprefix('/v1/')}/endpoints/{endpoint_id}"


# Where `kubectl apply` creates each kind the launchers render.
COLLECTIONS = {"Service": "/api/v1/namespaces/{namespace}/services",
               "JobSet": "/apis/jobset.x-k8s.io/v1alpha2/namespaces/{namespace}/jobsets",
               "Deployment": "/apis/apps/v1/namespaces/{namespace}/deployments",
               "HorizontalPodAutoscaler": "/apis/autoscaling/v2/namespaces/{namespace}/horizontalpodautoscalers"}


def applied_objects(standin: kubernetes_api.KubernetesApi, token: str) -> list[dict]:
    """The objects `kubectl apply` created with this token after its access check, each POSTed to its kind's
    collection with strict field validation; without the annotation kubectl adds."""
    assert standin.access_reviews(token), "no `kubectl auth can-i` before the apply"
    objects = []
    for request in standin.created(token):
        body = request["body"]
        assert request["method"] == "POST" and request["query"]["fieldValidation"] == ["Strict"], request
        assert request["path"] == COLLECTIONS[body["kind"]].format(namespace=body["metadata"]["namespace"])
        body["metadata"].pop("annotations")
        objects.append(body)
    return objects


@pytest.fixture(scope="module")
def kubernetes_standin(tmp_path_factory):
    """The Kubernetes API stand-in the real kubectl talks to (tests/kubernetes_api.py)."""
    yield from kubernetes_api.serve_for_tests(tmp_path_factory)


def test_gke_commands_reach_the_kubernetes_standin_as_written(kubernetes_standin, tmp_path):
    """Every `launch.gke` command of the guide and of docs/serving.md, as written after the guide's exports, applies
    through the real kubectl (each with its own kubeconfig and token, in place of the reader's current context) what
    the same command prints with --dry_run; the guide's own --dry_run command reaches nothing."""
    variables = guide_variables()
    commands = launcher_commands("launch.gke")
    assert sum(" serve " in command for command in commands) == 1 and len(commands) >= 4, commands
    assert any(GUIDE_KUBECONFIG in command for command in commands), "the stand-in recipe's kubeconfig moved"
    processes = []
    for index, command in enumerate(commands):
        kube_folder = tmp_path / f"kube-{index}"
        kube_folder.mkdir()
        environment = kubernetes_standin.kubeconfig(kube_folder, f"command-{index}")
        processes.append(start_as_written(command.replace(GUIDE_KUBECONFIG, environment["KUBECONFIG"]),
                                          tmp_path / str(index), environment))
    for index, (command, process) in enumerate(zip(commands, processes)):
        output = finished(command, process)
        if "--dry_run" in command:
            assert kubernetes_standin.requests(f"command-{index}") == [], command
            continue
        created = applied_objects(kubernetes_standin, f"command-{index}")
        printed = json.loads((tmp_path / str(index) / "printed.json").read_text())
        printed_objects = printed["items"] if printed["kind"] == "List" else [printed]
        name = created[-1]["metadata"]["name"]
        # Named for the second it was made in (--job_name's default), unless the command names it.
        assert created == [json.loads(json.dumps(item).replace(printed_objects[-1]["metadata"]["name"], name))
                           for item in printed_objects], command
        assert output.endswith(f"/{name}"), (command, output)
        assert f'"image": "{image_of(command, variables)}"' in json.dumps(created), command
        assert f'{variables["BUCKET"]}/runs/' in json.dumps(created), command


def test_pointers_to_the_guide_lead_somewhere():
    """The Dockerfile and the launchers send readers to files and to sections of docs pages that exist."""
    for source in [ROOT / "Dockerfile", *sorted((ROOT / "launch").glob("*.py"))]:
        text = source.read_text()
        for document in re.findall(r"[\w./-]+\.md\b", text):
            assert (ROOT / document).is_file(), (source.name, document)
        for page, section in re.findall(r'((?:README|docs/\w+)\.md), "([^"]+)"', text):
            assert re.search(rf"^#+ {re.escape(section)}\n", (ROOT / page).read_text(), re.M), (source.name, section)
