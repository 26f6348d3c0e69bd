"""One progress bar for a whole restoration: network tiles x diffusion steps, with the time left."""

from __future__ import annotations


class RestorationProgress:
    """A tqdm bar counting network calls (each tile of a tiled prior, or each whole-image call).

    Hook ``tiles`` to a tiled prior's ``on_tiles`` and pass ``step`` as the method's ``callback``: the
    bar's total (steps x tiles per step) is re-estimated at every step from the tiles counted so far,
    so tqdm's remaining-time estimate covers the whole restoration.
    """

    def __init__(self, desc: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=None, desc=desc, unit="tile", leave=False, disable=not enabled)
        self.done = 0
        self._at_last_step = 0

    def tiles(self, n: int) -> None:
        self.done += n
        self.bar.update(n)

    def step(self, info) -> None:
        """The method's callback (a ``StepInfo`` with ``i`` and ``steps``)."""
        if self.done == self._at_last_step:  # an untiled prior reports nothing: one call per step
            self.tiles(1)
        self._at_last_step = self.done
        i, steps = int(info["i"]), int(info["steps"])
        self.bar.total = self.done + round((steps - i - 1) * self.done / (i + 1))
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
