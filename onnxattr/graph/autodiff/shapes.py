"""Vector-Jacobian rules of ops that move values without arithmetic: reshapes, Transpose,
Concat, Split, Slice, Gather, Expand, Tile, Pad, Resize.

Shape, index and size inputs never carry a gradient. Where a gradient must put values back at
positions (Slice with steps other than 1, Pad reflect/edge/wrap), the forward op is applied to
an int64 map of x's flat indices and dy is scatter-added there (`_adjoint_by_index`).
"""

import numpy as np

from .registry import vjp


@vjp("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(g):
    """y = x with another shape:  dx = dy reshaped to x's shape."""
    return g.reshape_like(g.dy(), g.x())


@vjp("Transpose")
def transpose(g):
    """y = transpose(x, perm):  dx = transpose(dy, inverse of perm)."""
    perm = g.attr("perm") or list(reversed(range(g.rank(g.x()))))
    return g.op("Transpose", g.dy(), perm=[int(i) for i in np.argsort(perm)])


@vjp("Concat", inputs=None)
def concat(g):
    """y = concat(x_0, x_1, ..., axis):  dx_i = the slice of dy along axis where x_i sits (one
    Split of dy, sizes from the inferred shapes or from Shape at run time)."""
    rank = g.rank(g.y())
    axis = g.attr("axis") % rank
    names = list(g.node.input)
    sizes = [(g.shape(n) or [None] * rank)[axis] for n in names]
    if all(isinstance(s, int) for s in sizes):
        split = g.ints(sizes)
    else:
        split = g.op("Concat", *[g.op("Shape", n, start=axis, end=axis + 1) for n in names],
                     axis=0)
    parts = g.op("Split", g.dy(), split, axis=axis, outputs=len(names))
    if len(names) == 1:
        parts = [parts]
    return [part if g.wants(i) else None for i, part in enumerate(parts)]


@vjp("Split")
def split(g):
    """y_0, y_1, ... = split(x, axis):  dx = concat(dy_0, dy_1, ...) with zeros for outputs
    nothing uses."""
    axis = g.attr("axis", 0) % g.rank(g.x())
    parts = [g.dy_or_zeros(i) for i in range(len(g.node.output))]
    return g.op("Concat", *parts, axis=axis) if len(parts) > 1 else parts[0]


@vjp("Expand")
def expand(g):
    """y = x broadcast to a shape:  dx = dy summed over the broadcast axes."""
    return g.unbroadcast(g.dy(), g.x())


@vjp("Tile")
def tile(g):
    """y = tile(x, repeats):  dy viewed as [r_0, d_0, r_1, d_1, ...] (repeat-major, as Tile
    lays it out), dx = its sum over the r axes."""
    x = g.x()
    rank = g.rank(x)
    repeats, dims = g.value(g.x(1)), g.static_dims(x)
    if repeats is not None and dims is not None:
        view = g.ints([v for pair in zip(np.asarray(repeats).reshape(-1), dims) for v in pair])
    else:
        column = g.ints([1])
        pairs = g.op("Concat", g.op("Unsqueeze", g.x(1), column),
                     g.op("Unsqueeze", g.op("Shape", x), column), axis=1)
        view = g.op("Reshape", pairs, g.ints([-1]))
    return g.reduce_sum(g.op("Reshape", g.dy(), view), list(range(0, 2 * rank, 2)), keepdims=0)


@vjp("Slice")
def slice_(g):
    """y = x[starts:ends:steps] on some axes:  dx = dy padded back with zeros where all steps
    are 1 and the bounds and x's sliced dims are static; else dy scatter-added at the sliced
    positions of an index map of x."""
    x = g.x()
    rank = g.rank(x)
    starts, ends = g.value(g.x(1)), g.value(g.x(2))
    axes = g.value(g.x(3)) if g.x(3) else np.arange(len(np.asarray(starts).reshape(-1))) \
        if starts is not None else None
    steps = g.value(g.x(4)) if g.x(4) else (np.ones_like(axes) if axes is not None else None)
    if all(v is not None for v in (starts, ends, axes, steps)):
        axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
        steps = [int(s) for s in np.asarray(steps).reshape(-1)]
        shape = g.shape(x)
        if all(s == 1 for s in steps) and all(isinstance(shape[a], int) for a in axes):
            pads = [0] * 2 * rank
            for a, start, end in zip(axes, np.asarray(starts).reshape(-1),
                                     np.asarray(ends).reshape(-1)):
                first, stop, _ = slice(int(start), int(end), 1).indices(shape[a])
                pads[a] = first
                pads[rank + a] = shape[a] - max(stop, first)
            return g.op("Pad", g.dy(), g.ints(pads))
    return _adjoint_by_index(g, lambda index: g.op("Slice", index, *g.node.input[1:]),
                             reduction="none")


@vjp("Gather")
def gather(g):
    """y = take(x, indices, axis):  dx = zeros with dy scatter-added at the indices along axis
    (repeated indices add up; negative ones count from the end; a scalar index too)."""
    x, indices = g.x(0), g.x(1)
    rank = g.rank(x)
    axis = g.attr("axis", 0) % rank
    dims = g.static_dims(x)
    dim = g.op("Shape", x, start=axis, end=axis + 1) if dims is None else None
    constant = g.value(indices)
    if constant is not None and dims is not None:
        flat = g.ints(np.where(constant < 0, constant + dims[axis], constant).reshape(-1))
    else:
        flat = g.op("Cast", g.op("Reshape", indices, g.ints([-1])), to=7)
        size = g.ints([dims[axis]]) if dims is not None else dim
        flat = g.op("Where", g.op("Less", flat, g.const(np.array(0, np.int64))),
                    g.op("Add", flat, size), flat)
    if dims is not None:
        grouped_shape = g.ints(dims[:axis] + [-1] + dims[axis + 1:])
    else:
        grouped_shape = g.op("Concat", g.op("Shape", x, end=axis), g.ints([-1]),
                             g.op("Shape", x, start=axis + 1), axis=0)
    grouped = g.op("Reshape", g.dy(), grouped_shape)
    index = g.op("Reshape", flat, g.ints([1] * axis + [-1] + [1] * (rank - axis - 1)))
    index = g.op("Expand", index, g.op("Shape", grouped))
    return g.op("ScatterElements", g.zeros_like(x), index, grouped, axis=axis, reduction="add")


@vjp("Pad")
def pad(g):
    """y = pad(x, pads): constant mode: dx = dy with what was added cropped (Slice) and what a
    negative pad cropped refilled with zeros (Pad), or dx = pad(dy, -pads) when the pads are
    not constant; reflect, edge, wrap: dy scatter-added at the source cell of every output cell
    (an index map of x padded the same way)."""
    mode = g.attr("mode", "constant")
    if mode != "constant":
        inputs = list(g.node.input[1:])
        if len(inputs) > 1:
            inputs[1] = ""  # the constant value has no meaning outside constant mode
        return _adjoint_by_index(g, lambda index: g.op("Pad", index, *inputs, mode=mode),
                                 reduction="add")
    pads, axes = g.value(g.x(1)), g.value(g.x(3)) if g.x(3) else None
    if pads is None or (g.x(3) and axes is None):
        inputs = [g.dy(), g.op("Neg", g.x(1))] + (["", g.x(3)] if g.x(3) else [])
        return g.op("Pad", *inputs)
    rank = g.rank(g.x())
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in np.asarray(axes)]
    begin, end = [0] * rank, [0] * rank
    for k, a in enumerate(axes):
        begin[a], end[a] = pads[k], pads[k + len(axes)]
    dx = g.dy()
    if any(p < 0 for p in begin + end):  # refill the cells the forward cropped
        dx = g.op("Pad", dx, g.ints([max(-p, 0) for p in begin] + [max(-p, 0) for p in end]))
    if any(p > 0 for p in begin + end):  # crop the cells the forward added
        cut = [a for a in range(rank) if begin[a] > 0 or end[a] > 0]
        big = np.iinfo(np.int64).max
        dx = g.op("Slice", dx, g.ints([max(begin[a], 0) for a in cut]),
                  g.ints([-end[a] if end[a] > 0 else big for a in cut]), g.ints(cut))
    return dx


