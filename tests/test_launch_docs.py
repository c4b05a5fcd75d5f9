"""The "Run on Google Cloud" guide: its launcher commands run as written (with --dry_run), its gcloud ones parse,
and the image's and launchers' pointers to documentation lead somewhere."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

GUIDE_HEADING = "## Run on Google Cloud"


def guide_text() -> str:
    """docs/cloud.md's "Run on Google Cloud" section."""
    readme = (ROOT / "docs" / "cloud.md").read_text()
    section = readme[readme.index(GUIDE_HEADING):]
    following = section.find("\n## ", 1)
    return section if following < 0 else section[:following]


def guide_commands() -> list[str]:
    """Every command of the guide's bash blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", guide_text(), re.S)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


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


def test_pointers_to_the_guide_lead_somewhere():
    """The Dockerfile and the launchers send readers to files and to sections of docs pages that exist."""
    for source in [ROOT / "Dockerfile", *sorted((ROOT / "launch").glob("*.py"))]:
        text = source.read_text()
        for document in re.findall(r"[\w./-]+\.md\b", text):
            assert (ROOT / document).is_file(), (source.name, document)
        for page, section in re.findall(r'((?:README|docs/\w+)\.md), "([^"]+)"', text):
            assert re.search(rf"^#+ {re.escape(section)}\n", (ROOT / page).read_text(), re.M), (source.name, section)
