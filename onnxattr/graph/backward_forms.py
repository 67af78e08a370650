"""The fastest exact standard-op form of each costly backward, chosen by measurement.

Both gradient paths emit these: the native reverse pass (onnxattr.graph.autodiff) and the lowering of
the training builder's ops (onnxattr.lower). Every function takes an `Emitter`, tensor names,
attribute values and static shapes, and returns the name of the tensor it wrote; nothing here
knows which pass calls it. Where several forms were measured, `form` picks one for the
benchmark (scripts/bench_backward_forms.py) and tests; the default is the fastest exact one.

Times are medians of interleaved runs on onnxruntime 1.19.2 (CPU) at GoogLeNet's layer sizes,
batch 1, measured by `python scripts/bench_backward_forms.py --threads 1 --googlenet ...`;
each function's docstring gives them. They are 1-thread numbers: the machine they were taken
on has 2 cores shared with other jobs, where 2-thread runs (--threads 2) swing by 2-3x from run
to run; per layer those rank the forms the same way.
"""

import numpy as np
from onnx import helper, numpy_helper

from ..errors import OnnxAttrError

# The form each function emits when its caller names none: the fastest exact one measured
# (scripts/bench_backward_forms.py overrides these to time the others in whole graphs).
FORMS = {"conv_input_grad": "auto", "max_pool_grad": "indices", "gate": "mul",
         "relu_active": "output"}

FLOAT_MIN = {np.dtype(np.float16): np.finfo(np.float16).min,
             np.dtype(np.float32): np.finfo(np.float32).min,
             np.dtype(np.float64): np.finfo(np.float64).min}


# --- geometry --------------------------------------------------------------------------------------

