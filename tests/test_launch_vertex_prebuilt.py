"""deploy --prebuilt: our export loads and answers in the TensorFlow of the default prebuilt prediction container.

Slow: it installs that TensorFlow (tensorflow-cpu 2.15, which has wheels for Python 3.9 to 3.11) from PyPI into a
virtual environment of its own. SavedModels are not promised to load in an older TensorFlow than wrote them, so
this is the only evidence that the default --prebuilt_version serves what trainer.task exports.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from launch import vertex_deploy

ANSWER = """
import json, sys
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
signature = model.signatures["serving_default"]
with open(sys.argv[2], "rb") as image:
    outputs = signature(image_bytes=tf.constant([image.read()]))
print(json.dumps({"version": tf.__version__, "scores": outputs["scores"].numpy().tolist(),
                  "classes": [name.decode() for name in outputs["classes"].numpy()[0]]}))
"""


@pytest.mark.slow
def test_export_answers_in_the_default_prebuilt_tensorflow(tiny_run, tmp_path):
    model_dir, _ = tiny_run
    version = vertex_deploy.FLAGS["prebuilt_version"].default.replace("-", ".")
    environment = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(environment)], check=True, timeout=120)
    python = str(environment / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", f"tensorflow-cpu=={version}.*"],
                             capture_output=True, text=True, timeout=1800)
    assert install.returncode == 0, install.stderr[-2000:]
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(image)
    result = subprocess.run([python, "-c", ANSWER, str(model_dir / "export"), str(image)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["version"].startswith(version)
    (scores,) = answer["scores"]
    assert len(scores) == 10 and abs(sum(scores) - 1) < 1e-3
    assert len(answer["classes"]) == 10 and "cat" in answer["classes"]
