"""The audit's faithfulness part (docs/faithfulness.md): each map's metrics in the summary,
one curves plot per image (the methods overlaid), and a ranking of the methods over the audit
(mean and spread per quantity, the random-map control beside them)."""

import html

import numpy as np

from ..io.render import blank_figure, save_figure
from ..methods.metrics import INVERTED, QUANTITIES, RANDOM

CURVED = ("deletion_auc", "insertion_auc", "morf_auc", "lerf_auc")


def record_metrics(explainer, image, results, entry, metrics, metric_options):
    """Measure each result (an Explanation) of one image; its numbers and curves go into the
    entry's method records, the controls' into entry["controls"] (random: once per image)."""
    controls = entry.setdefault("controls", {})
    for result in results:
        measured = explainer.evaluate(image, result, metrics, metric_options=metric_options)
        record = entry["methods"][result.method]
        own = measured[result.method]
        record.update({q: r.value for q, r in own.items()})
        record["curves"] = {q: r.curve.tolist() for q, r in own.items() if r.curve is not None}
        inverted = measured.get(result.method + INVERTED, {})
        record.update({f"inverted_{q}": r.value for q, r in inverted.items()})
        controls[RANDOM] = {q: r.value for q, r in measured.get(RANDOM, {}).items()}
        controls.setdefault("curves", {}).update(
            {q: r.curve.tolist() for q, r in measured.get(RANDOM, {}).items()
             if r.curve is not None})


def quantities(summary):
    """The quantities the audit measured, in QUANTITIES' order."""
    found = {q for e in summary["images"] for r in e.get("methods", {}).values() for q in r}
    return [q for q in QUANTITIES if q in found]


def csv_columns(summary):
    """Extra CSV header cells and a function entry -> cells: per method each quantity and its
    inverted control's, then the random map's."""
    names = quantities(summary)
    methods = summary["methods"]
    header = [f"{m}_{p}{q}" for m in methods for p in ("", "inverted_") for q in names]
    header += [f"random_{q}" for q in names]

    def cells(entry):
        records = entry.get("methods", {})
        row = [records.get(m, {}).get(f"{p}{q}") for m in methods for p in ("", "inverted_")
               for q in names]
        return row + [entry.get("controls", {}).get(RANDOM, {}).get(q) for q in names]
    return header, cells


def save_curves(entry, path):
    """One small figure of the image's curves (a panel per curved quantity, the methods and
    the random map overlaid); the path, or None when there are none."""
    records = {m: r.get("curves") for m, r in entry.get("methods", {}).items() if r.get("curves")}
    shown = [q for q in CURVED if any(q in c for c in records.values())]
    if not shown:
        return None
    records[RANDOM] = entry.get("controls", {}).get("curves", {})
    fig = blank_figure(2.6 * len(shown), 2.4)
    for index, quantity in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), index + 1)
        for name, curves in records.items():
            if quantity in curves:
                curve = np.asarray(curves[quantity])
                ax.plot(np.linspace(0, 1, len(curve)), curve, label=name,
                        **({"color": "0.6", "linestyle": "--"} if name == RANDOM else {}))
        ax.set_title(quantity.removesuffix("_auc"), fontsize=9)
        ax.set_xlabel("share of pixels", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.axes[0].set_ylabel("probability", fontsize=8)
    fig.axes[-1].legend(fontsize=6)
    return save_figure(fig, path)


def ranking(summary):
    """[(map name, {quantity: (mean, std, count)})] over the done images: each method, then
    the random map."""
    names = quantities(summary)
    done = [e for e in summary["images"] if e.get("status") == "done"]
    rows = []
    for name in [*summary["methods"], RANDOM]:
        values = {}
        for q in names:
            found = [(e.get("controls", {}).get(RANDOM, {}) if name == RANDOM
                      else e.get("methods", {}).get(name, {})).get(q) for e in done]
            found = [v for v in found if v is not None]
            if found:
                values[q] = (float(np.mean(found)), float(np.std(found)), len(found))
        rows.append((name, values))
    return rows


def ranking_html(summary):
    """The ranking as an HTML table (mean ± std; the best method per quantity in bold), or
    '' when the audit measured no metric."""
    names = quantities(summary)
    if not names:
        return ""
    rows = ranking(summary)
    best = {}
    for q in names:
        scored = [(v[q][0], n) for n, v in rows if q in v and n != RANDOM]
        if scored:
            best[q] = (max if QUANTITIES[q] else min)(scored)[1]
    head = "".join(f"<th>{html.escape(q)} {'&uarr;' if QUANTITIES[q] else '&darr;'}</th>"
                   for q in names)
    body = []
    for name, values in rows:
        cells = "".join(
            "<td></td>" if q not in values else
            (f"<td><b>{values[q][0]:.4f}</b> ± {values[q][1]:.4f}</td>" if best.get(q) == name
             else f"<td>{values[q][0]:.4f} ± {values[q][1]:.4f}</td>") for q in names)
        body.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return ('<section class="ranking"><h2>Which map to trust: faithfulness over the audit</h2>'
            f'<table><tr><th>map</th>{head}</tr>{"".join(body)}</table>'
            '<p>mean ± std over the images; &uarr; higher is better, &darr; lower; see '
            "docs/faithfulness.md for what these numbers cannot say.</p></section>")
