"""Small folders of real CIFAR-10 test images for the folder-dataset tests: mixed sizes and formats, some broken."""

import contextlib
import http.server
import io
import pathlib
import threading
import struct
import zlib

import numpy as np
from PIL import Image

CLASSES = ("airplane", "cat", "ship")  # CIFAR-10 labels 0, 3 and 8.
CIFAR_LABELS = {"airplane": 0, "cat": 3, "ship": 8}


def cifar_images(cifar_dir: str, per_class: int) -> dict[str, list[np.ndarray]]:
    """`per_class` CIFAR-10 test images of each of CLASSES, as uint8 arrays."""
    import tensorflow_datasets as tfds

    wanted = {label: name for name, label in CIFAR_LABELS.items()}
    found = {name: [] for name in CLASSES}
    for example in tfds.as_numpy(tfds.load("cifar10", split="test[:400]", data_dir=cifar_dir)):
        name = wanted.get(int(example["label"]))
        if name and len(found[name]) < per_class:
            found[name].append(example["image"])
    return found


def save_mixed(image: np.ndarray, path_without_suffix: pathlib.Path, index: int) -> pathlib.Path:
    """Saves the image in one of several formats, modes and sizes, chosen by index."""
    picture = Image.fromarray(image)
    kind = index % 8
    if kind == 0:
        path = path_without_suffix.with_suffix(".png")
        picture.resize((48, 48)).save(path)
    elif kind == 1:
        path = path_without_suffix.with_suffix(".jpg")
        picture.resize((80, 60)).save(path, quality=90)
    elif kind == 2:
        path = path_without_suffix.with_suffix(".png")
        picture.convert("L").save(path)  # Greyscale.
    elif kind == 3:
        path = path_without_suffix.with_suffix(".gif")
        picture.convert("P").save(path)  # Palette.
    elif kind == 4:
        path = path_without_suffix.with_suffix(".png")
        picture.convert("RGBA").save(path)  # Alpha.
    elif kind == 5:
        path = path_without_suffix.with_suffix(".jpeg")
        picture.convert("CMYK").save(path)
    elif kind == 6:
        path = path_without_suffix.with_suffix(".png")
        sixteen = (np.asarray(picture.convert("L"), np.uint16) * 257)
        Image.fromarray(sixteen).save(path)  # uint16: mode I;16.
    else:
        path = path_without_suffix.with_suffix(".webp")
        picture.resize((40, 40)).save(path)
    return path


def make_class_folder(root: pathlib.Path, images: dict[str, list[np.ndarray]], prefix: str = "") -> None:
    for name, pictures in images.items():
        directory = root / prefix / name
        directory.mkdir(parents=True, exist_ok=True)
        for index, picture in enumerate(pictures):
            save_mixed(picture, directory / f"{name}_{index:03d}", index)


def truncated_jpeg(path: pathlib.Path, image: np.ndarray) -> None:
    encoded = io.BytesIO()
    Image.fromarray(image).resize((64, 64)).save(encoded, "JPEG")
    path.write_bytes(encoded.getvalue()[:300])


def huge_png(path: pathlib.Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels, with no pixel data: refusing it must not decode it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def exif_rotated_jpeg(path: pathlib.Path) -> None:
    """Dark left half, bright right half as stored, with EXIF orientation 3 (rotate 180): shown the other way."""
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, 16:] = 255
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(pixels).save(path, "JPEG", exif=exif, quality=95)


def tree_snapshot(root: pathlib.Path) -> dict[str, bytes]:
    """Every regular file under root with its bytes: the user's folder must look the same after a run."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file() and not path.is_symlink()}


class _Forbidding(http.server.BaseHTTPRequestHandler):
    """Cloud Storage as it answers an account without storage.objects.list (the emulator grants everything)."""

    def do_GET(self):
        self.server.paths.append(self.path)
        body = (b'{"error": {"code": 403, "message": "someone@example.com does not have storage.objects.list '
                b'access to the Google Cloud Storage bucket.", "errors": []}}')
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *arguments):
        pass


@contextlib.contextmanager
def forbidding_bucket():
    """A Cloud Storage endpoint on loopback that refuses every read: yields (its STORAGE_EMULATOR_HOST value, the
    paths asked for)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidding)
    server.paths = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.paths
    finally:
        server.shutdown()
