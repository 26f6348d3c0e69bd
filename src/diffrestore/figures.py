"""Image grids and figure files: a fixed pixel layout, drawn with matplotlib, saved atomically.

Used by the evaluation report (Figure 4 and the other figures) and by ``diffrestore demo``'s
comparison grid. matplotlib is imported only when a grid is drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffrestore import image_io


def save_figure(fig, path: Path) -> None:
    with image_io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)


def read_png(path: Path):
    from PIL import Image

    if not path.exists():
        return None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB") if im.mode not in ("RGB", "L") else im)


def show_image(ax, img, title=None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if img is None:
        ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes, color="grey")
    else:
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest", vmin=0, vmax=255 if img.dtype == np.uint8 else 1)
    if title:
        ax.set_title(title, fontsize=8)


class GridGeometry:
    """Pixel layout of an image grid: ``nrows`` x ``ncols`` square cells of ``cell_px`` pixels.

    From the top: an optional title band, the column titles, then the rows; each row is a band of
    cells plus (with captions) a caption strip below every cell. Row labels sit in a left margin.
    ``box(r, c)`` is the (left, top, right, bottom) pixel box of cell (r, c) in the saved PNG,
    whose size is exactly ``size``.
    """

    TITLE_PX = 30
    COL_TITLE_PX = 40
    CAPTION_PX = 20
    GAP_PX = 6
    MARGIN_PX = 6

    def __init__(
        self, nrows: int, ncols: int, *, cell_px: int, label_px: int, captions: bool, title: bool, col_title_px: int | None = None
    ):
        self.nrows, self.ncols, self.cell = int(nrows), int(ncols), int(cell_px)
        self.left = int(label_px)
        self.top = (self.TITLE_PX if title else self.MARGIN_PX) + int(col_title_px or self.COL_TITLE_PX)
        self.row_px = self.cell + (self.CAPTION_PX if captions else 0)
        width = self.left + self.ncols * self.cell + (self.ncols - 1) * self.GAP_PX + self.MARGIN_PX
        height = self.top + self.nrows * self.row_px + (self.nrows - 1) * self.GAP_PX + self.MARGIN_PX
        self.size = (width, height)

    def box(self, r: int, c: int) -> tuple[int, int, int, int]:
        x0 = self.left + c * (self.cell + self.GAP_PX)
        y0 = self.top + r * (self.row_px + self.GAP_PX)
        return x0, y0, x0 + self.cell, y0 + self.cell


def draw_image_grid(
    path: Path,
    cells: list[list],
    *,
    col_titles: list[str],
    row_labels: list[str],
    captions: list[list] | None = None,
    bold: set[tuple[int, int]] = frozenset(),
    title: str | None = None,
    cell_px: int = 160,
    label_px: int = 90,
    col_title_px: int | None = None,
    dpi: int = 100,
) -> GridGeometry:
    """Draw a grid of images (``cells[r][c]``: an (H, W[, 3]) array, uint8 or float in [0, 1], or None
    for "missing") with a title per column (above the first row), a label per row (left, horizontal),
    an optional caption under each cell (``captions[r][c]``, None for none; cells in ``bold`` get a
    bold caption) and an optional figure title; save it as a PNG at ``path`` (atomically).

    Images fill their square cell (nearest-neighbour, so a small measurement shows its pixels).
    Returns the :class:`GridGeometry`: the PNG is exactly ``geometry.size`` pixels and cell (r, c)
    is drawn inside ``geometry.box(r, c)``. ``col_title_px``: the height of the column titles' band
    (default ``GridGeometry.COL_TITLE_PX``, two lines), for titles of more lines.
    """
    from matplotlib.figure import Figure

    nrows, ncols = len(cells), len(col_titles)
    if len(row_labels) != nrows or any(len(row) != ncols for row in cells):
        raise ValueError(f"grid of {nrows} rows x {ncols} columns needs {nrows} row labels and {ncols} cells per row")
    geo = GridGeometry(
        max(1, nrows), ncols, cell_px=cell_px, label_px=label_px, captions=captions is not None, title=title is not None,
        col_title_px=col_title_px,
    )  # fmt: skip
    width, height = geo.size
    # +0.25 px: the canvas is int(inches * dpi) pixels, so float rounding cannot lose a pixel
    fig = Figure(figsize=((width + 0.25) / dpi, (height + 0.25) / dpi), dpi=dpi)
    if title:
        # shrink a title wider than a narrow grid (one method: three columns) so it is not clipped;
        # an average glyph is about 0.55 em wide, an em is fontsize * dpi / 72 px
        fit = 0.95 * width / (0.55 * len(title) * dpi / 72)
        fig.text(0.5, 1 - geo.MARGIN_PX / height, title, ha="center", va="top", fontsize=min(11.0, fit))
    for r, row in enumerate(cells):
        for c, img in enumerate(row):
            x0, y0, x1, y1 = geo.box(r, c)
            ax = fig.add_axes((x0 / width, 1 - y1 / height, (x1 - x0) / width, (y1 - y0) / height))
            show_image(ax, img, col_titles[c] if r == 0 else None)
            ax.set_aspect("auto")
            if r == 0:
                ax.title.set_fontsize(10)
            if c == 0:
                ax.text(-8 / geo.cell, 0.5, row_labels[r], transform=ax.transAxes, ha="right", va="center", fontsize=10)
            if captions is not None and captions[r][c]:
                ax.text(
                    0.5, -3 / geo.cell, captions[r][c], transform=ax.transAxes, ha="center", va="top", fontsize=9,
                    fontweight="bold" if (r, c) in bold else "normal",
                )  # fmt: skip
    save_figure(fig, path)
    return geo
