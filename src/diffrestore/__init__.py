"""diffrestore: diffusion-based image restoration and honest benchmarking.

Three nouns: operators (the degradation y = Hx + noise, with its SVD), priors (a diffusion network
plus its schedule) and methods (functions restore(prior, operator, y, ...) -> x_hat).

Importing the package keeps freed memory in the C allocator's heap between network calls
(``diffrestore.runtime``; ``DIFFRESTORE_MALLOC=system`` opts out).
"""

from diffrestore import runtime as _runtime

__version__ = "0.1.0"

_runtime.tune_allocator()
