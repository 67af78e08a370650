"""Benchmark onnxattr against Captum, per model, each side in a process of its own.

Both sides compute the same thing on the same network and weights with the same number of
threads: Captum on a float32 PyTorch model (GoogLeNet: built from the same Caffe files,
tests/torch_googlenet.py; ResNet-18 and MobileNetV2: torchvision at random init, the zoo's
calibration, tests/zoo_models.py), onnxattr on its ONNX export. By default every case runs on
each side in --rounds (3) fresh child processes, the sides taking turns (onnxattr's first in the
first round, then Captum's first, and so on): each child makes a warm-up call (the first
round's results are compared between the sides), then --repeats timed calls, whose median is
the child's time; the case's time is the median of its children's, and the table gives the
range of the per-round ratios. A process's times move together (on a 2-core virtual machine one
child ran GoogLeNet's gradient at 106 ms where the next two ran 84), so one child per side would
make a batch-1 ratio a draw. The parent only spawns the children and collects their JSON, so
neither side runs on cores that the other one's thread pools still hold (onnxruntime's and
torch's OpenMP threads keep spinning after a run). Each child gets the same thread count:
onnxruntime's intra-op threads, torch's set_num_threads, and OMP/MKL/OPENBLAS_NUM_THREADS in
its environment. Peak memory is the largest child's VmHWM (the peak resident set of the whole
process, imports and model included); the
onnxattr children run without torch importable, as in a deployment stack without PyTorch.
`--same-process` times both sides in this process instead, interleaved per repeat (the old
mode: each side then runs on cores the other's threads still spin on, which slows Captum's
side most), with peak memory still from one child per case and side. On CUDA (`--device cuda`,
onnxruntime-gpu and torch with CUDA) both sides run on the GPU, float32-exact by default
(`--precision tf32` lets both use TF32), timed with the GPU synchronised.

    python scripts/bench.py [--models googlenet,resnet18,mobilenet_v2] [--device cpu|cuda]
                            [--precision float32|tf32] [--builder auto|native|onnxruntime]
                            [--threads 2] [--repeats 5] [--rounds 3] [--cases ...]
                            [--json bench.json] [--same-process]

The "gradient-<builder>" cases time the gradient graph of each builder side by side (the
native graph and onnxruntime-training's, lowered to standard ops); "rel L2" checks that both
sides computed the same thing. With "forward-batch64" in the cases, each IG case also gets its
floor: the time of gradients that cost exactly two of onnxattr's forward passes at batch 64 per
path image (the forward pass, and one adjoint per convolution with the same multiply-adds), as
a ratio to Captum's time for the case: only the forward's few ops besides its convolutions
could make a gradient of onnxruntime's kernels a little cheaper. The gradient cases print their
ratio to their floor too (two forward passes at the same batch).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's onnxattr, the test models
CAFFE_DIR = REPO.parent / "shared" / "models" / "bvlc_googlenet"
PHOTO = REPO / "samples" / "chelsea.png"
MODELS = ("googlenet", "resnet18", "mobilenet_v2")
BATCH = 64  # the batched-gradient case
# deletion-insertion: 147 steps at 224 x 224 on both sides. Quantus's PixelFlipping ranks the
# map broadcast over the channels and needs features_in_step to divide H x W: 1024 channel
# values a step (341.3 pixels), 147 steps; onnxattr's 147 steps replace round(k·H·W/147) pixels
METRIC_STEPS, METRIC_FEATURES = 147, 1024
# occlusion: onnxattr's defaults at 224 x 224 (a 45-pixel mask, stride 23: 81 masked images),
# run 16 at a time on both sides, masked pixels set to the photo's channel means
OCCLUSION_MASK, OCCLUSION_STRIDE, OCCLUSION_BATCH = 45, 23, 16


def common_arguments(parser):
    """The GoogLeNet model, its Caffe source, threads and repeats: shared with
    scripts/bench_compiled.py."""
    parser.add_argument("--model", type=Path, default=REPO / "models" / "googlenet.onnx",
                        help="exported GoogLeNet (made from --caffe when missing)")
    parser.add_argument("--caffe", type=Path, default=CAFFE_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    return parser


def parse_args(argv=None):
    parser = common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--models", default="googlenet",
                        help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["float32", "tf32"], default="float32")
    parser.add_argument("--builder", default="auto", help="onnxattr's builder for the cases")
    parser.add_argument("--ig-steps", default="50", help="comma-separated step counts")
    parser.add_argument("--ig-batch-sizes", default="1,10,25,50")
    parser.add_argument("--smoothgrad-samples", type=int, default=25)
    parser.add_argument("--cases", default=None, help="comma-separated subset of the cases")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak memory children of --same-process")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench",
                        help="exported zoo models are cached here")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--rounds", type=int, default=3,
                        help="children per side and case, taking turns; the time is the median "
                             "of their medians")
    parser.add_argument("--same-process", action="store_true",
                        help="time both sides in this process, interleaved (not the default: "
                             "each side's idle threads slow the other)")
    # a child process: one case on one side (with the target class to explain, and where to
    # save the warm-up call's result), or the export of a zoo model
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "SIDE", "CASE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--target", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--export", metavar="MODEL", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def cases(args):
    """name -> (onnxattr call, captum call), each taking the prepared side state."""
    samples = args.smoothgrad_samples
    table = {
        "forward": (lambda s: s.engine.forward(s.pixels, reuse=False),
                    lambda s: s.model(s.x)),
        "gradient": (lambda s: s.engine.gradient(s.pixels, s.targets)[0],
                     lambda s: s.saliency.attribute(s.x, target=s.target, abs=False)),
        **{f"gradient-{builder}": (
            lambda s, builder=builder: s.other(builder).gradient(s.pixels, s.targets)[0],
            lambda s: s.saliency.attribute(s.x, target=s.target, abs=False))
           for builder in ("native", "onnxruntime")},
        f"forward-batch{BATCH}": (lambda s: s.engine.forward(s.batch, reuse=False),
                                   lambda s: s.model(s.x_batch)),
        f"gradient-batch{BATCH}": (
            lambda s: s.engine.gradient(s.batch, s.targets * BATCH)[0],
            lambda s: s.saliency.attribute(s.x_batch, target=s.target, abs=False)),
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
        # faithfulness of one guided-backprop map: onnxattr's deletion and insertion against
        # Quantus's PixelFlipping run twice (its own loop, one forward pass per step)
        "deletion-insertion": (lambda s: s.deletion_insertion(),
                               lambda s: s.quantus_deletion_insertion()),
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


def model_path(args, name):
    """The ONNX file of a model (GoogLeNet exported from --caffe when missing, without torch;
    a zoo model's is written by `torch_module`)."""
    if name != "googlenet":
        return args.out / f"{name}.onnx"
    if not args.model.exists():
        from onnxattr.io import caffe

        caffe.export(args.caffe, args.model)
    return args.model


def torch_module(args, name):
    """The float32 torch module of the model's weights (a zoo model is exported too, cached)."""
    if name == "googlenet":
        from torch_googlenet import build_reference

        return build_reference(args.caffe).float().eval()
    import zoo_models as zoo

    module = zoo.build(name, "full", seed=0)
    zoo.export_cached(module, model_path(args, name))
    return module.float().eval()


class OnnxattrSide:
    """onnxattr's Explainer on the model file, one photo, its top-1 class."""

    def __init__(self, args, path):
        from onnxattr import Explainer

        self.args, self.path = args, path
        self.explainer = Explainer(path, threads=args.threads, device=args.device,
                                   precision=args.precision, builder=args.builder)
        self.engine = self.explainer.engine
        self.pixels = self.explainer.pixels([PHOTO])
        self.targets = [int(np.argmax(self.engine.forward(self.pixels)[0]))]
        noise = np.random.default_rng(0).normal(0, 8, (BATCH, *self.pixels.shape[1:]))
        self.batch = (self.pixels + noise).clip(0, 255).astype(np.float32)
        self._others = {}

    def sync(self):
        """Nothing to wait for: onnxruntime returns its outputs in host memory."""

    def other(self, builder):
        """The engine of an Explainer with another builder (for the gradient-<builder> cases)."""
        from onnxattr import Explainer

        if builder not in self._others:
            self._others[builder] = Explainer(self.path, threads=self.args.threads,
                                              device=self.args.device,
                                              precision=self.args.precision,
                                              builder=builder).engine
        return self._others[builder]

    def explain(self, method, **options):
        return self.explainer.explain(PHOTO, method=method, target=self.targets[0],
                                      **options).attribution

    def method(self, name, batch_size=None, **options):
        """A method on the decoded pixels, as the gradient cases call the engine: no image
        decoding or figure data in the time."""
        from onnxattr.methods.table import METHODS

        attribution, _ = METHODS[name].compute(self.engine, self.pixels, np.array(self.targets),
                                               "prob", batch_size, **options)
        return attribution

    def deletion_insertion(self):
        """Deletion and insertion of the guided-backprop map alone (no controls): the curves
        after step 0, [2, METRIC_STEPS]."""
        from onnxattr.methods.metrics import Map, Subject, deletion, insertion
        from onnxattr.methods.table import CHUNK

        if not hasattr(self, "guided_map"):
            self.guided_map = self.engine.gradient(self.pixels, self.targets, "guided")[0][0]
        subject = Subject(self.engine, self.pixels[0], self.targets[0], CHUNK)
        maps = [Map("guided", self.guided_map)]
        curves = [measure(subject, maps, steps=METRIC_STEPS)["guided"][quantity].curve[1:]
                  for measure, quantity in ((deletion, "deletion_auc"),
                                            (insertion, "insertion_auc"))]
        return np.stack(curves)


def grad_cam_layer(name, module):
    """Captum's layer for Grad-CAM at onnxattr's default layer (the last 4-D activation before
    the global pooling): (the torch module, whether that activation is its input)."""
    if name == "googlenet":
        return module.ops["pool5/7x7_s1"], True
    if name == "resnet18":
        return module.net.layer4, False
    return module.net.features, False  # MobileNetV2: pooled by a functional call after it


class CaptumSide:
    """Captum on the float32 PyTorch model of the same weights, the same photo and class."""

    def __init__(self, args, name, module, pixels, target):
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

        torch.set_num_threads(args.threads)
        tf32 = args.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        device = torch.device(args.device)
        module = module.to(device)
        self.model = module
        self.x = torch.tensor(pixels, requires_grad=True, device=device)
        noise = np.random.default_rng(0).normal(0, 8, (BATCH, *pixels.shape[1:]))
        self.x_batch = torch.tensor((pixels + noise).clip(0, 255).astype(np.float32),
                                    requires_grad=True, device=device)
        self.target = target
        self.saliency = Saliency(module)
        self.guided = GuidedBackprop(module)
        self.integrated = IntegratedGradients(module)
        self.noise_tunnel = NoiseTunnel(self.saliency)
        self.occlusion = Occlusion(module)
        layer, self.cam_of_input = grad_cam_layer(name, module)
        self.layer_grad_cam = LayerGradCam(module, layer)
        self.interpolate = LayerAttribution.interpolate
        self.torch = torch

    def sync(self):
        """Wait for the GPU's queued work (a CUDA call returns before it is done)."""
        if self.x.is_cuda:
            self.torch.cuda.synchronize()

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

    def quantus_deletion_insertion(self):
        """Quantus's PixelFlipping of the same map (|guided backprop| summed over channels,
        from Captum): deletion to 0, and insertion as PixelFlipping of the blurred image with a
        perturb_func that puts the photo's values back; the curves, [2, METRIC_STEPS]. The
        module's output is already the softmax: Quantus's softmax stays off."""
        import quantus

        if not hasattr(self, "quantus_inputs"):
            self.quantus_inputs = self._quantus_inputs()
        x, blurred, a = self.quantus_inputs
        options = {"features_in_step": METRIC_FEATURES, "normalise": False, "disable_warnings": True}
        call = {"model": self.model, "y_batch": np.array([self.target]), "a_batch": a,
                "channel_first": True, "softmax": False, "device": str(self.x.device)}
        rows = np.arange(len(x))[:, None]

        def put_back(arr, indices, **_):
            arr = arr.copy()
            arr[rows, indices] = x.reshape(len(x), -1)[rows, indices]
            return arr

        deleted = quantus.PixelFlipping(perturb_baseline=0.0, **options)(x_batch=x, **call)
        inserted = quantus.PixelFlipping(perturb_func=put_back, **options)(x_batch=blurred,
                                                                           **call)
        return np.array([deleted[0], inserted[0]])

    def _quantus_inputs(self):
        """The photo, its blur (onnxattr's insertion start, made once, outside the time) and
        the map, as numpy for Quantus."""
        from onnxattr.methods.integration import make_baselines

        x = self.x.detach().cpu().numpy()
        guided = self.guided.attribute(self.x, target=self.target).detach().cpu().numpy()
        return x, make_baselines("blur", x), np.abs(guided).sum(axis=1, keepdims=True)

    def grad_cam_map(self):
        """Captum's LayerGradCam at the layer, ReLU'd, upsampled bilinearly (align_corners
        False) to the image."""
        cam = self.layer_grad_cam.attribute(self.x, target=self.target, relu_attributions=True,
                                            attribute_to_layer_input=self.cam_of_input)
        return self.interpolate(cam, tuple(self.x.shape[2:]), "bilinear")


def timed(call, state):
    start = time.perf_counter()
    result = call(state)
    state.sync()
    return time.perf_counter() - start, result


def to_numpy(result):
    if isinstance(result, tuple):
        result = result[0]
    if hasattr(result, "detach"):
        result = result.detach().cpu()
    return np.asarray(result, np.float64)


def child(args):
    """Run one case on one side in this fresh process: a warm-up call (its result saved to
    --result), then --repeats timed calls; print the times, the peak memory, this process's id
    and whether torch was loaded, as JSON."""
    name, side, case = args.child
    if side == "onnxattr":
        sys.modules["torch"] = None  # a stack without PyTorch
        state = OnnxattrSide(args, model_path(args, name))
        target = state.targets[0]
        import onnxruntime

        versions = {"onnxruntime": onnxruntime.__version__}
    else:
        state = _captum_only_state(args, name, torch_module(args, name))
        target = state.target
        versions = {"torch": state.torch.__version__,
                    "gpu": state.torch.cuda.get_device_name() if args.device == "cuda" else None}
    before = _status_mb("VmRSS")
    call = cases(args)[case][0 if side == "onnxattr" else 1]
    _, result = timed(call, state)
    if args.result:
        np.save(args.result, to_numpy(result))
    seconds = [timed(call, state)[0] for _ in range(args.repeats)]
    builders = _builders(state.engine) if side == "onnxattr" else {}
    print(json.dumps({"seconds": seconds, "peak_mb": _status_mb("VmHWM"), "before_mb": before,
                      "pid": os.getpid(), "target": target, "versions": versions,
                      "builders": builders,
                      "torch_loaded": any(module is not None and key.split(".")[0] == "torch"
                                          for key, module in list(sys.modules.items()))}))


def _captum_only_state(args, name, module):
    """Captum's side without loading onnxattr's runtime: the same pixels, and --target (else
    the model's top-1 class)."""
    from onnxattr.io.image import load_pixels

    pixels = load_pixels(PHOTO, (224, 224))[None]
    state = CaptumSide(args, name, module, pixels, args.target)
    if args.target is None:
        state.target = int(state.model(state.x).argmax())
    return state


def _status_mb(field):
    """A memory figure of this process from /proc (VmHWM: its peak resident set since exec)."""
    with open("/proc/self/status") as status:
        line = next(text for text in status if text.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def run_child(args, *options):
    """This script in a fresh process with the run's settings and `options`, every thread pool
    at --threads; its last line of output, as JSON."""
    command = [sys.executable, __file__, "--model", str(args.model),
               "--caffe", str(args.caffe), "--threads", str(args.threads), "--repeats",
               str(args.repeats), "--out", str(args.out), "--device", args.device,
               "--precision", args.precision, "--builder", args.builder,
               "--ig-steps", args.ig_steps, "--ig-batch-sizes", args.ig_batch_sizes,
               "--smoothgrad-samples", str(args.smoothgrad_samples), *options]
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "OPENBLAS_NUM_THREADS": threads}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"bench child {' '.join(options)} failed:\n{result.stderr[-3000:]}")
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def peak_memory(args, name, side, case):
    """The peak memory of one call of the case on the side, in a fresh process."""
    return run_child(args, "--child", name, side, case, "--repeats", "0")


