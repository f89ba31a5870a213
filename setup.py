"""One build step beyond pyproject.toml: schemas/ and config/ go into the package.

In a checkout they stay where they are (the settings' defaults point at them); a wheel carries
copies as ``pipeline/_data/schemas`` and ``pipeline/_data/config``, which is where the defaults
point when Herald runs from an installed package (pipeline.settings.data_root). Copying at
build keeps them out of the package tree in the checkout, and keeps setuptools from treating
every schema and template directory as a Python package.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA = ("schemas", "config")


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install runs from the checkout, which has them
        root = Path(__file__).resolve().parent
        target = Path(self.build_lib) / "pipeline" / "_data"
        for name in DATA:
            shutil.rmtree(target / name, ignore_errors=True)
            shutil.copytree(
                root / name, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )


setup(cmdclass={"build_py": BuildPyWithData})
