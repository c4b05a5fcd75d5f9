"""Hyperparameter tuning on Vertex AI: `python -m launch.vertex tune`, a HyperparameterTuningJob.

    python -m launch.vertex tune --image=IMAGE --output_dir=gs://BUCKET/runs --topology=one_gpu \\
        --parameter=learning_rate:log:1e-4:1e-1 --parameter=batch_size:discrete:128,256 \\
        --metric=eval_accuracy --max_trials=12 --parallel_trials=3 -- --model=cnn --epochs=20

Each trial runs the CustomJob that `python -m launch.vertex` would submit with the same flags, plus the trial's
values as trainer flags (--learning_rate=0.0031 ...). The trainer reports its eval metrics at the end of every
epoch in the file Vertex AI reads (trainer/training/hypertune.py); --metric picks the one the study optimises.
Each trial writes under OUTPUT_DIR/JOB_NAME/TRIAL_ID. --parameter takes NAME:TYPE:VALUES, NAME a trainer flag:
- NAME:linear|log|reverse_log:MIN:MAX, a range (whole numbers for an integer flag);
- NAME:discrete:V1,V2,... numbers, NAME:categorical:A,B,... words.
"""

import datetime
import json
import types

from absl import flags
from absl import logging

from launch import cloud
from launch import forwarded_flags
from trainer import cli
from trainer import config as config_lib
from trainer.training import hypertune
from trainer.errors import UsageError

SUBCOMMAND = "tune"
SCALES = {"linear": "UNIT_LINEAR_SCALE", "log": "UNIT_LOG_SCALE", "reverse_log": "UNIT_REVERSE_LOG_SCALE"}
GOALS = {"eval_accuracy": "maximize", "eval_loss": "minimize"}
ALGORITHMS = {"bayesian": None, "grid": "GRID_SEARCH", "random": "RANDOM_SEARCH"}  # None: Vertex AI's default.
OPTION_TYPES = {field.name: field for field in config_lib.OPTIONS}


def define_flags(flag_values: flags.FlagValues) -> None:
    """The tuning flags, beside launch.vertex's own (the trials' CustomJob)."""
    flags.DEFINE_multi_string("parameter", [], "A hyperparameter to tune, NAME:TYPE:VALUES (see above); repeat.",
                              flag_values=flag_values)
    flags.DEFINE_enum("metric", "eval_accuracy", hypertune.METRICS, "The metric the study optimises, as the trainer "
                      "reports it each epoch.", flag_values=flag_values)
    flags.DEFINE_enum("goal", None, ("maximize", "minimize"), "Default: maximize eval_accuracy, minimize eval_loss.",
                      flag_values=flag_values)
    flags.DEFINE_integer("max_trials", 10, "Trials in all.", flag_values=flag_values)
    flags.DEFINE_integer("parallel_trials", 2, "Trials at a time.", flag_values=flag_values)
    flags.DEFINE_integer("max_failed_trials", 0, "Failed trials before the job fails; 0: Vertex AI's default.",
                         flag_values=flag_values)
    flags.DEFINE_enum("algorithm", "bayesian", tuple(ALGORITHMS), "Search algorithm.", flag_values=flag_values)


def parameter_spec(text: str) -> dict:
    """One --parameter as a StudySpec.ParameterSpec, checked against the trainer's option of that name."""
    name, _, rest = text.partition(":")
    kind, _, values = rest.partition(":")
    field = OPTION_TYPES.get(name)
    cloud.require(field is not None and name not in cloud.MANAGED_TRAINER_FLAGS,
                  f"--parameter={text}: {name!r} is not a trainer flag a trial can set.")
    cloud.require(kind in (*SCALES, "discrete", "categorical"), f"--parameter={text}: TYPE must be one of "
                  f"{', '.join([*SCALES, 'discrete', 'categorical'])}.")
    integer = field.type is int or (isinstance(field.type, types.UnionType) and int in field.type.__args__)
    try:
        if kind in SCALES:
            low, high = (int(value) if integer else float(value) for value in values.split(":"))
            cloud.require(low < high and (kind == "linear" or low > 0), f"--parameter={text}: needs MIN < MAX"
                          f"{'' if kind == 'linear' else ' and MIN > 0 on a log scale'}.")
            spec = {"integerValueSpec": {"minValue": str(low), "maxValue": str(high)}} if integer else \
                {"doubleValueSpec": {"minValue": low, "maxValue": high}}
            return {"parameterId": name, **spec, "scaleType": SCALES[kind]}
        choices = [value for value in values.split(",") if value]
        cloud.require(len(choices) >= 2, f"--parameter={text}: give two or more values.")
        if kind == "discrete" and not integer:
            return {"parameterId": name, "discreteValueSpec": {"values": sorted(float(value) for value in choices)}}
        if kind == "discrete":
            # Vertex AI passes a discrete value as a floating-point number ("128.0"), which an integer flag refuses;
            # the same choices as words reach the trainer exactly as written.
            choices = [str(int(value)) for value in choices]
        return {"parameterId": name, "categoricalValueSpec": {"values": choices}}
    except ValueError as error:
        raise UsageError(f"--parameter={text}: {error}; use NAME:TYPE:VALUES, e.g. learning_rate:log:1e-4:1e-1."
                               ) from error


