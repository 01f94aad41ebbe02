"""HTML reports with figures, as fMRIPrep writes them.

``OUTPUT_DIR/sub-<label>.html`` has its figures in ``OUTPUT_DIR/sub-<label>/figures/``, and
``OUTPUT_DIR/group_target-<label>.html`` in ``OUTPUT_DIR/group/figures/``.

Figures are PNG files referenced by relative paths, so a report opens anywhere without a network.
"""

from __future__ import annotations

import contextlib
import html
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from bidsapp._version import __version__
from bidsapp.atlas import Atlas, region_map
from bidsapp.classification import SetResult
from bidsapp.errors import CannotCreateOutputError
from bidsapp.features import WHAT_IT_SEES
from bidsapp.io import (
    atomic_path,
    atomic_write_text,
    ensure_dir,
    remove_stale_temporaries,
    remove_temporaries,
)
from bidsapp.outputs import (
    NOTE_CANNOT_BE_HIDDEN,
    NOTE_HIDDEN_BY_VOXEL,
    REPORT_LOCK,
    GroupOutputs,
    RunOutputs,
    participant_figures,
    participant_report,
    run_figure,
    run_stem,
)

_LOCK_TIMEOUT_S = 600

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


def _spread_text(spread: float | None) -> str:
    """The RMS distance of a run's window embeddings from its embedding, for the report."""
    if spread is None:
        return "n/a"
    return (f"{spread:.4g}: RMS distance of the window embeddings from the run embedding, the "
            "unit of the representation sensitivity")


@contextlib.contextmanager
def report_lock(output_dir: Path, subject: str) -> Iterator[None]:
    """Hold the lock of ``sub-<label>.html`` (in its figures folder) while it is rebuilt."""
    figures = ensure_dir(participant_figures(output_dir, subject))
    lock = FileLock(figures / REPORT_LOCK, timeout=_LOCK_TIMEOUT_S)
    try:
        with lock:
            yield
    except Timeout as exc:
        raise CannotCreateOutputError(f"could not lock {lock.lock_file} within "
                                      f"{_LOCK_TIMEOUT_S} s; is another job stuck?") from exc


def _is_fresh(figure: Path, source: Path) -> bool:
    """``figure`` exists and was drawn after ``source`` (a run's completion sidecar) was written."""
    try:
        return figure.stat().st_mtime >= source.stat().st_mtime
    except FileNotFoundError:
        return False


def _cell(value: object) -> str:
    return html.escape("n/a" if value is None else str(value))


def _run_figures(out: RunOutputs, table: pd.DataFrame, figures: Path, stem: str) -> dict[str, Path]:
    """The four figures of one run's attribution, drawn once per run and model.

    A figure drawn after the run's completion sidecar is reused: rebuilding a report for a new
    run does not redraw every other one.
    """
    draws = {
        "reconerror": lambda p: plot_region_map(nib.load(out.recon_map), p,
                                                "reconstruction error (lower = better)",
                                                "viridis"),
        "occlusion": lambda p: plot_region_map(nib.load(out.occlusion_map), p,
                                               "representation sensitivity", "hot"),
        "topregions": lambda p: plot_top_regions(table, "occlusion", p,
                                                 "regions the embedding relies on most",
                                                 ascending=False),
        "bestrecon": lambda p: plot_top_regions(table, "reconerror", p,
                                                "best reconstructed regions", ascending=True,
                                                error="reconerror_se"),
    }
    if table["reconerror"].isna().all():   # a model without a decoder: nothing to draw
        draws = {k: v for k, v in draws.items() if k not in ("reconerror", "bestrecon")}
    drawn = {}
    for key, draw in draws.items():
        figure = run_figure(figures, stem, key)
        drawn[key] = figure if _is_fresh(figure, out.done) else draw(figure)
    return drawn


