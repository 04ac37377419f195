"""mriflow: synthetic 3D brain MRI with flow matching, and the evidence of how good it is.

    >>> import mriflow
    >>> model = mriflow.load("2mm")
    >>> brain = model.sample(age=70, sex="M")      # nibabel images: brain.image, brain.labels

`load`, `evaluate`, `Model` and `Sample` live in mriflow.api and are imported when first used, so `import mriflow`
stays light (no torch) for the command line's start-up.
"""

__version__ = "0.1.0"

_API = ("load", "evaluate", "Model", "Sample", "read_sidecar")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    # The one import from the root down to the "use" layer (ARCHITECTURE.md): the façade of the Python API, made on
    # first use, so that every module below can import __version__ from here without pulling the API in.
    if name in _API:
        import importlib

        return getattr(importlib.import_module("mriflow.api"), name)
    raise AttributeError(f"module 'mriflow' has no attribute {name!r}")
