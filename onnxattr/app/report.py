"""Audit: every method on every image of a batch, with a summary (JSON, CSV) and an HTML page.

    from onnxattr import Explainer
    from onnxattr.app.report import run_audit
    summary = run_audit(Explainer("models/googlenet.onnx"), ["photos/"], ["gradient"], "audit")

Per image, `<out>/<key>/` holds `photo.png`, `<method>.png`, `<method>.npy` and `panel.png`,
where `<key>` is the file's stem plus a short hash of its absolute path (so `a/cat.png` and
`b/cat.png` do not collide, and a resumed run finds the same folder). `<out>/summary.json`,
`summary.csv` and `index.html` are rewritten (atomically) after each image, so an interrupted run
keeps what was done. A file that cannot be read or explained is recorded as failed with its
error and the batch goes on; a file that cannot be written (a full disk) stops the audit with one
error, keeping what was written. One audit at a time writes into an output folder (files.py's
folder_lock); it starts by removing the temporaries a killed run left there.

`engine="ray"` runs the images on a Ray cluster instead (ray_audit.py): the workers write the
same per-image files with the same code (image_audit.py); this driver keeps the lock, the resume
and the summary, rewritten as results come in (now and then: each rewrite costs time in the
number of images) and at the end, with summary.parquet beside it.
"""

import csv
import glob
import html
import json
import time
from pathlib import Path
from urllib.parse import quote

from .._version import __version__
from ..errors import OnnxAttrError
from ..io.files import WriteError, atomic_path, folder_lock, remove_temporaries
from ..io.path_list import is_path_list, read_path_list
from ..io.remote import as_input, is_uri
from ..methods.figures import RenderOptions
from ..methods.table import METHODS, get_method
from . import faithfulness
from .image_audit import audit_image, image_key

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SUMMARY_VERSION = 1
ENGINES = ("local", "ray")
# The Ray engine rewrites the summary at most every CHECKPOINT_S seconds, and CHECKPOINT_COST
# times as long as the last rewrite took (50,000 images: 16 s), so the driver spends at most a
# tenth of its time on it; and at the end.
CHECKPOINT_S, CHECKPOINT_COST = 30, 10
DELTA_KEYS = ("convergence_delta", "relative_convergence_delta")
TEXT_COLUMNS = ("layer", "error")  # per-method CSV columns of text
# A CSV text cell starting so is a formula to a spreadsheet: it gets a leading quote (OWASP, "CSV
# Injection")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def parse_methods(text):
    """"gradient,guided-backprop" (or "all") -> the method names; unknown names are an error."""
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    if "all" in names:
        return list(METHODS)
    if not names:
        raise OnnxAttrError("no methods given")
    for name in names:
        get_method(name)
    return list(dict.fromkeys(names))


# --- inputs -----------------------------------------------------------------------------------


def collect_inputs(paths, exclude=None):
    """The files to audit, in order, each once: folders are searched recursively for image files
    (by extension, hidden files skipped); a quoted glob ("photos/*.jpg") is expanded; a .csv or
    .parquet file is a list of images (its `path` column, io/path_list.py); a URI (s3://...,
    io/remote.py) is taken as it is, read when its turn comes; other files named
    explicitly are taken whatever their extension (so a wrong file is tried and recorded as
    failed); missing paths are kept (they fail). Files under `exclude` (the output folder) are
    left out."""
    exclude = Path(exclude).resolve() if exclude is not None else None
    found, seen = [], set()

    def add(path):
        resolved = path if is_uri(path) else path.resolve()
        if resolved in seen or (exclude is not None and not is_uri(path)
                                and resolved.is_relative_to(exclude)):
            return
        seen.add(resolved)
        found.append(path)

    for path in _expanded(map(as_input, paths)):
        if not is_uri(path) and path.is_dir():
            for child in sorted(path.rglob("*")):
                relative = child.relative_to(path).parts
                if (child.suffix.lower() in IMAGE_EXTENSIONS and child.is_file()
                        and not any(part.startswith(".") for part in relative)):
                    add(child)
        else:
            add(path)
    return found


def _expanded(paths):
    """Each path, a glob that names no file as its matches, a list file as its paths."""
    for path in paths:
        if is_uri(path):
            yield path
        elif not path.exists() and glob.has_magic(str(path)):
            yield from map(Path, sorted(glob.glob(str(path), recursive=True)))
        elif is_path_list(path) and path.is_file():
            yield from read_path_list(path)
        else:
            yield path


# --- the audit --------------------------------------------------------------------------------