def write_participant_report(output_dir: Path, subject: str,
                             runs: Sequence[tuple[str, str, RunOutputs, dict[str, Any]]],
                             atlas: Atlas, examples: Mapping[str, dict[str, np.ndarray]] | None = None
                             ) -> Path:
    """``OUTPUT_DIR/sub-<label>.html``: per model and run, the maps, the top regions, a reconstruction.

    Parameters
    ----------
    runs : sequence of (run name, desc, RunOutputs, completion sidecar)
        Every complete run of the participant on disk
        (:func:`bidsapp.outputs.complete_runs`), whichever model and job wrote it: the report
        is built from the files, never from one job's memory, so no job drops another's runs.
    examples : mapping, optional
        ``{"<run>_desc-<m>": example}``: input / masked / reconstruction slices of the runs this
        job processed (only in memory), drawn to ``<run>_desc-<m>_reconstruction.png``.
    """
    figures = ensure_dir(participant_figures(output_dir, subject))
    # Left by a job killed while writing this report, which is now rewritten whole.
    remove_stale_temporaries(figures)
    report = participant_report(output_dir, subject)
    remove_temporaries(report)
    for stem, example in (examples or {}).items():
        plot_reconstruction(example, run_figure(figures, stem, "reconstruction"))
    body = [f"<h1>roimae: sub-{html.escape(subject)}</h1>",
            "<table class='meta'>"
            f"<tr><td>Atlas</td><td>{html.escape(atlas.name)} ({len(atlas.regions)} regions)"
            f"</td></tr><tr><td>Complete runs</td><td>{len(runs)}</td></tr></table>"]
    if not runs:
        body.append("<p class='note'>No complete run of this participant in the output "
                    "directory.</p>")
    shown_model = None
    for name, desc, out, meta in runs:
        model = meta["Model"]
        if (desc, model.get("SHA256")) != shown_model:
            shown_model = (desc, model.get("SHA256"))
            body.append(f"<h2>Model desc-{html.escape(desc)}</h2>")
            body.append("<table class='meta'>"
                        f"<tr><td>Model</td><td>{_cell(model.get('Path'))}</td></tr>"
                        f"<tr><td>Backbone / preset / masking</td><td>"
                        f"{_cell(model.get('Backbone'))} / {_cell(model.get('Preset'))} / "
                        f"{_cell(model.get('Masking'))}</td></tr>"
                        f"<tr><td>Epoch</td><td>{_cell(model.get('Epoch'))}</td></tr>"
                        f"<tr><td>Model SHA-256</td><td>{_cell(str(model.get('SHA256'))[:16])}..."
                        "</td></tr></table>")
        stem = run_stem(name, desc)
        sources = meta.get("Sources") or [None]
        body.append(f"<h3>{html.escape(name)}</h3>")
        body.append("<table class='meta'>"
                    f"<tr><td>BOLD</td><td>{_cell(sources[0])}</td></tr>"
                    f"<tr><td>Windows</td><td>{_cell(meta.get('NumberOfWindows'))} x "
                    f"{_cell(meta.get('WindowFrames'))} frames</td></tr>"
                    f"<tr><td>TR</td><td>{_cell(meta.get('RepetitionTime'))} s</td></tr>"
                    f"<tr><td>Embedding</td><td>{html.escape(out.embedding.name)}</td></tr>"
                    "<tr><td>Spread across windows</td><td>"
                    f"{_spread_text(meta.get('WindowSpread'))}</td></tr>"
                    "</table>")
        if meta.get("Attribution") is not None:
            table = pd.read_csv(out.table, sep="\t", na_values="n/a")
            drawn = _run_figures(out, table, figures, stem)
            body.append("<h4>Reconstruction fidelity</h4>")
            if "reconerror" in drawn:
                body += [_img(drawn["reconerror"], output_dir, "recon map"),
                         _img(drawn["bestrecon"], output_dir, "best reconstructed")]
            else:
                why = meta["Attribution"].get("ReconstructionErrorMissing") or "not measured"
                body.append(f"<p class='note'>No reconstruction error: {html.escape(why)}.</p>")
            body += ["<h4>Representation sensitivity</h4>",
                     _img(drawn["occlusion"], output_dir, "occlusion"),
                     _img(drawn["topregions"], output_dir, "top regions")]
            if out.groups is not None:
                summary = pd.read_csv(out.groups, sep="\t", na_values="n/a")
                body += ["<h4>By region group</h4>", _table_html(summary)]
            for note, said in ((NOTE_HIDDEN_BY_VOXEL, "own no token of the model grid and "
                                "were hidden voxel by voxel (a finer occlusion than the others')"),
                               (NOTE_CANNOT_BE_HIDDEN, "have no brain voxel on the model's "
                                "working grid and cannot be hidden")):
                names = table.loc[table["note"] == note, "name"]
                if len(names):
                    body.append(f"<p class='note'>{len(names)} regions {said}: "
                                + html.escape(", ".join(names)) + ".</p>")
        else:
            body.append("<p class='note'>No region attribution: the participant level ran "
                        "with --no-attribution.</p>")
        example = run_figure(figures, stem, "reconstruction")
        if _is_fresh(example, out.done):
            body += ["<h4>One window: input, masked input and reconstruction</h4>",
                     _img(example, output_dir, "reconstruction")]
    atomic_write_text(report, _page(f"roimae sub-{subject}", body))
    return report


def plot_roc(results: Mapping[str, SetResult], classes: np.ndarray, path: Path) -> Path:
    """Out-of-fold ROC curves (first repeat) of each embedding set, binary targets."""
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(4.2, 4))
    positive = classes[1]
    for desc, res in results.items():
        pred = res.predictions
        first = pred[pred["repeat"] == 0]
        fpr, tpr, _ = roc_curve(first["target"] == positive, first[f"p_{positive}"])
        auc = res.summary.set_index("metric").loc["roc_auc", "mean"]
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


