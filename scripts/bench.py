"""Benchmark onnxattr against Captum on BVLC GoogLeNet, in one run, interleaved.

Both sides compute the same thing on the same network and weights (Captum on a float32 PyTorch
model built from the same Caffe files, tests/torch_googlenet.py) with the same number of
threads. Times are medians over repeats; each repeat runs every case on both sides back to back.
Peak memory is measured per case and side in a fresh process (VmHWM: the peak resident set of
the whole process, imports and model included), so cases do not inherit each other's peaks;
the onnxattr processes run without torch importable, as in a deployment stack without PyTorch.

    python scripts/bench.py [--threads 2] [--repeats 5] [--json bench.json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CAFFE_DIR = REPO.parent / "shared" / "models" / "bvlc_googlenet"
PHOTO = REPO / "samples" / "chelsea.png"
# occlusion: onnxattr's defaults at 224 x 224 (a 45-pixel mask, stride 23: 81 masked images),
# run 16 at a time on both sides, masked pixels set to the photo's channel means
OCCLUSION_MASK, OCCLUSION_STRIDE, OCCLUSION_BATCH = 45, 23, 16
GRAD_CAM_POOL = "pool5/7x7_s1"  # Grad-CAM's layer is the input of this module


def common_arguments(parser):
    """The model, its Caffe source, threads and repeats: shared with scripts/bench_compiled.py."""
    parser.add_argument("--model", type=Path, default=REPO / "models" / "googlenet.onnx",
                        help="exported GoogLeNet (made from --caffe when missing)")
    parser.add_argument("--caffe", type=Path, default=CAFFE_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    return parser


def parse_args(argv=None):
    parser = common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--ig-steps", default="50", help="comma-separated step counts")
    parser.add_argument("--ig-batch-sizes", default="1,10,25,50")
    parser.add_argument("--smoothgrad-samples", type=int, default=25)
    parser.add_argument("--cases", default=None, help="comma-separated subset of the cases")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process peaks")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "CASE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def cases(args):
    """name -> (onnxattr call, captum call), each taking the prepared side state."""
    samples = args.smoothgrad_samples
    table = {
        "forward": (lambda s: s.engine.forward(s.pixels),
                    lambda s: s.model(s.x)),
        "gradient": (lambda s: s.engine.gradient(s.pixels, s.targets)[0],
                     lambda s: s.saliency.attribute(s.x, target=s.target, abs=False)),
        "guided-backprop": (lambda s: s.engine.gradient(s.pixels, s.targets, "guided")[0],
                            lambda s: s.guided.attribute(s.x, target=s.target)),
        "smoothgrad": (lambda s: s.explain("gradient", smooth="smoothgrad", samples=samples,
                                           noise=0.15, seed=0, batch_size=samples),
                       lambda s: s.noise_tunnel.attribute(
                           s.x, nt_type="smoothgrad", nt_samples=samples,
                           nt_samples_batch_size=samples, stdevs=0.15 * 255, target=s.target)),
        # both compared as one map per pixel: onnxattr spreads it over the channels (map / C
        # each), Captum writes it into every channel
        "occlusion": (lambda s: s.method("occlusion", mask_size=OCCLUSION_MASK,
                                         stride=OCCLUSION_STRIDE, mask_value="mean",
                                         batch_size=OCCLUSION_BATCH).sum(axis=1),
                      lambda s: s.occlude().mean(dim=1)),
        "grad-cam": (lambda s: s.method("grad-cam").sum(axis=1),
                     lambda s: s.grad_cam_map()),
    }
    for steps in map(int, args.ig_steps.split(",")):
        # "default": each side's own default chunking (onnxattr 16, Captum all steps at once)
        for size in [None, *map(int, args.ig_batch_sizes.split(","))]:
            table[f"ig-{steps}-{'batch' if size else 'default'}{size or ''}"] = (
                lambda s, steps=steps, size=size: s.explain(
                    "integrated-gradients", steps=steps, rule="gausslegendre", batch_size=size),
                lambda s, steps=steps, size=size: s.integrated.attribute(
                    s.x, target=s.target, n_steps=steps, method="gausslegendre",
                    internal_batch_size=size))
    if args.cases:
        wanted = args.cases.split(",")
        unknown = set(wanted) - set(table)
        if unknown:
            sys.exit(f"unknown case(s): {', '.join(sorted(unknown))}; known: {', '.join(table)}")
        table = {name: table[name] for name in wanted}
    return table


class OnnxattrSide:
    """onnxattr's Explainer on the exported model, one photo, its top-1 class."""

    def __init__(self, args):
        from onnxattr import Explainer
        from onnxattr.methods import METHODS

        self.explainer = Explainer(args.model, threads=args.threads)
        self.methods = METHODS
        self.engine = self.explainer.engine
        self.pixels = self.explainer.pixels([PHOTO])
        self.targets = [int(np.argmax(self.engine.forward(self.pixels)[0]))]

    def explain(self, method, **options):
        return self.explainer.explain(PHOTO, method=method, target=self.targets[0],
                                      **options).attribution

    def method(self, name, batch_size=None, **options):
        """A method on the decoded pixels, as the gradient cases call the engine: no image
        decoding or figure data in the time."""
        attribution, _ = self.methods[name].compute(self.engine, self.pixels,
                                                    np.array(self.targets), "prob", batch_size,
                                                    **options)
        return attribution


