"""diffrestore: diffusion-based image restoration and honest benchmarking.

Three nouns: operators (the degradation y = Hx + noise, with its SVD), priors (a diffusion network
plus its schedule) and methods (functions restore(prior, operator, y, ...) -> x_hat).
"""

__version__ = "0.1.0"
