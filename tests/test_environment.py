"""pyproject.toml and environment.yml list the same packages; CI runs make test."""
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_conda_and_pip_dependency_lists_agree():
    pip_deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item)
    assert sorted(pip_section) == sorted(pip_deps)
    names = {dep.split("=")[0].split(">")[0].split("<")[0] for dep in pip_deps}
    assert {"torch", "torchvision", "timm", "faiss-gpu", "scikit-learn", "opencv-python-headless",
            "matplotlib", "pandas", "tqdm", "pytest"} <= names


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
