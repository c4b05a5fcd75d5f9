"""Every network the trainer knows, one ModelSpec each: what config.py checks and models.py builds from."""

import dataclasses

# Options that apply to some networks only, each with the value that means "not used": given another value
# with a network whose spec does not list it, the option is an error (a recipe's value is dropped instead).
MODEL_SPECIFIC_OPTIONS = {"whiten_bias_epochs": 0, "fine_tune_epochs": 0, "cache_features": False}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One network, free of TensorFlow so the configuration can read it without importing it.

    builder and hooks are "module:name" paths that models.py imports when it builds the network.
    builder(image_shape, num_classes, image_size, weights, **{option: value for option in builder_options})
    returns a network.Network; hooks, when set, is a class taking (network, config, steps_per_epoch) with the
    methods of models.TrainingHooks, which the training loop calls.
    """

    name: str
    description: str
    builder: str
    builder_options: tuple[str, ...] = ()
    default_image_size: int | None = None  # None: the dataset's own size.
    default_weights: str = "none"
    imagenet_weights: bool = False
    fine_tune_stages: tuple[str, ...] = ()  # The backbone's stages, bottom to top; fine-tuning unfreezes the top ones.
    options: frozenset[str] = frozenset()  # Which of MODEL_SPECIFIC_OPTIONS apply to it.
    hooks: str | None = None

    def __post_init__(self):
        unknown = set(self.options) - set(MODEL_SPECIFIC_OPTIONS)
        if unknown:
            raise ValueError(f"{self.name}: {sorted(unknown)} are not in MODEL_SPECIFIC_OPTIONS.")


CNN = ModelSpec(
    name="cnn", description="the notebook's 2x[Conv 3x3 + MaxPool] (32, 64) -> Dense 128 -> Dropout -> Dense",
    builder="trainer.training.models:build_cnn", builder_options=("dropout",))

RESNET50 = ModelSpec(
    name="resnet50",
    description="ImageNet ResNet50 without top, frozen with BatchNorm in inference mode -> GlobalAveragePooling -> "
                "Dense 128 -> Dense",
    builder="trainer.training.models:build_resnet50", default_image_size=224, default_weights="imagenet",
    imagenet_weights=True, fine_tune_stages=("conv1", "conv2", "conv3", "conv4", "conv5"),
    options=frozenset({"fine_tune_epochs", "cache_features"}))

AIRBENCH = ModelSpec(
    name="airbench", description="airbench94's patch-whitened fast network, trained from scratch",
    builder="trainer.training.airbench:build_airbench", options=frozenset({"whiten_bias_epochs"}),
    hooks="trainer.training.airbench:WhiteningBiasWindow")

LINEAR = ModelSpec(
    name="linear", description="one Dense layer on the pixels: the smallest network, the example for adding one",
    builder="trainer.training.linear:build_linear")

# The registry: --model's choices, in the order --help lists them.
SPECS = {spec.name: spec for spec in (CNN, RESNET50, AIRBENCH, LINEAR)}


def describe() -> str:
    """--model's help: each network and what it is."""
    return ", ".join(f"{spec.name} ({spec.description})" for spec in SPECS.values())


def models_taking(option: str) -> tuple[str, ...]:
    """The networks that a model-specific option applies to."""
    return tuple(name for name, spec in SPECS.items() if option in spec.options)
