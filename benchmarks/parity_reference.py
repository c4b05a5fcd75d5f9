"""Runs the reference airbench94 (PyTorch, on the CPU) under instrumentation, for benchmarks/parity.py.

    <torch venv>/bin/python benchmarks/parity_reference.py --reference=airbench94.py --inputs=IN.npz --outputs=OUT

It runs in the harness's own torch virtual environment, not the project's, and imports nothing of the
trainer. It executes the reference file as it is and calls its own `main()`, so the optimizer, its
parameter groups, the schedule, the Lookahead and the whitening window are the reference's code, not a
rewrite. Instrumentation only observes and stops it:

- a *trace* of a whole run: `main()` with its real data pipeline over the training set the harness
  passes, where the network sees only the first few images of each batch (the reference's full network
  on 50,000 images for 10 epochs would take over half an hour here). It records every optimizer step's
  learning rate per parameter group, which parameters got a gradient, every Lookahead update, the
  whitening initialisation and the initial weights;
- one *step*: `main()` again, on one fixed batch, from the initial weights of
  the trace, at the schedule's peak learning rate; it records every layer's output, the per-example loss,
  the gradients, the weights after the step and the BatchNorm running statistics, then stops. In float32
  and float64 (the exact answer both float32 sides are judged against) on the whole batch; and in float32
  and float16 on its first 64 images, to measure float16's noise;
- an *optimizer* run: the reference's own SGD parameter groups over a given gradient sequence;
- *TTA*: the reference's `infer` at its three levels.

Writes OUT.npz (arrays) and OUT.json (scalars and names).
"""

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import types

import numpy as np
import torch

# Activations are kept for this many examples of the batch (all of them enter the BatchNorm statistics).
KEPT_EXAMPLES = 64
# In the trace, the network runs on this many images of each batch (its output is tiled to the batch).
TRACE_EXAMPLES = 2
# float16 on the CPU is slow in PyTorch (16 s for 64 images' step), so the precision comparison uses this many.
PRECISION_EXAMPLES = 64
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def snapshot(tensor: torch.Tensor, dtype=np.float32) -> np.ndarray:
    """A copy: `.numpy()` of a float32 tensor shares its memory, and the reference goes on training in place."""
    return tensor.detach().to(torch.float64).numpy().astype(dtype)


class StopReference(Exception):
    """Raised from inside the reference's training loop once the step under study is recorded."""


def torchvision_stand_in() -> types.ModuleType:
    """What the reference takes from torchvision: `transforms.Normalize` and `datasets.CIFAR10`.

    torchvision's PyPI wheels are built against PyTorch's CUDA build; against the CPU build their compiled
    operators fail to register, so the package cannot be imported. The reference uses only per-channel
    normalisation from it, and the CIFAR-10 download, which the harness replaces by writing the files the
    reference's loader reads first.
    """
    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = torch.as_tensor(mean), torch.as_tensor(std)

        def __call__(self, images):
            mean = self.mean.to(images.dtype).view(-1, 1, 1)
            std = self.std.to(images.dtype).view(-1, 1, 1)
            return (images - mean) / std

    class CIFAR10:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("the parity harness writes cifar10/train.pt and test.pt; nothing is downloaded")

    package = types.ModuleType("torchvision")
    package.transforms = types.ModuleType("torchvision.transforms")
    package.transforms.Normalize = Normalize
    package.datasets = types.ModuleType("torchvision.datasets")
    package.datasets.CIFAR10 = CIFAR10
    return package


def load_reference(path: str) -> types.ModuleType:
    stand_in = torchvision_stand_in()
    sys.modules.setdefault("torchvision", stand_in)
    sys.modules.setdefault("torchvision.transforms", stand_in.transforms)
    sys.modules.setdefault("torchvision.datasets", stand_in.datasets)
    spec = importlib.util.spec_from_file_location("airbench94_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _WallClockEvent:
    """torch.cuda.Event's timing interface on the CPU (the reference times its epochs with it)."""

    def __init__(self, enable_timing=False):
        self.time = None

    def record(self):
        self.time = time.perf_counter()

    def elapsed_time(self, end):
        return 1000.0 * (end.time - self.time)


@contextlib.contextmanager
def patched(target, name, value):
    previous = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, previous)