def relative_l2(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def measure_separately(args, name, workdir):
    """The table of one model, each case on each side in fresh processes: --rounds children
    per side, the sides taking turns (onnxattr's first in the first round: it picks the class
    that Captum's explains too; then the other way round, and so on). A child's times move
    together (one process ran 106 ms gradients where the next ran 84), so the time is the
    median of the children's medians, and the per-round ratios give the spread."""
    if not model_path(args, name).exists():
        run_child(args, "--export", name)
    rows, builders, versions, target = [], {}, {}, None
    for case in cases(args):
        runs = {"onnxattr": [], "captum": []}
        for round_ in range(args.rounds):
            for side in ("onnxattr", "captum")[::-1 if round_ % 2 else 1]:
                options = [] if target is None else ["--target", str(target)]
                if round_ == 0:  # the first round's results are compared
                    options += ["--result", str(workdir / f"{name}-{case}-{side}.npy")]
                result = run_child(args, "--child", name, side, case, *options)
                target = result["target"] if target is None else target
                builders.update(result["builders"])
                versions.update(result["versions"])
                runs[side].append(result)
        ours, theirs = (np.load(workdir / f"{name}-{case}-{side}.npy")
                        for side in ("onnxattr", "captum"))
        row = {"case": case, "relative_l2": agreement(case, ours, theirs)}
        for side, results in runs.items():
            row[f"{side}_child_s"] = [statistics.median(r["seconds"]) for r in results]
            row[f"{side}_s"] = statistics.median(row[f"{side}_child_s"])
            row[f"{side}_pids"] = [r["pid"] for r in results]
            if args.device == "cpu":
                row[f"{side}_peak_mb"] = max(r["peak_mb"] for r in results)
        row["onnxattr_torch_loaded"] = any(r["torch_loaded"] for r in runs["onnxattr"])
        rows.append(row)
    return summary(name, rows, builders, versions)


def measure_in_process(args, name):
    """The table of one model, both sides in this process, interleaved per repeat (peak
    memory from a fresh process per case and side)."""
    import onnxruntime

    module = torch_module(args, name)
    table = cases(args)
    ours = OnnxattrSide(args, model_path(args, name))
    theirs = CaptumSide(args, name, module, ours.pixels, ours.targets[0])
    times = {case: {"onnxattr": [], "captum": []} for case in table}
    results = {}
    for case, (ours_call, theirs_call) in table.items():  # warm-up, and the agreement check
        results[case] = agreement(case, to_numpy(ours_call(ours)), to_numpy(theirs_call(theirs)))
    for _ in range(args.repeats):
        for case, (ours_call, theirs_call) in table.items():
            times[case]["onnxattr"].append(timed(ours_call, ours)[0])
            times[case]["captum"].append(timed(theirs_call, theirs)[0])
    rows = []
    for case in table:
        row = {"case": case, "relative_l2": results[case]}
        for side in ("onnxattr", "captum"):
            row[f"{side}_s"] = statistics.median(times[case][side])
            row[f"{side}_child_s"] = [row[f"{side}_s"]]
            row[f"{side}_pids"] = [os.getpid()]
            if not args.no_memory and args.device == "cpu":
                row[f"{side}_peak_mb"] = peak_memory(args, name, side, case)["peak_mb"]
        rows.append(row)
    torch = theirs.torch
    versions = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    return summary(name, rows, _builders(ours.engine), versions)


def agreement(case, ours, theirs):
    """The relative L2 distance of onnxattr's result to Captum's (None for SmoothGrad: each
    side draws its own noise, there is no common answer)."""
    return None if case == "smoothgrad" else relative_l2(ours.reshape(theirs.shape), theirs)


def _builders(engine):
    return {"/".join(str(k) for k in key if k): b for key, b in engine.builders_used.items()}


def summary(name, rows, builders, versions):
    """A model's report: its rows with their time and memory ratios, and the gradient and IG
    cases' ratios to their floors."""
    for row in rows:
        row["time_ratio"] = row["onnxattr_s"] / row["captum_s"]
        row["time_ratio_range"] = _spread(row["onnxattr_child_s"], row["captum_child_s"])
        if "onnxattr_peak_mb" in row:
            row["memory_ratio"] = row["onnxattr_peak_mb"] / row["captum_peak_mb"]
    by_case = {r["case"]: r for r in rows}
    return {"model": name, "rows": rows, "builders": builders, "versions": versions,
            "gradient_over_forward": _over(by_case, "gradient", "forward"),
            "gradient_over_forward_batch": _over(by_case, f"gradient-batch{BATCH}",
                                                 f"forward-batch{BATCH}"),
            "ig_floors": ig_floors(rows)}


def _spread(times, others):
    """The smallest and largest ratio of round r's time to the other's round r."""
    ratios = [t / o for t, o in zip(times, others)]
    return [min(ratios), max(ratios)]


def _over(by_case, case, other):
    """onnxattr's time for `case` over its time for `other` (medians), with the per-round range;
    None when either case was not run."""
    if not {case, other} <= by_case.keys():
        return None
    ours, base = by_case[case], by_case[other]
    return {"ratio": ours["onnxattr_s"] / base["onnxattr_s"],
            "range": _spread(ours["onnxattr_child_s"], base["onnxattr_child_s"])}


def ig_floors(rows):
    """For each IG case: the time of `steps` gradients that cost two forward passes each at
    batch BATCH, its ratio to Captum's time for the case ("ratio") and onnxattr's time over it
    ("over_floor")."""
    by_case = {r["case"]: r for r in rows}
    forward = by_case.get(f"forward-batch{BATCH}")
    if forward is None:
        return {}
    floors = {}
    for case, row in by_case.items():
        if case.startswith("ig-"):
            per_step = 2 * int(case.split("-")[1]) / BATCH
            seconds = per_step * forward["onnxattr_s"]
            floors[case] = {"seconds": seconds, "ratio": seconds / row["captum_s"],
                            "over_floor": row["onnxattr_s"] / seconds,
                            "over_floor_range": [r / per_step for r in _spread(
                                row["onnxattr_child_s"], forward["onnxattr_child_s"])]}
    return floors


def machine(args):
    """How the run measures: the mode, the threads, the CPU (the GPU and the library versions
    are added from the first model's report)."""
    with open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info
                    if line.startswith("model name")), platform.machine())
    return {"mode": "same process" if args.same_process else "separate processes",
            "cpu": cpu, "cores": os.cpu_count(), "threads": args.threads,
            "repeats": args.repeats, "rounds": 1 if args.same_process else args.rounds,
            "python": platform.python_version(), "device": args.device,
            "precision": args.precision}


