"""pyproject.toml and environment.yml list the same packages; CI runs make test."""
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]


def names(deps: list[str]) -> set[str]:
    return {dep.split("=")[0].split(">")[0].split("<")[0] for dep in deps}


def test_conda_and_pip_dependency_lists_agree():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime, test = project["dependencies"], project["optional-dependencies"]["test"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item)
    assert sorted(pip_section) == sorted(runtime + test)
    assert {"torch", "torchvision", "timm", "faiss-gpu", "scikit-learn", "opencv-python-headless",
            "matplotlib", "pandas", "tqdm", "tensorboard"} <= names(runtime)
    # what only the tests need stays out of the runtime list
    assert names(test) == {"pytest", "pyyaml", "selenium", "ruff"} and not names(test) & names(runtime)


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
