"""Device-side augmentation: each transform does what it says, per image, reproducibly."""

import numpy as np
import pytest
import tensorflow as tf

from trainer.training import augment


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


def test_mixup_blends_images_and_targets_in_the_same_proportion():
    # Image i is filled with the value i and is the only one of class i, so every blend is readable.
    images = tf.constant(np.broadcast_to(np.arange(32, dtype=np.float32)[:, None, None, None], (32, 4, 4, 3)).copy())
    targets = tf.one_hot(tf.range(32), 32)
    mixed, mixed_targets = augment.mix(images, targets, seed(3), mixup_alpha=0.4, cutmix_alpha=0.0)
    mixed, mixed_targets = mixed.numpy(), mixed_targets.numpy()
    np.testing.assert_allclose(mixed_targets.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mixed[:, 0, 0, 0], mixed_targets @ np.arange(32), rtol=1e-5)
    assert np.all(mixed == mixed[:, :1, :1, :1])  # A uniform blend, not a pasted box.
    assert np.count_nonzero(mixed_targets > 1e-6) > 32  # Some images really got a partner.


def test_cutmix_pastes_a_box_whose_area_matches_the_target_weights():
    images = tf.zeros((16, 16, 16, 1))
    partner_marker = tf.ones((16, 16, 16, 1))
    # Two halves: real images are 0, so a pasted partner shows up as 1 only if it comes from the marked half.
    batch = tf.concat([images[:8], partner_marker[:8]], axis=0)
    targets = tf.one_hot(tf.concat([tf.zeros(8, tf.int32), tf.ones(8, tf.int32)], axis=0), 2)
    mixed, mixed_targets = augment.mix(batch, targets, seed(7), mixup_alpha=0.0, cutmix_alpha=1.0)
    mixed, mixed_targets = mixed.numpy(), mixed_targets.numpy()
    for index in range(16):
        own_class = 0 if index < 8 else 1
        pasted_area = np.mean(mixed[index] != (0.0 if own_class == 0 else 1.0))
        other_weight = mixed_targets[index, 1 - own_class]
        assert pasted_area == pytest.approx(other_weight, abs=1e-6)
    assert any(mixed_targets[index].max() < 1.0 for index in range(16))


def test_with_mixup_and_cutmix_each_batch_uses_one_of_them():
    images = tf.constant(np.random.default_rng(1).uniform(0, 255, (8, 8, 8, 3)).astype(np.float32))
    targets = tf.one_hot(tf.range(8), 8)
    kinds = set()
    for value in range(20):
        mixed, _ = augment.mix(images, targets, seed(value), mixup_alpha=0.5, cutmix_alpha=1.0)
        pixels_from_one_image = np.mean(np.isin(mixed.numpy(), images.numpy()))
        kinds.add("cutmix" if pixels_from_one_image > 0.99 else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_alternating_flip_shows_every_example_both_ways_every_two_epochs():
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (64, 4, 4, 3)), tf.float32)
    config = augment.AugmentConfig(random_flip=True, alternating_flip=True)
    indices = tf.range(64, dtype=tf.int64)

    def flipped(epoch, step_seed):
        result = augment.augment(images, seed(step_seed), config, indices, epoch, base_seed=3).numpy()
        mirrored = np.all(result == images.numpy()[:, :, ::-1], axis=(1, 2, 3))
        assert np.all(mirrored | np.all(result == images.numpy(), axis=(1, 2, 3)))
        return mirrored

    first = flipped(0, 1)
    assert 16 < first.sum() < 48  # A random half...
    np.testing.assert_array_equal(flipped(1, 2), ~first)  # ...and the other half next epoch,
    np.testing.assert_array_equal(flipped(2, 3), first)  # whatever the step's own random draw.
    other_seed = augment.augment(images, seed(1), config, indices, 0, base_seed=4).numpy()
    assert not np.array_equal(other_seed, augment.augment(images, seed(1), config, indices, 0, base_seed=3).numpy())
