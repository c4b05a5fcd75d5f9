"""A folder of labelled images: telling it from a TFDS name, its two layouts, its classes, its held-out split and
its fingerprint."""

import dataclasses
import hashlib
import json
import posixpath

from trainer.training import folder_sources
from trainer import image_files
from trainer.errors import UsageError

# A --dataset value that starts like a path names a folder; anything else is a TFDS name (cifar10, name/config:1.0.0).
PATH_PREFIXES = ("/", "./", "../", "~", "gs://")
# predict's formats, and TIFF, the format of CMYK and 16-bit scans.
IMAGE_EXTENSIONS = (*image_files.IMAGE_EXTENSIONS, ".tif", ".tiff")
DEFAULT_VALIDATION_FRACTION = 0.1
TRAIN_SPLIT = "train"
HELD_OUT_SPLITS = ("validation", "test")
SPLIT_NAMES = (TRAIN_SPLIT, *HELD_OUT_SPLITS)
# The held-out images of ROOT/<class>/<image> are chosen with this seed, not the run's --seed: runs that differ
# in --seed are then compared on the same images, and they reuse one prepared copy.
SPLIT_SEED = "image-folder-split-1"
# Bumped whenever preparation would write different shards from the same folder.
FORMAT_VERSION = 1


def is_folder(dataset: str) -> bool:
    """Whether --dataset names a folder of images rather than a TFDS dataset."""
    return dataset.startswith(PATH_PREFIXES)


@dataclasses.dataclass(frozen=True)
class LabelledFile:
    file: folder_sources.ListedFile
    label: int


@dataclasses.dataclass(frozen=True)
class Folder:
    """What a folder holds, before any image is decoded."""

    root: str
    layout: str  # "classes" (ROOT/<class>/<image>) or "splits" (ROOT/<split>/<class>/<image>).
    class_names: tuple[str, ...]
    splits: dict[str, tuple[LabelledFile, ...]]
    skipped: tuple[tuple[str, str], ...]  # (relative path, reason) for entries passed over while listing.
    source: object = dataclasses.field(compare=False, repr=False)
    # Layout "classes": images of each class the validation split takes, out of every image in the class.
    held_out_quota: tuple[int, ...] | None = None

    @property
    def num_images(self) -> int:
        if self.held_out_quota:
            return len(self.splits[TRAIN_SPLIT])  # Both splits list every image; each goes to one.
        return sum(len(files) for files in self.splits.values())

    def fingerprint(self, image_size: int) -> str:
        """Changes whenever the prepared shards would: a file added, removed, renamed, resized or touched, another
        split or another stored size."""
        digest = hashlib.sha256(json.dumps([FORMAT_VERSION, self.layout, image_size, self.class_names,
                                            self.held_out_quota]).encode())
        # One list encoded at once: an encoding per file took longer than listing the folder.
        entries = [[split, labelled.label, labelled.file.relative, labelled.file.size, labelled.file.stamp]
                   for split in sorted(self.splits) for labelled in self.splits[split]]
        digest.update(json.dumps(entries).encode())
        return digest.hexdigest()


def held_out_split(root: str) -> str:
    """The split a run on this folder evaluates when --eval_split is not given: test for ROOT/train + ROOT/test,
    else validation. Looks without listing the images; a folder that cannot be read is reported later."""
    try:
        source = folder_sources.open_source(root)
        names = set(source.children("").directories)
    except UsageError:
        return HELD_OUT_SPLITS[0]
    return "test" if _is_split_layout(names) and "validation" not in names else "validation"


def _is_split_layout(names: set[str]) -> bool:
    return TRAIN_SPLIT in names and names <= set(SPLIT_NAMES)


def discover(root: str, validation_fraction: float) -> Folder:
    """Lists the folder and assigns every image to a split and a class; refuses, in one line, a folder a run
    cannot train on."""
    source = folder_sources.open_source(root)
    top = source.children("")
    skipped = list(top.skipped)
    skipped += [(file.relative, "outside any class folder") for file in top.files]
    if not top.directories:
        images = [file for file in top.files if _is_image(file.relative)]
        where = "holds images but no class folders" if images else "holds no class folders"
        raise UsageError(f"--dataset={root} {where}; put each class's images in ROOT/<class>/ (or ROOT/train/<class>/ "
                         "and ROOT/validation/<class>/).")
    if _is_split_layout(set(top.directories)):
        return _split_layout(root, source, top.directories, skipped)
    by_class = {name: _class_images(source, name, skipped) for name in top.directories}
    _check_classes(root, by_class, "")
    splits, quota = held_out(root, by_class, validation_fraction)
    return Folder(root, "classes", tuple(by_class), splits, tuple(skipped), source, quota)


