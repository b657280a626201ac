"""Shared pytest fixtures: tiny random models saved as local HF folders, and texts.

The builders behind them live in ``tiny.py``.
"""

from pathlib import Path

import pytest

from tiny import CORPUS, save_tiny_model


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models"), request.param)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("texts")
    for i in range(3):
        (root / f"part{i}.txt").write_text(CORPUS)
    return root
