"""Property tests (hypothesis): BIDS file names and the masking strategies.

``tests/test_derivatives.py`` checks the name round trip on a small alphabet and a list of invalid
labels; here every character a label or index may hold, every entity, output paths, arbitrary
invalid values and arbitrary names are drawn. The masking strategies are drawn on small random
region grids (random labels, brain, token size) and checked against what they promise: the mask
size, what they may hide, and one mask per seed.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bidsapp.bids.derivatives import (
    ENTITY_FORMATS,
    ENTITY_ORDER,
    RUN_ENTITIES,
    DerivativesWriter,
    build_filename,
    check_label,
    parse_filename,
)
from bidsapp.errors import BadDataError, UsageError
from bidsapp.model.masking import build_masking
from bidsapp.model.regions import RegionGrid

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- file names -----------------------------------------------------------------------------------

LABEL_CHARS = string.ascii_letters + string.digits + "+"
_VALUES = {key: st.text(alphabet=string.digits if fmt == "index" else LABEL_CHARS, min_size=1,
                        max_size=12)
           for key, fmt in ENTITY_FORMATS.items()}
_SUFFIXES = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=10)
_EXTENSIONS = st.lists(st.text(alphabet=string.ascii_letters + string.digits, min_size=1,
                               max_size=4), min_size=1, max_size=3).map(
    lambda parts: "".join(f".{p}" for p in parts))


def _entity_sets(keys: tuple[str, ...] = ENTITY_ORDER) -> st.SearchStrategy[dict[str, str]]:
    return st.sets(st.sampled_from(keys), max_size=len(keys)).flatmap(
        lambda chosen: st.fixed_dictionaries({key: _VALUES[key] for key in chosen}))


@SETTINGS
@given(entities=_entity_sets(), suffix=_SUFFIXES, extension=_EXTENSIONS)
def test_any_valid_entity_set_round_trips(entities: dict[str, str], suffix: str,
                                          extension: str) -> None:
    name = build_filename(entities, suffix, extension)
    assert "/" not in name and name == Path(name).name
    parsed, parsed_suffix, parsed_extension = parse_filename(name)
    assert parsed == entities and list(parsed) == [k for k in ENTITY_ORDER if k in entities]
    assert (parsed_suffix, parsed_extension) == (suffix, extension)
    # The order given does not matter: names are canonical.
    assert build_filename(dict(reversed(list(entities.items()))), suffix, extension) == name


@SETTINGS
@given(source=_entity_sets(), extra=_entity_sets(("atlas", "desc", "stat", "res")),
       sub=_VALUES["sub"], ses=st.none() | _VALUES["ses"])
def test_output_paths_keep_run_entities_and_parse_back(tmp_path: Path, source: dict[str, str],
                                                       extra: dict[str, str], sub: str,
                                                       ses: str | None) -> None:
    source = {**source, "sub": sub} if ses is None else {**source, "sub": sub, "ses": ses}
    writer = DerivativesWriter(tmp_path)
    path = writer.path_for(source, suffix="embedding", extension=".tsv", **extra)
    expected = {k: v for k, v in source.items() if k in RUN_ENTITIES} | extra
    assert parse_filename(path.name) == (
        {k: expected[k] for k in ENTITY_ORDER if k in expected}, "embedding", ".tsv")
    folder = tmp_path / f"sub-{sub}"
    if "ses" in source:
        folder = folder / f"ses-{source['ses']}"
    assert path.parent == folder / "func"
    assert path.resolve().is_relative_to(tmp_path.resolve())


def _with_bad_char(fmt: str) -> st.SearchStrategy[str]:
    """A value of format ``fmt`` with at least one character it may not hold."""
    allowed = string.digits if fmt == "index" else LABEL_CHARS
    bad = st.characters(codec="utf-8").filter(lambda c: c not in allowed)
    return st.tuples(st.text(alphabet=allowed, max_size=5), bad, st.text(max_size=5)).map(
        "".join)


@SETTINGS
@given(data=st.data(), key=st.sampled_from(ENTITY_ORDER))
def test_invalid_values_are_usage_errors(data: st.DataObject, key: str) -> None:
    value = data.draw(st.just("") | _with_bad_char(ENTITY_FORMATS[key]))
    with pytest.raises(UsageError):
        check_label(key, value)
    with pytest.raises(UsageError):
        build_filename({"sub": "01", key: value}, "bold", ".nii.gz")
    with pytest.raises(UsageError):
        DerivativesWriter(Path("/nonexistent")).path_for({"sub": "01", "task": "rest"},
                                                          suffix="bold", extension=".nii.gz",
                                                          **{key: value})


@SETTINGS
@given(key=st.text(alphabet=string.ascii_letters, min_size=1, max_size=8).filter(
    lambda k: k not in ENTITY_FORMATS), value=_VALUES["desc"])
def test_unknown_entities_are_usage_errors(key: str, value: str) -> None:
    with pytest.raises(UsageError):
        build_filename({"sub": "01", key: value}, "bold", ".nii.gz")
    with pytest.raises(UsageError):
        parse_filename(f"sub-01_{key}-{value}_bold.nii.gz")


@SETTINGS
@given(name=st.lists(st.sampled_from([*ENTITY_ORDER[:6], "run", "x"]) | st.text(max_size=4),
                     max_size=6).flatmap(
    lambda keys: st.tuples(*[st.text(alphabet="ab01+-_. ", max_size=4) for _ in keys]).map(
        lambda values: "_".join(f"{k}-{v}" for k, v in zip(keys, values, strict=True))))
       | st.text(max_size=30).filter(lambda n: "/" not in n and "\x00" not in n))
def test_parse_filename_accepts_only_valid_names(name: str) -> None:
    """Any name: a UsageError, or entities that are all valid and build the same name back."""
    for candidate in (name, f"{name}_bold.nii.gz"):
        try:
            entities, suffix, extension = parse_filename(candidate)
        except UsageError:
            continue
        for key, value in entities.items():
            assert check_label(key, value) == value
        if extension:
            rebuilt = build_filename(entities, suffix, extension)
            assert parse_filename(rebuilt) == (
                {k: entities[k] for k in ENTITY_ORDER if k in entities}, suffix, extension)
            if list(entities) == [k for k in ENTITY_ORDER if k in entities]:
                assert rebuilt == candidate


# --- masking strategies -----------------------------------------------------------------------------

@st.composite
def region_grids(draw: st.DrawFn) -> RegionGrid:
    """A random grid: 1-4 tokens per axis of 1-3 voxels, 1-6 regions, random labels and brain."""
    patch = draw(st.integers(1, 3))
    shape = tuple(patch * draw(st.integers(1, 4)) for _ in range(3))
    n_regions = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labelled = draw(st.floats(0.0, 1.0))
    brain = rng.random(shape) < draw(st.floats(0.0, 1.0))
    labels = np.where(rng.random(shape) < labelled, rng.integers(0, n_regions, shape), -1)
    return RegionGrid.from_labels(torch.from_numpy(labels), torch.from_numpy(brain), patch,
                                  n_regions)


def _tokens_to_voxels(tokens: torch.Tensor, p: int) -> torch.Tensor:
    for dim in (-3, -2, -1):
        tokens = tokens.repeat_interleave(p, dim=dim)
    return tokens


_RATIOS = st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)


@settings(max_examples=200, deadline=None)
@given(grid=region_grids(), name=st.sampled_from(["roi", "roi-voxel", "random", "brain-random"]),
       unit=st.sampled_from(["regions", "tokens"]), time=st.sampled_from(["tube", "random"]),
       ratio=_RATIOS, seed=st.integers(0, 2**63 - 1), batch=st.integers(1, 3),
       frames=st.integers(1, 3))
def test_masks_have_the_promised_size_hide_only_eligible_and_follow_the_seed(
        grid: RegionGrid, name: str, unit: str, time: str, ratio: float, seed: int, batch: int,
        frames: int) -> None:
    token_labels, brain_tokens = grid.token_labels, grid.brain_tokens
    owned = torch.bincount(token_labels[token_labels >= 0], minlength=grid.n_regions)
    in_brain = torch.bincount(grid.voxel_labels[grid.brain & (grid.voxel_labels >= 0)],
                              minlength=grid.n_regions)
    try:
        masking = build_masking(name, grid, ratio, unit=unit, time=time)
    except BadDataError:
        event(f"{name}: nothing to hide")
        # Only when there is nothing the strategy could hide.
        assert name != "random"
        assert (not (in_brain > 0).any()) if name == "roi-voxel" else (
            not (owned > 0).any() or not brain_tokens.any())
        return
    event(f"{name}, unit {unit}")
    mask = masking(batch, frames, torch.Generator().manual_seed(seed))
    again = masking(batch, frames, torch.Generator().manual_seed(seed))
    assert torch.equal(mask.tokens, again.tokens) and torch.equal(mask.voxels, again.voxels)
    tm = frames if time == "random" else 1
    assert mask.tokens.shape == (batch, tm, *grid.grid_shape)
    assert mask.voxels.shape == (batch, tm, *grid.voxel_labels.shape)
    hidden_tokens = mask.tokens.flatten(2).sum(-1)                      # (B, Tm)

    if name == "random":
        assert (hidden_tokens == max(1, round(ratio * token_labels.numel()))).all()
        assert torch.equal(mask.voxels, _tokens_to_voxels(mask.tokens, grid.patch_size))
        return
    if name == "brain-random":
        n_brain = int(brain_tokens.sum())
        expected = max(1, round(ratio * n_brain)) if unit == "tokens" else masking.n_hidden
        assert 1 <= expected <= n_brain and (hidden_tokens == expected).all()
        assert not (mask.tokens & ~brain_tokens).any()
        assert torch.equal(mask.voxels, _tokens_to_voxels(mask.tokens, grid.patch_size))
        return

    # Region strategies: what a region hides, and which regions may be drawn.
    sizes = owned if name == "roi" else in_brain
    eligible = sizes > 0
    drawn = mask.regions                                                 # (B, Tm, R)
    assert not (drawn & ~eligible).any()
    n_drawn = drawn.sum(-1)
    if unit == "regions":
        n_eligible = int(eligible.sum())
        assert (n_drawn == min(n_eligible, max(1, round(ratio * n_eligible)))).all()
    else:
        total = int(brain_tokens.sum()) if name == "roi" else int(grid.brain.sum())
        target = ratio * total
        hidden = (drawn * sizes).sum(-1).double()                         # (B, Tm)
        largest = (drawn * sizes).amax(-1).double()
        assert (n_drawn >= 1).all()
        # Within one region of the target: reached (unless every region is drawn), and not
        # reached before the last region was taken.
        assert ((hidden >= target) | (n_drawn == int(eligible.sum()))).all()
        assert (hidden - largest < target).all()
    for b in range(batch):
        for t in range(tm):
            regions = drawn[b, t].nonzero().flatten()
            if name == "roi":
                tokens = torch.isin(token_labels, regions)
                assert torch.equal(mask.tokens[b, t], tokens)
                assert torch.equal(mask.voxels[b, t], _tokens_to_voxels(tokens, grid.patch_size))
                assert int(tokens.sum()) == int(sizes[regions].sum())
            else:
                voxels = torch.isin(grid.voxel_labels, regions)
                assert torch.equal(mask.voxels[b, t], voxels)
                assert int((voxels & grid.brain).sum()) == int(sizes[regions].sum())
                # A token is the mask token only if it holds brain and all of it is hidden.
                visible = _blocks_any(~voxels & grid.brain, grid.patch_size)
                assert torch.equal(mask.tokens[b, t], brain_tokens & ~visible)


def _blocks_any(volume: torch.Tensor, p: int) -> torch.Tensor:
    d, h, w = volume.shape
    return volume.reshape(d // p, p, h // p, p, w // p, p).any(5).any(3).any(1)
