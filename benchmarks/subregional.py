"""Benchmark: which readout sees structure inside regions? The demo's ``subregional`` effect.

    python benchmarks/subregional.py [OUT] [--participants 24] [--frames 40] [--epochs 12]
        [--maskings roi random] [--targets subregional diagnosis coupling] [--cv-repeats 5]
        [--sets roi-subregion fc ...]

Writes the demo dataset to ``OUT/bids`` (OUT: a temporary directory if not given) and pretrains the
demo chain's models into ``OUT/derivatives`` (the chain's own pretrain configs,
:func:`bidsapp.cli.demo.demo_configs`), unless they are there already. Then, for every run and
model, the encoder's finest token features (no attribution) give every readout: the group level's
``region``, ``connectivity`` and ``global``, and the within-region candidates of docs/science.md:

- ``subregion``: :func:`bidsapp.readouts.within_region_dispersion` (purity exponent 3);
- ``subregion-q0`` .. ``subregion-q2``: the same dispersion with purity exponents 0 to 2 (0: the
  region pooling's weights);
- ``tokvar``: the pooling-weighted mean over the region's tokens of each token's variance over
  frames (token amplitude, within and between the region's tokens alike);
- ``paircorr``: the pooling-weighted mean correlation over frames between two of the region's
  tokens (within-region coherence), per channel.

Beside them the baselines on the same runs' region signals: ``fc``, ``tangent`` and ``regionmean``
(each region signal's mean and SD over frames), and ``subregion-input``: the ``subregion`` statistic
of the model's input averaged per token (:func:`bidsapp.readouts.input_token_signals`), what it
finds without a model. Each set is scored on each target with the group level's pipeline and folds
(:func:`bidsapp.classification.evaluate`, 5-fold, seed 0), and for sets with per-region features
the region importance (:func:`bidsapp.classification.region_importance`) of the target's planted
regions: their mean minus the median of the other regions, in standard errors (the SD of the
others over the square root of the number planted). One JSON row per model with its run times
(encoder passes, ``subregion``), then one per set and target.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from _common import emit
from threadpoolctl import threadpool_limits

from bidsapp.atlas import load_atlas
from bidsapp.bids.layout import discover_runs
from bidsapp.classification import evaluate, make_splits, region_importance
from bidsapp.cli.demo import demo_configs
from bidsapp.data import prepare_runs
from bidsapp.demo import TRUTH_FILE, make_demo_dataset
from bidsapp.features import EmbeddingSet, feature_regions, time_series_set
from bidsapp.grid import cube_atlas
from bidsapp.inference import load_model
from bidsapp.levels import run as run_level
from bidsapp.logs import setup_logging
from bidsapp.outputs import find_model
from bidsapp.readouts import (
    DispersionSums,
    RegionPooling,
    correlation_matrix,
    dispersion_weights,
    feature_correlation,
    input_token_signals,
    region_timeseries,
    vectorize,
    within_region_dispersion,
)

#: The truth record's key of each target's planted regions.
PLANTED = {"subregional": "subregional_effect", "diagnosis": "adhd_effect",
           "coupling": "coupling_effect"}


def _pooled_moments(tokens: torch.Tensor, pooling: RegionPooling) -> tuple[np.ndarray, np.ndarray]:
    """``tokvar`` and ``paircorr`` of one run's tokens ``(F, N, C)``, each ``(R, C)``.

    ``paircorr``: with z-scored token courses ``z_j``, the weighted mean correlation between two
    different tokens is ``(Var(sum_j w_j z_j) - sum_j w_j^2) / (1 - sum_j w_j^2)``.
    """
    x = tokens.to(torch.float64)[:, pooling.tokens]                            # (F, M, C)
    w = pooling.weights[:, None]
    n_regions = pooling.n_regions

    def per_region(values: torch.Tensor) -> torch.Tensor:                      # (M, ...) -> (R, ...)
        out = torch.zeros((n_regions, *values.shape[1:]), dtype=torch.float64)
        return out.index_add_(0, pooling.regions, values)

    tokvar = per_region(w * x.var(0, unbiased=False))
    sd = x.std(0, unbiased=False)
    z = torch.where(sd > 1e-12, (x - x.mean(0)) / sd.clamp_min(1e-12), torch.zeros_like(x))
    summed = per_region((w * z.transpose(0, 1).flatten(1)).reshape(-1, *z.shape[::2]))  # (R, F, C)
    squares = per_region(pooling.weights**2)[:, None]                         # (R, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        paircorr = ((summed.var(1, unbiased=False) - squares) / (1 - squares)).numpy()
        paircorr = np.where(squares.numpy() < 1 - 1e-9, paircorr, np.nan)
        tokvar = np.log(tokvar.numpy())
    return np.where(np.isfinite(tokvar), tokvar, np.nan), paircorr


def extract(bids: Path, out: Path, masking: str, weights: dict[str, RegionPooling]
            ) -> tuple[dict[str, list], list[np.ndarray], list[np.ndarray], float, float]:
    """Every model readout of every run, the runs' region signals and input dispersions, encoder
    and readout seconds."""
    config = next(c for c in demo_configs(bids, out) if c.analysis_level == "participant"
                  and c.participant.model_desc == masking)
    atlas = load_atlas()
    loaded = load_model(find_model(out, masking), atlas, torch.device("cpu"))
    runs = discover_runs(config).runs
    cached = prepare_runs(config, runs, loaded.preprocess_params())
    cube = cube_atlas(atlas)
    features: dict[str, list] = {}
    signals, inputs, encoder, readout = [], [], 0.0, 0.0
    with torch.inference_mode():
        for cache in cached:
            brain = torch.from_numpy(cache.brain)[None]
            embeddings, frames, valid = [], [], None
            sums = {name: DispersionSums(w) for name, w in weights.items()}
            for index in range(cache.n_windows):
                start = time.perf_counter()
                emb, tokens, valid = loaded.model.encode_tokens(
                    torch.from_numpy(cache.window(index))[None], brain)
                encoder += time.perf_counter() - start
                embeddings.append(emb[0].float().numpy())
                frames.append(tokens[0])
                start = time.perf_counter()
                sums["subregion"].add(tokens[0], valid[0])
                readout += time.perf_counter() - start
                for name, s in sums.items():
                    if name != "subregion":
                        s.add(tokens[0], valid[0])
            tokens = torch.cat(frames)                                          # (F, g, g, g, C)
            pooled = loaded.pooling(tokens, valid[0]).numpy()                   # (F, R, C)
            tokvar, paircorr = _pooled_moments(tokens.flatten(1, 3), loaded.pooling)
            row = {"region": pooled.mean(0).ravel(),
                   "connectivity": vectorize(feature_correlation(pooled)),
                   "global": np.mean(embeddings, axis=0), "tokvar": tokvar.ravel(),
                   "paircorr": paircorr.ravel(),
                   **{name: s.result().ravel() for name, s in sums.items()}}
            for name, values in row.items():
                features.setdefault(name, []).append(values)
            signals.append(region_timeseries(cache, cube))
            tokens = input_token_signals(cache, loaded.preset.patch_size)       # (F, g, g, g, 1)
            inputs.append(within_region_dispersion(tokens, torch.ones(tokens.shape[1:4],
                                                                      dtype=torch.bool),
                                                   weights["subregion"]).ravel())
    return features, signals, inputs, encoder / len(cached), readout / len(cached)


def score(name: str, X, kind: str | None, participants: pd.DataFrame, target: str,
          planted: list[str], folds: int, repeats: int, atlas) -> dict:
    """Balanced accuracy of one set on one target, and its planted regions' importance."""
    n_regions = len(atlas.regions)
    subjects = participants.index.to_numpy()
    y = participants[target].to_numpy()
    runs = pd.DataFrame({"run": subjects, "participant_id": subjects, "target": y,
                         "cv_group": subjects, "table": None, "occluded": None})
    if kind == "tangent":
        X, regions = time_series_set(X, n_regions)
        es = EmbeddingSet(name, name, None, "tangent", runs, X, regions)
    else:
        X = np.vstack(X)
        regions = feature_regions(kind, n_regions, X.shape[1]) if kind else None
        if regions is not None:
            # A region without a value in any run cannot be hidden: no importance (NaN), not 0.
            regions = [c if np.isfinite(X[:, c]).any() else c[:0] for c in regions]
        es = EmbeddingSet(name, name, None, kind or "global", runs, X, regions)
    config = SimpleNamespace(random_seed=0, group=SimpleNamespace(classifier="logreg"))
    start = time.perf_counter()
    table, _, models, _ = evaluate(es, make_splits(y, subjects, folds, repeats, 0),
                                   np.array(sorted(set(y))), config)
    row = {"target": target, "set": name, "features": es.n_features,
           "balanced_accuracy": table["balanced_accuracy"].mean(),
           "balanced_accuracy_sd": table["balanced_accuracy"].std(ddof=1),
           "roc_auc": table["roc_auc"].mean(), "seconds": time.perf_counter() - start}
    if regions is not None and kind != "tangent":
        importance = region_importance(es, models, atlas).dropna(subset=["importance"])
        is_planted = importance["name"].isin(planted)
        others = importance.loc[~is_planted, "importance"]
        se = others.std(ddof=1) / np.sqrt(max(is_planted.sum(), 1))
        row["planted_with_importance"] = int(is_planted.sum())
        row["importance_margin_se"] = (importance.loc[is_planted, "importance"].mean()
                                       - others.median()) / se
        ranks = importance["importance"].rank(ascending=False)[is_planted]
        row["planted_ranks"] = sorted(int(r) for r in ranks)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", help="default: a temporary directory")
    parser.add_argument("--participants", type=int, default=24)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None,
                        help="pretraining epochs (default: the demo chain's)")
    parser.add_argument("--maskings", nargs="+", default=["roi", "random"])
    parser.add_argument("--targets", nargs="+", default=list(PLANTED))
    parser.add_argument("--sets", nargs="+", default=None, help="only these sets (default: all)")
    parser.add_argument("--cv-folds", type=int, default=5)
    parser.add_argument("--cv-repeats", type=int, default=5)
    args = parser.parse_args()
    setup_logging(0)
    torch.set_num_threads(1)
    if args.out is None:
        with tempfile.TemporaryDirectory(prefix="roimae-subregional-") as tmp:
            measure(args, Path(tmp))
    else:
        measure(args, args.out)