def run_audit(explainer, paths, methods, out_dir, options=None, target=None, score="prob",
              resume=False, advance=None, method_options=None, metrics=None, metric_options=None,
              engine="local", ray_address=None, workers=None):
    """Run `methods` on every image found in `paths` and write the figures and the summary.

    `options`: a `RenderOptions` (default: the example's map). `target`: class index or label to
    explain (None: each image's top-1 class). `resume`: skip images already done by an earlier
    run into `out_dir` with the same settings and their outputs present. `advance(n)` is called
    as methods finish (for a progress bar). `method_options`: {method: keyword options of
    Explainer.explain} (e.g. integrated gradients' steps). `metrics`: faithfulness metrics
    measured on every map (onnxattr.methods.metrics; `metric_options` as Explainer.evaluate's),
    recorded per method with the controls, plotted and ranked (app/faithfulness.py). `engine`:
    "local" (this process) or "ray" (`workers` Ray actors on the cluster at `ray_address`, or a
    local one; app/ray_audit.py). Returns the summary dict, also written to
    `out_dir/summary.json`; `summary["counts"]` has how many images are done, failed, skipped.
    OnnxAttrError if another audit is writing into `out_dir` or a file cannot be written.
    """
    out_dir = Path(out_dir)
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise OnnxAttrError("no methods given")
    if engine not in ENGINES:
        raise OnnxAttrError(f"unknown engine {engine!r}: choose {' or '.join(ENGINES)}")
    if engine == "ray":
        _ray_audit().require_ray()
    options = (options or RenderOptions()).check()
    target_index = None if target is None else explainer.target_index(target)
    files = collect_inputs(paths, exclude=out_dir)
    if not files:
        raise OnnxAttrError("no image files found in " + ", ".join(map(str, paths)))
    settings = {"model_sha256": explainer.classifier.digest, "fit": explainer.fit, "score": score,
                "target": target_index, "render": options.as_dict(), "onnxattr": __version__,
                "method_options": method_options or {}, "metrics": list(metrics or []),
                "metric_options": metric_options or {}}
    job = {"methods": methods, "options": options, "target_index": target_index, "score": score,
           "settings": settings, "method_options": method_options or {}, "metrics": metrics,
           "metric_options": metric_options}
    summary = {"version": SUMMARY_VERSION, "methods": methods, "settings": settings,
               "counts": {}, "images": []}
    busy = (f"another onnxattr audit is writing into {out_dir}: wait for it to end or choose "
            "another output folder")
    kept = {"done": 0}  # the done images of the last summary written
    try:
        with folder_lock(out_dir, busy):
            remove_temporaries(out_dir)
            _audit_files(explainer, files, out_dir, job, summary, kept, resume,
                         advance or (lambda n: None), engine, ray_address, workers)
    except WriteError as err:
        raise OnnxAttrError(f"{err}; {_kept(kept['done'])}") from err
    return summary


def _audit_files(explainer, files, out_dir, job, summary, kept, resume, advance, engine, address,
                 workers):
    """Reuse what resume allows, audit the rest on `engine`, and keep the summary written: after
    each image locally, as batches come in from Ray (see CHECKPOINT_S), and at the end;
    `kept["done"]`: the done images of the last one written."""
    methods, keys = job["methods"], [image_key(path) for path in files]
    previous = _previous_entries(out_dir) if resume else {}
    entries, todo = {}, []
    for path, key in zip(files, keys):
        old = previous.get(key)
        if old is not None and _reusable(old, job["settings"], methods, out_dir):
            entries[key] = dict(old, file=str(path))
            advance(len(methods))
        else:
            todo.append((path, key))
    skipped, due = len(entries), 0.0

    def record(new, final=False):
        nonlocal due
        entries.update(new)
        summary["images"] = [entries[key] for key in keys if key in entries]
        summary["counts"] = _counts(summary["images"], skipped)
        if final or engine == "local" or time.monotonic() >= due:
            start = time.monotonic()
            write_summary(out_dir, summary)
            kept["done"] = summary["counts"]["done"]
            due = time.monotonic() + max(CHECKPOINT_S, CHECKPOINT_COST * (time.monotonic() - start))

    if engine == "local":
        for path, key in todo:
            record({key: audit_image(explainer, path, key, out_dir=out_dir, advance=advance, **job)})
    elif todo:
        for batch in _ray_audit().audit_batches(explainer, todo, out_dir, job, address, workers):
            advance(len(methods) * len(batch))
            record(batch)
    record({}, final=True)
    if engine == "ray":
        _ray_audit().write_parquet(out_dir, summary)


def _ray_audit():
    """app/ray_audit.py, imported when an audit runs on Ray: Ray and pyarrow cost a second and
    100 MB of memory that `import onnxattr` and the local audit should not pay."""
    from . import ray_audit
    return ray_audit


def _kept(done):
    """What an audit stopped by a write error keeps, given the done images its summary lists."""
    if not done:
        return "no image was written"
    return "the 1 image already written is kept" if done == 1 else \
        f"the {done} images already written are kept"


