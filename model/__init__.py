"""Model package: `from model import build_model`.

Imports are lazy so that `import model.moe` (or `model.clip_model`) stays light.
"""

__all__ = ["build_model", "RetrievalModel"]


def __getattr__(name):
    if name in __all__:
        from . import build
        return getattr(build, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
