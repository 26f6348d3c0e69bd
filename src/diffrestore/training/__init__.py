"""Training the built-in priors from scratch (resumable, CPU- or CUDA-friendly).

* ``train_pixel(data_dir, out_dir, run_dir, ...)`` -> ``builtin/pixel-s`` (``python -m diffrestore.training.pixel``);
* ``train_latent_sr(stage, data_dir, out_dir, run_dir, ...)``, stage ``"autoencoder"`` then ``"unet"``
  -> ``builtin/ldmsr-s`` (``python -m diffrestore.training.latent_sr``).

Both command modules also have ``main(argv)`` / ``build_parser()`` for the CLI. The shared pieces:
:mod:`.options` (loop options, command line), :mod:`.trainer` (the work around a model and its loss),
:mod:`.loop`, :mod:`.checkpoints`, :mod:`.data`, :mod:`.model_folder` (exported folders).
"""

__all__ = ["train_pixel", "train_latent_sr"]


def __getattr__(name):  # lazy, so ``python -m diffrestore.training.pixel`` does not import itself twice
    if name == "train_pixel":
        from .pixel import train_pixel

        return train_pixel
    if name == "train_latent_sr":
        from .latent_sr import train_latent_sr

        return train_latent_sr
    raise AttributeError(name)