class CaptumSide:
    """Captum on a float32 PyTorch GoogLeNet of the same weights, the same photo and class."""

    def __init__(self, args, pixels, target):
        import torch
        from captum.attr import (
            GuidedBackprop,
            IntegratedGradients,
            LayerAttribution,
            LayerGradCam,
            NoiseTunnel,
            Occlusion,
            Saliency,
        )

        sys.path.insert(0, str(REPO / "tests"))
        from torch_googlenet import build_reference

        torch.set_num_threads(args.threads)
        reference = build_reference(args.caffe).float().eval()
        self.model = lambda x: reference(x)
        self.x = torch.tensor(pixels, requires_grad=True)
        self.target = target
        self.saliency = Saliency(reference)
        self.guided = GuidedBackprop(reference)
        self.integrated = IntegratedGradients(reference)
        self.noise_tunnel = NoiseTunnel(self.saliency)
        self.occlusion = Occlusion(reference)
        self.layer_grad_cam = LayerGradCam(reference, reference.ops[GRAD_CAM_POOL])
        self.interpolate = LayerAttribution.interpolate
        self.torch = torch

    def occlude(self):
        """Captum's Occlusion with onnxattr's mask, stride and mask value (forward passes only,
        so without autograd: Captum's best case)."""
        x = self.x.detach()
        with self.torch.no_grad():
            return self.occlusion.attribute(
                x, sliding_window_shapes=(3, OCCLUSION_MASK, OCCLUSION_MASK),
                strides=(3, OCCLUSION_STRIDE, OCCLUSION_STRIDE), target=self.target,
                baselines=x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous(),
                perturbations_per_eval=OCCLUSION_BATCH)

    def grad_cam_map(self):
        """Captum's LayerGradCam at inception_5b's output (the pool's input), ReLU'd, upsampled
        bilinearly (align_corners=False) to the image."""
        cam = self.layer_grad_cam.attribute(self.x, target=self.target, relu_attributions=True,
                                            attribute_to_layer_input=True)
        return self.interpolate(cam, tuple(self.x.shape[2:]), "bilinear")


def timed(call, state):
    start = time.perf_counter()
    result = call(state)
    return time.perf_counter() - start, result


def to_numpy(result):
    if isinstance(result, tuple):
        result = result[0]
    return np.asarray(result.detach() if hasattr(result, "detach") else result, np.float64)


def ensure_model(args):
    if not args.model.exists():
        from onnxattr import caffe

        caffe.export(args.caffe, args.model)


def child(args):
    """Run one case once on one side in this fresh process; print its peak memory."""
    side, case = args.child
    if side == "onnxattr":
        sys.modules["torch"] = None  # a stack without PyTorch (onnxruntime-training probes it)
        state = OnnxattrSide(args)
    else:
        state = _captum_only_state(args)
    before = _status_mb("VmRSS")
    call = cases(args)[case][0 if side == "onnxattr" else 1]
    call(state)
    print(json.dumps({"peak_mb": _status_mb("VmHWM"), "before_mb": before}))


