"""The suite's tolerance policy (tests/README.md says why): one place for the bounds that
compare float32 results with references.

- float32 against a float64 reference: at MARGIN times float32's own error on that case,
  measured in the same run by an independent float32 evaluation of the reference (the same
  network and weights in float32 PyTorch) against its float64 evaluation. A deep network's
  float32 error is dominated by near-tied ReLU and MaxPool decisions that flip with the order
  of float32 sums (AVX2, AVX-512, AMX, another onnxruntime release): on GoogLeNet one photo's
  error moves between 1e-6 and 6e-3 with the rounding of its input alone. So the error is the
  largest over every photo and rule of the case, not one photo's (one photo's can be 1e-6 on
  one machine and 5e-5 on another).
- two float32 implementations: only where both evaluate the same forward graph on the same
  runtime (the same decisions; the backward's gates dY > 0 are continuous at 0), at a bound
  with MARGIN over the spread they show; otherwise each is compared with float64 as above.
- float64 against float64 (central differences, exact rules): the bounds of float64 rounding
  and of the difference formula, which no CPU changes.
"""

import numpy as np

MARGIN = 10  # over a measured error or spread


def rel_l2(got, want):
    """Relative L2 error of `got` against `want` (float64 arithmetic)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def float32_bound(errors):
    """The bound for a float32 result of a case whose measured float32 errors are `errors`."""
    return MARGIN * max(errors)
