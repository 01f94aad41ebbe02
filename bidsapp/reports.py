"""HTML reports with figures, as fMRIPrep writes them.

``OUTPUT_DIR/sub-<label>.html`` has its figures in ``OUTPUT_DIR/sub-<label>/figures/``, and
``OUTPUT_DIR/group.html`` in ``OUTPUT_DIR/group/figures/``.

Figures are PNG files referenced by relative paths, so a report opens anywhere without a network.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd

from bidsapp import __version__
from bidsapp.inference import window_spread
from bidsapp.io import (
    atomic_path,
    atomic_write_text,
    ensure_dir,
    remove_stale_temporaries,
    remove_temporaries,
)

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;line-height:1.45}
h1{border-bottom:2px solid #345;padding-bottom:.2em}h2{color:#345;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#eef}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:.3em 0}.meta td{text-align:left}
.note{color:#555;font-size:.92em}
"""


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    ensure_dir(path.parent)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_region_map(img: nib.Nifti1Image, path: Path, title: str, cmap: str) -> Path:
    """A region map over the MNI152 template (nilearn's bundled copy: no download)."""
    from nilearn import datasets, plotting

    data = np.nan_to_num(np.asanyarray(img.dataobj, dtype=np.float32))
    finite = data[data != 0]
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    shown = nib.Nifti1Image(data, img.affine)
    fig = plt.figure(figsize=(9, 3.2))
    plotting.plot_stat_map(shown, bg_img=datasets.load_mni152_template(resolution=2),
                           display_mode="ortho", cut_coords=(0, -20, 0), colorbar=True,
                           cmap=cmap, vmin=0 if finite.size and finite.min() >= 0 else None,
                           vmax=vmax, symmetric_cbar=False, title=title, figure=fig,
                           draw_cross=False, annotate=True)
    return save_figure(fig, path)


def plot_top_regions(table: pd.DataFrame, column: str, path: Path, title: str, *,
                     ascending: bool, n: int = 15, error: str | None = None) -> Path:
    """Horizontal bar chart of the ``n`` top regions by ``column``."""
    top = table.dropna(subset=[column]).sort_values(column, ascending=ascending).head(n)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.28 * len(top) + 1.2))
    xerr = top[error] if error is not None and error in top else None
    colors = plt.cm.tab10(pd.Categorical(top["group"]).codes % 10)
    ax.barh(top["name"], top[column], xerr=xerr, color=colors)
    ax.set_xlabel(column)
    ax.set_title(title)
    ax.set_yticks(range(len(top)), [f"{name} ({group})" for name, group
                                     in zip(top["name"], top["group"], strict=True)])
    return save_figure(fig, path)


