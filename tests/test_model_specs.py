"""One spec per network: the registry config.py and models.py read, and the example model trained for one step."""

import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT
from helpers import make_config
from trainer import config as config_lib
from trainer.training import model_specs
from trainer.training import models
from trainer.training import train


def test_the_specs_load_without_tensorflow():
    code = ("import sys; import trainer.training.model_specs, trainer.config; "
            "print(sorted(name for name in ('tensorflow', 'keras') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(model_specs.SPECS))
def test_every_registered_network_builds_from_its_spec_alone(name):
    spec = model_specs.SPECS[name]
    assert name in config_lib.Config.__dataclass_fields__["model"].metadata["choices"]
    assert f"{name} ({spec.description})" in config_lib.Config.__dataclass_fields__["model"].metadata["help"]
    network = models.build(name, image_shape=(32, 32, 3), num_classes=10, image_size=spec.default_image_size and 32,
                           weights="none", dropout=0.5, unrelated_option=1)
    assert network.model.output.shape == (None, 10) and network.stages == spec.fine_tune_stages
    config = config_lib.build_config(model=name, weights="none", model_dir="unused")
    assert config.image_size == spec.default_image_size
    assert config_lib.build_config(model=name, model_dir="unused").weights == spec.default_weights


def test_a_model_specific_option_names_the_models_it_applies_to():
    with pytest.raises(config_lib.UsageError, match="--fine_tune_epochs applies to --model=resnet50 only, not "
                                                   "--model=linear"):
        config_lib.build_config(model="linear", fine_tune_epochs=1, model_dir="unused")
    with pytest.raises(config_lib.UsageError, match="--model=airbench has no ImageNet weights"):
        config_lib.build_config(model="airbench", weights="imagenet", model_dir="unused")
    # A recipe's model-specific option stays with its own network.
    assert config_lib.build_config(recipe="fast", model="linear", model_dir="unused").whiten_bias_epochs == 0


def test_a_spec_may_only_list_known_model_specific_options():
    with pytest.raises(ValueError, match="not in MODEL_SPECIFIC_OPTIONS"):
        model_specs.ModelSpec(name="x", description="x", builder="x:y", options=frozenset({"dropout"}))


def test_the_example_model_trains_one_step_through_the_trainer(cifar_dir, tmp_path):
    config = make_config(cifar_dir, tmp_path, model="linear", steps_per_epoch=1, steps_per_loop=1,
                         train_split="train[:64]", eval_split="test[:64]")
    metrics = train.run(config)
    assert metrics["history"][0]["epoch"] == 1 and np.isfinite(metrics["test_loss"])
    assert metrics["num_parameters"] == 32 * 32 * 3 * 10 + 10
