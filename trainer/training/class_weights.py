"""--class_weight: per-class weights of the training loss, 'balanced' from the training split's class counts or
given by class name."""

from absl import logging
import numpy as np

from trainer.errors import UsageError

BALANCED = "balanced"
SYNTAX = "'balanced' or NAME:WEIGHT pairs such as cat:2,dog:0.5 (unnamed classes weigh 1)"


def parse(text: str) -> str | dict[str, float]:
    """'balanced', or {class name: weight} from NAME:WEIGHT,...; a malformed or non-positive weight is a UsageError
    naming the flag. Class names are checked against the dataset later, in `resolve`."""
    if text.strip() == BALANCED:
        return BALANCED
    weights = {}
    for pair in text.split(","):
        name, separator, value = pair.strip().rpartition(":")
        if not separator or not name:
            raise UsageError(f"--class_weight={text}: '{pair.strip()}' is not NAME:WEIGHT; give {SYNTAX}.")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not (np.isfinite(weight) and weight > 0):
            raise UsageError(f"--class_weight={text}: the weight of {name} must be a positive number, not '{value}'.")
        if name in weights:
            raise UsageError(f"--class_weight={text} names {name} twice.")
        weights[name] = weight
    return weights


def balanced(counts: np.ndarray) -> np.ndarray:
    """scikit-learn's 'balanced': n / (classes * n_c), so the average weight over the training examples is 1. A
    class absent from the training split gets 1; no training example carries its weight."""
    counts = np.asarray(counts, np.float64)
    weights = np.ones_like(counts)
    present = counts > 0
    weights[present] = counts.sum() / (len(counts) * counts[present])
    return weights.astype(np.float32)


def resolve(text: str | None, class_names, count_classes) -> np.ndarray | None:
    """The float32 weight of each class that --class_weight=`text` asks for, or None without it. `count_classes`
    returns the training split's examples per class; it is called only for 'balanced'."""
    if not text:
        return None
    spec = parse(text)
    if spec == BALANCED:
        weights = balanced(count_classes())
    else:
        unknown = [name for name in spec if name not in class_names]
        if unknown:
            raise UsageError(f"--class_weight={text}: {', '.join(unknown)} is not a class of the dataset; its "
                             f"classes are {', '.join(class_names)}.")
        weights = np.array([spec.get(name, 1.0) for name in class_names], np.float32)
    logging.info("Class weights (--class_weight=%s): %s.", text,
                 ", ".join(f"{name} {weight:.4g}" for name, weight in zip(class_names, weights)))
    return weights


def record(text: str | None, class_names, weights: np.ndarray | None) -> dict | None:
    """What metrics.json keeps of the weights: the flag and each class's resolved weight."""
    if weights is None:
        return None
    return {"class_weight": text, "weights": {name: float(weight) for name, weight in zip(class_names, weights)}}
