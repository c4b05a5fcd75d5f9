"""Training-time augmentation that runs inside the step, on the accelerator, with stateless seeds."""

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    random_flip: bool = True
    # Flip each example in every other epoch instead of at random (random_flip must be on).
    alternating_flip: bool = False
    brightness: float = 0.0  # Largest brightness change, as a fraction of the 0-255 range.
    translate: int = 0  # Largest shift in pixels, with reflect padding.
    mixup: float = 0.0  # Beta(alpha, alpha) parameter; 0 is off.
    cutmix: float = 0.0

    @classmethod
    def from_config(cls, config) -> "AugmentConfig":
        """The augmentation a run configuration asks for: its options of the same names."""
        return cls(**{field.name: getattr(config, field.name) for field in dataclasses.fields(cls)})

    @property
    def enabled(self) -> bool:
        return self.random_flip or self.brightness > 0 or self.translate > 0

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def step_seed(base_seed: int, step: tf.Tensor) -> tf.Tensor:
    """A seed unique to (run seed, step, replica), so augmentation is reproducible after a resume."""
    replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
    seed = tf.random.experimental.stateless_fold_in(tf.constant([base_seed, 0], tf.int64), step)
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(replica_id, tf.int64))


# Each image's transform is drawn from four uniform numbers: flip, row shift, column shift, brightness.
DRAWS = 4


def augment(images: tf.Tensor, seed: tf.Tensor, config: AugmentConfig, indices: tf.Tensor | None = None,
            epoch: tf.Tensor | int = 0, base_seed: int = 0) -> tf.Tensor:
    """Augments a batch of float 0-255 images [B, H, W, C]; every image draws its own transform.

    With alternating flips, `indices` (the examples' positions in the split), `epoch` and the run's
    `base_seed` decide the flips instead of the draw.
    """
    uniforms = tf.random.stateless_uniform([tf.shape(images)[0], DRAWS], seed)
    if config.random_flip and config.alternating_flip:
        uniforms = tf.concat([alternating_flip_draws(indices, epoch, base_seed), uniforms[:, 1:]], axis=1)
    return transform(images, uniforms, config)


def alternating_flip_draws(indices: tf.Tensor, epoch: tf.Tensor | int, seed: int) -> tf.Tensor:
    """Flip draws [B, 1] (below 0.5 flips) that flip a fixed random half of the examples in even epochs and
    the other half in odd ones: airbench's alternating flip, which shows every example both ways every two
    epochs instead of leaving it to chance."""
    first_epoch_flip = view_uniforms(indices, tf.zeros_like(indices), seed)[:, 0] < 0.5
    odd_epoch = tf.cast(epoch, tf.int64) % 2 == 1
    flip = tf.math.logical_xor(first_epoch_flip, odd_epoch)
    return tf.where(flip, 0.25, 0.75)[:, tf.newaxis]


def augment_views(images: tf.Tensor, indices: tf.Tensor, step: tf.Tensor, steps_per_epoch: int, views: int,
                  seed: int, config: AugmentConfig) -> tf.Tensor:
    """Augments with a finite set of transforms: each example has `views` fixed ones and uses one of them
    per epoch. With a finite set, a frozen backbone's features can be computed once per view."""
    chosen = chosen_views(indices, step, steps_per_epoch, views, seed)
    return transform(images, view_uniforms(indices, chosen, seed), config)


def chosen_views(indices: tf.Tensor, step: tf.Tensor, steps_per_epoch: int, views: int, seed: int) -> tf.Tensor:
    """Which of its `views` each example uses in the epoch of `step`: a hash of (seed, epoch, example)."""
    epoch = tf.cast(step, tf.int64) // steps_per_epoch
    return _hash(_xor(_hash(epoch + seed * 7919), tf.cast(indices, tf.int64))) % views


def view_uniforms(indices: tf.Tensor, views: tf.Tensor, seed: int) -> tf.Tensor:
    """The uniform draws of view `views[i]` of example `indices[i]`: a hash, the same on every device."""
    golden = tf.constant(0x9E3779B1, tf.int64)
    base = _hash(_xor(_hash(tf.cast(indices, tf.int64) + seed * 1_000_003), tf.cast(views, tf.int64) * golden))
    draws = tf.stack([_hash(_xor(base, tf.constant(draw, tf.int64))) for draw in range(DRAWS)], axis=-1)
    return tf.cast(draws, tf.float32) / 2.0 ** 32


_MASK = 0xFFFFFFFF


def _xor(first: tf.Tensor, second: tf.Tensor) -> tf.Tensor:
    return tf.bitwise.bitwise_xor(first, second)