def _adjoint_by_index(g, forward, reduction):
    """The cotangent of x for a y that only copies cells of x: `forward` applied to x's flat
    indices says where each y cell came from; dy is scattered there."""
    x = g.x()
    flat = g.ints([-1])
    count = g.op("Size", x)
    index = g.op("Reshape", g.op("Range", g.const(np.array(0, np.int64)), count,
                                 g.const(np.array(1, np.int64))), g.op("Shape", x))
    source = g.op("Reshape", forward(index), flat)
    zeros = g.op("Reshape", g.zeros_like(x), flat)
    scattered = g.op("ScatterElements", zeros, source, g.op("Reshape", g.dy(), flat), axis=0,
                     reduction=reduction)
    return g.op("Reshape", scattered, g.op("Shape", x))


# --- Resize ----------------------------------------------------------------------------------------

@vjp("Resize")
def resize(g):
    """y = resize(x) (nearest or linear, any coordinate_transformation_mode but
    tf_crop_and_resize): separable, y = x times one [out, in] interpolation matrix M_a per
    resized axis a (static, from the sizes and scales):  dx = dy times M_a^T on each axis (a
    MatMul; the last two axes need no Transpose)."""
    x = g.x(0)
    mode = g.attr("mode", "nearest")
    transform = g.attr("coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear"):
        raise g.error(f"Resize mode '{mode}' is not supported (nearest and linear are)")
    if g.attr("antialias", 0) or transform == "tf_crop_and_resize":
        raise g.error("Resize with antialias or tf_crop_and_resize is not supported")
    if g.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise g.error("Resize with keep_aspect_ratio_policy other than stretch is not supported")
    rank = g.rank(x)
    axes = [a % rank for a in (g.attr("axes") or range(rank))]
    shape = g.shape(x)
    scales = g.value(g.x(2)) if g.x(2) else None
    sizes = g.value(g.x(3)) if g.x(3) else None
    if (scales is None or not np.size(scales)) and sizes is None:
        raise g.error("its scales or sizes are not constant")
    dx, rank_dy = g.dy(), rank
    for k, a in enumerate(axes):
        in_len = shape[a]
        if sizes is not None:
            out_len = int(np.asarray(sizes).reshape(-1)[k])
            scale = None if not isinstance(in_len, int) else out_len / in_len
        else:
            scale = float(np.asarray(scales).reshape(-1)[k])
            out_len = None if not isinstance(in_len, int) else int(np.floor(in_len * scale))
        if scale == 1.0 and (out_len is None or out_len == in_len):
            continue
        if not isinstance(in_len, int):
            raise g.error(f"axis {a} of '{x}' is resized but has no static size")
        matrix = resize_matrix(in_len, out_len, scale, transform, mode,
                               g.attr("nearest_mode", "round_prefer_floor"))
        dx = _contract(g, dx, g.const(matrix, x, "resize_matrix"), a, rank_dy)
    return dx


