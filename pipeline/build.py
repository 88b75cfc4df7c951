"""Build: the ResNet50 architecture, logged as a config, a summary and a parameter count."""

import json
import logging
import tempfile
from pathlib import Path

import mlflow

from pipeline import cli, config, tracking
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.build")


def run(out_dir: Path, image_size: int = config.IMAGE_SIZE, num_classes: int = config.NUM_CLASSES):
    """Build the model and write its architecture and summary to `out_dir`.

    Raises PipelineError naming the parameter when the shape is impossible.
    """
    import keras  # TensorFlow takes seconds to import; only build, tune and train need it

    from pipeline import fitting

    try:
        model = fitting.new_model(image_size, num_classes)  # the model train and tune start from
    except ValueError as error:
        raise PipelineError(str(error)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / config.ARCHITECTURE_FILE).write_text(json.dumps(json.loads(model.to_json()), indent=1))
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line), line_length=120)
    (out_dir / config.SUMMARY_FILE).write_text("\n".join(lines) + "\n")
    log.info(
        "built %s with %s parameters (keras %s)", model.name, f"{model.count_params():,}", keras.__version__
    )
    return model


def load(folder: Path):
    """The (untrained) model described by a downloaded build artifact folder."""
    import keras

    path = folder / config.ARCHITECTURE_FILE
    try:
        return keras.models.model_from_json(path.read_text())
    except (OSError, ValueError, TypeError) as error:
        raise PipelineError(f"{path}: cannot rebuild the model ({error})") from None


def parse_args(argv: list[str] | None):
    parser = cli.parser("build", __doc__.splitlines()[0])
    parser.add_argument("--image-size", type=cli.image_size, default=config.IMAGE_SIZE)
    parser.add_argument("--num-classes", type=cli.int_range(2), default=config.NUM_CLASSES)
    return parser.parse_args(argv)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tracking.stage_run("build", vars(args)), tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / config.BUILD_ARTIFACT
        model = run(out_dir, args.image_size, args.num_classes)
        trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
        mlflow.log_metrics({"num_params": model.count_params(), "num_trainable_params": trainable})
        mlflow.log_artifacts(str(out_dir), artifact_path=config.BUILD_ARTIFACT)


if __name__ == "__main__":
    cli.run(main)
