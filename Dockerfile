# The training job's image, for one accelerator: `python -m trainer.task` with the flags as arguments.
#
#   docker build --build-arg ACCELERATOR=gpu -t IMAGE .   (or python -m launch.build: docs/cloud.md, "Run on Google Cloud")
#   docker run IMAGE --model=cnn --epochs=1
#   docker run -p 8080:8080 --entrypoint python IMAGE -m trainer.serve --host=0.0.0.0 --model_dir=gs://...   (serving)
#
# Every Python package comes from requirements/ACCELERATOR.txt, pinned with hashes, so a rebuild installs the
# same bytes. The base is a build argument because the image is also built on other bases (tests build it on a
# local Debian image with the same Python).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# gpu: TensorFlow with CUDA and cuDNN from pip wheels (the machine supplies the NVIDIA driver);
# tpu: tensorflow-tpu and libtpu; cpu: TensorFlow's CPU-only build.
ARG ACCELERATOR=gpu

# Where each accelerator's runtime is found when the job runs (docs/cloud.md, "The images find their accelerator"):
# - GPU: GKE's NVIDIA device plugin mounts the driver in /usr/local/nvidia (lib64, bin) and sets no library path, so
#   the image puts it on LD_LIBRARY_PATH and PATH, as NVIDIA's CUDA images do; hosts that inject the driver with the
#   NVIDIA container toolkit instead do so for the devices and capabilities the NVIDIA_* variables ask for.
# - TPU: tensorflow-tpu loads the runtime named by $TPU_LIBRARY_PATH, the variable the Cloud TPU docs set; the tpu
#   build links the libtpu package's libtpu.so to this fixed path, so the image says which runtime it loads (without
#   it, tensorflow-tpu 2.20 looks for the package itself, as its start-up log shows). It is linked to /lib/libtpu.so
#   too, where Vertex AI's guide for custom TensorFlow containers on TPU VMs asks for it.
# Each is inert in the images that do not use it. TRAINER_ACCELERATOR is the trainer's --accelerator default, so a
# GPU or TPU image that lands on a machine without one stops with one error line instead of training on the CPU.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/nvidia/bin:$PATH \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TPU_LIBRARY_PATH=/opt/venv/lib/libtpu.so \
    TRAINER_ACCELERATOR=${ACCELERATOR}

# A virtual environment, because Debian's system Python refuses pip installs (PEP 668).
COPY requirements/ /tmp/requirements/
RUN case "${ACCELERATOR}" in \
        cpu|gpu|tpu) ;; \
        *) echo "ACCELERATOR must be cpu, gpu or tpu, not '${ACCELERATOR}'" >&2; exit 1 ;; \
    esac \
    && python -m venv "${VIRTUAL_ENV}" \
    && pip install --no-deps --require-hashes -r /tmp/requirements/build.txt \
    && pip install --no-deps --require-hashes --no-build-isolation -r "/tmp/requirements/${ACCELERATOR}.txt" \
    && if [ "${ACCELERATOR}" = tpu ]; then \
        libtpu="$(python -c 'import libtpu; print(libtpu.get_library_path())')" \
        && ln -s "${libtpu}" "${TPU_LIBRARY_PATH}" && ln -s "${libtpu}" /lib/libtpu.so \
        && test -f "${TPU_LIBRARY_PATH}" && test -f /lib/libtpu.so; \
    fi \
    && rm -rf /tmp/requirements

# --no-deps: the lock already holds every dependency, and the cpu and tpu images carry TensorFlow under
# another distribution name (tensorflow-cpu, tensorflow-tpu) than setup.py's `tensorflow`. The imports prove the
# lock complete for training and serving; TPU_SKIP_MDS_QUERY stops libtpu from asking a TPU VM's metadata server,
# which a build has not.
COPY setup.py /tmp/src/setup.py
COPY trainer/ /tmp/src/trainer/
RUN pip install --no-deps --no-build-isolation /tmp/src \
    && rm -rf /tmp/src \
    && TPU_SKIP_MDS_QUERY=1 python -c "import trainer.task, trainer.serve" \
    && useradd --create-home --uid 1000 --user-group trainer

# A numeric user, so Kubernetes can check runAsNonRoot.
USER 1000:1000
WORKDIR /home/trainer
ENTRYPOINT ["python", "-m", "trainer.task"]
