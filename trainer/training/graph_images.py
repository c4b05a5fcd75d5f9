"""Image files decoded and resized inside a TensorFlow graph exactly as image_files.load_image does with Pillow.

The export's image-bytes signature uses it, so that TF Serving and Vertex AI's prebuilt containers, which run no
Python of ours, give the answers trainer.predict and trainer.serve give. Pillow's resampling is reproduced, not
approximated: per axis, the same filter weights (box to shrink, bicubic to enlarge), the same windows at the edges,
the same order of its two passes and rounding after each; JPEGs are decoded at the reduced scale Pillow's draft mode
picks.
The one difference: EXIF orientation tags are not applied (Pillow's exif_transpose), so a photo a camera stored
sideways is classified sideways.
"""

import tensorflow as tf

# trainer.predict composites transparent pixels over white, as training images had no transparency.
BACKGROUND = 255.0
JPEG_DRAFT_RATIOS = (1, 2, 4, 8)
# Pillow's filters: support (in input pixels at scale 1) and the weight at a distance.
BOX_SUPPORT, BICUBIC_SUPPORT, BICUBIC_A = 0.5, 2.0, -0.5


def decode_image(data: tf.Tensor, image_shape: tuple[int, int, int]) -> tf.Tensor:
    """One encoded image file (PNG, JPEG, GIF, BMP) as uint8 [H, W, C] at the model's size."""
    height, width, channels = image_shape
    image = tf.cast(_decode(data, height, width), tf.float32)
    found = tf.shape(image)[-1]
    # 1 channel: grey; 2: grey + alpha; 3: RGB; 4: RGB + alpha.
    colour = tf.cond(found < 3, lambda: tf.repeat(image[..., :1], 3, axis=-1), lambda: image[..., :3])
    alpha = tf.cond(found % 2 == 0, lambda: image[..., -1:] / 255.0, lambda: tf.ones_like(image[..., :1]))
    colour = _round(colour * alpha + BACKGROUND * (1.0 - alpha))
    if channels == 1:
        colour = _round(tf.image.rgb_to_grayscale(colour))
    size = tf.shape(colour)[:2]
    shrinking = tf.logical_and(size[0] >= height, size[1] >= width)
    resized = tf.cond(shrinking, lambda: _resize(colour, height, width, _box, BOX_SUPPORT),
                      lambda: _resize(colour, height, width, _bicubic, BICUBIC_SUPPORT))
    return tf.cast(resized, tf.uint8)


def _decode(data: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """A JPEG at the smallest of 1/1, 1/2, 1/4, 1/8 scale still at least the target size (Pillow's draft mode,
    through the same libjpeg scaling); any other format at full size."""
    def jpeg():
        shape = tf.io.extract_jpeg_shape(data)
        scale = tf.minimum(shape[1] // width, shape[0] // height)
        branch = tf.reduce_sum(tf.cast(scale >= tf.constant(JPEG_DRAFT_RATIOS[1:]), tf.int32))
        return tf.switch_case(branch, [lambda ratio=ratio: tf.io.decode_jpeg(data, ratio=ratio,
                                                                              dct_method="INTEGER_ACCURATE")
                                       for ratio in JPEG_DRAFT_RATIOS])

    def other():
        return tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)

    return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def _box(distance: tf.Tensor) -> tf.Tensor:
    return tf.cast((distance > -0.5) & (distance <= 0.5), distance.dtype)


def _bicubic(distance: tf.Tensor) -> tf.Tensor:
    x = tf.abs(distance)
    near = ((BICUBIC_A + 2.0) * x - (BICUBIC_A + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * BICUBIC_A
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def _weights(in_size: tf.Tensor, out_size: int, kernel, support: float) -> tf.Tensor:
    """[out_size, in_size] resampling weights along one axis, computed as Pillow's precompute_coeffs does, in
    double precision as it does: a pixel centre exactly on a window's edge must fall on the same side."""
    in_float = tf.cast(in_size, tf.float64)
    scale = in_float / out_size
    filter_scale = tf.maximum(scale, 1.0)
    window = support * filter_scale
    centers = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale
    # Pillow truncates toward zero (a C cast) and clips to the image: the window's first and last input pixel.
    first = tf.maximum(tf.cast(tf.cast(centers - window + 0.5, tf.int32), tf.float64), 0.0)
    last = tf.minimum(tf.cast(tf.cast(centers + window + 0.5, tf.int32), tf.float64), in_float)
    pixels = tf.range(in_float)[None, :]
    inside = (pixels >= first[:, None]) & (pixels < last[:, None])
    weights = tf.where(inside, kernel((pixels - centers[:, None] + 0.5) / filter_scale), tf.constant(0.0, tf.float64))
    return tf.cast(weights / tf.reduce_sum(weights, axis=1, keepdims=True), tf.float32)


def _resize(image: tf.Tensor, height: int, width: int, kernel, support: float) -> tf.Tensor:
    """Two passes like Pillow's, each rounded to 8 bits. Pillow (13) runs the vertical pass first when it shrinks
    the image by a larger factor than the horizontal pass does, else the horizontal one (found by comparing
    against it: the order changes the intermediate rounding)."""
    size = tf.shape(image)

    def across(values):
        return _round(tf.einsum("wx,hxc->hwc", _weights(tf.shape(values)[1], width, kernel, support), values))

    def down(values):
        return _round(tf.einsum("hy,ywc->hwc", _weights(tf.shape(values)[0], height, kernel, support), values))

    vertical_first = tf.logical_and(height * size[1] < width * size[0], height < size[0])
    return tf.cond(vertical_first, lambda: across(down(image)), lambda: down(across(image)))


def _round(values: tf.Tensor) -> tf.Tensor:
    """Half up and clipped to 0-255, as Pillow's fixed-point arithmetic rounds."""
    return tf.clip_by_value(tf.floor(values + 0.5), 0.0, 255.0)