def _counts(entries, skipped):
    done = sum(e["status"] == "done" for e in entries)
    return {"images": len(entries), "done": done, "failed": len(entries) - done,
            "skipped": skipped}


def _previous_entries(out_dir):
    """Entries of an earlier summary.json in `out_dir` by key ({} if none or unreadable)."""
    try:
        data = json.loads((Path(out_dir) / "summary.json").read_text(encoding="utf-8"))
        return {e["key"]: e for e in data["images"] if isinstance(e, dict) and "key" in e}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _reusable(entry, settings, methods, out_dir):
    """Done with the same settings, every method done, and every output file present."""
    if entry.get("status") != "done" or entry.get("settings") != settings:
        return False
    records = entry.get("methods", {})
    if any(records.get(m, {}).get("status") != "done" for m in methods):
        return False
    outputs = list(entry.get("outputs", {}).values())
    outputs += [records[m].get(kind) for m in methods for kind in ("png", "npy")]
    return bool(outputs) and all(p and (Path(out_dir) / p).is_file() for p in outputs)


# --- summary files ----------------------------------------------------------------------------


def write_summary(out_dir, summary):
    """Write summary.json, summary.csv and index.html into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with atomic_path(out_dir / "summary.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerows(csv_rows(summary))
    with atomic_path(out_dir / "index.html") as tmp:
        tmp.write_text(index_html(summary), encoding="utf-8")


def csv_rows(summary):
    """The summary as CSV rows: one header, then one row per image."""
    methods = summary["methods"]
    header = ["file", "status", "error", "predicted_index", "predicted_label", "score", "top5",
              "target_index", "target_label", "target_score"]
    columns = {m: ["time_s", *DELTA_KEYS, *(["layer"] if "layer" in METHODS[m].options else []),
                   "error"] for m in methods}
    header += [f"{m}_{column}" for m in methods for column in columns[m]]
    extra, cells = faithfulness.csv_columns(summary)
    rows = [header + extra]
    for e in summary["images"]:
        predicted, target = e.get("predicted") or {}, e.get("target") or {}
        top = "; ".join(f"{t['label']} ({t['index']}) {t['prob']:.4f}" for t in e.get("top5", []))
        row = [_text(e["file"]), _text(e["status"]), _text(e.get("error")),
               predicted.get("index", ""), _text(predicted.get("label")),
               _fmt(predicted.get("prob")), _text(top), target.get("index", ""),
               _text(target.get("label")), _fmt(target.get("score"))]
        for m in methods:
            record = e.get("methods", {}).get(m, {})
            row += [_text(record.get(column)) if column in TEXT_COLUMNS
                    else _fmt(record.get(column)) for column in columns[m]]
        rows.append(row + [_fmt(value) for value in cells(e)])
    return rows


def _fmt(value):
    return "" if value is None else f"{value:.6g}"


def _text(value):
    """A text cell: "" for None, a leading quote where a spreadsheet would see a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


# --- the HTML page ----------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f4;color:#222}
header{padding:12px 20px;background:#fff;border-bottom:1px solid #ddd;display:flex;
 flex-wrap:wrap;gap:8px 20px;align-items:center;font-size:13px}
