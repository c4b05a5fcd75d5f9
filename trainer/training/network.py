"""What every model builder returns: the model and its parts (Network), and loading a weights file into it."""

import collections.abc
import dataclasses

import keras

from trainer.errors import UsageError
from trainer.errors import one_line


@dataclasses.dataclass
class Network:
    """A model plus the pretrained backbone inside it, when it has one.

    `fit_to_data`, when set, is called once before a new run trains, with a sample of training
    images (uint8, [N, H, W, C]); a network uses it to set weights from data statistics.
    """

    model: keras.Model
    backbone: keras.Model | None = None
    fit_to_data: collections.abc.Callable | None = None
    # For networks with a frozen backbone: model(x) == head(features(x)), so the head can be trained
    # on features computed once.
    features: keras.Model | None = None
    head: keras.Model | None = None
    # The backbone's stages bottom to top, as layer-name prefixes; fine-tuning unfreezes the top ones.
    stages: tuple[str, ...] = ()


def load_model_weights(model: keras.Model, weights: str) -> None:
    if weights == "none":
        return
    try:
        model.load_weights(weights)
    except Exception as error:  # Keras raises ValueError, KeyError or OSError for a wrong file.
        raise UsageError(f"--weights={weights} does not match --model={model.name}: {one_line(error)}") \
            from error
