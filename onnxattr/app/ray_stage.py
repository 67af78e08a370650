"""`onnxattr.ray.Attribute`: attribution maps as a stage of your own Ray Data pipeline.

    import ray
    from onnxattr.ray import Attribute

    ds = ray.data.read_images("s3://bucket/photos/", mode="RGB")
    ds = ds.map_batches(Attribute, fn_constructor_kwargs={"model": "googlenet.onnx",
                                                          "methods": ["gradient"]},
                        concurrency=4, batch_size=8, num_cpus=2)

A callable class, so Ray Data runs it in actors and each actor makes its Explainer once. It
needs nothing from Ray itself (a test can call it on a dict of arrays). Rows bring an `image`
column (uint8 (H, W, 3), as `read_images` gives) or a `path` column (files each actor can
read); the batch comes back with, per row, the explained class (`class_index`, `label`) and its
`score` (the softmax probability), and per method `<method>` (the attribution, float32, the
model's input layout), `<method>_map` (float32 (H, W) in [0, 1], as the audit draws it) and,
for each quantity the `metrics` measure, `<method>_<quantity>` (e.g. `gradient_deletion_auc`).
"""

import numpy as np

from ..io.image import load_image
from ..methods.explainer import Explainer


class Attribute:
    """`methods` on each row's image, explaining `target` (None: each image's top-1 class),
    optionally measured by `metrics`; `threads`: onnxruntime's threads in this actor (give
    what `num_cpus` reserves); other keyword arguments go to Explainer."""

    def __init__(self, model, methods=("gradient",), target=None, score="prob", metrics=(),
                 threads=None, method_options=None, metric_options=None, **explainer_options):
        self.explainer = Explainer(model, threads=threads, **explainer_options)
        self.methods, self.target, self.score = list(methods), target, score
        self.metrics, self.metric_options = list(metrics), metric_options
        self.method_options = method_options or {}

    def __call__(self, batch):
        column = batch["image"] if "image" in batch else batch["path"]
        images = [load_image(image if isinstance(image, np.ndarray) else str(image))
                  for image in column]
        out, first = dict(batch), True
        for method in self.methods:
            results = self.explainer.explain(images, method, self.target, self.score,
                                             **self.method_options.get(method, {}))
            if first:
                out["class_index"] = np.array([r.class_index for r in results])
                out["label"] = np.array([r.label for r in results])
                out["score"] = np.array([r.score for r in results], dtype=np.float32)
                first = False
            out[method] = np.stack([r.attribution for r in results])
            out[f"{method}_map"] = np.stack([r.map for r in results])
            if self.metrics:
                measured = self.explainer.evaluate(images, results, self.metrics,
                                                   metric_options=self.metric_options)
                for quantity in measured[0][method]:
                    out[f"{method}_{quantity}"] = np.array(
                        [m[method][quantity].value for m in measured], dtype=np.float64)
        return out
