"""The project's ResNet-50 and training recipe on a GPU, under Keras' JAX backend.

    KERAS_BACKEND=jax python benchmarks/gpu_jax.py --images IMAGES_NPZ [--epochs 40] [--seeds 42 1 2]

For a GPU machine where TensorFlow cannot be installed (no CUDA 12 libraries, no registry;
benchmarks/README.md): it needs Keras 3 and JAX with its CUDA plugin, not this project's
environment. It runs pipeline/resnet.py, fitting.py's new_model, compile_model, steps and
WeightAverage, and data.py's augmenter as written: their source, read with ast, since those
modules import TensorFlow at the top. With train's defaults: mixed_bfloat16 (what precision=auto picks on a
GPU), batch 128, 2e-3, 40 epochs, augmentation, the mean of the last 10 epochs' weights with
batch-norm statistics re-estimated. Unlike train: no tuning, early stopping, MLflow or test-time
shifts (the network's one-view answer), and full batches only (each batch shape compiles again).
IMAGES_NPZ is an ingest run's dataset/images.npz. Trains once per seed (train's --seed: initial
weights, data order, augmentation), printing each epoch and the test accuracy, then measures the
training and inference speed, and writes it all as JSON (--out).
With several seeds, JAX_COMPILATION_CACHE_DIR (and JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0)
lets the trainings after the first read the compiled step back instead of compiling it again.
"""

import argparse
import ast
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gpu_jax.json"
RECIPE = {"fitting": ("new_model", "compile_model", "steps", "WeightAverage"), "data": ("augmenter",)}


def load_recipe() -> dict:
    """RECIPE's functions and classes, compiled from the project's source and bound to Keras and
    the project's config and resnet: under whatever backend Keras was imported with."""
    import keras

    from pipeline import resnet

    namespace = {"keras": keras, "np": np, "math": math, "config": config, "resnet": resnet}
    for module, names in RECIPE.items():
        path = ROOT / "pipeline" / f"{module}.py"
        tree = ast.parse(path.read_text())
        definitions = (ast.FunctionDef, ast.ClassDef)
        body = [node for node in tree.body if isinstance(node, definitions) and node.name in names]
        missing = set(names) - {node.name for node in body}
        if missing:
            raise SystemExit(f"{path}: no {', '.join(sorted(missing))}; update RECIPE")
        exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(config.NUM_CLASSES, dtype=np.float32)[labels]


def epoch_times(keras):
    class EpochTimes(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)

    return EpochTimes()


