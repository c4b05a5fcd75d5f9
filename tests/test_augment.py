"""Device-side augmentation: each transform does what it says, per image, reproducibly."""

import numpy as np
import tensorflow as tf

from trainer import augment


def ramp_images(batch=16, size=8):
    """Images whose pixel value is its column index, so flips and shifts are easy to see."""
    row = np.arange(size, dtype=np.float32)
    return tf.constant(np.broadcast_to(row[None, None, :, None], (batch, size, size, 3)).copy())


def seed(value=0):
    return tf.constant([value, 0], tf.int64)


def test_flip_mirrors_some_images_and_leaves_the_others():
    images = ramp_images()
    flipped = augment.augment(images, seed(), augment.AugmentConfig(random_flip=True)).numpy()
    mirrored = [np.array_equal(image, images[0].numpy()[:, ::-1]) for image in flipped]
    unchanged = [np.array_equal(image, images[0].numpy()) for image in flipped]
    assert all(m or u for m, u in zip(mirrored, unchanged))
    assert 0 < sum(mirrored) < len(flipped)


def test_brightness_shifts_each_image_uniformly_within_bounds_and_clips():
    images = tf.fill([32, 4, 4, 3], 128.0)
    brightened = augment.augment(images, seed(), augment.AugmentConfig(random_flip=False, brightness=0.2)).numpy()
    shifts = brightened[:, 0, 0, 0] - 128.0
    assert np.all(np.abs(shifts) <= 0.2 * 255 + 1e-4)
    assert np.std(shifts) > 5
    np.testing.assert_allclose(brightened, brightened[:, :1, :1, :1] * np.ones_like(brightened))
    saturated = augment.augment(tf.fill([32, 2, 2, 3], 250.0), seed(),
                                augment.AugmentConfig(random_flip=False, brightness=0.5)).numpy()
    assert saturated.max() <= 255.0 and saturated.min() >= 0.0


def test_translate_shifts_each_image_by_at_most_the_limit():
    images = ramp_images(batch=64, size=16)
    shifted = augment.augment(images, seed(), augment.AugmentConfig(random_flip=False, translate=3)).numpy()
    offsets = shifted[:, 8, 8, 0] - 8.0  # Away from the border the ramp moves by the shift.
    assert set(offsets.tolist()) <= set(range(-3, 4)) and len(set(offsets.tolist())) > 3
    assert shifted.shape == images.shape


def test_same_seed_same_augmentation_and_new_seed_new_augmentation():
    config = augment.AugmentConfig(random_flip=True, brightness=0.1, translate=2)
    images = ramp_images()
    first = augment.augment(images, seed(1), config).numpy()
    np.testing.assert_array_equal(first, augment.augment(images, seed(1), config).numpy())
    assert not np.array_equal(first, augment.augment(images, seed(2), config).numpy())
