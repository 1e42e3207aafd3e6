"""instructseg: instructed visual segmentation of images and videos.

Public API (imported lazily so that `import instructseg` stays fast):
`InstructSegModel`, `ModelConfig`, `InstructSegPredictor`, `load_model`.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "instructseg.config",
    "InstructSegModel": "instructseg.model.instructseg",
    "load_model": "instructseg.model.instructseg",
    "InstructSegPredictor": "instructseg.inference.predictor",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'instructseg' has no attribute {name!r}")


__all__ = list(_LAZY)
