"""Prediction requests as clients send them (TF Serving / Vertex AI JSON): checked, and decoded into images.

Every refusal is a RequestError with an HTTP status and a message that names the instance at fault.
"""

import base64
import binascii
import dataclasses
import io
import json
import warnings

import numpy as np
from PIL import Image

from trainer import image_files
from trainer.errors import one_line

# The server enforces its own, lower limit (--max_image_pixels) right after reading an image's header, before
# decoding; Pillow's warning for large images would only repeat it.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
JSON_TYPE = "application/json"
SUPPORTED_FORMATS = image_files.SUPPORTED_FORMATS
INSTANCE_FORMS = '{"b64": "<base64 file bytes>"} or {"image_bytes": {"b64": "<base64 file bytes>"}}'


class RequestError(Exception):
    """A request the server refuses: `status` is the HTTP status (4xx), the message says what to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
    max_request_bytes: int
    max_instances: int
    max_image_pixels: int


def check_content_type(content_type: str | None) -> None:
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != JSON_TYPE:
        raise RequestError(415, f"the body must be JSON with Content-Type: {JSON_TYPE}, not "
                                f"{content_type or 'no Content-Type'}.")


def check_length(content_length: str | None, limits: Limits) -> None:
    """Refuses a body that says it is too large before any of it is read."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limits.max_request_bytes:
        raise too_large(int(content_length), limits)


def too_large(size: int, limits: Limits, complete: bool = True) -> RequestError:
    """`size` is the body's whole length, or, when not `complete`, as much of it as had arrived."""
    amount = f"{size:,} bytes" if complete else f"at least {size:,} bytes"
    return RequestError(413, f"the request body has {amount}, more than --max_request_bytes="
                             f"{limits.max_request_bytes:,}; send fewer or smaller images per request.")


def parse_body(body: bytes, limits: Limits, num_classes: int, default_top_k: int) -> tuple[list[bytes], int]:
    """The image files of the request's instances, and the top_k it asks for."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(400, f"the body is not valid JSON ({error}).") from error
    except RecursionError as error:  # Raised by the parser itself, before any of our code sees the value.
        raise RequestError(400, "the body's JSON is nested too deeply; a request is "
                                '{"instances": [...]} with one level per instance.') from error
    if not isinstance(request, dict) or "instances" not in request:
        raise RequestError(400, 'the body must be a JSON object {"instances": [...]}, each instance '
                                f"{INSTANCE_FORMS}.")
    unknown = sorted(set(request) - {"instances", "parameters"})
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r} in the body; it holds \"instances\" and optionally "
                                "\"parameters\".")
    instances = request["instances"]
    if not isinstance(instances, list) or not instances:
        raise RequestError(400, f'"instances" must be a non-empty list, each instance {INSTANCE_FORMS}.')
    if len(instances) > limits.max_instances:
        raise RequestError(413, f"the request has {len(instances)} instances, more than --max_instances="
                                f"{limits.max_instances}; split it into several requests.")
    return [instance_bytes(index, instance) for index, instance in enumerate(instances)], \
        requested_top_k(request.get("parameters"), num_classes, default_top_k)


def instance_bytes(index: int, instance) -> bytes:
    """The file bytes of one instance, in either of TF Serving's forms for a binary input."""
    if isinstance(instance, dict) and set(instance) == {"image_bytes"}:
        instance = instance["image_bytes"]
    if not (isinstance(instance, dict) and set(instance) == {"b64"} and isinstance(instance["b64"], str)):
        raise RequestError(400, f"instances[{index}] must be {INSTANCE_FORMS}; got {_preview(instance)}.")
    try:
        data = base64.b64decode(instance["b64"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(400, f"instances[{index}]: b64 is not valid base64 ({error}).") from error
    if not data:
        raise RequestError(400, f"instances[{index}]: b64 holds no bytes; send the image file's contents.")
    return data


def too_many_pixels(index: int, declared: str, limits: Limits) -> RequestError:
    return RequestError(400, f"instances[{index}]: the image declares {declared}, more than --max_image_pixels="
                             f"{limits.max_image_pixels:,}; it is refused before decoding (a small file can declare a "
                             "huge image). Send a smaller image.")


def _preview(value) -> str:
    try:
        text = json.dumps(value)
    except RecursionError:
        return "a deeply nested value"
    return text if len(text) <= 60 else text[:57] + "..."


def requested_top_k(parameters, num_classes: int, default_top_k: int) -> int:
    if parameters is None:
        return min(default_top_k, num_classes)
    if not isinstance(parameters, dict) or set(parameters) - {"top_k"}:
        raise RequestError(400, '"parameters" may only hold "top_k", the number of classes to rank per instance.')
    top_k = parameters.get("top_k", default_top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_classes:
        raise RequestError(400, f'"parameters": top_k must be an integer from 1 to {num_classes} (the model\'s '
                                f"classes), not {_preview(top_k)}.")
    return top_k


def decode_images(files: list[bytes], image_shape: tuple[int, int, int], limits: Limits) -> np.ndarray:
    """The instances as uint8 [N, H, W, C] at the model's size, made exactly as trainer.predict makes them."""
    return np.stack([decode_image(index, data, image_shape, limits) for index, data in enumerate(files)])


def decode_image(index: int, data: bytes, image_shape: tuple[int, int, int], limits: Limits) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # Read from the header: nothing is decoded yet.
            image_format = image.format
    except Image.UnidentifiedImageError as error:
        raise RequestError(400, f"instances[{index}]: not an image file ({len(data):,} bytes that Pillow cannot "
                                f"read; {image_files.SUPPORTED_FORMATS_TEXT} expected).") from error
    except Image.DecompressionBombError as error:  # Pillow's own limit, far above ours: refused all the same.
        raise too_many_pixels(index, "more pixels than Pillow allows", limits) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise RequestError(400, f"instances[{index}]: cannot read the image ({one_line(error, 200)}).") from error
    if image_format not in SUPPORTED_FORMATS:
        raise RequestError(400, f"instances[{index}]: {image_format} images are not supported; send "
                                f"{image_files.SUPPORTED_FORMATS_TEXT}.")
    if width * height > limits.max_image_pixels:
        raise too_many_pixels(index, f"{width:,}x{height:,} pixels", limits)
    try:
        return image_files.load_image(io.BytesIO(data), image_shape)
    except (OSError, ValueError, SyntaxError) as error:
        raise RequestError(400, f"instances[{index}]: cannot decode the image ({one_line(error, 200)}); is the file "
                                "complete?") from error