def _contract(g, value, matrix, axis, rank):
    """value [..., out (at axis), ...] times matrix [out, in] over that axis."""
    if axis == rank - 1:
        return g.op("MatMul", value, matrix)
    if axis == rank - 2:
        return g.op("MatMul", g.op("Transpose", matrix, perm=[1, 0]), value)
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    moved = g.op("MatMul", g.op("Transpose", value, perm=perm), matrix)
    return g.op("Transpose", moved, perm=perm)


def resize_matrix(in_len, out_len, scale, transform, mode, nearest_mode):
    """The [out_len, in_len] matrix of a 1-D Resize (ONNX's coordinate transformations;
    linear interpolation clamps the source coordinate to the input, as onnxruntime does)."""
    j = np.arange(out_len, dtype=np.float64)
    if transform == "half_pixel":
        source = (j + 0.5) / scale - 0.5
    elif transform == "pytorch_half_pixel":
        source = (j + 0.5) / scale - 0.5 if out_len > 1 else np.zeros_like(j)
    elif transform == "align_corners":
        source = (j * (in_len - 1) / (out_len - 1) if out_len > 1 else np.zeros_like(j))
    elif transform == "asymmetric":
        source = j / scale
    elif transform == "tf_half_pixel_for_nn":
        source = (j + 0.5) / scale
    elif transform == "half_pixel_symmetric":
        adjustment = out_len / (scale * in_len)
        offset = in_len / 2 * (1 - adjustment)
        source = offset + (j + 0.5) / scale - 0.5
    else:
        raise ValueError(f"unknown coordinate_transformation_mode {transform}")
    matrix = np.zeros((out_len, in_len))
    rows = np.arange(out_len)
    if mode == "nearest":
        rounded = {"round_prefer_floor": lambda v: np.ceil(v - 0.5),
                   "round_prefer_ceil": lambda v: np.floor(v + 0.5),
                   "floor": np.floor, "ceil": np.ceil}[nearest_mode](source)
        matrix[rows, np.clip(rounded, 0, in_len - 1).astype(int)] = 1.0
        return matrix
    source = np.clip(source, 0, in_len - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, in_len - 1)
    weight = source - low
    np.add.at(matrix, (rows, low), 1 - weight)
    np.add.at(matrix, (rows, high), weight)
    return matrix