def tuning_job(options: flags.FlagValues, custom_job: dict, parameters: list[dict]) -> dict:
    """The body of projects.locations.hyperparameterTuningJobs.create around the trials' CustomJob."""
    goal = (options.goal or GOALS[options.metric]).upper()
    study = {"metrics": [{"metricId": options.metric, "goal": goal}], "parameters": parameters}
    if ALGORITHMS[options.algorithm]:
        study["algorithm"] = ALGORITHMS[options.algorithm]
    body = {"displayName": custom_job["displayName"], "labels": custom_job["labels"], "studySpec": study,
            "maxTrialCount": options.max_trials, "parallelTrialCount": options.parallel_trials,
            "trialJobSpec": custom_job["jobSpec"]}
    if options.max_failed_trials:
        body["maxFailedTrialCount"] = options.max_failed_trials
    return body


def check_flags(options: flags.FlagValues, trainer_args: list[str]) -> list[dict]:
    cloud.require(bool(options.parameter), "tune needs at least one --parameter=NAME:TYPE:VALUES.")
    parameters = [parameter_spec(text) for text in options.parameter]
    names = [parameter["parameterId"] for parameter in parameters]
    cloud.require(len(set(names)) == len(names), f"--parameter: {', '.join(names)} names a flag twice.")
    given = {argument[2:].partition("=")[0] for argument in trainer_args}
    for name in sorted(given & set(names)):
        raise UsageError(f"trainer flag --{name} is tuned (--parameter); leave it out after --.")
    for parameter in parameters:
        # Vertex AI's grid search takes integer, discrete and categorical parameters only.
        cloud.require(options.algorithm != "grid" or "doubleValueSpec" not in parameter,
                      f"--algorithm=grid: --parameter {parameter['parameterId']} is a continuous range, which a grid "
                      "cannot enumerate; give it as discrete values, or use --algorithm=random or bayesian.")
    for parameter in parameters:
        forwarded_flags.check_tuned_values(trainer_args, [], parameter["parameterId"],
                                           tried_values(parameter))
    cloud.require(options.max_trials >= 1, f"--max_trials={options.max_trials} must be at least 1.")
    cloud.require(1 <= options.parallel_trials <= options.max_trials, f"--parallel_trials={options.parallel_trials} "
                  f"must be 1 to --max_trials ({options.max_trials}).")
    cloud.require(options.max_failed_trials >= 0, f"--max_failed_trials={options.max_failed_trials} must be zero or "
                  "more.")
    return parameters


def tried_values(parameter: dict) -> list[str]:
    """What a trial may pass for a ParameterSpec: every choice, or a range's two ends."""
    if "categoricalValueSpec" in parameter:
        return list(parameter["categoricalValueSpec"]["values"])
    if "discreteValueSpec" in parameter:
        return [str(value) for value in parameter["discreteValueSpec"]["values"]]
    spec = parameter.get("integerValueSpec") or parameter["doubleValueSpec"]
    return [str(spec["minValue"]), str(spec["maxValue"])]


def submit_command(options: flags.FlagValues, body: dict) -> cloud.Command:
    labels = ",".join(f"{key}={value}" for key, value in body["labels"].items())
    argv = ("gcloud", "ai", "hp-tuning-jobs", "create", f"--project={options.project}", f"--region={options.region}",
            f"--display-name={body['displayName']}", f"--labels={labels}",
            f"--max-trial-count={body['maxTrialCount']}", f"--parallel-trial-count={body['parallelTrialCount']}",
            f"--config={cloud.CONFIG_FILE}", "--format=value(name)")
    config = {key: body[key] for key in ("studySpec", "trialJobSpec", "maxFailedTrialCount") if key in body}
    # Unlike `custom-jobs create`, `hp-tuning-jobs create --config=-` does not read stdin: the config goes in a file.
    return cloud.Command(argv, config_file=json.dumps(config, indent=2),
                         config_file_description="the request's studySpec and trialJobSpec, printed above")


def main(argv: list[str], options: flags.FlagValues, custom_job_request) -> None:
    """`options` is launch.vertex's registry with the tuning flags added; `custom_job_request(argv)` is
    launch.vertex's CustomJob for the same flags (checked there)."""
    custom_job = custom_job_request(argv)
    body = tuning_job(options, custom_job, check_flags(options, argv[1:]))
    command = submit_command(options, body)
    if options.dry_run:
        cloud.print_dry_run(body, [command])
        return
    cloud.require_gcloud_credentials()
    name = cloud.run(command, capture=True).strip()
    logging.info("Submitted %s (%s trials). Follow it: gcloud ai hp-tuning-jobs describe %s --region=%s", name,
                 body["maxTrialCount"], name, options.region)
    print(name)



def start(vertex_flags: flags.FlagValues, custom_job_request) -> None:
    """Runs `python -m launch.vertex tune ...` (the word already taken out by cli.take_subcommand): each trial is
    the CustomJob of launch.vertex's flags, so the tuning flags join launch.vertex's registry."""
    define_flags(vertex_flags)
    default_name = f"cifar-tune-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    vertex_flags.set_default("job_name", default_name)
    cli.start(lambda argv: main(argv, vertex_flags, custom_job_request), vertex_flags, __doc__,
              unknown_flag_hint=" (trainer flags go after --)")
