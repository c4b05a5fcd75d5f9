"""Command-line flags, and the validated run configuration built from them."""

import dataclasses
import datetime
import os
import sys

from absl import flags

from trainer import recipes
from trainer.errors import UsageError

MODELS = ("cnn", "resnet50", "airbench")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "step", "onecycle")
EARLY_STOPPING_MONITORS = ("eval_accuracy", "eval_loss")

# Side length each model sees when --image_size is not given; None keeps the dataset's own.
DEFAULT_IMAGE_SIZE = {"cnn": None, "resnet50": 224, "airbench": None}

FLAGS = flags.FLAGS

flags.DEFINE_enum(
    "recipe", None, tuple(recipes.RECIPES),
    "A named group of flag values; flags given explicitly still win. " + recipes.describe())

# Model.
flags.DEFINE_enum(
    "model", "cnn", MODELS,
    "Network to train: cnn (the notebook's 2-conv network), resnet50 (ImageNet ResNet50 + head), airbench "
    "(airbench94's patch-whitened fast network, trained from scratch).")
flags.DEFINE_string(
    "weights", None,
    "Initial backbone weights: 'imagenet' (default for resnet50), 'none', or the path of a "
    "weights file (for resnet50 the Keras no-top ResNet50 .h5; for other models a full "
    "model .weights.h5).")
flags.DEFINE_integer(
    "image_size", None,
    "Side length the network sees; images are resized on the accelerator, inside the model. "
    "Default: 224 for resnet50, the dataset's own size otherwise.")
flags.DEFINE_float("dropout", 0.5, "Dropout rate before the cnn's output layer.")

# Data.
flags.DEFINE_string("dataset", "cifar10", "TFDS image-classification dataset with 'image' and 'label'.")
flags.DEFINE_string(
    "data_dir", None, "TFDS data directory. Default: TFDS's own, or $TFDS_DATA_DIR when set.")
flags.DEFINE_string("train_split", "train", "TFDS split to train on; slicing such as 'train[:2000]' works.")
flags.DEFINE_string("eval_split", "test", "TFDS split evaluated after every epoch and at the end.")

# Hardware.
flags.DEFINE_enum(
    "strategy", "auto", STRATEGIES,
    "tf.distribute strategy. auto: TPU if one is configured (--tpu or $TPU_NAME), mirrored on "
    "several GPUs, one_device on one GPU, default on CPU.")
flags.DEFINE_string("tpu", None, "TPU name or grpc:// address; 'local' on a TPU VM. Default: $TPU_NAME.")
flags.DEFINE_list(
    "devices", None,
    "Devices for one_device (one) or mirrored (several), e.g. /gpu:0,/gpu:1. Default: all GPUs, "
    "else the CPU.")
flags.DEFINE_integer(
    "cpu_devices", 0,
    "Split the host CPU into this many logical devices, so mirrored can be tried without "
    "GPUs. 0 leaves the CPU whole.")
flags.DEFINE_enum(
    "precision", "auto", PRECISIONS,
    "Keras dtype policy. auto: mixed_float16 with loss scaling on GPU, mixed_bfloat16 on TPU, "
    "float32 on CPU. Logits and loss are float32 in every case.")
flags.DEFINE_enum(
    "communication", "auto", ("auto", "ring", "nccl"),
    "Cross-worker all-reduce for multi_worker_mirrored: ring (gRPC), nccl (GPUs), or auto.")
flags.DEFINE_integer(
    "collective_timeout", 600,
    "multi_worker_mirrored: seconds a collective may wait for its peers before the job fails; 0 waits forever.")
flags.DEFINE_integer(
    "heartbeat_timeout", 30,
    "multi_worker_mirrored: seconds without a heartbeat after which a worker counts as dead and the job fails.")
flags.DEFINE_bool(
    "jit_compile", None,
    "Compile the training and evaluation steps with XLA. Default: on for GPU, off for CPU (XLA's CPU "
    "convolutions measured 2x slower here); TPUs always compile.")

