"""A tour of onnxattr, top to bottom: load a model, explain, compare methods, check which map
is faithful to the model, compile and run the compiled model in onnxruntime alone.

    python examples/tour.py [MODEL] [IMAGE] [--out DIR]

MODEL defaults to models/googlenet.onnx (the README's first command makes it), IMAGE to the
sample photo; pictures are written to DIR (default out/tour). Only the public API is used.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from onnxattr import Explainer, OnnxAttrError, compile_model

REPO = Path(__file__).resolve().parents[1]
METHODS = ["gradient", "guided-backprop", "integrated-gradients", "grad-cam", "occlusion"]


def main(model, image, out):
    out.mkdir(parents=True, exist_ok=True)

    # 1. Load a model: any ONNX classifier with one image input [N, 3, H, W].
    explainer = Explainer(model)
    for index, label, probability in explainer.classify(image, top=3):
        print(f"class {index} {label}: {probability:.3f}")

    # 2. Explain the top-1 class with the plain gradient; save the map as a picture.
    gradient = explainer.explain(image, method="gradient")
    print(f"gradient of {gradient.label!r} ({gradient.score:.3f}) by the {gradient.builder} builder")
    Image.fromarray(gradient.render()).save(out / "gradient.png")

    # 3. Compare methods on the same class: each map beside the others, and how alike they are.
    results = {method: explainer.explain(image, method=method, target=gradient.class_index)
               for method in METHODS}
    pictures = [result.render() for result in results.values()]
    Image.fromarray(np.concatenate(pictures, axis=1)).save(out / "methods.png")
    for method, result in results.items():
        if result.map.std() == 0:  # nothing to correlate (a Grad-CAM map all zero, say)
            print(f"{method:22s} a flat map")
            continue
        alike = np.corrcoef(result.map.ravel(), gradient.map.ravel())[0, 1]
        print(f"{method:22s} correlation with the gradient map {alike:+.2f}")
    print(f"integrated gradients' completeness gap: "
          f"{results['integrated-gradients'].relative_convergence_delta:.1%}")

    # 4. Which map to trust: deletion and insertion (docs/faithfulness.md) of two maps, beside
    #    a random map of the same image (lower deletion and higher insertion are better).
    for method in ("gradient", "guided-backprop"):
        scores = explainer.evaluate(image, results[method], metrics="deletion,insertion",
                                    metric_options={"steps": 10})
        for name, quantities in scores.items():
            print(f"{name:22s} deletion AUC {quantities['deletion_auc'].value:.3f}, "
                  f"insertion AUC {quantities['insertion_auc'].value:.3f}")

    # 5. Compile a standalone attribution model and run it in onnxruntime alone: inputs `image`
    #    (RGB pixels 0..255) and `target`, outputs the probabilities and the attribution.
    import onnxruntime  # here, after onnxattr: it keeps the training build from importing torch

    compiled = out / "gradient.onnx"
    compile_model(model, "gradient", "prob", compiled)
    session = onnxruntime.InferenceSession(str(compiled), providers=["CPUExecutionProvider"])
    pixels = explainer.pixels([image])  # float32 [1, 3, H, W] at the model's input size
    target = np.array([gradient.class_index], dtype=np.int64)
    prob, attribution = session.run(["prob", "attribution"], {"image": pixels, "target": target})
    difference = np.linalg.norm(attribution[0] - gradient.attribution) / np.linalg.norm(
        gradient.attribution)
    print(f"compiled model: probability {prob[0, target[0]]:.3f}, "
          f"relative difference to the explainer's gradient {difference:.1e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=REPO / "models" / "googlenet.onnx", type=Path)
    parser.add_argument("image", nargs="?", default=REPO / "samples" / "chelsea.png", type=Path)
    parser.add_argument("--out", default=Path("out/tour"), type=Path)
    arguments = parser.parse_args()
    try:
        main(arguments.model, arguments.image, arguments.out)
    except OnnxAttrError as error:  # bad input: one line, as the command line says it
        sys.exit(f"error: {error}")