class _DeviceOnCpu(type):
    """torch.device, except that a GPU index (the reference loads its data onto `torch.device(0)`) is the CPU."""

    original = torch.device

    def __instancecheck__(cls, instance):
        return isinstance(instance, cls.original)

    def __call__(cls, *args, **kwargs):
        if args and isinstance(args[0], int):
            return cls.original("cpu")
        return cls.original(*args, **kwargs)


@contextlib.contextmanager
def on_cpu():
    """The reference targets one CUDA GPU: `.cuda()` and GPU devices stay on the CPU, events use the wall clock."""
    original_load = torch.load
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(torch, "device", _DeviceOnCpu("device", (), {})))
        stack.enter_context(patched(torch.nn.Module, "cuda", lambda self, device=None: self))
        stack.enter_context(patched(torch.cuda, "Event", _WallClockEvent))
        stack.enter_context(patched(torch.cuda, "synchronize", lambda device=None: None))
        stack.enter_context(patched(torch, "load", lambda *args, **kwargs: original_load(
            *args, **{**kwargs, "map_location": "cpu", "weights_only": False})))
        yield


class Recorder:
    """What the instrumented `main()` saw."""

    def __init__(self):
        self.arrays, self.facts = {}, {}
        self.model, self.names = None, {}
        self.steps = 0

    def name_parameters(self, model):
        self.model = model
        self.names = {id(parameter): name for name, parameter in model.named_parameters()}


def recording_optimizer(recorder: Recorder, on_step):
    """torch.optim.SGD that reports to `on_step(optimizer)` before each of its steps."""
    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            on_step(self)
            result = super().step(closure)
            recorder.steps += 1
            return result

    return RecordingSGD


