"""Distributed image-classifier training job: Keras 3 models, tf.distribute, TFDS.

Three subpackages hold the three concerns: training/ (the job, from flags to the exported model), results/
(the tools that read finished runs) and serving/ (the page and prediction API). The entry points stay at the
top, as `python -m trainer.NAME`, beside the declarations that all three share.

Entry points and what they share:

  task.py                        the entry point: flags -> Config -> train.run
  cli.py                         every entry point's plumbing: exit statuses, flag parsing, --help, one-line
                                 errors, imports (and folder listings) without the garbage collector
  config.py                      every option, declared once: its flag, its check, its README row; build_config
  recipes.py                     named groups of option values (--recipe)
  image_files.py                 image files read as the models see them (predict, the server, folder datasets)
  display_text.py                names (paths, classes) shown on a terminal as text that cannot act on it
  errors.py                      the errors the entry points turn into one line
  evaluate.py                    python -m trainer.evaluate: the entry point of results/evaluate.py
  predict.py                     python -m trainer.predict: the entry point of results/predict.py
  compare.py                     python -m trainer.compare: the entry point of results/compare.py
  serve.py                       python -m trainer.serve: the entry point of serving/serve.py

training/, in the order a run meets it, from `python -m trainer.task` to the exported model:

  training/distribution.py       the tf.distribute strategy, devices, cluster environment, precision, XLA
  training/accelerators.py       --accelerator: no silent CPU fallback, the one-line diagnosis, the start-up
                                 device log
  training/run_directory.py      RunDirectory: a run's start-up in order (open, check, lock, restore, prepare,
                                 check the resume), config.json, and the clean-up of a run that fails before
                                 writing anything
  training/storage.py            the run directory's layout, safe writes, and its checks before a run writes
  training/gcs.py                gs:// run directories, mirrored from a local working copy
  training/mirrored_files.py     which files of that copy the mirror sends (and in what order), fetches back and
                                 deletes
  training/run_lock.py           the run lock: one job at a time in a model_dir (a file lock, or a lock object
                                 on gs://)
  training/data.py               TFDS splits -> uint8 batches per replica (Inputs), evaluation batches
  training/image_folder.py       --dataset=PATH: a folder of labelled images, its layouts, classes, held-out
                                 split, fingerprint
  training/folder_sources.py     a folder's files listed and read, local or gs://
  training/folder_dataset.py     a folder prepared once into TFDS shards in --data_dir, and its summary of
                                 skipped files
  training/folder_workers.py     several workers on one folder: the chief prepares it, the others wait for its
                                 word
  training/folder_records.py     a folder's examples encoded by the decoding workers, framed as TFRecords, written
                                 into shards with an index of each image's pixels
  training/pixel_shards.py       raw-pixel shards read back: parsed in batches through tf.data, or in place
                                 through memory maps for training batches
  training/model_specs.py        one ModelSpec per network (TensorFlow-free): defaults, options, builder, hooks
  training/models.py             builds a spec's network (cnn, resnet50 here), its training hooks, test-time
                                 augmentation
  training/airbench.py           airbench94's patch-whitened network and its whitening-bias window
  training/linear.py             the example network: one Dense layer, the template for adding one
  training/layers.py             layers the networks share: in-model preprocessing, inference-mode sub-models
  training/network.py            what a model builder returns (Network) and weight-file loading
  training/augment.py            on-device augmentation and mixing, with stateless seeds
  training/optimization.py       optimizers, schedules, clipping, weight averaging, Lookahead
  training/class_weights.py      --class_weight: per-class loss weights, 'balanced' from the class counts or by
                                 class name
  training/model_state.py        the training state: model, phases' optimizers, weight average, Lookahead, train
                                 metrics
  training/training_loop.py      the compiled training loop: on-device augmentation, the gradient step, the
                                 network's hooks
  training/evaluation_loop.py    evaluation: loss, accuracy, confusion matrix, test-time augmentation
  training/steps.py              Steps: a run's training state, training loop and evaluation, as the Trainer
                                 drives them
  training/feature_cache.py      a frozen backbone's features computed once (--cache_features)
  training/early_stopping.py     the best epoch, its weights, and when a phase stops
  training/checkpoint_schema.py  what a checkpoint holds (one function builds it) and reading older checkpoints
  training/checkpoints.py        TrainingState, checkpoints under multi-worker rules, preemption
  training/train.py              run(): builds the Steps; Trainer: phases, epochs, checkpoints, early stopping,
                                 progress
  training/run_outputs.py        a run's outputs as it trains (summaries, history chart) and at its end (final
                                 evaluation, export, metrics.json, charts)
  training/progress.py           console progress with images/s and ETA
  training/summaries.py          TensorBoard events: scalars, images, flags, hparams, profiles
  training/log_upload.py         live TensorBoard: a gs:// run's events sent every --log_upload_seconds
  training/hypertune.py          the eval metric each epoch, as Vertex AI hyperparameter tuning reads it
  training/export.py             the SavedModel: raw uint8 images or encoded image bytes in, probabilities out
  training/graph_images.py       image decoding inside the graph, as predict.py does it

results/, the tools that read finished runs:

  results/reports.py             metrics.json and the charts
  results/runs.py                finished runs as the tools read them (local or gs://)
  results/evaluate.py            python -m trainer.evaluate: a run's per-class metrics and confusion matrix
  results/predict.py             python -m trainer.predict: classify image files
  results/compare.py             python -m trainer.compare: runs side by side

serving/, the prediction server (its page in serving/static/):

  serving/serve.py               python -m trainer.serve: the web page and prediction API
  serving/serve_settings.py      trainer.serve's flags and their checks, without TensorFlow (the launchers check
                                 them too)
  serving/server.py              the server's web application (FastAPI): page, predict, health, metrics routes
  serving/http_connections.py    the server's connections: head and body deadlines, the connection cap that
                                 evicts the slowest
  serving/inflight_requests.py   the server's request bodies in flight (memory cap) and its SIGTERM grace with
                                 JSON 503s
  serving/served_model.py        the model the server serves and what the page shows about it
  serving/prediction_requests.py TF Serving / Vertex AI request bodies, checked and decoded
  serving/batching.py            dynamic batching of concurrent requests
  serving/serving_metrics.py     the server's Prometheus metrics
"""

import glob
import os

# TensorFlow turns its oneDNN CPU kernels on only for CPUs with AVX-512/AMX-class features. On the
# AVX2 CPUs measured here they train the cnn 1.3x faster (benchmarks/run.py), and TensorFlow
# reads this only at import, so set it before anything imports TensorFlow. Export 0 to opt out.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# libtpu, which tensorflow-tpu loads as TensorFlow is imported, asks the Cloud TPU metadata server about the host,
# 30 times for each of several settings: on a machine without a TPU (the TPU image on the wrong node, a laptop) the
# import hangs for many minutes instead of reaching --accelerator's one-line error (measured with tensorflow-tpu
# 2.20). A TPU host has its chips as /dev/accel* (or /dev/vfio/N); without them there is nothing to ask about.
if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
