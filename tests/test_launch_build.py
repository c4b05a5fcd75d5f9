"""launch.build: tags by commit, refuses dirty trees, the docker and Cloud Build commands, missing tools."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT
from helpers import run_task
from helpers import single_error_line
from launch_fakes import FakeTools
from launch_fakes import printed_commands

REPOSITORY = "us-central1-docker.pkg.dev/my-project/training/cifar-trainer"
CLOUD_BUILD_CONFIG = ROOT / "launch" / "cloudbuild.yaml"
GCLOUD_LIB = pathlib.Path("/usr/lib/google-cloud-sdk/lib")


def git(checkout: pathlib.Path, *arguments: str) -> str:
    environment = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                   "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-C", str(checkout), *arguments], check=True, capture_output=True, text=True,
                          env=environment).stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> pathlib.Path:
    """A clean git checkout with a Dockerfile, standing in for the repository."""
    folder = tmp_path / "repo"
    folder.mkdir()
    shutil.copy(ROOT / "Dockerfile", folder / "Dockerfile")
    git(folder, "init", "--quiet")
    git(folder, "add", "Dockerfile")
    git(folder, "commit", "--quiet", "-m", "image")
    return folder


def build(checkout: pathlib.Path, *flags: str, env: dict | None = None):
    return run_task(f"--image={REPOSITORY}", f"--context={checkout}", *flags, module="launch.build", env=env,
                    timeout=60)


def test_docker_dry_run_tags_the_image_by_commit_and_accelerator(checkout):
    commit = git(checkout, "rev-parse", "HEAD")
    result = build(checkout, "--accelerator=cpu", "--dry_run")
    assert result.returncode == 0, result.stderr
    image = f"{REPOSITORY}:{commit[:12]}-cpu"
    assert result.stdout.strip() == image
    assert printed_commands(result.stderr) == [
        ["docker", "build", "--platform=linux/amd64", "--build-arg=ACCELERATOR=cpu",
         f"--label=org.opencontainers.image.revision={commit}", f"--tag={image}", "BUILD_CONTEXT"],
        ["docker", "push", image]]


def test_cloud_build_dry_run_fills_every_substitution_of_the_config(checkout):
    commit = git(checkout, "rev-parse", "HEAD")
    result = build(checkout, "--builder=cloud_build", "--project=my-project", "--accelerator=tpu", "--dry_run")
    assert result.returncode == 0, result.stderr
    image = f"{REPOSITORY}:{commit[:12]}-tpu"
    (command,) = printed_commands(result.stderr)
    assert command == ["gcloud", "builds", "submit", "--project=my-project", f"--config={CLOUD_BUILD_CONFIG}",
                       f"--substitutions=_IMAGE={image},_ACCELERATOR=tpu,_REVISION={commit}", "BUILD_CONTEXT"]
    passed = {item.split("=")[0] for item in command[5].removeprefix("--substitutions=").split(",")}
    assert set(re.findall(r"\$\{(_[A-Z_]+)\}", CLOUD_BUILD_CONFIG.read_text())) == passed


@pytest.mark.skipif(not (GCLOUD_LIB / "googlecloudsdk").is_dir(), reason=f"the Google Cloud SDK is not in {GCLOUD_LIB}")
def test_cloud_build_config_loads_in_gcloud():
    """gcloud's own loader accepts the config (schema, substitutions) without contacting Google Cloud."""
    script = ("import sys\nfrom googlecloudsdk.api_lib.cloudbuild import cloudbuild_util, config\n"
              "build = config.LoadCloudbuildConfigFromPath(sys.argv[1], cloudbuild_util.GetMessagesModule(), "
              "params={'_IMAGE': 'r/i:t', '_ACCELERATOR': 'gpu', '_REVISION': 'abc'})\nprint(build.images)")
    env = {**os.environ, "PYTHONPATH": f"{GCLOUD_LIB / 'third_party'}{os.pathsep}{GCLOUD_LIB}"}
    result = subprocess.run([sys.executable, "-c", script, str(CLOUD_BUILD_CONFIG)], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "${_IMAGE}" in result.stdout


def test_dirty_tree_is_refused_unless_allowed(checkout):
    (checkout / "notes.txt").write_text("untracked")
    with (checkout / "Dockerfile").open("a") as dockerfile:
        dockerfile.write("# changed\n")
    result = build(checkout, "--dry_run")
    assert result.returncode == 2
    line = single_error_line(result)
    assert "--allow_dirty" in line and "(Dockerfile, notes.txt)" in line, line
    allowed = build(checkout, "--dry_run", "--allow_dirty")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip().endswith(f":{git(checkout, 'rev-parse', 'HEAD')[:12]}-dirty-gpu")


def test_not_a_git_checkout_is_refused(tmp_path):
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    result = build(tmp_path, "--dry_run")
    assert result.returncode == 2
    assert "not a git checkout" in single_error_line(result)


@pytest.mark.parametrize("image", [f"{REPOSITORY}:latest", "Cifar Trainer", "registry/x;touch pwned", "a/$(id)"])
def test_bad_image_repository_is_refused_before_anything_runs(checkout, tmp_path, image):
    tools = FakeTools(tmp_path / "bin")
    tools.add("docker")
    result = run_task(f"--image={image}", f"--context={checkout}", module="launch.build", env=tools.env(), timeout=60)
    assert result.returncode == 2
    assert "--image" in single_error_line(result)
    assert tools.calls() == [] and not list(checkout.glob("pwned*"))


def test_builds_and_pushes_with_docker(checkout, tmp_path):
    tools = FakeTools(tmp_path / "bin")
    tools.add("docker", [(["info"], "28.2.2\n", 0)])
    result = build(checkout, env=tools.env())
    assert result.returncode == 0, result.stderr
    image = result.stdout.strip()
    assert [call["argv"][0] for call in tools.calls()] == ["info", "build", "push"]
    assert tools.calls()[2]["argv"] == ["push", image]


# A docker that answers `info` and, for `build`, records the files of the context it was given.
RECORDING_DOCKER = """#!{python}
import json, os, sys
if sys.argv[1] == "info":
    print("28.2.2")
elif sys.argv[1] == "build":
    context = sys.argv[-1]
    files = sorted(os.path.relpath(os.path.join(folder, name), context) for folder, _, names in os.walk(context)
                   for name in names)
    with open({log!r}, "w") as log:
        json.dump(files, log)
"""


def test_git_ignored_files_never_reach_the_build_context(checkout, tmp_path):
    """.dockerignore lets trainer/ in; a git-ignored trainer/runs/ of the user's must still stay out."""
    (checkout / ".gitignore").write_text("runs/\nbuild/\n")
    (checkout / "trainer").mkdir()
    (checkout / "trainer" / "task.py").write_text("print('train')\n")
    git(checkout, "add", ".gitignore", "trainer/task.py")
    git(checkout, "commit", "--quiet", "-m", "trainer")
    for ignored in ("trainer/runs/cnn/model.keras", "trainer/build/lib/task.py"):
        (checkout / ignored).parent.mkdir(parents=True)
        (checkout / ignored).write_text("not committed")
    tools = FakeTools(tmp_path / "bin")
    docker = tools.folder / "docker"
    docker.write_text(RECORDING_DOCKER.format(python=sys.executable, log=str(tmp_path / "context.json")))
    docker.chmod(0o755)
    result = build(checkout, env=tools.env())
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "context.json").read_text()) == [".gitignore", "Dockerfile", "trainer/task.py"]
    assert result.stdout.strip().endswith(f":{git(checkout, 'rev-parse', 'HEAD')[:12]}-gpu")


