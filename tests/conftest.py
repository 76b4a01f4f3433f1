"""Shared test set-up: a hypothesis profile sized for 2 cores, and model-file helpers."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

import milsparse  # noqa: F401  (registers passes; hides coremltools' import-time noise)

settings.register_profile(
    "default",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def save_program(tmp_path):
    """Save a built MIL program as a .mlpackage under tmp_path and return its path."""
    from milsparse.fixtures.programs import program_to_mlmodel

    def _save(prog, name="model.mlpackage"):
        path = tmp_path / name
        program_to_mlmodel(prog).save(str(path))
        return path

    return _save