def explicit_pads(auto_pad, pads, size, kernel, strides, dilations):
    """The begin+end pads of a Conv or pooling window with `auto_pad` resolved against the
    static input `size` (SAME_UPPER puts the odd cell at the end, SAME_LOWER at the start)."""
    rank = len(kernel)
    auto_pad = auto_pad or "NOTSET"
    if auto_pad == "NOTSET":
        return list(pads) if pads else [0] * 2 * rank
    if auto_pad == "VALID":
        return [0] * 2 * rank
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise OnnxAttrError(f"unknown auto_pad {auto_pad}")
    begin, end = [], []
    for x, k, s, d in zip(size, kernel, strides, dilations):
        out = -(-x // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - x)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin + end


def window_output_size(size, kernel, strides, pads, dilations, ceil_mode=False):
    """Output size of a sliding window (Conv, MaxPool, AveragePool) per spatial axis; with
    `ceil_mode` a last partial window counts when it starts inside the input or its begin pad."""
    rank = len(kernel)
    out = []
    for i, (x, k, s, d) in enumerate(zip(size, kernel, strides, dilations)):
        span = (k - 1) * d + 1
        room = x + pads[i] + pads[i + rank] - span
        n = (-(-room // s) if ceil_mode else room // s) + 1
        if ceil_mode and (n - 1) * s >= x + pads[i]:
            n -= 1
        out.append(n)
    return out


def transpose_geometry(size, out_size, kernel, strides, pads, dilations):
    """(pads, output_padding) of the ConvTranspose that maps a window op's output grid
    `out_size` back onto its input grid `size`: the begin pads crop the forward's begin pad, the
    end pad crops what the windows cover past the input, output_padding adds the input cells
    that no window reaches (their gradient is zero)."""
    rank = len(kernel)
    end, output_padding = [], []
    for i in range(rank):
        span = (kernel[i] - 1) * dilations[i] + 1
        extra = strides[i] * (out_size[i] - 1) + span - pads[i] - size[i]
        end.append(max(extra, 0))
        output_padding.append(max(-extra, 0))
    return list(pads[:rank]) + end, output_padding


# --- Conv: the input gradient ----------------------------------------------------------------------

def conv_input_grad(em, dy, w, size, kernel, strides, pads, dilations, group, weight_shape,
                    out_size=None, form=None):
    """dX of Y = Conv(X, W) (no bias): the adjoint of the convolution, onto X's grid `size`.
    `weight_shape` is W's static shape [M, C/group, k...].

    Forms (`form`):
      "flipped_conv"    stride 1: Conv(dY, W') with pads (k - 1) * d - p, where W' holds each
                        group's weights in/out-transposed and spatially flipped, made in the
                        graph from W (Reshape, Transpose, Slice with steps -1: onnxruntime folds
                        them into a constant when W is one, and the file keeps one copy of the
                        weights); onnxruntime runs this Conv on its NCHWc path.
      "conv_transpose"  ConvTranspose(dY, W) with the forward geometry and the output_padding
                        that restores X's size (any stride).
    Default ("auto"): "flipped_conv" where it applies (stride 1 and no pad above
    (k - 1) * d), else "conv_transpose". Measured, 1 thread, median of 30 (ConvTranspose ->
    flipped Conv): conv2/3x3 64->192 56x56 11.2 -> 8.9 ms, 64->64 112x112 k3 20.4 -> 13.1 ms,
    inception_3a/3x3 96->128 28x28 3.4 -> 2.6 ms, 5x5 16->48 14x14 0.22 -> 0.19 ms, 1x1
    192->64 28x28 0.42 -> 0.38 ms; in the whole GoogLeNet gradient the ConvTranspose form is
    3-9 % slower. Stride 2 keeps ConvTranspose (conv1/7x7_s2: 7.8 ms, its forward 4.6 ms).
    """
    if out_size is None:
        out_size = window_output_size(size, kernel, strides, pads, dilations)
    flipped_pads = [(k - 1) * d - p for k, d, p in zip(list(kernel) * 2, list(dilations) * 2,
                                                        pads)]
    can_flip = all(s == 1 for s in strides) and all(p >= 0 for p in flipped_pads)
    form = form or FORMS["conv_input_grad"]
    if form == "auto":
        form = "flipped_conv" if can_flip else "conv_transpose"
    if form == "flipped_conv":
        if not can_flip:
            raise OnnxAttrError("the flipped-conv form needs stride 1 and pads <= "
                                "(k - 1) * dilation")
        return em.op("Conv", dy, flipped_conv_weight(em, w, weight_shape, group),
                     kernel_shape=list(kernel), pads=flipped_pads, dilations=list(dilations),
                     group=group)
    if form != "conv_transpose":
        raise ValueError(form)
    t_pads, output_padding = transpose_geometry(size, out_size, kernel, strides, pads, dilations)
    return em.op("ConvTranspose", dy, w, kernel_shape=list(kernel), strides=list(strides),
                 pads=t_pads, dilations=list(dilations), group=group,
                 output_padding=output_padding)


def flipped_conv_weight(em, w, weight_shape, group):
    """Conv weights W [M, C/g, k...] as the weights of the stride-1 adjoint Conv [C, M/g, k...]:
    per group, in and out channels swapped, and every spatial axis reversed."""
    m, c_per, *kernel = weight_shape
    rank = len(kernel)
    ints = lambda values: em.const(np.array(values, np.int64))  # noqa: E731
    if group == 1:
        swapped = em.op("Transpose", w, perm=[1, 0, *range(2, 2 + rank)])
    else:
        grouped = em.op("Reshape", w, ints([group, m // group, c_per, *kernel]))
        moved = em.op("Transpose", grouped, perm=[0, 2, 1, *range(3, 3 + rank)])
        swapped = em.op("Reshape", moved, ints([group * c_per, m // group, *kernel]))
    last = np.iinfo(np.int64).min
    return em.op("Slice", swapped, ints([-1] * rank), ints([last] * rank),
                 ints(list(range(2, 2 + rank))), ints([-1] * rank))


# --- pooling windows -------------------------------------------------------------------------------

def _unfold_kernels(kernel, dtype):
    """One-hot kernels [prod(k), 1, k...]: output channel j of a Conv with them is window cell j
    (in scan order, last axis fastest), which is also the order onnxruntime's MaxPool scans."""
    cells = int(np.prod(kernel))
    return np.eye(cells, dtype=dtype).reshape(cells, 1, *kernel)


def max_pool_grad(em, x, y, dy, size, kernel, strides, pads, dilations, out_size, form=None,
                  indices=None):
    """dX of Y = MaxPool(X): each window's dY goes to its first maximum in scan order (as
    onnxruntime's MaxPool and MaxPoolGrad do: a tie, such as an all-zero window after a ReLU,
    sends the whole gradient to the first cell); overlapping windows add up. `size` and
    `out_size` are X's and Y's static spatial sizes, `pads` explicit (auto_pad resolved).

    Forms (`form`):
      "indices"  MaxPool with its Indices output (a second MaxPool beside the forward's, unless
                 `indices` names the forward's own) and a ScatterElements (reduction add) of dY
                 at them: bit for bit what onnxruntime-training's MaxPoolGrad gives.
      "slices"   no indexed kernel: for each window cell in scan order, a Slice of X (padded
                 with the dtype's lowest finite value, never -inf), Equal to Y, and the still
                 unrouted dY taken where equal (Cast, Mul, Sub: the first maximum wins); the
                 cells go back with a Pad per cell, a Sum per stride phase and an
                 Unsqueeze/Concat/Reshape interleave of the phases.
      "unfold"   no indexed kernel: a Conv with one-hot kernels unfolds the padded windows into
                 channels [N*C, k*k, out...], ArgMax over them picks the first maximum, Where
                 puts dY there and a ConvTranspose with the same kernels adds the cells back.
      "separable" no indexed kernel: the window's max as a max over the last axis, then over
                 the one before (plain MaxPools), and "slices" through each one-axis pool in
                 reverse: k + k cells instead of k * k, ties still to the first maximum.
    Default "indices". Median ms, 1 thread, idle machine, 21 interleaved runs
    (indices / slices / unfold / separable; training build's MaxPool with Indices +
    MaxPoolGrad; plain forward MaxPool), each including the forward MaxPool:
      pool1 3x3/2 ceil 64x112x112      7.4 / 6.3 / 12.1 / 5.6;  7.3;  0.7
      pool2 3x3/2 ceil 192x56x56       5.7 / 4.7 /  8.7 / 4.3;  5.2;  0.6
      inception_3a/pool 3x3/1 pad 1    3.7 / 2.6 /  6.9 / 1.8;  3.9;  0.2   (192x28x28)
      pool3 3x3/2 ceil 480x28x28       3.5 / 4.0 /  6.4 / 3.4;  3.5;  0.4
      inception_4a/pool 3x3/1 pad 1    2.7 / 2.3 /  6.2 / 1.8;  2.7;  0.2   (480x14x14)
    Per pool, at 1 thread, "separable" is the fastest, yet in the whole GoogLeNet gradient graph
    it takes 0.94-1.07x the time of "indices" (native and lowered graphs, 1 and 2 threads,
    batch 1, sessions interleaved, `python scripts/bench_backward_forms.py --only googlenet`;
    one after the other, and 0.94-1.00x at batch 8 on 1 thread as the IG workers run, from a
    one-off profile, docs/benchmarks.md): its ~25 small ops per pool (Pad, Slice, Cast: 12.5,
    10.6, 7.5 ms of a 104 ms profile at 2 threads) cost between the nodes what the indexed
    kernel loses inside one. "slices" (the
    last cell takes what no earlier one did) is 1.18x on the whole graph at 2 threads. The
    indexed MaxPool kernel is slow (5 ms where the plain one takes 0.5) but one pass. The
    other forms stay for the GPU, where small ops are cheap (not measured: no GPU was lent),
    and for scripts/bench_backward_forms.py.
    """
    form = form or FORMS["max_pool_grad"]
    geometry = (size, kernel, strides, pads, dilations, out_size)
    if form == "indices":
        return _max_pool_grad_indices(em, x, dy, *geometry, indices)
    if form == "slices":
        return _max_pool_grad_slices(em, x, y, dy, *geometry)
    if form == "unfold":
        return _max_pool_grad_unfold(em, x, y, dy, *geometry)
    if form == "separable":
        return _max_pool_grad_separable(em, x, y, dy, *geometry)
    raise ValueError(f"unknown max_pool_grad form {form!r}")


def _max_pool_grad_indices(em, x, dy, size, kernel, strides, pads, dilations, out_size, indices):
    """The indexed form of max_pool_grad: dY scattered (added) at the flat N*C*H*W indices
    into flat zeros of X's size, reshaped back. The zeros are X * 0 (X is finite wherever the
    forward pass is) and every reshape has a constant shape, so there is no Shape/Size
    arithmetic for a CUDA session to place on the CPU (a Mod to per-image indices instead
    cost 0.6 ms per pool on the CPU)."""
    if indices is None:
        floor_size = window_output_size(size, kernel, strides, pads, dilations)
        _, indices = em.op("MaxPool", x, outputs=2, kernel_shape=list(kernel),
                           strides=list(strides), pads=list(pads), dilations=list(dilations),
                           ceil_mode=int(floor_size != list(out_size)))
    flat = em.const(np.array([-1], np.int64))
    zeros = em.op("Mul", em.op("Reshape", x, flat), em.const(np.zeros((), em.dtype(dy))))
    scattered = em.op("ScatterElements", zeros, em.op("Reshape", indices, flat),
                      em.op("Reshape", dy, flat), axis=0, reduction="add")
    shape = em.inferred_shape(x)
    static = shape is not None and all(isinstance(d, int) for d in shape[1:])
    return em.op("Reshape", scattered, em.const(np.array([-1, *shape[1:]], np.int64)) if static
                 else em.op("Shape", x))


def _max_pool_grad_unfold(em, x, y, dy, size, kernel, strides, pads, dilations, out_size):
    """The unfold form of max_pool_grad: X [N, C, spatial...] as N*C one-channel images,
    padded, windows unfolded into channels."""
    rank = len(kernel)
    dtype = em.dtype(dy)
    images = em.const(np.array([-1, 1, *size], np.int64))
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    need = [s * (o - 1) + span for s, o, span in zip(strides, out_size, spans)]
    pad_end = [max(0, n - x_ - p) for n, x_, p in zip(need, size, pads[:rank])]
    padded = em.op("Reshape", x, images)
    if any(pads[:rank]) or any(pad_end):
        padded = em.op("Pad", padded, em.const(np.array([0, 0, *pads[:rank], 0, 0, *pad_end],
                                                        np.int64)),
                       em.const(np.array(FLOAT_MIN[np.dtype(dtype)], dtype)))
    kernels = em.const(_unfold_kernels(kernel, dtype), "onehot_cells")
    cells = em.op("Conv", padded, kernels, kernel_shape=list(kernel), strides=list(strides),
                  dilations=list(dilations))
    count = int(np.prod(kernel))
    first = em.op("ArgMax", cells, axis=1, keepdims=1)
    number = em.const(np.arange(count, dtype=np.int64).reshape(1, count, *[1] * rank))
    dy_images = em.op("Reshape", dy, em.const(np.array([-1, 1, *out_size], np.int64)))
    routed = em.op("Where", em.op("Equal", first, number), dy_images,
                   em.const(np.zeros((), dtype)))
    t_pads, output_padding = transpose_geometry(size, out_size, kernel, strides, pads, dilations)
    back = em.op("ConvTranspose", routed, kernels, kernel_shape=list(kernel),
                 strides=list(strides), pads=t_pads, dilations=list(dilations),
                 output_padding=output_padding)
    return em.op("Reshape", back, em.op("Shape", x))


def _max_pool_grad_slices(em, x, y, dy, size, kernel, strides, pads, dilations, out_size):
    """The per-cell form of max_pool_grad (see there)."""
    rank = len(kernel)
    dtype = em.dtype(dy)
    axes = list(range(2, 2 + rank))
    i64 = lambda values: em.const(np.array(values, np.int64))  # noqa: E731
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    need = [s * (o - 1) + span for s, o, span in zip(strides, out_size, spans)]
    # the padded grid, whole stride periods long, so that its phases are equally long
    length = [-(-max(n, p + x_) // s) for n, p, x_, s in zip(need, pads, size, strides)]
    pad_end = [n * s - p - x_ for n, s, p, x_ in zip(length, strides, pads, size)]
    padded = x
    if any(pads[:rank]) or any(pad_end):
        padded = em.op("Pad", x, i64([0, 0, *pads[:rank], 0, 0, *pad_end]),
                       em.const(np.array(FLOAT_MIN[np.dtype(dtype)], dtype)))
    offsets = list(np.ndindex(*kernel))
    phase_of = [tuple((o * d) % s for o, d, s in zip(offset, dilations, strides))
                for offset in offsets]
    shift_of = [tuple((o * d) // s for o, d, s in zip(offset, dilations, strides))
                for offset in offsets]
    phases = list(np.ndindex(*strides))
    ends = i64([n * s for n, s in zip(length, strides)])
    grids = {phase: padded if len(phases) == 1 else
             em.op("Slice", padded, i64(list(phase)), ends, i64(axes), i64(list(strides)))
             for phase in phases if phase in phase_of}
    # every window cell, in scan order: the remaining gradient goes to the first maximum
    remaining, routed = dy, []
    for n, (phase, shift) in enumerate(zip(phase_of, shift_of)):
        if n + 1 == len(offsets):  # no earlier cell is the maximum: the last one is
            routed.append(remaining)
            break
        cells = grids[phase]
        if any(shift) or any(n != o for n, o in zip(length, out_size)):
            cells = em.op("Slice", cells, i64(list(shift)),
                          i64([sh + o for sh, o in zip(shift, out_size)]), i64(axes))
        hit = em.op("Cast", em.op("Equal", cells, y), to=_onnx_type(dtype))
        routed.append(em.op("Mul", remaining, hit))
        remaining = em.op("Sub", remaining, routed[-1])
    # back onto the padded grid: the cells of one phase are whole output cells apart
    placed = {}
    for phase in phases:
        parts = []
        for contribution, ph, shift in zip(routed, phase_of, shift_of):
            if ph == phase:
                end = [length[i] - out_size[i] - shift[i] for i in range(rank)]
                if any(shift) or any(end):
                    contribution = em.op("Pad", contribution, i64([0, 0, *shift, 0, 0, *end]))
                parts.append(contribution)
        if not parts:  # a phase no window cell lands on (stride > kernel span)
            parts = [em.op("Expand", em.const(np.zeros((), dtype)),
                           em.op("Concat", em.op("Shape", dy, end=2), i64(length), axis=0))]
        placed[phase] = parts[0] if len(parts) == 1 else em.op("Sum", *parts)
    grid = _interleave(em, placed, strides, length, rank)
    return em.op("Slice", grid, i64(pads[:rank]), i64([p + n for p, n in zip(pads, size)]),
                 i64(axes))


def _max_pool_grad_separable(em, x, y, dy, size, kernel, strides, pads, dilations, out_size):
    """The separable form of max_pool_grad: the window's max is a max over the last axis, then
    over the one before, and so on, so the backward routes dY through those one-axis pools in
    reverse, each by the per-cell form. Exact, ties included: the first row holding the
    maximum, then the first cell of that row that does, is the first maximum in scan order."""
    rank = len(kernel)
    axes = [a for a in reversed(range(rank))
            if kernel[a] != 1 or strides[a] != 1 or pads[a] or pads[a + rank]]
    stages, values, shape = [], x, list(size)
    for n, axis in enumerate(axes):
        def one(value, rest, axis=axis):
            return [value if i == axis else rest for i in range(rank)]
        geometry = dict(kernel=one(kernel[axis], 1), strides=one(strides[axis], 1),
                        pads=one(pads[axis], 0) + one(pads[axis + rank], 0),
                        dilations=one(dilations[axis], 1))
        out = shape[:axis] + [out_size[axis]] + shape[axis + 1:]
        ceil = window_output_size(shape, **geometry) != out
        pooled = y if n + 1 == len(axes) else em.op(
            "MaxPool", values, ceil_mode=int(ceil), kernel_shape=geometry["kernel"],
            strides=geometry["strides"], pads=geometry["pads"], dilations=geometry["dilations"])
        stages.append((values, pooled, shape, out, geometry))
        values, shape = pooled, out
    grad = dy
    for values, pooled, shape, out, geometry in reversed(stages):
        grad = _max_pool_grad_slices(em, values, pooled, grad, shape, out_size=out, **geometry)
    return grad


def _interleave(em, grids, strides, length, rank):
    """One grid from its stride phases {phase tuple: [N, C, length...]}: cell m*s + a of an
    axis is cell m of phase a. Unsqueeze, Concat and Reshape, last axis first (a Transpose of
    the stacked phases takes 9 ms at GoogLeNet's pool1 against 1 ms for this)."""
    length = list(length)
    for axis in reversed(range(rank)):
        if strides[axis] == 1:
            continue
        after = em.const(np.array([3 + axis], np.int64))
        length[axis] *= strides[axis]
        shape = em.const(np.array([0, 0, *length], np.int64))
        merged = {}
        for phase in sorted({p[:axis] + p[axis + 1:] for p in grids}):
            parts = [grids[phase[:axis] + (a,) + phase[axis:]] for a in range(strides[axis])]
            stacked = em.op("Concat", *[em.op("Unsqueeze", g, after) for g in parts],
                            axis=3 + axis)
            merged[phase[:axis] + (0,) + phase[axis:]] = em.op("Reshape", stacked, shape)
        grids = merged
    return grids[(0,) * rank]


def _onnx_type(dtype):
    """The TensorProto element type of a numpy dtype."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def average_pool_grad(em, x, dy, size, kernel, strides, pads, dilations, out_size,
                      count_include_pad):
    """dX of Y = AveragePool(X): each window's dY / (its divisor) spread over its cells.

    The divisor of each output cell is static: the cells of the window inside the input, or,
    with count_include_pad, inside the padded input (a ceil_mode window past the end pad
    counts only up to it, as onnxruntime does). X is viewed as N*C one-channel images; one
    ConvTranspose with a kernel of ones spreads dY / divisor back.
    """
    rank = len(kernel)
    dtype = em.dtype(dy)
    counts = []
    for i in range(rank):
        starts = np.arange(out_size[i]) * strides[i] - pads[i]
        cells = starts[:, None] + np.arange(kernel[i])[None, :] * dilations[i]
        low, high = (-pads[i], size[i] + pads[i + rank]) if count_include_pad else (0, size[i])
        counts.append(((cells >= low) & (cells < high)).sum(axis=1))
    divisor = counts[0]
    for c in counts[1:]:
        divisor = np.multiply.outer(divisor, c)
    scale = (1.0 / np.maximum(divisor, 1)).astype(dtype).reshape(1, 1, *out_size)
    dy_images = em.op("Reshape", dy, em.const(np.array([-1, 1, *out_size], np.int64)))
    scaled = em.op("Mul", dy_images, em.const(scale, "window_share"))
    t_pads, output_padding = transpose_geometry(size, out_size, kernel, strides, pads, dilations)
    back = em.op("ConvTranspose", scaled, em.const(np.ones((1, 1, *kernel), dtype), "ones"),
                 kernel_shape=list(kernel), strides=list(strides), pads=t_pads,
                 dilations=list(dilations), output_padding=output_padding)
    return em.op("Reshape", back, em.op("Shape", x))


# --- LRN -------------------------------------------------------------------------------------------

def channel_window_weights(channels, before, after, dtype=np.float32):
    """Weights [C, C, 1, 1] of the 1x1 Conv that sums, for each channel c, the channels
    [c - before, c + after] (a band of ones): LRN's window sum, which onnxruntime runs in its
    NCHWc layout (a one-channel Conv over [N, 1, C, H*W] the layout pads to its channel block,
    16 on AVX-512, and Slices of the zero-padded tensor are one pass per window cell)."""
    channel = np.arange(channels)
    band = (channel[None, :] >= channel[:, None] - before) & (
        channel[None, :] <= channel[:, None] + after)
    return band.astype(dtype)[:, :, None, None]


# --- ReLU ------------------------------------------------------------------------------------------

def relu_active(em, x, y, form=None):
    """Where a Relu y = max(x, 0) passes its input, as a bool tensor: y > 0 ("output", the
    default), or x > 0 ("input"): the same cells. Reading y leaves x to the forward alone, so
    onnxruntime can fuse the Conv before the Relu (FusedConv) and free x early. Measured, 1
    thread, Conv + Relu forward and the Relu backward (gate Where): 64->64 112x112 k3 18.8 ms
    from x, 18.0 from y; 192->192 28x28 7.8 / 7.7; in the whole GoogLeNet gradient the
    difference is within run-to-run noise (-2 % to +7 % across runs)."""
    t = y if (form or FORMS["relu_active"]) == "output" else x
    return em.op("Greater", t, em.const(np.zeros((), em.dtype(t))))


def gate(em, value, active, form=None, out=None):
    """`value` where the bool tensor `active` is true, else 0 (a ReLU's backward).

    Forms: "mul" value * Cast(active) (exact: v * 1 = v, v * 0 = 0, but -0 for negative v and
    NaN for an infinite v); "where" Where(active, value, 0). Default "mul": onnxruntime's Where
    with a scalar branch is slow (1.07 ms against 0.19 for Cast and Mul at 64x56x56, 2
    threads). Measured, 1 thread, Conv + Relu forward and backward: 64->64 112x112 k3 18.0 ms
    with Where, 14.3 with Mul; 192->192 28x28 7.7 / 7.0; the whole GoogLeNet gradient 3-12 %
    faster with Mul."""
    outputs = 1 if out is None else [out]
    if (form or FORMS["gate"]) == "where":
        return em.op("Where", active, value, em.const(np.zeros((), em.dtype(value))),
                     outputs=outputs)
    return em.op("Mul", value, em.op("Cast", active, to=_onnx_type(em.dtype(value))),
                 outputs=outputs)


def _scalar_tensor(value, dtype):
    return numpy_helper.from_array(np.array([value], dtype))
