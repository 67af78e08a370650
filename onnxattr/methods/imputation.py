"""Noisy linear imputation (Rong et al. 2022, ROAD): removed pixels filled from their neighbours.

Each removed pixel takes the weighted mean of its in-image neighbours, the 4 direct ones
weighing 1/6 and the 4 diagonal ones 1/12 (the weights of Rong et al.'s `NoisyLinearImputer`;
at the border the mean is over the neighbours inside the image). Removed neighbours are
unknowns too, so all removed pixels are solved jointly: one sparse linear system per image,
symmetric positive definite whenever a pixel is kept. It is block tridiagonal over the image
rows (a row's unknowns couple only to the rows above and below), solved exactly by block
elimination row by row with dense solves of at most a row's width, numpy only.
"""

import numpy as np

# (dy, dx) -> weight
NEIGHBOURS = {(dy, dx): 1 / 12 if dy and dx else 1 / 6
              for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx}


def shifted(grid, dy, dx):
    """grid[..., y + dy, x + dx] at each (y, x), 0 where that falls outside the image."""
    height, width = grid.shape[-2:]
    out = np.zeros_like(grid)
    out[..., max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)] = \
        grid[..., max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)]
    return out


def _coupling(removed, place, y, row_above, cols):
    """Block (len(cols), unknowns of row `row_above`): -weight where a removed pixel of row y
    at `cols` has a removed neighbour in `row_above` (y - 1, or y itself for the row's own)."""
    width = removed.shape[1]
    block = np.zeros((len(cols), int(removed[row_above].sum())))
    for (dy, dx), weight in NEIGHBOURS.items():
        if y + dy != row_above:
            continue
        column = cols + dx
        inside = (column >= 0) & (column < width)
        hit = inside.copy()
        hit[inside] = removed[row_above, column[inside]]
        block[np.flatnonzero(hit), place[row_above, column[hit]]] -= weight
    return block


def linear_impute(image, removed):
    """float64 (C, H, W): `image` with its `removed` pixels ((H, W) bool) replaced by the
    joint weighted mean of their neighbours (noise not added)."""
    image = np.asarray(image, np.float64)
    total = sum(w * shifted(np.ones(removed.shape), dy, dx) for (dy, dx), w in NEIGHBOURS.items())
    given = sum(w * shifted(image * ~removed, dy, dx) for (dy, dx), w in NEIGHBOURS.items())
    place = np.cumsum(removed, axis=1) - 1  # an unknown's index within its row
    # forward: each row's Schur complement inverted, with the right-hand side carried down
    inverses, carried, couplings = [], [], []
    for y in range(removed.shape[0]):
        cols = np.flatnonzero(removed[y])
        schur = _coupling(removed, place, y, y, cols)
        schur[np.arange(len(cols)), np.arange(len(cols))] = total[y, cols]
        rhs = given[:, y, cols].T
        if y:
            above = _coupling(removed, place, y, y - 1, cols)  # row y's unknowns to row y - 1's
            schur -= above @ inverses[-1] @ above.T
            rhs = rhs - above @ (inverses[-1] @ carried[-1])
            couplings.append(above)
        inverses.append(np.linalg.inv(schur))
        carried.append(rhs)
    # backward: each row from the one below it
    filled = image.copy()
    values = np.zeros((0, image.shape[0]))
    for y in range(removed.shape[0] - 1, -1, -1):
        if y + 1 < removed.shape[0]:
            carried[y] = carried[y] - couplings[y].T @ values
        values = inverses[y] @ carried[y]
        filled[:, y, removed[y]] = values.T
    return filled