def _captum_only_state(args):
    """Captum's side without loading onnxattr's runtime: the same pixels and target."""
    from onnxattr.image import load_pixels

    pixels = load_pixels(PHOTO, (224, 224))[None]
    state = CaptumSide(args, pixels, 0)
    state.target = int(state.model(state.x).argmax())
    return state


def _status_mb(field):
    """A memory figure of this process from /proc (VmHWM: its peak resident set since exec)."""
    with open("/proc/self/status") as status:
        line = next(text for text in status if text.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def peak_memory(args, side, case):
    command = [sys.executable, __file__, "--child", side, case, "--model", str(args.model),
               "--caffe", str(args.caffe), "--threads", str(args.threads),
               "--ig-steps", args.ig_steps, "--ig-batch-sizes", args.ig_batch_sizes,
               "--smoothgrad-samples", str(args.smoothgrad_samples)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def relative_l2(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv=None):
    args = parse_args(argv)
    ensure_model(args)
    if args.child:
        return child(args)
    table = cases(args)
    ours = OnnxattrSide(args)
    theirs = CaptumSide(args, ours.pixels, ours.targets[0])
    times = {name: {"onnxattr": [], "captum": []} for name in table}
    agreement = {}
    for name, (ours_call, theirs_call) in table.items():  # warm-up, and the agreement check
        a, b = to_numpy(ours_call(ours)), to_numpy(theirs_call(theirs))
        # SmoothGrad draws its own noise on each side: no common answer to compare
        agreement[name] = None if name == "smoothgrad" else relative_l2(a.reshape(b.shape), b)
    for _ in range(args.repeats):
        for name, (ours_call, theirs_call) in table.items():
            times[name]["onnxattr"].append(timed(ours_call, ours)[0])
            times[name]["captum"].append(timed(theirs_call, theirs)[0])
    rows = []
    for name in table:
        row = {"case": name, "relative_l2": agreement[name]}
        for side in ("onnxattr", "captum"):
            row[f"{side}_s"] = statistics.median(times[name][side])
        row["time_ratio"] = row["onnxattr_s"] / row["captum_s"]
        if not args.no_memory:
            for side in ("onnxattr", "captum"):
                row[f"{side}_peak_mb"] = peak_memory(args, side, name)["peak_mb"]
            row["memory_ratio"] = row["onnxattr_peak_mb"] / row["captum_peak_mb"]
        rows.append(row)
    forward = next((r for r in rows if r["case"] == "forward"), None)
    report = {"machine": machine(args), "rows": rows,
              "gradient_over_forward": (next(r["onnxattr_s"] for r in rows if r["case"] ==
                                             "gradient") / forward["onnxattr_s"])
              if forward and "gradient" in table else None}
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def machine(args):
    import onnxruntime
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": args.threads, "repeats": args.repeats, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


def print_table(report):
    m = report["machine"]
    print(f"GoogLeNet 224x224, batch 1; {m['cores']} cores, {m['threads']} threads; medians of "
          f"{m['repeats']}; onnxruntime {m['onnxruntime']}, torch {m['torch']}")
    memory = "onnxattr_peak_mb" in report["rows"][0]
    header = f"{'case':<20} {'onnxattr s':>11} {'captum s':>9} {'ratio':>6}"
    header += f" {'onnxattr MB':>12} {'captum MB':>10} {'ratio':>6}" if memory else ""
    print(header + f" {'rel L2':>8}")
    for r in report["rows"]:
        line = f"{r['case']:<20} {r['onnxattr_s']:11.4f} {r['captum_s']:9.4f} {r['time_ratio']:6.2f}"
        if memory:
            line += (f" {r['onnxattr_peak_mb']:12.0f} {r['captum_peak_mb']:10.0f}"
                     f" {r['memory_ratio']:6.2f}")
        agreement = "random" if r["relative_l2"] is None else f"{r['relative_l2']:.1e}"
        print(line + f" {agreement:>8}")
    if report["gradient_over_forward"]:
        print(f"onnxattr gradient / forward: {report['gradient_over_forward']:.2f}")


if __name__ == "__main__":
    main()
