"""Image files read as the models see them: any format Pillow reads, EXIF orientation applied, 8-bit RGB or
greyscale, resized to the model's input (shared by predict, the server's requests and folder datasets)."""

import numpy as np
from PIL import Image
from PIL import ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# A transparent pixel shows its background; training images had none, so assume the usual white page.
BACKGROUND = (255, 255, 255)
# Larger images are refused before they are decoded. The model sees a few thousand pixels, and a 50-megapixel photo
# (the largest phone cameras') decodes in about a second; a small PNG can claim 13000x13000 pixels (1.6 GB and 11 s
# to decode) while staying under Pillow's own bomb limit of 179 megapixels.
MAX_PIXELS = 50_000_000


# Formats Pillow decodes by itself (MPO: a camera's JPEG); others, such as EPS, would need outside programs
# (Ghostscript), so they are refused by name instead of failing on a missing program.
SUPPORTED_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "WEBP", "TIFF")
SUPPORTED_FORMATS_TEXT = "PNG, JPEG, GIF, BMP, WebP or TIFF"


class UnsupportedFormat(ValueError):
    """An image in a format outside SUPPORTED_FORMATS, refused before decoding."""


class ImageTooLarge(ValueError):
    """An image above MAX_PIXELS, refused before decoding."""


def load_image(path, image_shape: tuple[int, int, int]) -> np.ndarray:
    """The file (a path or a binary file object) as uint8 [H, W, C] at the model's input size, shrunk by area
    averaging like CIFAR's own downsampling."""
    height, width, channels = image_shape
    with Image.open(path) as image:
        if image.format not in SUPPORTED_FORMATS:
            raise UnsupportedFormat(f"{image.format} images are not supported; use {SUPPORTED_FORMATS_TEXT}")
        if image.width * image.height > MAX_PIXELS:
            raise ImageTooLarge(f"{image.width}x{image.height} pixels is more than the {MAX_PIXELS // 10**6}-megapixel "
                             "limit for images to classify; shrink it first")
        mode = "RGB" if channels == 3 else "L"
        image.draft(mode, (width, height))  # JPEG decodes at a reduced size: faster.
        # In place, and no conversion or resizing that would change nothing: each of them copies the image, and
        # together they cost as much as decoding a small JPEG (a folder dataset prepares thousands).
        ImageOps.exif_transpose(image, in_place=True)
        image = _eight_bit(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", image.size, (*BACKGROUND, 255)), image)
        if image.mode != mode:
            image = image.convert(mode)
        if image.size != (width, height):
            shrinking = image.width >= width and image.height >= height
            image = image.resize((width, height), Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC)
        pixels = np.asarray(image, np.uint8)
    return pixels if channels == 3 else pixels[..., None]


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale scaled to 8 bits; Pillow's own conversion would clip it to white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        return Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    return image
