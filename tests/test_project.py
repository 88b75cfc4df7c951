"""The project files agree with each other and with the code."""

import importlib
import re
import tomllib

import pytest
import yaml
from conftest import ROOT

from pipeline import config

MLPROJECT = yaml.safe_load((ROOT / "MLproject").read_text())
ENTRY_POINTS = MLPROJECT["entry_points"]


def test_conda_yaml_names_the_same_requirements_as_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(item["pip"] for item in conda["dependencies"] if isinstance(item, dict))
    assert sorted(req for req in pip_section if not req.startswith("-e")) == sorted(
        pyproject["project"]["dependencies"]
    )
    python = next(
        item for item in conda["dependencies"] if isinstance(item, str) and item.startswith("python")
    )
    assert python.split("=")[1] in pyproject["project"]["requires-python"]


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_entry_point_parameters_are_the_cli_options(entry_point):
    spec = ENTRY_POINTS[entry_point]
    module = importlib.import_module(f"pipeline.{entry_point}")
    assert spec["command"].startswith(f"python -m pipeline.{entry_point} ")
    options = re.findall(r"--([a-z0-9-]+) \{([a-z0-9_]+)\}", spec["command"])
    assert sorted(name for _, name in options) == sorted(spec["parameters"])
    for flag, name in options:
        assert flag == name.replace("_", "-")
    # The defaults in MLproject are the CLI's defaults (one place: pipeline/config.py).
    parsed = vars(
        module.parse_args([f"--{flag}={spec['parameters'][name]['default']}" for flag, name in options])
    )
    assert parsed == vars(module.parse_args([]))


def test_default_source_is_the_pinned_public_archive():
    assert ENTRY_POINTS["ingest"]["parameters"]["source"]["default"] == config.DATASET_URL
    assert config.DATASET_COMMIT in config.DATASET_URL


def test_ignored_outputs_stay_out_of_git():
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    for pattern in (
        "mlflow.db",
        "/mlruns/*",
        "/input_dataset/*",
        ".venv/",
        "/tuner/",
        "/checkpoints/",
        "/.tracking-server/",
    ):
        assert pattern in ignored
    assert (ROOT / "input_dataset" / "README.md").is_file()


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("document", ["README.md", "benchmarks/README.md", "benchmarks/RUNS.md"])
def test_document_links_point_at_files_and_headings_that_exist(document):
    path = ROOT / document
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", path.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        linked = (path.parent / target) if target else path
        assert linked.exists(), f"{document} links to {target}, which does not exist"
        if anchor:
            headings = heading_anchors(linked.read_text())
            assert anchor in headings, f"{document}: {linked.name} has no heading for #{anchor}"