def _hash(values: tf.Tensor) -> tf.Tensor:
    """A 32-bit integer mix (in int64, so products never overflow)."""
    values = tf.bitwise.bitwise_and(tf.cast(values, tf.int64), _MASK)
    for _ in range(2):
        values = _xor(values, tf.bitwise.right_shift(values, 16))
        values = tf.bitwise.bitwise_and(values * 0x45D9F3B, _MASK)
    return _xor(values, tf.bitwise.right_shift(values, 16))


def transform(images: tf.Tensor, uniforms: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Applies the flip, shift and brightness that the uniform draws [B, 4] in [0, 1) pick for each image."""
    if config.random_flip:
        flip = uniforms[:, 0] < 0.5
        images = tf.where(flip[:, tf.newaxis, tf.newaxis, tf.newaxis], tf.reverse(images, axis=[2]), images)
    if config.translate > 0:
        shifts = tf.cast(tf.floor(uniforms[:, 1:3] * (2 * config.translate + 1)), tf.int32)
        images = translate(images, config.translate, shifts)
    if config.brightness > 0:
        shift = (uniforms[:, 3] * 2.0 - 1.0) * 255.0 * config.brightness
        images = tf.clip_by_value(images + shift[:, tf.newaxis, tf.newaxis, tf.newaxis], 0.0, 255.0)
    return images


def translate(images: tf.Tensor, max_shift: int, shifts: tf.Tensor) -> tf.Tensor:
    """Shifts each image by its own offset (shifts [B, 2] in [0, 2 * max_shift]), reflecting at the border.

    Two batched gathers instead of per-image crops keep it one fused op on GPU and TPU.
    """
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    padded = tf.pad(images, [[0, 0], [max_shift, max_shift], [max_shift, max_shift], [0, 0]], mode="REFLECT")
    rows = shifts[:, 0:1] + tf.range(height)[tf.newaxis, :]
    columns = shifts[:, 1:2] + tf.range(width)[tf.newaxis, :]
    shifted = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(shifted, columns, axis=2, batch_dims=1)


def _beta(seed: tf.Tensor, alpha: float) -> tf.Tensor:
    """One draw from Beta(alpha, alpha), as a ratio of two stateless gamma draws."""
    first, second = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    x = tf.random.stateless_gamma([], first, alpha=alpha)
    y = tf.random.stateless_gamma([], second, alpha=alpha)
    return x / (x + y)


def mix(images: tf.Tensor, targets: tf.Tensor, seed: tf.Tensor, mixup_alpha: float, cutmix_alpha: float):
    """Mixup or CutMix within the batch; with both on, each batch picks one at random.

    Mixup blends every image with a partner from the batch; CutMix pastes a box of the partner. The
    (one-hot or smoothed) targets are blended in the same proportion as the pixels.
    """
    choice_seed, mixup_seed, cutmix_seed, partner_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    partners = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(images)[0]), partner_seed)
    partner_images, partner_targets = tf.gather(images, partners), tf.gather(targets, partners)

    def blend():
        share = _beta(mixup_seed, mixup_alpha)
        return share * images + (1 - share) * partner_images, share

    def paste():
        mask, share = _cutmix_mask(tf.shape(images), _beta(cutmix_seed, cutmix_alpha), cutmix_seed)
        return images * mask + partner_images * (1 - mask), share

    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = tf.random.stateless_uniform([], choice_seed) < 0.5
        mixed, share = tf.cond(use_cutmix, paste, blend)
    else:
        mixed, share = paste() if cutmix_alpha > 0 else blend()
    return mixed, share * targets + (1 - share) * partner_targets


def _cutmix_mask(shape: tf.Tensor, share: tf.Tensor, seed: tf.Tensor):
    """A [1, H, W, 1] mask that is 0 inside a random box covering about 1 - share of the image.

    Returns the mask and the share of the original image that actually remains (boxes are clipped
    at the border).
    """
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    ratio = tf.sqrt(1.0 - share)
    center = tf.random.stateless_uniform([2], seed, 0.0, 1.0) * tf.stack([height, width])
    half = tf.stack([height, width]) * ratio / 2
    low, high = tf.maximum(center - half, 0.0), tf.minimum(center + half, tf.stack([height, width]))
    rows = tf.range(height)[:, tf.newaxis]
    columns = tf.range(width)[tf.newaxis, :]
    inside = (rows >= low[0]) & (rows < high[0]) & (columns >= low[1]) & (columns < high[1])
    mask = 1.0 - tf.cast(inside, tf.float32)
    return mask[tf.newaxis, :, :, tf.newaxis], tf.reduce_mean(mask)
