"""diffrestore: diffusion-based image restoration and honest benchmarking.

    from diffrestore import restore
    restore("photo.png", task="denoise").save("restored.png")

Three nouns: operators (the degradation y = Hx + noise, with its SVD), priors (a diffusion network
plus its schedule) and methods (functions restore(prior, operator, y, ...) -> x_hat). The names
below are imported on first use, so ``import diffrestore`` (and the CLI's ``--help``) stays fast.

Importing the package keeps freed memory in the C allocator's heap between network calls
(``diffrestore.runtime``; ``DIFFRESTORE_MALLOC=system`` opts out).
"""

from diffrestore import runtime as _runtime

__version__ = "0.1.0"

_runtime.tune_allocator()

_LAZY = {
    "restore": "diffrestore.api",
    "run": "diffrestore.api",
    "Restoration": "diffrestore.api",
    "get_method": "diffrestore.methods",
    "make_task": "diffrestore.operators.tasks",
    "load_prior": "diffrestore.priors.loading",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffrestore' has no attribute {name!r}")