# Optimisation.
flags.DEFINE_integer("batch_size", 128, "Global batch size, split evenly over all replicas.")
flags.DEFINE_integer("epochs", 10, "Training epochs (for resnet50: epochs of the frozen-backbone phase).")
flags.DEFINE_enum("optimizer", "adam", OPTIMIZERS, "Optimizer. adamw and sgd use --weight_decay.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
flags.DEFINE_float("momentum", 0.9, "Momentum for sgd (Nesterov).")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay for adamw and sgd.")
flags.DEFINE_enum(
    "lr_schedule", "constant", LR_SCHEDULES,
    "Learning-rate schedule of each phase after the warmup: constant; cosine decay to zero; step "
    "(divide by 10 at 30%, 60% and 90%); onecycle (linear rise, for 20% of the phase without "
    "--warmup_epochs, then linear decay to zero).")
flags.DEFINE_float("warmup_epochs", 0.0, "Linear learning-rate warmup from zero, in epochs.")
flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing of the training loss (0.1 is typical).")
flags.DEFINE_float("clip_grad_norm", 0.0, "Clip the global gradient norm to this; 0 turns clipping off.")
flags.DEFINE_float(
    "ema_decay", 0.0,
    "Keep an exponential moving average of the weights with this decay (e.g. 0.999) and use it for "
    "evaluation, best-weight selection and the export; 0 turns it off.")
flags.DEFINE_integer(
    "lookahead_steps", 0,
    "Lookahead (hlb-CIFAR10, airbench): every N steps, move a slow copy of the weights toward the weights and "
    "continue training from it. Its decay rises along a cubic ramp over each phase to --lookahead_decay^N, and "
    "the phase ends on the slow weights. 0 turns it off.")
flags.DEFINE_float("lookahead_decay", 0.95, "Per-step decay of --lookahead_steps' slow weights at the end of a phase.")
flags.DEFINE_bool(
    "tta", False,
    "Flip test-time augmentation: evaluate (and export) the average of the predictions for each image "
    "and its mirror image.")
flags.DEFINE_integer(
    "tta_translate", 0,
    "With --tta, also average over the image and its mirror shifted N pixels up-left and down-right (reflect "
    "padding); the shifted views share half the weight, as in airbench's multi-crop TTA. They triple the cost "
    "of an evaluation, so only the final evaluation and the export use them. 0 turns it off.")
flags.DEFINE_integer("seed", 0, "Seed for weights, data order and augmentation.")
flags.DEFINE_integer(
    "early_stopping_patience", 5,
    "Stop a phase after this many epochs without improvement of --early_stopping_monitor, and "
    "finish with the best weights. 0 turns early stopping off.")
flags.DEFINE_enum(
    "early_stopping_monitor", "eval_accuracy", EARLY_STOPPING_MONITORS,
    "Metric that early stopping and best-weight selection watch.")

# Fine-tuning (resnet50).
flags.DEFINE_integer(
    "fine_tune_epochs", 0,
    "resnet50 only: epochs of a second phase that unfreezes the top --fine_tune_stages stages of "
    "the backbone. BatchNorm stays in inference mode.")
flags.DEFINE_float(
    "fine_tune_learning_rate", None, "Peak learning rate of the fine-tuning phase. Default: --learning_rate / 10.")
flags.DEFINE_integer(
    "fine_tune_stages", 2,
    "How many of ResNet50's five stages, counted from the top, the fine-tuning phase unfreezes "
    "(5 unfreezes everything).")

# Augmentation, applied on the accelerator.
flags.DEFINE_bool("random_flip", True, "Random horizontal flips.")
flags.DEFINE_bool(
    "alternating_flip", False,
    "With --random_flip: flip a random half of the examples in the first epoch and flip each example in every "
    "other epoch after that (airbench), so every example is seen both ways every two epochs.")
flags.DEFINE_float(
    "brightness", 0.2, "Maximum random brightness change, as a fraction of the pixel range; 0 turns it off.")
flags.DEFINE_integer("translate", 0, "Random translation of up to this many pixels (reflect padding); 0 turns it off.")
flags.DEFINE_integer(
    "augment_views", 0,
    "0: every step draws a fresh random transform. N > 0: each example gets N fixed transforms and uses one "
    "of them per epoch, which lets --cache_features compute a frozen backbone's features once per view.")
flags.DEFINE_bool(
    "cache_features", False,
    "While the backbone is frozen (resnet50 before fine-tuning), compute its features once per augmentation "
    "view and train the head on them; later epochs then cost almost nothing. Needs --augment_views when "
    "augmenting, and no mixup/CutMix.")
flags.DEFINE_float("mixup", 0.0, "Mixup with Beta(alpha, alpha) blending (0.2 is typical); 0 turns it off.")
flags.DEFINE_float(
    "cutmix", 0.0, "CutMix with Beta(alpha, alpha) box sizes (1.0 is typical); 0 turns it off. With --mixup, "
    "each batch uses one of the two.")

# Loop, checkpoints and outputs.
flags.DEFINE_string(
    "model_dir", None,
    "Where checkpoints, logs, the export and metrics go. Default: $AIP_MODEL_DIR when set "
    "(Vertex AI), else a fresh timestamped directory under ./runs.")
flags.DEFINE_integer("steps_per_epoch", None, "Cap on training steps per epoch, for smoke runs.")
flags.DEFINE_integer(
    "steps_per_loop", 50, "Training steps per tf.function call; progress and NaN checks happen between calls.")
flags.DEFINE_list(
    "profile_steps", None,
    "Two global steps A,B: capture a TensorFlow profiler trace from step A to step B into the TensorBoard "
    "logs (view it with the tensorboard-plugin-profile package).")
flags.DEFINE_integer(
    "checkpoint_steps", 0,
    "Also checkpoint every this many steps (rounded up to a whole loop); 0 checkpoints once per epoch.")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs, validated; made by `build_config` or `config_from_flags`."""

    recipe: str | None
    model: str
    weights: str
    image_size: int | None
    dropout: float
    dataset: str
    data_dir: str | None
    train_split: str
    eval_split: str
    strategy: str
    tpu: str | None
    devices: tuple[str, ...]
    cpu_devices: int
    precision: str
    communication: str
    collective_timeout: int
    heartbeat_timeout: int
    jit_compile: bool | None
    batch_size: int
    epochs: int
    optimizer: str
    learning_rate: float
    momentum: float
    weight_decay: float
    lr_schedule: str
    warmup_epochs: float
    label_smoothing: float
    clip_grad_norm: float
    ema_decay: float
    lookahead_steps: int
    lookahead_decay: float
    tta: bool
    tta_translate: int
    seed: int
    early_stopping_patience: int
    early_stopping_monitor: str
    fine_tune_epochs: int
    fine_tune_learning_rate: float
    fine_tune_stages: int
    random_flip: bool
    alternating_flip: bool
    brightness: float
    translate: int
    augment_views: int
    cache_features: bool
    mixup: float
    cutmix: float
    model_dir: str
    steps_per_epoch: int | None
    steps_per_loop: int
    checkpoint_steps: int
    profile_steps: tuple[int, int] | None

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.fine_tune_epochs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_config(**values) -> Config:
    """The flags' defaults overridden by `values`, with model-dependent defaults filled in; validated."""
    names = [field.name for field in dataclasses.fields(Config)]
    unknown = set(values) - set(names)
    if unknown:
        raise TypeError(f"Unknown config fields: {sorted(unknown)}")
    merged = {name: FLAGS[name].default for name in names}
    recipe = values.get("recipe")
    if recipe is not None:
        if recipe not in recipes.RECIPES:
            raise UsageError(f"--recipe={recipe} is unknown; choose one of {', '.join(recipes.RECIPES)}.")
        merged.update(recipes.RECIPES[recipe]["flags"])
    merged.update(values)
    merged["devices"] = tuple(merged["devices"] or ())
    merged["profile_steps"] = _profile_steps(merged["profile_steps"])
    merged["tpu"] = merged["tpu"] or os.environ.get("TPU_NAME") or None
    if merged["weights"] is None:
        merged["weights"] = "imagenet" if merged["model"] == "resnet50" else "none"
    if merged["image_size"] is None:
        merged["image_size"] = DEFAULT_IMAGE_SIZE.get(merged["model"])
    if merged["fine_tune_learning_rate"] is None:
        merged["fine_tune_learning_rate"] = merged["learning_rate"] / 10
    if not merged["model_dir"]:
        merged["model_dir"] = default_model_dir(merged["model"])
    config = Config(**merged)
    validate(config)
    return config


def config_from_flags(flag_values=FLAGS) -> Config:
    """The run configuration the parsed command line asks for: defaults, then the recipe, then the
    flags given explicitly (on the command line or in a --flagfile)."""
    return build_config(**{field.name: flag_values[field.name].value for field in dataclasses.fields(Config)
                           if flag_values[field.name].present or field.name == "recipe"})


def _profile_steps(value) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        first, last = (int(step) for step in value)
    except ValueError as error:
        raise UsageError(f"--profile_steps={','.join(map(str, value))} must be two step numbers A,B "
                         "(e.g. 100,110).") from error
    if not 0 < first <= last:
        raise UsageError(f"--profile_steps={first},{last} needs 0 < A <= B.")
    return first, last


def default_model_dir(model: str) -> str:
    """Vertex AI's output directory when it set one, else a new timestamped local directory."""
    if os.environ.get("AIP_MODEL_DIR"):
        return os.environ["AIP_MODEL_DIR"]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{model}-{stamp}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def validate(config: Config) -> None:
    """Rejects values no run could use, naming the flag and what is allowed."""
    _require(config.model in MODELS, f"--model={config.model} is unknown; choose one of {', '.join(MODELS)}.")
    _require(config.batch_size > 0, f"--batch_size={config.batch_size} must be a positive integer.")
    _require(config.epochs >= 0, f"--epochs={config.epochs} must be zero or more.")
    _require(config.fine_tune_epochs >= 0, f"--fine_tune_epochs={config.fine_tune_epochs} must be zero or more.")
    _require(config.learning_rate > 0, f"--learning_rate={config.learning_rate} must be positive.")
    _require(config.fine_tune_learning_rate > 0,
             f"--fine_tune_learning_rate={config.fine_tune_learning_rate} must be positive.")
    _require(config.steps_per_loop > 0, f"--steps_per_loop={config.steps_per_loop} must be at least 1.")
    _require(config.steps_per_epoch is None or config.steps_per_epoch > 0,
             f"--steps_per_epoch={config.steps_per_epoch} must be at least 1 (leave it out for whole epochs).")
    _require(config.checkpoint_steps >= 0, f"--checkpoint_steps={config.checkpoint_steps} must be zero or more.")
    _require(config.collective_timeout >= 0, f"--collective_timeout={config.collective_timeout} must be 0 or more.")
    _require(config.heartbeat_timeout > 0, f"--heartbeat_timeout={config.heartbeat_timeout} must be positive.")
    _require(config.cpu_devices >= 0, f"--cpu_devices={config.cpu_devices} must be zero or more.")
    _require(config.early_stopping_patience >= 0,
             f"--early_stopping_patience={config.early_stopping_patience} must be zero (off) or more.")
    _require(0 <= config.dropout < 1, f"--dropout={config.dropout} must be in [0, 1).")
    _require(0 <= config.brightness <= 1, f"--brightness={config.brightness} must be in [0, 1].")
    _require(config.translate >= 0, f"--translate={config.translate} must be zero or more pixels.")
    _require(0 <= config.label_smoothing < 1, f"--label_smoothing={config.label_smoothing} must be in [0, 1).")
    _require(config.clip_grad_norm >= 0, f"--clip_grad_norm={config.clip_grad_norm} must be zero (off) or more.")
    _require(0 <= config.ema_decay < 1, f"--ema_decay={config.ema_decay} must be in [0, 1), e.g. 0.999.")
    _require(config.lookahead_steps >= 0, f"--lookahead_steps={config.lookahead_steps} must be zero (off) or more.")
    _require(0 < config.lookahead_decay < 1, f"--lookahead_decay={config.lookahead_decay} must be in (0, 1).")
    _require(config.tta_translate >= 0, f"--tta_translate={config.tta_translate} must be zero (off) or more pixels.")
    _require(config.tta or not config.tta_translate, f"--tta_translate={config.tta_translate} needs --tta.")
    _require(config.random_flip or not config.alternating_flip, "--alternating_flip needs --random_flip.")
    _require(not (config.alternating_flip and config.augment_views),
             "--alternating_flip and --augment_views both fix each example's flips; use one of them.")
    _require(config.mixup >= 0 and config.cutmix >= 0,
             f"--mixup={config.mixup} and --cutmix={config.cutmix} must be zero (off) or positive.")
    _require(config.augment_views >= 0, f"--augment_views={config.augment_views} must be zero or more.")
    _validate_feature_cache(config)
    _require(config.warmup_epochs >= 0, f"--warmup_epochs={config.warmup_epochs} must be zero or more.")
    _require(config.weight_decay >= 0, f"--weight_decay={config.weight_decay} must be zero or more.")
    _require(1 <= config.fine_tune_stages <= 5, f"--fine_tune_stages={config.fine_tune_stages} must be 1 to 5.")
    _require(config.image_size is None or config.image_size >= 32,
             f"--image_size={config.image_size} must be at least 32.")
    _require(config.fine_tune_epochs == 0 or config.model == "resnet50",
             f"--fine_tune_epochs applies to --model=resnet50 only, not --model={config.model}.")
    _validate_weights(config)


def _validate_feature_cache(config: Config) -> None:
    if not config.cache_features:
        return
    _require(config.model == "resnet50", f"--cache_features needs a frozen backbone; --model={config.model} has none.")
    _require(config.mixup == 0 and config.cutmix == 0,
             "--cache_features cannot reproduce --mixup/--cutmix, which blend pixels before the backbone; turn "
             "them off or drop --cache_features.")
    augmenting = config.random_flip or config.brightness > 0 or config.translate > 0
    _require(config.augment_views > 0 or not augmenting,
             "--cache_features with augmentation needs --augment_views=N (e.g. 2): features can be cached for a "
             "finite set of views only.")


def _validate_weights(config: Config) -> None:
    if config.weights in ("none", "imagenet"):
        _require(config.weights == "none" or config.model == "resnet50",
                 f"--weights=imagenet: --model={config.model} has no ImageNet weights; use --weights=none "
                 "or a weights file.")
        return
    _require(os.path.isfile(config.weights),
             f"--weights={config.weights}: no such file; give 'imagenet', 'none' or the path of a weights file.")


HELP_FLAGS = ("--help", "-help", "--helpshort", "--helpfull", "--helpxml", "-?", "-h")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags parser that reports a bad flag in one line and exits 2, and exits 0 after --help."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as exit_request:
        # absl exits 1 after printing help; asking for help is not a failure.
        if exit_request.code == 1 and any(argument.split("=")[0] in HELP_FLAGS for argument in argv[1:]):
            sys.exit(0)
        raise
