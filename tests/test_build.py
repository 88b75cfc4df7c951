"""The build stage: architecture and summary files, and a model rebuilt from them."""

import json

import pytest

from pipeline import build, config
from pipeline.errors import PipelineError


@pytest.mark.slow
def test_build_writes_a_config_that_rebuilds_the_same_model(tmp_path):
    model = build.run(tmp_path / "model")
    architecture = json.loads((tmp_path / "model" / config.ARCHITECTURE_FILE).read_text())
    assert architecture["config"]["name"] == "resnet50"
    summary = (tmp_path / "model" / config.SUMMARY_FILE).read_text()
    assert "res5c_branch2c" in summary and f"{model.count_params():,}" in summary
    rebuilt = build.load(tmp_path / "model")
    assert rebuilt.count_params() == model.count_params() == 23_608_202
    assert rebuilt.output_shape == (None, 10)
    # The model train and tune start from: their batch-norm momentum and zero-initialised blocks.
    assert rebuilt.get_layer("bn3a_branch2a").momentum == config.BN_MOMENTUM
    zero_init = not rebuilt.get_layer("bn3a_branch2c").gamma.numpy().any()
    assert zero_init == config.ZERO_INIT_RESIDUAL


@pytest.mark.parametrize(
    ("options", "name"), [({"image_size": 16}, "input_shape"), ({"num_classes": 1}, "num_classes")]
)
def test_impossible_shapes_fail_with_the_parameter_named(tmp_path, options, name):
    with pytest.raises(PipelineError, match=name):
        build.run(tmp_path / "model", **options)


def test_unreadable_architecture_names_the_file(tmp_path):
    (tmp_path / config.ARCHITECTURE_FILE).write_text("{not json")
    with pytest.raises(PipelineError, match=config.ARCHITECTURE_FILE):
        build.load(tmp_path)