def _split_layout(root: str, source, split_names: list[str], skipped: list) -> Folder:
    held_out_names = [name for name in HELD_OUT_SPLITS if name in split_names]
    if not held_out_names:
        raise UsageError(f"--dataset={root} has train/ but neither validation/ nor test/; add one, or put the class "
                         "folders directly in the folder and let --validation_fraction hold images out.")
    class_names = source.children(TRAIN_SPLIT).directories
    by_split = {}
    for split in (TRAIN_SPLIT, *held_out_names):
        present = source.children(split)
        skipped += list(present.skipped) + [(file.relative, "outside any class folder") for file in present.files]
        strangers = sorted(set(present.directories) - set(class_names))
        if strangers:
            raise UsageError(f"--dataset={root}: {split}/{strangers[0]} is not a class of train/; every class of "
                             f"{split}/ needs training images in train/{strangers[0]}/.")
        by_class = {name: _class_images(source, posixpath.join(split, name), skipped) for name in class_names
                    if name in present.directories}
        _check_classes(root, {name: by_class.get(name, []) for name in class_names}, f"{split}/")
        by_split[split] = tuple(LabelledFile(file, label) for label, name in enumerate(class_names)
                                for file in by_class[name])
    return Folder(root, "splits", tuple(class_names), by_split, tuple(skipped), source)


def _is_image(relative: str) -> bool:
    return relative.lower().endswith(IMAGE_EXTENSIONS)


def _class_images(source, relative_dir: str, skipped: list) -> list[folder_sources.ListedFile]:
    """The image files directly in a class folder; everything else goes to `skipped` with its reason."""
    children = source.children(relative_dir)
    skipped += children.skipped
    skipped += [(posixpath.join(relative_dir, name), "a folder inside a class folder (only files directly in a "
                 "class folder are read)") for name in children.directories]
    images = []
    for file in children.files:
        if _is_image(file.relative):
            images.append(file)
        else:
            skipped.append((file.relative, f"not an image file name ({', '.join(IMAGE_EXTENSIONS)})"))
    return images


def _check_classes(root: str, by_class: dict[str, list], prefix: str) -> None:
    if len(by_class) < 2:
        names = ", ".join(by_class) or "none"
        raise UsageError(f"--dataset={root} has {len(by_class)} class folder{'s' * (len(by_class) != 1)} in "
                         f"{prefix or 'it'} ({names}); a classifier needs two or more, one per class.")
    if prefix and not any(by_class.values()):
        raise UsageError(f"--dataset={root}: {prefix} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    if not any(by_class.values()):
        raise UsageError(f"--dataset={root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders.")
    for name, images in by_class.items():
        if not images:
            what = "held-out image" if prefix and not prefix.startswith(TRAIN_SPLIT) else "image"
            raise UsageError(f"--dataset={root}: class '{name}' has no {what} in {prefix}{name}/; every class needs "
                             f"at least one (or remove the folder).")


def held_out(root: str, by_class: dict[str, list], fraction: float) -> tuple[dict, tuple[int, ...]]:
    """The splits of ROOT/<class>/<image> and how many images of each class the validation split holds:
    round(fraction x images), at least one. Both splits list every image; the validation split in the order it
    takes them (a seeded hash of their names, the same on every run, and adding an image moves few others) until
    its share of readable images is full, the training split takes the rest (see folder_dataset)."""
    ranked, training, quota = [], [], []
    for label, (name, images) in enumerate(by_class.items()):
        count = max(1, round(fraction * len(images)))
        if count >= len(images):
            raise UsageError(f"--dataset={root}: class '{name}' has {len(images)} image{'s' * (len(images) != 1)}; "
                             f"holding out --validation_fraction={fraction:g} of it (at least one) leaves none to "
                             "train on. Add images, or use ROOT/train/ and ROOT/validation/.")
        quota.append(count)
        order = sorted(images, key=lambda file: hashlib.sha256(f"{SPLIT_SEED}/{file.relative}".encode()).digest())
        ranked += [LabelledFile(file, label) for file in order]
        training += [LabelledFile(file, label) for file in images]
    return {HELD_OUT_SPLITS[0]: tuple(ranked), TRAIN_SPLIT: tuple(training)}, tuple(quota)