def plot_reconstruction(example: dict[str, np.ndarray], path: Path) -> Path:
    """Axial slice of one window's middle frame: input, masked input and reconstruction."""
    inp, hidden, rec = example["input"], example["hidden"], example["reconstruction"]
    masked = np.where(hidden, np.nan, inp)
    lim = float(np.nanpercentile(np.abs(inp), 99)) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    for ax, image, title in zip(axes, (inp, masked, rec),
                                ("input", "masked input (hidden regions blank)",
                                 "reconstruction"), strict=True):
        ax.imshow(np.rot90(image), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return save_figure(fig, path)


def _table_html(frame: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    return frame.to_html(index=False, float_format=lambda v: floatfmt.format(v), na_rep="n/a",
                         border=0, escape=True)


def _page(title: str, body: Sequence[str]) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>"
            f"{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(body) + f"<hr><p class='note'>roimae {__version__}</p></body></html>\n")


def _img(path: Path, root: Path, alt: str) -> str:
    return f"<img src='{html.escape(path.relative_to(root).as_posix())}' alt='{html.escape(alt)}'>"


def _spread_text(result) -> str:
    """How much the window embeddings of a run differ, absolutely and relative to its embedding."""
    spread = window_spread(result.window_embeddings)
    size = float(np.linalg.norm(result.embedding))
    relative = f" ({spread / size:.2%} of the run embedding's length)" if size > 0 else ""
    return (f"{spread:.4g}{relative}: RMS distance of the window embeddings from the run "
            "embedding, the unit of the representation sensitivity")


def write_participant_report(output_dir: Path, subject: str, items: Sequence, loaded,
                             atlas) -> Path:
    """``OUTPUT_DIR/sub-<label>.html``: per run, the maps, the top regions, a reconstruction."""
    figures = ensure_dir(output_dir / f"sub-{subject}" / "figures")
    # Left by a job killed while writing this report, which is now rewritten whole.
    remove_stale_temporaries(figures)
    remove_temporaries(output_dir / f"sub-{subject}.html")
    body = [f"<h1>roimae: sub-{html.escape(subject)}</h1>",
            "<table class='meta'>"
            f"<tr><td>Model</td><td>{html.escape(str(loaded.path))}</td></tr>"
            f"<tr><td>Preset / masking</td><td>{html.escape(loaded.preset.name)} / "
            f"{html.escape(loaded.masking)}</td></tr>"
            f"<tr><td>Model SHA-256</td><td>{html.escape(loaded.sha256[:16])}...</td></tr>"
            f"<tr><td>Atlas</td><td>{html.escape(atlas.name)} ({len(atlas.regions)} regions)"
            "</td></tr></table>"]
    for run, out, result in items:
        stem = f"{run.name}_desc-{loaded.desc}"
        body.append(f"<h2>{html.escape(run.name)}</h2>")
        body.append("<table class='meta'>"
                    f"<tr><td>BOLD</td><td>{html.escape(run.source_uri)}</td></tr>"
                    f"<tr><td>Windows</td><td>{len(result.window_embeddings)} x "
                    f"{html.escape(str(loaded.window_frames))} frames</td></tr>"
                    f"<tr><td>TR</td><td>{html.escape(str(run.repetition_time))} s</td></tr>"
                    f"<tr><td>Embedding</td><td>{html.escape(out.embedding.name)}</td></tr>"
                    f"<tr><td>Spread across windows</td><td>{_spread_text(result)}</td></tr>"
                    "</table>")
        if result.recon_error is not None:
            table = pd.read_csv(out.table, sep="\t", na_values="n/a")
            recon = plot_region_map(nib.load(out.recon_map), figures / f"{stem}_reconerror.png",
                                    "reconstruction error (lower = better)", "viridis")
            occl = plot_region_map(nib.load(out.occlusion_map), figures / f"{stem}_occlusion.png",
                                   "representation sensitivity", "hot")
            bars = plot_top_regions(table, "occlusion", figures / f"{stem}_topregions.png",
                                    "regions the embedding relies on most", ascending=False)
            best = plot_top_regions(table, "reconerror", figures / f"{stem}_bestrecon.png",
                                    "best reconstructed regions", ascending=True,
                                    error="reconerror_se")
            body += ["<h3>Reconstruction fidelity</h3>", _img(recon, output_dir, "recon map"),
                     _img(best, output_dir, "best reconstructed"),
                     "<h3>Representation sensitivity</h3>", _img(occl, output_dir, "occlusion"),
                     _img(bars, output_dir, "top regions")]
            if out.groups is not None:
                summary = pd.read_csv(out.groups, sep="\t", na_values="n/a")
                body += ["<h3>By region group</h3>", _table_html(summary)]
            missing = table[table["note"].notna() & (table["note"] != "n/a")]
            if len(missing):
                body.append(f"<p class='note'>{len(missing)} regions have no voxel on the "
                            "model's working grid and cannot be hidden: "
                            + html.escape(", ".join(missing["name"])) + ".</p>")
        if result.example:
            recon_fig = plot_reconstruction(result.example, figures / f"{stem}_reconstruction.png")
            body += ["<h3>One window: input, masked input and reconstruction</h3>",
                     _img(recon_fig, output_dir, "reconstruction")]
    report = output_dir / f"sub-{subject}.html"
    atomic_write_text(report, _page(f"roimae sub-{subject}", body))
    return report


def plot_roc(results: dict, classes: np.ndarray, path: Path) -> Path:
    """Out-of-fold ROC curves (first repeat) of each embedding set, binary targets."""
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(4.2, 4))
    positive = classes[1]
    for desc, res in results.items():
        pred = res["predictions"]
        first = pred[pred["repeat"] == 0]
        fpr, tpr, _ = roc_curve(first["target"] == positive, first[f"p_{positive}"])
        auc = res["summary"].set_index("metric").loc["roc_auc", "mean"]
        ax.plot(fpr, tpr, label=f"{desc} (AUC {auc:.2f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel(f"true positive rate ({positive})")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_confusion(confusion: np.ndarray, classes: np.ndarray, path: Path, title: str) -> Path:
    """Confusion matrix summed over all folds and repeats."""
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(confusion, cmap="Blues")
    for (i, j), value in np.ndenumerate(confusion):
        ax.text(j, i, str(value), ha="center", va="center")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def write_group_report(output_dir: Path, prefix: str, classes: np.ndarray, results: dict,
                       comparison: pd.DataFrame | None, scores: pd.DataFrame, atlas) -> Path:
    """``OUTPUT_DIR/group.html``: scores beside the baselines, metrics, ROC, confusion, regions."""
    from bidsapp.participant import region_map

    figures = ensure_dir(output_dir / "group" / "figures")
    body = [f"<h1>roimae group report: {html.escape(prefix.removeprefix('target-'))}</h1>",
            f"<p>Classes: {html.escape(', '.join(map(str, classes)))}. Metrics are the mean and "
            "standard deviation over the folds of repeated stratified group k-fold "
            "cross-validation (runs of a participant never straddle folds).</p>"]
    body += ["<h2>Models and baselines</h2>",
             "<p>Every feature set on the same folds. <code>fc</code>: functional connectivity "
             "(Pearson correlations of region mean signals); <code>covariates</code>: phenotype "
             "columns only. <code>difference</code>, <code>t</code> and <code>p_corrected</code> "
             "compare each set with the best baseline (corrected resampled t-test, Nadeau &amp; "
             "Bengio 2003). <code>effective_rank</code>: how many directions the features of "
             "different runs use (a near-constant embedding has a rank near 1).</p>",
             _table_html(scores)]
    body.append("<h2>Classification</h2>")
    for name, res in results.items():
        body += [f"<h3>{html.escape(name)}</h3>", _table_html(res["summary"])]
        conf = plot_confusion(res["confusion"], classes, figures / f"{prefix}_{name}_"
                              "confusion.png", name)
        body.append(_img(conf, output_dir, "confusion matrix"))
    if len(classes) == 2:
        roc = plot_roc(results, classes, figures / f"{prefix}_roc.png")
        body += ["<h3>ROC curves (first repeat, out of fold)</h3>", _img(roc, output_dir, "ROC")]
    if comparison is not None:
        body += ["<h2>Pairwise comparisons</h2>",
                 "<p>Fold-wise difference of balanced accuracy on identical folds; p from the "
                 "corrected resampled t-test (Nadeau &amp; Bengio 2003).</p>",
                 _table_html(comparison)]
    body.append("<h2>Regions</h2>")
    contiguous = atlas.contiguous(np.asarray(atlas.image.dataobj))
    for desc, res in results.items():
        table = res["attribution"]
        body.append(f"<h3>{html.escape(desc)}</h3>")
        if table["importance"].notna().any():
            bars = plot_top_regions(table, "importance", figures / f"{prefix}_{desc}_"
                                    "importance.png", "regions the classifier needs most",
                                    ascending=False, error="importance_se")
            body.append(_img(bars, output_dir, "importance"))
            img = region_map(table["importance"].to_numpy(), contiguous, atlas.image.affine)
            fig = plot_region_map(img, figures / f"{prefix}_{desc}_importancemap.png",
                                  "classifier importance", "hot")
            body.append(_img(fig, output_dir, "importance map"))
            if atlas.has_groups:
                by_group = (table.groupby("group")["importance"].mean()
                            .sort_values(ascending=False).reset_index())
                body += ["<p>Mean importance by region group:</p>", _table_html(by_group)]
        for column, title, cmap in (("reconerror", "mean reconstruction error", "viridis"),
                                    ("occlusion", "mean representation sensitivity", "hot")):
            if table[column].notna().any():
                img = region_map(table[column].to_numpy(), contiguous, atlas.image.affine)
                fig = plot_region_map(img, figures / f"{prefix}_{desc}_{column}.png",
                                      title, cmap)
                body.append(_img(fig, output_dir, title))
    report = output_dir / "group.html"
    atomic_write_text(report, _page("roimae group report", body))
    return report