def measure(args: argparse.Namespace, root: Path) -> None:
    """Write (or reuse) the demo and its models under ``root`` and print every row."""
    bids, out = root / "bids", root / "derivatives"
    if not (bids / TRUTH_FILE).is_file():
        make_demo_dataset(bids, n_participants=args.participants, n_frames=args.frames,
                          seed=args.seed)
    for config in demo_configs(bids, out):
        masking = config.masking.masking
        if (config.analysis_level == "pretrain" and masking in args.maskings
                and not (out / "models" / f"desc-{masking}" / "model.safetensors").is_file()):
            if args.epochs is not None:
                config = config.model_copy(update={"pretrain": config.pretrain.model_copy(
                    update={"epochs": args.epochs})})
            run_level(config)
    atlas = load_atlas()
    cube = cube_atlas(atlas)
    weights = {"subregion": dispersion_weights(cube, 8),
               **{f"subregion-q{q}": dispersion_weights(cube, 8, exponent=q) for q in range(3)}}
    truth = json.loads((bids / TRUTH_FILE).read_text())
    participants = pd.read_csv(bids / "participants.tsv", sep="\t").set_index("participant_id")
    sets: dict[str, tuple] = {}
    for masking in args.maskings:
        features, signals, inputs, encoder, readout = extract(bids, out, masking, weights)
        emit({"masking": masking, "encoder_seconds_per_run": encoder,
              "subregion_seconds_per_run": readout, "runs": len(signals)})
        for name, values in features.items():
            kind = {"connectivity": "connectivity", "global": None}.get(name, "region")
            sets[f"{masking}-{name}"] = (values, kind)
    sets["fc"] = ([vectorize(correlation_matrix(s)) for s in signals], "fc")
    sets["tangent"] = (signals, "tangent")
    sets["subregion-input"] = (inputs, "region")
    sets["regionmean"] = ([np.concatenate([np.nanmean(s, 0), np.nanstd(s, 0)]) for s in signals],
                          None)
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for target in args.targets:
            planted = [r["name"] for r in truth[PLANTED[target]]["regions"]]
            for name, (values, kind) in sets.items():
                if args.sets and name not in args.sets:
                    continue
                emit(score(name, values, kind, participants, target, planted, args.cv_folds,
                           args.cv_repeats, atlas))


if __name__ == "__main__":
    main()