def recording_loss(recorder: Recorder):
    class RecordingCrossEntropyLoss(torch.nn.CrossEntropyLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            recorder.facts["loss"] = {"label_smoothing": self.label_smoothing, "reduction": self.reduction}

        def forward(self, outputs, labels):
            losses = super().forward(outputs, labels)
            recorder.arrays["per_example_loss"] = snapshot(losses)
            return losses

    return RecordingCrossEntropyLoss


def group_facts(optimizer, recorder: Recorder) -> list[dict]:
    return [{"parameters": [recorder.names[id(parameter)] for parameter in group["params"]],
             "base_lr": group["initial_lr"], "weight_decay": group["weight_decay"], "momentum": group["momentum"],
             "nesterov": group["nesterov"], "dampening": group["dampening"]} for group in optimizer.param_groups]


def write_cifar_files(directory: str, inputs) -> None:
    os.makedirs(os.path.join(directory, "cifar10"), exist_ok=True)
    for split in ("train", "test"):
        torch.save({"images": torch.from_numpy(inputs[f"{split}_images"]),
                    "labels": torch.from_numpy(inputs[f"{split}_labels"].astype(np.int64)),
                    "classes": CIFAR10_CLASSES}, os.path.join(directory, "cifar10", f"{split}.pt"))


def trace_run(reference, inputs, recorder: Recorder) -> None:
    """The reference's `main()` over the whole run, its network on a few images per batch."""
    learning_rates, whitening_bias_trained, batch_sizes, lookahead = [], [], [], []
    original_make_net, original_init = reference.make_net, reference.init_whitening_conv
    original_update = reference.LookaheadState.update

    def make_net():
        # float32: PyTorch's float16 kernels on the CPU are slow, and the trace records no numbers of the network.
        model = original_make_net().float()
        recorder.name_parameters(model)

        def first_images(module, arguments):
            batch_sizes.append(len(arguments[0]))
            return (arguments[0][:TRACE_EXAMPLES].float(),)

        def tiled(module, arguments, output):
            return output.repeat(-(-batch_sizes[-1] // len(output)), 1)[:batch_sizes[-1]]

        model.register_forward_pre_hook(first_images)
        model.register_forward_hook(tiled)
        return model

    def init_whitening_conv(layer, train_set, *args, **kwargs):
        original_init(layer, train_set, *args, **kwargs)
        recorder.arrays["whitening_weight"] = snapshot(layer.weight)
        recorder.arrays["whitening_images_checksum"] = snapshot(train_set.float().sum(dim=(0, 2, 3)))
        for name, value in recorder.model.state_dict().items():
            if value.is_floating_point():
                recorder.arrays[f"init/{name}"] = snapshot(value)

    def on_step(optimizer):
        if recorder.steps == 0:
            recorder.facts["groups"] = group_facts(optimizer, recorder)
        learning_rates.append([group["lr"] for group in optimizer.param_groups])
        whitening_bias_trained.append(recorder.model[0].bias.grad is not None)

    def update(state, net, decay):
        lookahead.append((recorder.steps, float(decay)))
        return original_update(state, net, decay)

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(reference, "make_net", make_net))
        stack.enter_context(patched(reference, "init_whitening_conv", init_whitening_conv))
        stack.enter_context(patched(reference.LookaheadState, "update", update))
        stack.enter_context(patched(reference, "evaluate", lambda model, loader, tta_level=0: float("nan")))
        stack.enter_context(patched(torch.optim, "SGD", recording_optimizer(recorder, on_step)))
        stack.enter_context(patched(torch.nn, "CrossEntropyLoss", recording_loss(recorder)))
        reference.main(0)
    recorder.arrays["trace/learning_rates"] = np.array(learning_rates, np.float64)
    recorder.arrays["trace/whitening_bias_trained"] = np.array(whitening_bias_trained)
    recorder.arrays["trace/batch_sizes"] = np.array(batch_sizes[:len(learning_rates)])
    recorder.arrays["trace/lookahead"] = np.array(lookahead, np.float64).reshape(-1, 2)
    recorder.facts["hyp"] = reference.hyp
    recorder.facts["cifar_mean"] = reference.CIFAR_MEAN.tolist()
    recorder.facts["cifar_std"] = reference.CIFAR_STD.tolist()


def initial_state(recorder: Recorder, model) -> dict:
    state = model.state_dict()
    return {name: torch.from_numpy(recorder.arrays[f"init/{name}"]).to(value.dtype) if f"init/{name}" in
            recorder.arrays else value for name, value in state.items()}


class OneBatchLoader:
    """Stands for the reference's CifarLoader in the step: yields the harness's batch once, unaugmented."""

    def __init__(self, images, labels, normalize, dtype):
        self.images, self.labels, self.normalize, self.dtype = images, labels, normalize, dtype

    def __len__(self):
        return 1

    def __iter__(self):
        yield self.normalize(self.images).to(self.dtype).contiguous(memory_format=torch.channels_last), self.labels


def one_step(reference, inputs, recorder: Recorder, dtype: torch.dtype, prefix: str, count: int) -> None:
    """The reference's `main()` for one step on the harness's batch, from the trace's initial weights."""
    images = torch.from_numpy(inputs["batch_images"][:count]).permute(0, 3, 1, 2).to(
        torch.float64 if dtype == torch.float64 else torch.float32) / 255
    labels = torch.from_numpy(inputs["batch_labels"][:count].astype(np.int64))
    normalize = sys.modules["torchvision"].transforms.Normalize(reference.CIFAR_MEAN, reference.CIFAR_STD)
    original_make_net = reference.make_net
    calls = {}

    def make_net():
        model = original_make_net()
        if dtype != torch.float16:
            model = model.to(dtype)
        model.load_state_dict(initial_state(recorder, model))
        recorder.name_parameters(model)
        for name, module in model.named_modules():
            if len(list(module.children())) == 0:
                module.register_forward_hook(lambda module, arguments, output, name=name: keep(name, output))
        return model

    def keep(name, output):
        calls[name] = calls.get(name, 0) + 1
        recorder.arrays[f"{prefix}/activation/{name}#{calls[name]}"] = \
            snapshot(output[:KEPT_EXAMPLES])

    def on_step(optimizer):
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]  # The peak of the schedule, as on the harness's side.
        recorder.facts[f"{prefix}/step_lr"] = [group["lr"] for group in optimizer.param_groups]
        for name, parameter in recorder.model.named_parameters():
            if parameter.grad is not None:
                recorder.arrays[f"{prefix}/gradient/{name}"] = snapshot(parameter.grad)

    def after_step(optimizer):
        for name, value in recorder.model.state_dict().items():
            if value.is_floating_point():
                recorder.arrays[f"{prefix}/after/{name}"] = snapshot(value)
        raise StopReference

    recording = recording_optimizer(recorder, on_step)

    class StoppingSGD(recording):
        def step(self, closure=None):
            super().step(closure)
            after_step(self)

    train_loader = OneBatchLoader(images, labels, normalize, dtype)
    test_loader = OneBatchLoader(images[:1], labels[:1], normalize, dtype)  # main() builds it; never evaluated.
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(reference, "make_net", make_net))
        stack.enter_context(patched(reference, "init_whitening_conv", lambda *args, **kwargs: None))
        stack.enter_context(patched(reference, "CifarLoader", lambda path, train=True, **kwargs:
                                    train_loader if train else test_loader))
        stack.enter_context(patched(torch.optim, "SGD", StoppingSGD))
        stack.enter_context(patched(torch.nn, "CrossEntropyLoss", recording_loss(recorder)))
        recorder.steps = 0
        try:
            reference.main(0)
        except StopReference:
            pass
    recorder.arrays[f"{prefix}/per_example_loss"] = recorder.arrays.pop("per_example_loss")