def augmented_batches(keras, augmenter, x, y, batch_size, seed):
    """data.dataset's training batches (shuffled, augmented) without tf.data. Under JAX Keras runs
    a model that holds augmentation layers eagerly (7 s a step on an H200), so the layers run
    here, jitted on their own, outside the model."""
    import jax

    class Augmented(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            layers = augmenter(seed)
            layers.build((None, *x.shape[1:]))
            self.seeds = [v.value for v in layers.non_trainable_variables]
            self.augment = jax.jit(
                lambda seeds, images: layers.stateless_call([], seeds, images, training=True)
            )
            self.rng = np.random.default_rng(seed)
            self.on_epoch_end()

        def __len__(self):
            return len(x) // batch_size

        def __getitem__(self, index):
            rows = self.order[index * batch_size : (index + 1) * batch_size]
            images, self.seeds = self.augment(self.seeds, x[rows].astype(np.float32))
            return np.asarray(images, np.float32), y[rows]

        def on_epoch_end(self):
            self.order = self.rng.permutation(len(x))

    return Augmented()


def reestimate_batch_norm(keras, model, images: np.ndarray, batch_size: int, seed: int) -> None:
    """fitting.reestimate_batch_norm, its forward pass jitted by JAX instead of tf.function."""
    import jax

    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    variables = model.non_trainable_variables
    slots = [
        [next(i for i, v in enumerate(variables) if v is stat) for stat in (n.moving_mean, n.moving_variance)]
        for n in norms
    ]
    for norm in norms:
        norm.momentum = 0.0  # a forward pass leaves its batch's statistics in the moving ones
    trainable = [v.value for v in model.trainable_variables]
    # the weights as arguments: closed over, JAX takes arrays as constants of the compiled pass
    forward = jax.jit(
        lambda weights, state, batch: model.stateless_call(weights, state, batch, training=True)[1]
    )
    state = [v.value for v in variables]
    order = np.random.default_rng(seed).permutation(len(images))
    batches = len(images) // batch_size
    totals = [[0.0, 0.0] for _ in norms]
    for start in range(0, batches * batch_size, batch_size):
        updated = forward(trainable, state, images[order[start : start + batch_size]].astype(np.float32))
        for total, slot in zip(totals, slots):
            for i in (0, 1):
                total[i] = total[i] + np.asarray(updated[slot[i]], np.float64)
    for (mean, variance), norm in zip(totals, norms):
        norm.momentum = config.BN_MOMENTUM
        norm.moving_mean.assign(mean / batches)
        norm.moving_variance.assign(variance / batches)


def train(keras, recipe, arrays: dict, epochs: int, seed: int, batch_size: int = config.BATCH_SIZE) -> dict:
    keras.utils.set_random_seed(seed)
    model = recipe["new_model"](config.IMAGE_SIZE)
    labels = one_hot(arrays["y_train"])
    batches = augmented_batches(keras, recipe["augmenter"], arrays["x_train"], labels, batch_size, seed)
    recipe["compile_model"](model, config.LEARNING_RATE, len(batches), epochs)
    times, average = epoch_times(keras), recipe["WeightAverage"](epochs)
    val = (arrays["x_val"].astype(np.float32), one_hot(arrays["y_val"]))
    start = time.perf_counter()
    history = model.fit(
        batches,
        epochs=epochs,
        validation_data=val,
        validation_batch_size=len(val[0]) // 2,  # two equal batches: one compile
        callbacks=[times, average],
        verbose=2,
    )
    result = {"fit_s": time.perf_counter() - start, "epoch_s": times.seconds}
    result["val_accuracy_by_epoch"] = history.history["val_accuracy"]
    if average.complete:
        model.set_weights(average.mean)
        start = time.perf_counter()
        reestimate_batch_norm(keras, model, arrays["x_train"], batch_size, seed)
        result["reestimate_s"] = time.perf_counter() - start
    for split in ("val", "test"):
        x = arrays[f"x_{split}"].astype(np.float32)
        probabilities = model.predict(x, batch_size=len(x) // 2, verbose=0)
        wrong = np.flatnonzero(probabilities.argmax(axis=1) != arrays[f"y_{split}"])
        result[f"{split}_wrong"] = wrong.tolist()  # indices into the split (the ingest's manifest.csv)
        result[f"{split}_accuracy"] = 1 - len(wrong) / len(x)
    return result


def train_speed(keras, recipe, images: np.ndarray, batch_size: int, epochs: int = 6) -> dict:
    """Images/s of the training step on unaugmented arrays, the median epoch after the first."""
    model = recipe["new_model"](config.IMAGE_SIZE)
    recipe["compile_model"](model, config.LEARNING_RATE, recipe["steps"](len(images), batch_size), epochs)
    times = epoch_times(keras)
    labels = one_hot(np.arange(len(images)) % config.NUM_CLASSES)
    model.fit(images, labels, batch_size=batch_size, epochs=epochs, callbacks=[times], verbose=0)
    return {"images_s": len(images) / float(np.median(times.seconds[1:])), "epoch_s": times.seconds}


def predict_speed(recipe, images: np.ndarray, batch_size: int = 64, repeat: int = 5) -> dict:
    model = recipe["new_model"](config.IMAGE_SIZE)
    model.predict(images, batch_size=batch_size, verbose=0)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        model.predict(images, batch_size=batch_size, verbose=0)
        seconds.append(time.perf_counter() - start)
    return {"images_s": len(images) / float(np.median(seconds)), "seconds": seconds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="an ingest run's dataset/images.npz")
    parser.add_argument("--epochs", type=int, default=config.EPOCHS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[config.SEED], help="one training each")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import keras

    report = {"keras": keras.__version__, "backend": keras.backend.backend(), "jax": jax.__version__}
    report["devices"] = [str(device) for device in jax.devices()]
    print(json.dumps(report), flush=True)
    arrays = dict(np.load(args.images))
    recipe = load_recipe()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    images = arrays["x_train"][: len(arrays["x_train"]) // 64 * 64].astype(np.float32)
    trainings = {
        "train" if seed == config.SEED else f"train_seed{seed}": lambda seed=seed: train(
            keras, recipe, arrays, args.epochs, seed
        )
        for seed in args.seeds
    }
    stages = {
        **trainings,
        "train_speed_batch32": lambda: train_speed(keras, recipe, images, 32),
        "predict_speed_batch64": lambda: predict_speed(recipe, images),
    }
    for name, stage in stages.items():
        start = time.perf_counter()
        report[name] = stage()
        report[name]["total_s"] = time.perf_counter() - start
        print(name, json.dumps(report[name]), flush=True)
        args.out.write_text(json.dumps(report, indent=1))  # what is done survives a timeout


if __name__ == "__main__":
    main()
