"""The prediction page in headless Chromium: upload images, read the rendered predictions, take the README's screenshot.

    python docs/screenshot.py --model_dir=runs/seed [--output=docs/serve.png]

It serves the run with `python -m trainer.serve` on 127.0.0.1, opens the page in Debian's chromium (through
chromium-driver and Selenium), drops CIFAR-10 test images of several classes, sizes and modes on it, and saves the
page once every prediction is drawn. tests/test_serve.py drives the page with the same functions.
"""

import argparse
import base64
import contextlib
import os
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import ServerProcess  # noqa: E402

CHROMIUM = ("chromium", "chromium-browser")
CHROMEDRIVER = "chromedriver"
# Headless, and nothing that reaches beyond 127.0.0.1 or keeps state between runs.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")
WINDOW = (1280, 900)


def browser_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) from PATH, or None when either is missing."""
    chromium = next((path for path in map(shutil.which, CHROMIUM) if path), None)
    driver = shutil.which(CHROMEDRIVER) or next(
        (path for path in ("/usr/lib/chromium/chromedriver",) if os.path.exists(path)), None)
    return (chromium, driver) if chromium and driver else None


@contextlib.contextmanager
def headless_chromium(window: tuple[int, int] = WINDOW):
    """A Selenium driver of a fresh headless Chromium (its own empty profile, removed afterwards)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    if paths is None:
        raise RuntimeError("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
    chromium, driver_path = paths
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        # Both paths given, so Selenium never looks for (or downloads) a browser of its own.
        options.binary_location = chromium
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
        try:
            yield driver
        finally:
            driver.quit()


def classify_on_page(driver, url: str, files: list[pathlib.Path], timeout: float = 60) -> list[dict]:
    """Opens the page, waits for the model, chooses `files` in its file picker, and waits until every card shows
    predictions or an error. Returns one dict per card in file order: file, state, message, and the ranked
    (class, probability) bars as drawn."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda browser: "status-ready" in browser.find_element(By.ID, "status").get_attribute("class"))
    driver.find_element(By.ID, "files").send_keys("\n".join(str(path.resolve()) for path in files))
    wait.until(lambda browser: len(browser.find_elements(By.CSS_SELECTOR, ".card")) == len(files) and not
               browser.find_elements(By.CSS_SELECTOR, '.card[data-state="pending"]'))
    cards = {}
    for card in driver.find_elements(By.CSS_SELECTOR, ".card"):
        bars = [(row.get_attribute("data-class"), float(row.get_attribute("data-probability")),
                 row.find_element(By.CSS_SELECTOR, ".bar-value").text)
                for row in card.find_elements(By.CSS_SELECTOR, ".bar-row")]
        cards[card.get_attribute("data-file")] = {
            "file": card.get_attribute("data-file"), "state": card.get_attribute("data-state"),
            "message": card.find_element(By.CSS_SELECTOR, ".card-message").text, "bars": bars,
            "thumbnail_loaded": driver.execute_script(
                "const image = arguments[0].querySelector('img'); return !!image && image.naturalWidth > 0;", card)}
    return [cards[path.name] for path in files]


def save_page(driver, path: pathlib.Path) -> None:
    """Saves the whole page (not only the window) as a PNG."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))


def sample_images(data_dir: str | None, folder: pathlib.Path) -> list[pathlib.Path]:
    """CIFAR-10 test images of six classes as a user might have them: PNGs, a large JPEG, a greyscale one."""
    import tensorflow_datasets as tfds
    from PIL import Image

    builder = tfds.builder("cifar10", data_dir=data_dir)
    names = builder.info.features["label"].names
    wanted = ["cat", "ship", "horse", "airplane", "frog", "truck"]
    found = {}
    for image, label in tfds.as_numpy(builder.as_dataset(split="test[:200]", as_supervised=True)):
        if names[label] in wanted:
            found.setdefault(names[label], image)
    paths = []
    paths = []
    for name in wanted:
        image = Image.fromarray(found[name])
        if name == "horse":  # Any size: a 256x256 JPEG, as from a camera.
            path = folder / f"{name}.jpg"
            image.resize((256, 256), Image.Resampling.BICUBIC).save(path, quality=92)
        elif name == "airplane":  # Greyscale.
            path = folder / f"{name}-grey.png"
            image.convert("L").save(path)
        else:
            path = folder / f"{name}.png"
            image.save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="A finished run of trainer.task.")
    parser.add_argument("--output", default=str(ROOT / "docs" / "serve.png"))
    parser.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR") or str(
        ROOT.parent / "shared" / "tensorflow_datasets"), help="TFDS data directory with CIFAR-10 (for the images).")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="screenshot-") as work:
        work_dir = pathlib.Path(work)
        files = sample_images(arguments.data_dir, work_dir)
        with ServerProcess(arguments.model_dir, log_path=work_dir / "server.log") as server, \
                headless_chromium() as driver:
            cards = classify_on_page(driver, f"{server.url}/", files)
            save_page(driver, pathlib.Path(arguments.output))
    for card in cards:
        print(card["file"], card["state"], card["bars"][:1] or card["message"])
    print(f"Saved {arguments.output}")


if __name__ == "__main__":
    main()
