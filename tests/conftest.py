"""Shared fixtures: one small ShapesIVS dataset per test session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    from instructseg.data.synthetic import SynthSpec, generate

    root = tmp_path_factory.mktemp("shapesivs")
    generate(root, SynthSpec(seed=0, videos=4, images=8, frames=6, height=64, width=80))
    return root
