#!/usr/bin/env bash
# End to end on a folder of your own images (README, "Train on your own images"): makes a folder of CIFAR-10 test
# images at mixed sizes and formats, some broken, then trains on it, evaluates, predicts and serves.
#
#   TFDS_DATA_DIR=/path/to/tensorflow_datasets bash docs/own_images_example.sh
#
# Run it from the repository root. Everything it writes lives in one temporary directory, removed at the end; the
# prepared shards go there too (--data_dir), so $TFDS_DATA_DIR is only read. EPOCHS (default 6) sets the training
# length.
set -euo pipefail

: "${TFDS_DATA_DIR:?set TFDS_DATA_DIR to the directory that holds the prepared cifar10}"
if [[ ! -f trainer/task.py ]]; then
  echo "error: run this from the repository root (trainer/task.py not found)" >&2
  exit 2
fi
EPOCHS="${EPOCHS:-6}"
PYTHON="${PYTHON:-python}"

WORK="$(mktemp -d -t own_images.XXXXXX)"
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
ROOT="$WORK/pets"
RUN="$WORK/run"
step() { printf '\n==> %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }  # Shows each command as it runs.

step "1. Making $ROOT/<class>/<image> from CIFAR-10 test images (mixed sizes and formats, some broken)"
"$PYTHON" - "$ROOT" <<'PYTHON'
"""Saves CIFAR-10 test images of three classes as a class folder: PNG, JPEG, WEBP, greyscale, alpha, 32 to 200 px."""
import collections
import io
import pathlib
import sys

import tensorflow_datasets as tfds
from PIL import Image

root = pathlib.Path(sys.argv[1])
classes = {0: "airplane", 6: "frog", 9: "truck"}
per_class = 150
saved = collections.Counter()
for example in tfds.as_numpy(tfds.load("cifar10", split="test")):
    name = classes.get(int(example["label"]))
    if name is None or saved[name] == per_class:
        continue
    index = saved[name]
    saved[name] += 1
    picture = Image.fromarray(example["image"])
    size = 32 + (index * 37) % 169  # 32 to 200 px.
    picture = picture.resize((size, size), Image.Resampling.BICUBIC)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{name}_{index:03d}"
    kind = index % 5
    if kind == 0:
        picture.save(stem.with_suffix(".png"))
    elif kind == 1:
        picture.save(stem.with_suffix(".jpg"), quality=90)
    elif kind == 2:
        picture.save(stem.with_suffix(".webp"), quality=90)
    elif kind == 3:
        picture.convert("L").save(stem.with_suffix(".png"))  # Greyscale.
    else:
        picture.convert("RGBA").save(stem.with_suffix(".png"))  # With an alpha channel.
    if sum(saved.values()) == per_class * len(classes):
        break

# Broken files, as a folder of downloads has them: a JPEG cut short and a text file named .jpg.
encoded = io.BytesIO()
picture.convert("RGB").save(encoded, "JPEG")
(root / "truck" / "truck_cut_short.jpg").write_bytes(encoded.getvalue()[:400])
(root / "frog" / "frog_not_an_image.jpg").write_text("<html>404 Not Found</html>\n")

files = sorted(path for path in root.rglob("*") if path.is_file())
suffixes = collections.Counter(path.suffix for path in files)
print(f"{len(files)} files in {len(classes)} classes "
      f"({', '.join(f'{count} {suffix}' for suffix, count in sorted(suffixes.items()))}), "
      "2 of them broken")
PYTHON

step "2. Training (the first run prepares the folder into --data_dir)"
run "$PYTHON" -m trainer.task --dataset="$ROOT" --model=cnn --image_size=32 --epochs="$EPOCHS" --batch_size=32 \
  --data_dir="$WORK/prepared" --model_dir="$RUN"
echo "export/assets.extra/labels.txt: $(tr '\n' ' ' < "$RUN/export/assets.extra/labels.txt")"
echo "skipped_files.txt:"
sed 's/^/  /' "$RUN/skipped_files.txt"

step "3. Evaluating on the held-out split"
run "$PYTHON" -m trainer.evaluate --model_dir="$RUN"

step "4. Predicting four images and a text file named .jpg"
FILES=("$ROOT/airplane/airplane_000.png" "$ROOT/frog/frog_001.jpg" "$ROOT/truck/truck_002.webp"
       "$ROOT/truck/truck_003.png" "$ROOT/frog/frog_not_an_image.jpg")
# Exit status 1 means some files could not be classified: the broken one here, on purpose.
run "$PYTHON" -m trainer.predict --model_dir="$RUN" "${FILES[@]}" || [[ $? == 1 ]]

step "5. Serving on any free port of 127.0.0.1 (--port=0), in the background"
echo "\$ $PYTHON -m trainer.serve --model_dir=$RUN --host=127.0.0.1 --port=0 > $WORK/serve.log 2>&1 &"
"$PYTHON" -m trainer.serve --model_dir="$RUN" --host=127.0.0.1 --port=0 > "$WORK/serve.log" 2>&1 &
SERVER_PID=$!
URL=""
for _ in $(seq 600); do
  URL="$(grep -o 'Serving on http://127\.0\.0\.1:[0-9]*' "$WORK/serve.log" | head -n1 | sed 's/^Serving on //')" || true
  if [[ -n "$URL" ]] && curl -sf "$URL/healthz" > /dev/null; then
    break
  fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "error: the server stopped:" >&2
    cat "$WORK/serve.log" >&2
    exit 1
  fi
  sleep 0.2
done
if [[ -z "$URL" ]] || ! curl -sf "$URL/healthz" > /dev/null; then
  echo "error: the server did not become ready within 2 minutes:" >&2
  cat "$WORK/serve.log" >&2
  exit 1
fi
echo "healthz: $(curl -sf "$URL/healthz")"
IMAGE="$ROOT/frog/frog_001.jpg"
echo "POST $URL/v1/models/cnn:predict with $IMAGE:"
printf '{"instances": [{"b64": "%s"}], "parameters": {"top_k": 2}}' "$(base64 -w0 "$IMAGE")" > "$WORK/request.json"
curl -sS --fail-with-body -H 'Content-Type: application/json' --data-binary "@$WORK/request.json" \
  "$URL/v1/models/cnn:predict"
echo
kill "$SERVER_PID"
status=0
wait "$SERVER_PID" || status=$?
SERVER_PID=""
echo "server stopped (exit status $status): $(tail -n1 "$WORK/serve.log")"

step "Done; removing $WORK"
