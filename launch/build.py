"""Builds the training image for one accelerator and pushes it, tagged with the git commit it was built from.

    python -m launch.build --image=us-central1-docker.pkg.dev/PROJECT/REPOSITORY/cifar-trainer --accelerator=gpu
    python -m launch.build --image=... --accelerator=tpu --builder=cloud_build --project=PROJECT

The tag is `<commit>-<accelerator>` (the commit's first 12 hex digits), so an image always says which code and
which TensorFlow build it holds. A working tree with uncommitted changes or untracked files is refused, because
the image would not match its tag; --allow_dirty builds it anyway as `<commit>-dirty-<accelerator>`, a tag that
the next dirty build overwrites. The build context is a temporary copy of the files git lists (tracked, and with
--allow_dirty untracked ones it does not ignore), so a git-ignored file (trainer/runs/, a local build/) never
reaches the image, whatever .dockerignore lets in. The full image reference is the only line on stdout:
`IMAGE=$(python -m launch.build ...)`.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from absl import flags
from absl import logging

from launch import cloud
from trainer import cli
from trainer.errors import UsageError

FLAGS = cli.flag_registry()
flags.DEFINE_string("image", None, "Image repository without tag, e.g. us-central1-docker.pkg.dev/PROJECT/REPO/NAME.",
                    flag_values=FLAGS)
flags.DEFINE_enum("accelerator", "gpu", cloud.ACCELERATORS, "TensorFlow build in the image (Dockerfile ACCELERATOR).",
                  flag_values=FLAGS)
flags.DEFINE_enum("builder", "docker", ("docker", "cloud_build"),
                  "docker: `docker build` and `docker push` on this machine. cloud_build: `gcloud builds submit` "
                  "builds and pushes on Google Cloud Build (no local Docker needed).", flag_values=FLAGS)
flags.DEFINE_string("project", os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT"),
                    "Google Cloud project for --builder=cloud_build. Default: $GOOGLE_CLOUD_PROJECT.",
                    flag_values=FLAGS)
flags.DEFINE_string("context", ".", "The repository checkout to build (it holds the Dockerfile).",
                    flag_values=FLAGS)
flags.DEFINE_bool("allow_dirty", False, "Build a working tree with uncommitted changes, tagged <commit>-dirty-*.",
                  flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "Print the image reference and the commands, and run nothing but git.",
                  flag_values=FLAGS)

CLOUD_BUILD_CONFIG = pathlib.Path(__file__).with_name("cloudbuild.yaml")


def git(context: pathlib.Path, *arguments: str) -> str:
    cloud.require_tool("git")
    result = subprocess.run(["git", "-C", str(context), *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "git failed"
        raise UsageError(f"--context={context} is not a git checkout with a commit ({reason}).")
    return result.stdout.rstrip()  # Not strip(): `git status --porcelain` lines may start with a space.


def image_tag(context: pathlib.Path, accelerator: str, allow_dirty: bool) -> tuple[str, str]:
    """(tag, full commit) for the checkout; refuses a dirty tree unless allowed."""
    commit = git(context, "rev-parse", "--verify", "HEAD^{commit}")
    changes = git(context, "status", "--porcelain", "--untracked-files=normal")
    if changes and not allow_dirty:
        changed = ", ".join(line[3:] for line in changes.splitlines()[:5])
        raise UsageError(f"the working tree has uncommitted changes ({changed}); commit them so the image "
                               "matches its tag, or pass --allow_dirty for a <commit>-dirty tag.")
    dirty = "-dirty" if changes else ""
    if dirty:
        logging.warning("Building uncommitted changes; the tag %s%s-%s is overwritten by the next dirty build.",
                        commit[:12], dirty, accelerator)
    return f"{commit[:12]}{dirty}-{accelerator}", commit


# Stands for the temporary copy of the checkout in what --dry_run prints.
BUILD_CONTEXT = "BUILD_CONTEXT"


def copy_git_files(context: pathlib.Path, destination: pathlib.Path) -> int:
    """Copies the files git lists in the checkout (tracked, and untracked but not ignored) to `destination`;
    returns how many."""
    names = [name for name in git(context, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
             if name]
    copied = 0
    for name in names:
        source = context / name
        if not source.is_file():  # Deleted in the working tree, or a submodule.
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied += 1
    return copied


def build_commands(image: str, accelerator: str, commit: str, builder: str, project: str | None,
                   context: pathlib.Path | str) -> list[cloud.Command]:
    """The commands that build and push `image` (a full reference with its tag)."""
    if builder == "cloud_build":
        substitutions = f"_IMAGE={image},_ACCELERATOR={accelerator},_REVISION={commit}"
        return [cloud.Command(("gcloud", "builds", "submit", f"--project={project}",
                               f"--config={CLOUD_BUILD_CONFIG}", f"--substitutions={substitutions}", str(context)))]
    # linux/amd64 because the lock files pin x86_64 wheels, which an ARM laptop would not pick by itself.
    build = ("docker", "build", "--platform=linux/amd64", f"--build-arg=ACCELERATOR={accelerator}",
             f"--label=org.opencontainers.image.revision={commit}", f"--tag={image}", str(context))
    return [cloud.Command(build), cloud.Command(("docker", "push", image))]


def check_flags() -> pathlib.Path:
    cloud.require(FLAGS.image is not None, "--image is required: the repository to push to, e.g. "
                  "us-central1-docker.pkg.dev/PROJECT/REPOSITORY/cifar-trainer.")
    cloud.check_name("image", FLAGS.image, cloud.IMAGE_REPOSITORY, 255)
    if FLAGS.builder == "cloud_build":
        cloud.require(FLAGS.project is not None, "--builder=cloud_build needs --project (or $GOOGLE_CLOUD_PROJECT).")
        cloud.check_name("project", FLAGS.project, cloud.PROJECT_ID)
    context = pathlib.Path(FLAGS.context).resolve()
    cloud.require((context / "Dockerfile").is_file(), f"--context={FLAGS.context} has no Dockerfile; run from the "
                  "repository's root or point --context at it.")
    return context


def preflight(builder: str) -> None:
    """Checks that the tools can work before anything is started, so a missing one is one clear line."""
    if builder == "cloud_build":
        cloud.require_gcloud_credentials()
    else:
        cloud.check_output(["docker", "info", "--format", "{{.ServerVersion}}"],
                           "docker cannot reach a Docker engine; start Docker, or build with --builder=cloud_build.")


def main(argv: list[str]) -> None:
    cloud.require(len(argv) == 1, f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag.")
    context = check_flags()
    tag, commit = image_tag(context, FLAGS.accelerator, FLAGS.allow_dirty)
    image = f"{FLAGS.image}:{tag}"
    if FLAGS.dry_run:
        commands = build_commands(image, FLAGS.accelerator, commit, FLAGS.builder, FLAGS.project, BUILD_CONTEXT)
        cloud.print_dry_run(image, commands)
        print(f"# {BUILD_CONTEXT}: a temporary copy of the files git lists in {context}", file=sys.stderr)
        return
    preflight(FLAGS.builder)
    with tempfile.TemporaryDirectory(prefix="launch-build-") as folder:
        logging.info("Build context: %d files git lists in %s, copied to %s.", copy_git_files(context, pathlib.Path(
            folder)), context, folder)
        for command in build_commands(image, FLAGS.accelerator, commit, FLAGS.builder, FLAGS.project,
                                      pathlib.Path(folder)):
            cloud.run(command)
    logging.info("Pushed %s. If the push was refused, run `gcloud auth configure-docker %s`.", image,
                 FLAGS.image.split("/")[0])
    print(image)


if __name__ == "__main__":
    cli.start(main, FLAGS, __doc__, unknown_flag_hint=" (trainer flags go after --)")