def write_group_report(outputs: GroupOutputs, classes: np.ndarray,
                       results: Mapping[str, SetResult], comparison: pd.DataFrame | None,
                       scores: pd.DataFrame, atlas: Atlas, setup: Mapping[str, object]) -> Path:
    """``OUTPUT_DIR/group_target-<label>.html``: scores beside the baselines, metrics, ROC, regions.

    Parameters
    ----------
    outputs : bidsapp.outputs.GroupOutputs
        The paths of the ``--target``'s outputs (the report and its figures).
    classes : ndarray
        The target's classes, sorted.
    results : mapping of str to bidsapp.classification.SetResult
        Each feature set's results, by set name, in the order of the report.
    comparison : pandas.DataFrame or None
        The pairwise comparison of the sets (None for a single set).
    scores : pandas.DataFrame
        One row per set, beside the best baseline.
    atlas : bidsapp.atlas.Atlas
        For the region maps.
    setup : mapping
        What was scored and how (atlas, runs, participants, folds, permutations, covariates,
        models), shown as a table.

    Returns
    -------
    Path
        The report.
    """
    output_dir = outputs.output_dir
    ensure_dir(outputs.figures)
    body = [f"<h1>roimae group report: {html.escape(outputs.prefix.removeprefix('target-'))}"
            "</h1>",
            f"<p>Classes: {html.escape(', '.join(map(str, classes)))}. Metrics are the mean and "
            "standard deviation over the folds of repeated stratified group k-fold "
            "cross-validation (runs of a participant never straddle folds).</p>"]
    body += ["<h2>Models and baselines</h2>",
             "<p>Every feature set on the same folds. <code>fc</code>: functional connectivity "
             "(Pearson correlations of region mean signals); <code>tangent</code>: their "
             "covariances in tangent space (reference fit on the training folds); "
             "<code>covariates</code>: phenotype "
             "columns only. <code>difference</code>, <code>t</code> and <code>p_corrected</code> "
             "compare each set with the best baseline (corrected resampled t-test, Nadeau &amp; "
             "Bengio 2003). <code>effective_rank</code>: how many directions the features of "
             "different runs use (a near-constant embedding has a rank near 1).</p>",
             _table_html(scores),
             "<h3>What each feature set can see</h3>",
             _table_html(pd.DataFrame(
                 [{"readout": readout, "sees": sees, "blind to": blind}
                  for readout, (sees, blind) in WHAT_IT_SEES.items()
                  if readout in set(scores["readout"])])),
             "<h3>Setup</h3>",
             _table_html(pd.DataFrame({"setting": list(setup),
                                       "value": [str(v) for v in setup.values()]}))]
    body.append("<h2>Classification</h2>")
    for name, res in results.items():
        body += [f"<h3>{html.escape(name)}</h3>", _table_html(res.summary)]
        conf = plot_confusion(res.confusion, classes, outputs.figure(f"{name}_confusion"), name)
        body.append(_img(conf, output_dir, "confusion matrix"))
    if len(classes) == 2:
        roc = plot_roc(results, classes, outputs.figure("roc"))
        body += ["<h3>ROC curves (first repeat, out of fold)</h3>", _img(roc, output_dir, "ROC")]
    if comparison is not None:
        body += ["<h2>Pairwise comparisons</h2>",
                 "<p>Fold-wise difference of balanced accuracy on identical folds; p from the "
                 "corrected resampled t-test (Nadeau &amp; Bengio 2003).</p>",
                 _table_html(comparison)]
    body.append("<h2>Regions</h2>")
    contiguous = atlas.contiguous(np.asarray(atlas.image.dataobj))
    for desc, res in results.items():
        table = res.attribution
        body.append(f"<h3>{html.escape(desc)}</h3>")
        note = res.regions_note
        if note:   # e.g. the participant level ran with --no-attribution
            body.append(f"<p class='note'>{html.escape(note[:1].upper() + note[1:])}.</p>")
        if table["importance"].notna().any():
            bars = plot_top_regions(table, "importance", outputs.figure(f"{desc}_importance"),
                                    "regions the classifier needs most", ascending=False,
                                    error="importance_se")
            body.append(_img(bars, output_dir, "importance"))
            img = region_map(table["importance"].to_numpy(), contiguous, atlas.image.affine)
            fig = plot_region_map(img, outputs.figure(f"{desc}_importancemap"),
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
                fig = plot_region_map(img, outputs.figure(f"{desc}_{column}"), title, cmap)
                body.append(_img(fig, output_dir, title))
    atomic_write_text(outputs.report, _page("roimae group report", body))
    return outputs.report


def plot_loss_curve(history: pd.DataFrame, path: Path, title: str) -> None:
    """Training and held-out loss per epoch, as a PNG (the pretrain level's ``loss_curve.png``).

    Parameters
    ----------
    history : pandas.DataFrame
        The training log: ``epoch``, ``train_loss`` and ``val_loss`` (NaN without a held-out set).
    path : Path
        The PNG to write, atomically.
    title : str
        The figure title.
    """
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(history["epoch"], history["train_loss"], "o-", label="training")
    if history["val_loss"].notna().any():
        ax.plot(history["epoch"], history["val_loss"], "s-", label="held-out")
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked reconstruction MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
