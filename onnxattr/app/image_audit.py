"""One image of an audit: classify it, run every method, write its figures and raw maps, and
return its summary entry. The one code path of both engines: the local loop (report.py) and the
Ray workers (ray_audit.py) call `audit_image`, so their files are made by the same code.
"""

import hashlib
import math
import re
import time
from pathlib import Path

from ..errors import OnnxAttrError
from ..io.files import WriteError
from ..io.image import load_image
from ..io.remote import is_uri
from ..methods.figures import write_figures
from . import faithfulness

TOP = 5


def image_key(path):
    """Folder name for one input: its stem (made file-name safe) and 8 hex digits of its
    absolute path (of a URI: the URI)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._")[:60] or "image"
    name = path if is_uri(path) else str(Path(path).resolve())
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{stem}-{digest[:8]}"


def audit_image(explainer, path, key, methods, out_dir, options, target_index, score, settings,
                advance, method_options=None, metrics=None, metric_options=None):
    """One image: classify, every method, figures; a summary entry (never raises on bad input)."""
    entry = {"file": str(path), "key": key, "status": "failed", "error": None, "predicted": None,
             "top5": [], "target": None, "methods": {}, "outputs": {}, "settings": settings}
    errors, results = [], []
    try:
        image = load_image(path)
        ranked = explainer.classify(image, top=TOP)
    except Exception as err:  # noqa: BLE001 - a bad file must not stop the batch
        entry["error"] = _message(err)
        advance(len(methods))
        return entry
    entry["top5"] = [{"index": i, "label": label, "prob": p} for i, label, p in ranked]
    entry["predicted"] = entry["top5"][0]
    chosen = ranked[0][0] if target_index is None else target_index
    for method in methods:
        record = entry["methods"][method] = {"status": "failed", "time_s": None, "error": None}
        start = time.perf_counter()
        try:
            result = explainer.explain(image, method=method, target=chosen, score=score,
                                       **(method_options or {}).get(method, {}))
        except Exception as err:  # noqa: BLE001
            record["error"] = _message(err)
            errors.append(f"{method}: {record['error']}")
        else:
            record.update(status="done", time_s=round(time.perf_counter() - start, 4),
                          **_recorded(result.extras))
            results.append(result)
        advance(1)
    if results:
        first = results[0]
        entry["target"] = {"index": first.class_index, "label": first.label, "score": first.score}
        try:
            written = write_figures(results, f"{out_dir / key}/", options, save_raw=True,
                                    panel=True)
        except WriteError:  # a full disk: every image would fail, so the audit stops
            raise
        except Exception as err:  # noqa: BLE001 - this image fails, the batch goes on
            errors.append(f"figures: {_message(err)}")
        else:
            rel = {name: path.relative_to(out_dir).as_posix() for name, path in written.items()}
            entry["outputs"] = {"photo": rel["photo"], "panel": rel["panel"]}
            for result in results:
                entry["methods"][result.method].update(png=rel[result.method],
                                                       npy=rel[f"{result.method}.npy"])
        if metrics:
            try:
                faithfulness.record_metrics(explainer, image, results, entry, metrics,
                                            metric_options)
                curves = faithfulness.save_curves(entry, out_dir / key / "curves.png")
            except WriteError:
                raise
            except Exception as err:  # noqa: BLE001 - this image fails, the batch goes on
                errors.append(f"metrics: {_message(err)}")
            else:
                entry["outputs"].update({"curves": f"{key}/curves.png"} if curves else {})
    entry["error"] = "; ".join(errors) or None
    entry["status"] = "failed" if errors else "done"
    return entry


def _message(err):
    """One line for an error: ours as is, anything else with its type."""
    text = str(err) if isinstance(err, OnnxAttrError) else f"{type(err).__name__}: {err}"
    return " ".join(text.split())


def _recorded(extras):
    """The method's scalar extras (e.g. IG's convergence deltas) as JSON numbers, and its
    names (a layer method's layer); arrays (a Grad-CAM map) stay out."""
    numbers = {}
    for name, value in (extras or {}).items():
        if value is None:  # a number that is not defined here (e.g. a relative delta of 0 / 0)
            numbers[name] = None
            continue
        if isinstance(value, str):
            numbers[name] = value
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        numbers[name] = number if math.isfinite(number) else None
    return numbers
