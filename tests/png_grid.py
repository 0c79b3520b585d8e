"""Reading a tiled image grid back from a PNG written by vae_fast.plots (matplotlib figure: a
title above, the grid shown with imshow(cmap="gray", vmin=0, vmax=1, interpolation="nearest"),
one white pixel between tiles), so that tests check the pixels, not just that a file exists.

The geometry is found from the picture itself, not from plots' code: below the title, the rows
and columns of the PNG that hold any non-white pixel form one band per row and per column of
tiles (the white gaps between tiles split them), and the grid's tile area spans the first band's
start to the last one's end; each tile pixel is then read at its centre."""

from __future__ import annotations

import numpy as np
from matplotlib import image as mpimg

# Below this a PNG pixel is "not white": a tile pixel of value 1 is written as 255.
_WHITE = 254.5 / 255


def _bands(mask: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True in a 1-D mask as (start, end) pairs."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def read_grid(path, tile_shape: tuple[int, int], *, titled: bool = True) -> np.ndarray:
    """The tiles of the grid PNG at `path` as float [rows, cols, H, W] grey values in [0, 1].

    Asserts the grid is laid out as tiles of `tile_shape` with one-pixel gaps and square pixels.
    """
    picture = mpimg.imread(str(path))
    assert picture.ndim == 3 and picture.shape[2] in (3, 4), picture.shape
    rgb = picture[..., :3].astype(np.float64)
    # The gray colormap: every pixel is grey (R = G = B), whatever the tiles hold.
    assert np.abs(rgb - rgb.mean(-1, keepdims=True)).max() < 2 / 255
    grey = rgb.mean(-1)
    rows = _bands((grey < _WHITE).any(1))
    if titled:
        rows = rows[1:]  # the title's line of text
    assert rows, f"{path}: no grid below the title"
    top, bottom = rows[0][0], rows[-1][1]
    cols = _bands((grey[top:bottom] < _WHITE).any(0))
    left, right = cols[0][0], cols[-1][1]
    h, w = tile_shape
    n_rows, n_cols = len(rows), len(cols)
    # Tile area: n tiles of h (w) pixels and n - 1 one-pixel gaps, each grid pixel s PNG pixels.
    sy = (bottom - top) / (n_rows * (h + 1) - 1)
    sx = (right - left) / (n_cols * (w + 1) - 1)
    assert sy > 2 and abs(sx - sy) / sy < 0.05, f"{path}: grid pixels {sx:.2f} x {sy:.2f} PNG pixels"
    # Each band must start where the geometry puts its tile (a band that split inside a tile or
    # two tiles run together would not).
    for index, (start, _) in enumerate(rows):
        assert abs(start - (top + index * (h + 1) * sy)) <= 1.5, f"{path}: tile row {index} starts at {start}"
    for index, (start, _) in enumerate(cols):
        assert abs(start - (left + index * (w + 1) * sx)) <= 1.5, f"{path}: tile column {index} starts at {start}"
    tiles = np.empty((n_rows, n_cols, h, w))
    for r in range(n_rows):
        for c in range(n_cols):
            ys = np.floor(top + (r * (h + 1) + np.arange(h) + 0.5) * sy).astype(int)
            xs = np.floor(left + (c * (w + 1) + np.arange(w) + 0.5) * sx).astype(int)
            tiles[r, c] = grey[np.ix_(ys, xs)]
    return tiles
