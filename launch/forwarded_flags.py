"""The trainer's and the server's flags a launcher passes on (after `--`), checked here with their own definitions
and rules, so that a misspelt flag or a bad value fails in one line before any machine is asked for."""

from collections.abc import Sequence

from absl import flags

from trainer import cli
from trainer import config as config_lib
from trainer.training import image_folder
from trainer.serving import serve_settings
from trainer.errors import UsageError

# A weights file is read where the trainer runs (inside the image); on this machine it need not exist.
CONTAINER_FILE_FLAGS = ("weights",)


def check_trainer_flags(arguments: Sequence[str], launcher_flags: Sequence[str] = (),
                        local_files: bool = False) -> None:
    """Parses `launcher_flags` + `arguments` as trainer.task would and builds its Config (which checks every value
    and the rules between them), without running anything. `local_files`: the trainer runs on this machine, so
    the files its flags name must exist here."""
    if not local_files:
        arguments = [_without_container_file(argument) for argument in arguments]
    registry = _parsed(launcher_flags, arguments)
    if not local_files and image_folder.is_folder(registry.dataset) and not registry["eval_split"].present:
        # Which split of a folder is held out is found where the job reads the folder, with the job's credentials;
        # this machine need not read the bucket (or have the container's path).
        registry = _parsed([*launcher_flags, f"--eval_split={image_folder.HELD_OUT_SPLITS[0]}"], arguments)
    try:
        config_lib.config_from_flags(registry)
    except UsageError as error:
        raise UsageError(f"trainer flags after --: {error}") from error


def _parsed(launcher_flags: Sequence[str], arguments: Sequence[str]) -> flags.FlagValues:
    registry = config_lib.define_flags(cli.flag_registry())
    try:
        registry(["trainer.task", *launcher_flags, *arguments])
    except flags.Error as error:
        raise UsageError(f"trainer flags after --: {error}") from error
    return registry


def _without_container_file(argument: str) -> str:
    name, _, value = argument.removeprefix("--").partition("=")
    if name in CONTAINER_FILE_FLAGS and value not in ("none", "imagenet"):
        return f"--{name}=none"
    return argument


def check_serve_flags(arguments: list[str]) -> None:
    """Parses `arguments` as trainer.serve would, in a registry of their own, and checks its settings without
    loading any model (trainer.serve_settings needs no TensorFlow)."""
    if not arguments:
        return  # The server's defaults pass its checks.
    registry = serve_settings.define_flags(cli.flag_registry())
    try:
        registry(["trainer.serve", "--model_dir=gs://launcher-check/run", *arguments])
    except flags.Error as error:
        raise UsageError(f"trainer.serve flags after --: {error}") from error
    try:
        serve_settings.settings_from_flags(registry)
    except UsageError as error:
        raise UsageError(f"trainer.serve flags after --: {error}") from error


def check_tuned_values(trainer_arguments: Sequence[str], launcher_flags: Sequence[str], name: str,
                       values: Sequence[str]) -> None:
    """Each value a tuning trial may give trainer flag `name` (the choices, or a range's ends), with the other
    trainer flags, passes the trainer's checks."""
    for value in values:
        try:
            check_trainer_flags([*trainer_arguments, f"--{name}={value}"], launcher_flags)
        except UsageError as error:
            raise UsageError(f"--parameter {name}={value}: {error}") from error
