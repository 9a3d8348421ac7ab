"""Shared fixtures: example models built once per session from their fixed seeds."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest

from edgecc.models.examples import build_example


@pytest.fixture(scope="session")
def example_path(tmp_path_factory):
    """example_path(name, exporter) -> path of that example, exported once per session."""
    root = tmp_path_factory.mktemp("examples")
    cache: dict = {}

    def get(name: str, exporter: str = "dynamo"):
        key = (name, exporter)
        if key not in cache:
            cache[key] = build_example(name, root / f"{name}-{exporter}.onnx", exporter=exporter)
        return cache[key]

    return get


def parse_model(text: str) -> onnx.ModelProto:
    """A model from ONNX text format, checked."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


def run_cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    """The edgecc CLI in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "edgecc.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """hf_model(arch, exporter) -> a random-weight transformers LM exported once per session."""
    from tests import hf_models

    root = tmp_path_factory.mktemp("hf")
    cache: dict = {}

    def get(arch: str, exporter: str = "dynamo"):
        key = (arch, exporter)
        if key not in cache:
            cache[key] = hf_models.export(arch, exporter, root / f"{arch}-{exporter}.onnx")
        return cache[key]

    return get