def optimizer_run(inputs, recorder: Recorder) -> None:
    """The reference's SGD parameter groups over the harness's gradient scenarios [S, T, n] and lr multipliers."""
    gradients, multipliers = inputs["optimizer_gradients"], inputs["optimizer_multipliers"]
    for index, group in enumerate(recorder.facts["groups"]):
        finals = []
        for scenario in gradients:
            parameter = torch.nn.Parameter(torch.from_numpy(inputs["optimizer_start"].astype(np.float64)))
            optimizer = torch.optim.SGD([parameter], lr=group["base_lr"], momentum=group["momentum"],
                                        nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                                        dampening=group["dampening"])
            for gradient, multiplier in zip(scenario, multipliers):
                optimizer.param_groups[0]["lr"] = group["base_lr"] * multiplier
                parameter.grad = torch.from_numpy(gradient.astype(np.float64))
                optimizer.step()
            finals.append(snapshot(parameter, np.float64))
        recorder.arrays[f"optimizer/group{index}"] = np.stack(finals)


def tta(reference, inputs, recorder: Recorder) -> None:
    """The reference's `infer` at TTA levels 0-2 on the harness's test images, with the initial weights."""
    model = reference.make_net().float()
    model.load_state_dict(initial_state(recorder, model))
    images = torch.from_numpy(inputs["tta_images"]).permute(0, 3, 1, 2).float() / 255
    loader = types.SimpleNamespace(images=images, normalize=sys.modules["torchvision"].transforms.Normalize(
        reference.CIFAR_MEAN, reference.CIFAR_STD))
    for level in range(3):
        recorder.arrays[f"tta/level{level}"] = snapshot(reference.infer(model, loader, tta_level=level))
    grid = torch.linspace(-6, 6, 2401)
    recorder.arrays["gelu/grid"] = snapshot(grid)
    recorder.arrays["gelu/values"] = snapshot(model[1](grid))
    norms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    recorder.facts["batch_norm"] = {"eps": norms[0].eps, "momentum": norms[0].momentum,
                                    "weight_trainable": norms[0].weight.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--outputs", required=True)
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(0)
    inputs = dict(np.load(arguments.inputs))
    reference = load_reference(os.path.abspath(arguments.reference))
    recorder = Recorder()
    with tempfile.TemporaryDirectory() as directory, on_cpu():
        write_cifar_files(directory, inputs)
        previous = os.getcwd()
        os.chdir(directory)  # The reference reads ./cifar10/{train,test}.pt.
        try:
            began = time.perf_counter()
            trace_run(reference, inputs, recorder)
            print(f"reference: traced {recorder.steps} steps in {time.perf_counter() - began:.0f}s", flush=True)
            batch = len(inputs["batch_labels"])
            for dtype, prefix, count in ((torch.float32, "float32", batch), (torch.float64, "float64", batch),
                                         (torch.float32, "float32_small", PRECISION_EXAMPLES),
                                         (torch.float16, "float16_small", PRECISION_EXAMPLES)):
                one_step(reference, inputs, recorder, dtype, prefix, count)
                print(f"reference: one {prefix} step recorded", flush=True)
            optimizer_run(inputs, recorder)
            tta(reference, inputs, recorder)
        finally:
            os.chdir(previous)
    np.savez(arguments.outputs + ".npz", **recorder.arrays)
    with open(arguments.outputs + ".json", "w") as file:
        json.dump(recorder.facts, file, indent=1, default=str)


if __name__ == "__main__":
    main()