header h1{font-size:18px;margin:0}
header .hint{color:#666}
header .counts b.failed{color:#b00020}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px;padding:16px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;display:flex;
 flex-direction:column;gap:4px;min-width:0}
.card.failed{border-color:#e0a0a8;background:#fff6f7}
.card img{width:100%;height:auto;display:block;cursor:zoom-in}
.card .file{font-size:12px;color:#555;overflow-wrap:anywhere}
.card .class{font-weight:600}
.card .error{color:#b00020;font-size:12px;overflow-wrap:anywhere}
.card .maps{font-size:12px}
.card .maps a{margin-right:6px}
.card .nophoto{height:120px;display:flex;align-items:center;justify-content:center;
 background:#f3d6da;color:#b00020;font-weight:600;border-radius:4px}
#lightbox{position:fixed;inset:0;background:rgba(0,0,0,.8);display:flex;align-items:center;
 justify-content:center;cursor:zoom-out;z-index:10}
#lightbox[hidden]{display:none}
#lightbox figure{margin:0;max-width:96vw;text-align:center;color:#fff}
#lightbox img{max-width:96vw;max-height:88vh;background:#fff}
"""

_JS = """
(function(){
  var grid=document.getElementById('grid');
  var order={
    input:function(a,b){return a.dataset.order-b.dataset.order;},
    'score-desc':function(a,b){return b.dataset.score-a.dataset.score||a.dataset.order-b.dataset.order;},
    'score-asc':function(a,b){return a.dataset.score-b.dataset.score||a.dataset.order-b.dataset.order;},
    'class':function(a,b){return (a.dataset.label===''?1:0)-(b.dataset.label===''?1:0)||
      a.dataset.label.localeCompare(b.dataset.label)||a.dataset.order-b.dataset.order;},
    status:function(a,b){return (a.dataset.status==='failed'?0:1)-(b.dataset.status==='failed'?0:1)||
      a.dataset.order-b.dataset.order;}
  };
  var select=document.getElementById('sort');
  function sortCards(){
    var cards=Array.prototype.slice.call(grid.children);
    cards.sort(order[select.value]);
    cards.forEach(function(card){grid.appendChild(card);});
  }
  select.addEventListener('change',sortCards);
  var box=document.getElementById('lightbox'),boxImg=box.querySelector('img'),
      boxCap=box.querySelector('figcaption');
  grid.addEventListener('click',function(event){
    var link=event.target.closest('a.panel');
    if(!link){return;}
    event.preventDefault();
    boxImg.src=link.getAttribute('href');
    boxCap.textContent=link.dataset.caption;
    box.hidden=false;
  });
  function close(){box.hidden=true;boxImg.removeAttribute('src');}
  box.addEventListener('click',close);
  document.addEventListener('keydown',function(event){if(event.key==='Escape'){close();}});
})();
"""


def _url(relative):
    return html.escape(quote(relative), quote=True)


def _card(number, entry):
    e = html.escape
    predicted = entry.get("predicted") or {}
    outputs = entry.get("outputs") or {}
    label = predicted.get("label", "")
    score = predicted.get("prob")
    attrs = (f'data-order="{number}" data-score="{-1 if score is None else score:.6f}" '
             f'data-label="{e(label.lower(), quote=True)}" data-status="{e(entry["status"])}"')
    parts = [f'<div class="card {e(entry["status"])}" {attrs}>']
    if "photo" in outputs and "panel" in outputs:
        caption = f'{entry["file"]}: {label} ({score:.2f})'
        parts.append(f'<a class="panel" href="{_url(outputs["panel"])}" '
                     f'data-caption="{e(caption, quote=True)}" title="show every map">'
                     f'<img src="{_url(outputs["photo"])}" alt="{e(label, quote=True)}" '
                     'loading="eager"></a>')
    else:
        parts.append('<div class="nophoto">failed</div>')
    parts.append(f'<div class="file">{e(entry["file"])}</div>')
    if predicted:
        parts.append(f'<div class="class">{e(label)} <span>({score:.2f})</span></div>')
        target = entry.get("target") or {}
        if target and target.get("index") != predicted.get("index"):
            parts.append(f'<div>explained: {e(target["label"])} ({target["score"]:.2f})</div>')
    links = []
    for method, record in (entry.get("methods") or {}).items():
        text = e(method)
        if record.get("time_s") is not None:
            text += f' {record["time_s"]:.2f}s'
        if record.get("convergence_delta") is not None:
            text += f' &Delta;={record["convergence_delta"]:.2g}'
        if record.get("png"):
            links.append(f'<a href="{_url(record["png"])}">{text}</a>')
        else:
            links.append(f"<span>{text}</span>")
    if outputs.get("curves"):
        links.append(f'<a href="{_url(outputs["curves"])}">curves</a>')
    if links:
        parts.append(f'<div class="maps">{" ".join(links)}</div>')
    error = entry.get("error") or ""
    if error.startswith(f'{entry["file"]}: '):  # the file is named just above
        error = error[len(entry["file"]) + 2:]
    if error:
        parts.append(f'<div class="error">{e(error)}</div>')
    parts.append("</div>")
    return "".join(parts)


def index_html(summary):
    """One self-contained page: relative links to the PNGs, inline CSS and JS, no network."""
    counts = summary.get("counts") or _counts(summary["images"], 0)
    methods = ", ".join(summary["methods"])
    cards = "\n".join(_card(i, entry) for i, entry in enumerate(summary["images"]))
    failed = (f'<b class="failed">{counts["failed"]} failed</b>' if counts["failed"]
              else "0 failed")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>onnxattr audit: {counts["images"]} images</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>onnxattr audit</h1>
<span class="counts">{counts["images"]} images: {counts["done"]} done, {failed}</span>
<span>methods: {html.escape(methods)}</span>
<span><a href="summary.json">summary.json</a> <a href="summary.csv">summary.csv</a></span>
<label>sort by <select id="sort">
<option value="input">input order</option>
<option value="score-desc">score, high to low</option>
<option value="score-asc">score, low to high</option>
<option value="class">class</option>
<option value="status">failed first</option>
</select></label>
<span class="hint">click a photo for all its maps</span>
</header>
{faithfulness.ranking_html(summary)}
<main id="grid">
{cards}
</main>
<div id="lightbox" hidden><figure><img alt="every map"><figcaption></figcaption></figure></div>
<script>{_JS}</script>
</body>
</html>
"""
