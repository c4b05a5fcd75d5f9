"""Stand-ins for gcloud, kubectl and docker that record how they were called, for the launcher tests."""

import json
import os
import pathlib
import shlex
import stat
import sys

# A fake tool appends {"argv": [...], "stdin": "..."} to calls.jsonl, then prints the canned answer of the first
# entry in its table whose argument prefix matches, and exits with that entry's status.
FAKE_TOOL = """#!{python}
import json, sys
answers = {answers}
arguments = sys.argv[1:]
stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
with open({log!r}, "a") as log:
    log.write(json.dumps({{"tool": {name!r}, "argv": arguments, "stdin": stdin}}) + "\\n")
for prefix, output, status in answers:
    if arguments[:len(prefix)] == prefix:
        sys.stdout.write(output)
        sys.exit(status)
"""


class FakeTools:
    """A folder of fake command-line tools to put first on PATH, and the calls they received."""

    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "calls.jsonl"

    def add(self, name: str, answers: list[tuple[list[str], str, int]] = ()) -> None:
        """answers: (argument prefix, stdout, exit status); unmatched calls print nothing and succeed."""
        path = self.folder / name
        path.write_text(FAKE_TOOL.format(python=sys.executable, answers=repr(list(answers)), log=str(self.log),
                                         name=name))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def link(self, name: str) -> None:
        """Makes a real tool (e.g. git) available on a PATH that holds only this folder."""
        real = next(pathlib.Path(folder) / name for folder in os.environ["PATH"].split(os.pathsep)
                    if (pathlib.Path(folder) / name).is_file())
        (self.folder / name).symlink_to(real)

    def env(self, only: bool = False) -> dict:
        """Environment with this folder first on PATH (or alone on it, to make every other tool missing)."""
        path = str(self.folder) if only else f"{self.folder}{os.pathsep}{os.environ['PATH']}"
        return {"PATH": path}

    def calls(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


def printed_commands(stderr: str) -> list[list[str]]:
    """The `+ command` lines a launcher printed, split back into argument lists."""
    return [shlex.split(line[2:], comments=True) for line in stderr.splitlines() if line.startswith("+ ")]


# The start of a script for the Google Cloud SDK's own Python: `unknown(message, path)` lists the fields of a
# request body that Vertex AI's API schema does not know (a misspelled or misplaced field), recursively.
GCLOUD_UNKNOWN_FIELDS = """
import json, sys
from apitools.base.py import encoding
from googlecloudsdk.generated_clients.apis.aiplatform.v1 import aiplatform_v1_messages as messages

def unknown(message, path):
    found = [f"{path}.{name}" for name in message.all_unrecognized_fields()]
    for field in message.all_fields():
        values = getattr(message, field.name)
        for value in values if field.repeated else [values]:
            if hasattr(value, "all_unrecognized_fields"):
                found += unknown(value, f"{path}.{field.name}")
    return found
"""
