"""The export's image-bytes signature: files in, the same answers as trainer.predict, in TensorFlow ops only."""

import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import run_in_process
from test_serve import served_run  # noqa: F401  (the session's one trained run, shared with the server tests)
from trainer.training import graph_images
from trainer.image_files import load_image
from trainer.results import predict


def save(path, pixels, **options):
    Image.fromarray(pixels).save(path, **options)
    return path


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """PNG, JPEG, greyscale, transparent and 16-bit files of odd sizes, larger and smaller than 32x32."""
    folder = tmp_path_factory.mktemp("signature-images")
    random = np.random.default_rng(3)
    smooth = np.kron(random.integers(0, 256, (12, 9, 3), np.uint8), np.ones((25, 25, 1), np.uint8))
    return [
        save(folder / "colour.png", random.integers(0, 256, (47, 61, 3), np.uint8)),
        save(folder / "photo.jpg", smooth, quality=90),
        save(folder / "grey.png", random.integers(0, 256, (20, 13), np.uint8)),
        save(folder / "grey.jpg", smooth[..., 0], quality=90),
        save(folder / "alpha.png", random.integers(0, 256, (33, 90, 4), np.uint8)),
        save(folder / "deep.png", random.integers(0, 65536, (40, 40), np.uint16)),
    ]


@pytest.mark.parametrize("image_shape", [(32, 32, 3), (16, 16, 1)])
def test_the_graph_decodes_images_as_trainer_predict_does(image_files, image_shape):
    """Pillow's resampling reproduced in the graph: box to shrink, bicubic to enlarge, alpha over white, greyscale to
    RGB. Colour pixels agree to one level (rounding); a greyscale model's pixels from colour JPEGs differ a little
    more, as Pillow has libjpeg decode those straight to grey."""
    for path in image_files:
        in_graph = graph_images.decode_image(tf.constant(path.read_bytes()), image_shape).numpy()
        expected = load_image(str(path), image_shape)
        assert in_graph.shape == expected.shape == image_shape, path.name
        difference = np.abs(in_graph.astype(int) - expected.astype(int))
        if image_shape[-1] == 3:
            assert difference.max() <= 1, (path.name, difference.max())
        else:
            assert difference.mean() < 0.5 and difference.max() <= 16, (path.name, difference.mean())


def graph_op_types(function) -> set[str]:
    """Every op type in a concrete function's graph and the functions it calls (map_fn's loop body, ...)."""
    graph_def = function.graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for library_function in graph_def.library.function:
        types |= {node.op for node in library_function.node_def}
    return types


def test_the_default_signature_takes_image_files_and_agrees_with_trainer_predict(served_run, image_files,  # noqa: F811
                                                                                  capsys):
    """The default signature classifies the files themselves, with TensorFlow ops only (no Python callbacks, so
    TF Serving and Vertex AI's prebuilt containers run it as is); its top-1 is trainer.predict's on every file."""
    export_dir = served_run / "export"
    loaded = tf.saved_model.load(str(export_dir))
    default = loaded.signatures["serving_default"]
    assert {name: (spec.dtype, spec.shape.as_list()) for name, spec in default.structured_input_signature[1].items()
            } == {"image_bytes": (tf.string, [None])}
    serve_input = loaded.signatures["serve"].structured_input_signature[1]["images"]
    assert (serve_input.dtype, serve_input.shape.as_list()) == (tf.uint8, [None, 32, 32, 3])  # Unchanged.
    op_types = graph_op_types(default)
    assert {"DecodeImage", "DecodeJpeg", "Einsum", "Conv2D", "Softmax"} <= op_types  # The whole path is seen...
    assert not op_types & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}  # ...and none of it calls back into Python.
    outputs = default(image_bytes=tf.constant([path.read_bytes() for path in image_files]))

    with pytest.raises(SystemExit) as exit_info:
        run_in_process(predict, f"--model_dir={served_run}", "--output=json", "--top_k=10", *map(str, image_files))
    assert exit_info.value.code == 0
    expected = {record["path"]: record["predictions"] for record in json.loads(capsys.readouterr().out)}
    labels = (export_dir / "assets.extra" / "labels.txt").read_text().split()
    for path, scores, classes in zip(image_files, outputs["scores"].numpy(), outputs["classes"].numpy()):
        assert [name.decode() for name in classes] == labels
        assert scores.sum() == pytest.approx(1.0, abs=1e-4)
        ranked = expected[str(path)]
        assert labels[int(np.argmax(scores))] == ranked[0]["class"], path.name
        by_class = {item["class"]: item["probability"] for item in ranked}
        assert scores == pytest.approx([by_class[name] for name in labels], abs=0.02), path.name


def test_the_signature_refuses_bytes_that_are_no_image(served_run):  # noqa: F811
    loaded = tf.saved_model.load(str(served_run / "export"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?i)unknown image file format"):
        loaded.signatures["serving_default"](image_bytes=tf.constant([b"not an image"]))
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, "PNG")
    outputs = loaded.signatures["serving_default"](image_bytes=tf.constant([png.getvalue()] * 3))
    assert outputs["scores"].shape == (3, 10) and outputs["classes"].shape == (3, 10)
