"""Training-time augmentation that runs inside the step, on the accelerator, with stateless seeds."""

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    random_flip: bool = True
    brightness: float = 0.0  # Largest brightness change, as a fraction of the 0-255 range.
    translate: int = 0  # Largest shift in pixels, with reflect padding.

    @property
    def enabled(self) -> bool:
        return self.random_flip or self.brightness > 0 or self.translate > 0


def step_seed(base_seed: int, step: tf.Tensor) -> tf.Tensor:
    """A seed unique to (run seed, step, replica), so augmentation is reproducible after a resume."""
    replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
    seed = tf.random.experimental.stateless_fold_in(tf.constant([base_seed, 0], tf.int64), step)
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(replica_id, tf.int64))


def augment(images: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Augments a batch of float 0-255 images [B, H, W, C]; every image draws its own transform."""
    flip_seed, brightness_seed, translate_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    if config.random_flip:
        images = tf.image.stateless_random_flip_left_right(images, flip_seed)
    if config.translate > 0:
        images = random_translate(images, config.translate, translate_seed)
    if config.brightness > 0:
        batch_size = tf.shape(images)[0]
        delta = 255.0 * config.brightness
        shift = tf.random.stateless_uniform([batch_size, 1, 1, 1], brightness_seed, -delta, delta, images.dtype)
        images = tf.clip_by_value(images + shift, 0.0, 255.0)
    return images


def random_translate(images: tf.Tensor, max_shift: int, seed: tf.Tensor) -> tf.Tensor:
    """Shifts each image by its own random offset in [-max_shift, max_shift], reflecting at the border.

    Two batched gathers instead of per-image crops keep it one fused op on GPU and TPU.
    """
    batch_size, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    padded = tf.pad(images, [[0, 0], [max_shift, max_shift], [max_shift, max_shift], [0, 0]], mode="REFLECT")
    offsets = tf.random.stateless_uniform([2, batch_size, 1], seed, 0, 2 * max_shift + 1, tf.int32)
    rows = offsets[0] + tf.range(height)[tf.newaxis, :]
    columns = offsets[1] + tf.range(width)[tf.newaxis, :]
    shifted = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(shifted, columns, axis=2, batch_dims=1)