def test_cloud_build_without_credentials_is_one_clear_line(checkout, tmp_path):
    tools = FakeTools(tmp_path / "bin")
    tools.add("gcloud", [(["auth", "list"], "", 0)])
    result = build(checkout, "--builder=cloud_build", "--project=my-project", env=tools.env())
    assert result.returncode == 1
    assert "gcloud auth login" in single_error_line(result)
    assert len(tools.calls()) == 1


def test_cloud_build_with_an_expired_login_is_one_clear_line(checkout, tmp_path):
    tools = FakeTools(tmp_path / "bin")
    tools.add("gcloud", [(["auth", "list"], "me@example.com\n", 0), (["auth", "print-access-token"], "", 1)])
    result = build(checkout, "--builder=cloud_build", "--project=my-project", env=tools.env())
    assert result.returncode == 1
    assert "cannot get an access token" in single_error_line(result)
    assert [call["argv"][:2] for call in tools.calls()] == [["auth", "list"], ["auth", "print-access-token"]]


def test_missing_docker_is_one_clear_line(checkout, tmp_path):
    tools = FakeTools(tmp_path / "bin")
    tools.link("git")
    result = build(checkout, env=tools.env(only=True))
    assert result.returncode == 1
    assert "docker is not installed" in single_error_line(result)


def test_docker_without_an_engine_is_one_clear_line(checkout, tmp_path):
    """With the real docker CLI when there is one (this machine has no engine), else a stand-in that fails."""
    tools = FakeTools(tmp_path / "bin")
    if shutil.which("docker") is None:
        tools.add("docker", [(["info"], "", 1)])
    env = {**tools.env(), "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    result = build(checkout, env=env)
    assert result.returncode == 1
    assert "cannot reach a Docker engine" in single_error_line(result)


def test_help_lists_the_flags():
    result = run_task("--help", module="launch.build", timeout=60)
    assert result.returncode == 0
    assert "--allow_dirty" in result.stdout and "--builder" in result.stdout
