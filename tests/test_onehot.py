"""One-hot encoding: label k is column k, round trip, and labels out of range."""

import numpy as np
import pytest

from pipeline import config, onehot
from pipeline.errors import PipelineError


def test_label_k_is_column_k():
    encoded = onehot.encode(np.arange(10))
    assert encoded.dtype == np.float32
    assert np.array_equal(encoded, np.eye(10, dtype=np.float32))


def test_round_trip():
    labels = np.random.default_rng(0).integers(0, 10, 500)
    assert np.array_equal(onehot.decode(onehot.encode(labels)), labels)


@pytest.mark.parametrize("labels", [[0, 10], [-1, 3], [11]])
def test_labels_outside_the_classes_are_rejected(labels):
    with pytest.raises(PipelineError, match=r"outside \[0, 10\)"):
        onehot.encode(np.array(labels))


def test_non_integer_labels_are_rejected():
    with pytest.raises(PipelineError, match="1-D integer"):
        onehot.encode(np.array([0.0, 1.0]))


def test_run_encodes_every_split_of_an_ingest_folder(dataset_dir, tmp_path):
    from pipeline import ingest

    ingested = ingest.run(str(dataset_dir), tmp_path / "dataset", data_dir=tmp_path / "cache")
    encoded = onehot.run(tmp_path / "dataset", tmp_path / "onehot")
    loaded = onehot.load(tmp_path / "onehot")
    for split in config.SPLITS:
        assert np.array_equal(loaded[f"y_{split}"], encoded[f"y_{split}"])
        assert np.array_equal(onehot.decode(loaded[f"y_{split}"]), ingested.arrays[f"y_{split}"])


def test_fewer_classes_than_labels_fails(dataset_dir, tmp_path):
    from pipeline import ingest

    ingest.run(str(dataset_dir), tmp_path / "dataset", data_dir=tmp_path / "cache")
    with pytest.raises(PipelineError, match=r"outside \[0, 5\)"):
        onehot.run(tmp_path / "dataset", tmp_path / "onehot", num_classes=5)