def print_table(report, machine_info):
    m = machine_info
    mode = ("both sides in one process, interleaved" if m["mode"] == "same process" else
            f"each side and case in processes of its own, {m['rounds']} per side taking turns")
    where = f"{m['gpu']}, " if m.get("gpu") else ""
    print(f"\n{report['model']} 224x224, batch 1; measured with {mode}, {m['threads']} threads "
          f"each; {where}{m['cpu']}, {m['cores']} cores; {m['precision']}; medians of "
          f"{m['repeats']} per process, the median of the processes; onnxruntime "
          f"{m['onnxruntime']}, torch {m['torch']}; builders used: {report['builders']}")
    memory = "onnxattr_peak_mb" in report["rows"][0]
    header = f"| {'case':<22} | {'onnxattr s':>10} | {'Captum s':>9} | {'ratio (rounds)':>17} |"
    header += f" {'onnxattr MB':>11} | {'Captum MB':>9} | {'ratio':>5} |" if memory else ""
    print(header + f" {'rel L2':>8} |")
    for r in report["rows"]:
        ratio = f"{r['time_ratio']:.2f} {_range(r['time_ratio_range'])}"
        line = f"| {r['case']:<22} | {r['onnxattr_s']:10.4f} | {r['captum_s']:9.4f} | {ratio:>17} |"
        if memory:
            line += (f" {r['onnxattr_peak_mb']:11.0f} | {r['captum_peak_mb']:9.0f} |"
                     f" {r['memory_ratio']:5.2f} |")
        agreement = "random" if r["relative_l2"] is None else f"{r['relative_l2']:.1e}"
        print(line + f" {agreement:>8} |")
    for key, batch in (("gradient_over_forward", "batch 1"),
                       ("gradient_over_forward_batch", f"batch {BATCH}")):
        if report[key]:
            over = report[key]
            print(f"onnxattr gradient / forward at {batch}: {over['ratio']:.2f}; over its floor "
                  f"of two forward passes: {over['ratio'] / 2:.2f} "
                  f"{_range([r / 2 for r in over['range']])}")
    for case, floor in report["ig_floors"].items():
        print(f"{case} floor (two forward passes at batch {BATCH} per path image): "
              f"{floor['seconds']:.2f} s, {floor['ratio']:.2f} of Captum's time; onnxattr "
              f"{floor['over_floor']:.2f} {_range(floor['over_floor_range'])} times its floor")


def _range(bounds):
    return f"({bounds[0]:.2f}-{bounds[1]:.2f})"


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    if args.export:
        return torch_module(args, args.export)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        sys.exit(f"unknown model(s): {', '.join(sorted(unknown))}; known: {', '.join(MODELS)}")
    cases(args)  # an unknown case stops here, before any child starts
    info = machine(args)
    reports = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            report = (measure_in_process(args, name) if args.same_process else
                      measure_separately(args, name, Path(workdir)))
            info.update(report.pop("versions"))
            reports.append(report)
            print_table(report, info)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "parent_pid": os.getpid(),
                                         "models": reports}, indent=2))


if __name__ == "__main__":
    main()
