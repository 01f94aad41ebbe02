"""Model cards: every pretraining writes ``model.md`` and the same facts in ``model.json``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import PretrainedDemo

from bidsapp.cli import main
from bidsapp.outputs import card_path


def test_pretraining_writes_a_model_card(pretrained_demo: PretrainedDemo) -> None:
    meta = json.loads(pretrained_demo.model.with_suffix(".json").read_text())
    card = meta["model_card"]
    description = json.loads((pretrained_demo.bids / "dataset_description.json").read_text())
    assert card["roimae_version"] == meta["roimae_version"]
    assert (card["backbone"], card["preset"]) == ("swin4d", "tiny")
    assert card["masking"]["masking"] == "roi"
    assert card["atlas"]["name"] == "AAL3v1" and len(card["atlas"]["sha256"]) == 64
    data = card["training_data"]
    assert data["dataset"] == description["Name"]
    assert (data["participants"], data["runs"], data["frames"]) == (4, 4, 80)
    assert data["participants_train"] + data["participants_heldout"] == 4
    assert data["space"] == "MNI152NLin6Asym" and data["repetition_time"] == [2.0]
    assert data["target_tr"] is None
    assert [p["epoch"] for p in card["loss_curve"]] == [1]
    assert card["loss_curve"][0]["heldout_loss"] > 0
    assert card["random_seed"] == 0 and card["hardware"]["device"] == "cpu"
    assert card["wall_seconds"] > 0
    text = card_path(pretrained_demo.model).read_text()
    for fact in (description["Name"], card["atlas"]["sha256"], meta["weights_sha256"],
                 "MNI152NLin6Asym", "held-out loss", "swin4d", meta["roimae_version"]):
        assert fact in text, fact


def test_participant_sidecars_cite_the_card(pretrained_demo: PretrainedDemo, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(pretrained_demo.out / "models", out / "models")
    assert main([str(pretrained_demo.bids), str(out), "participant", "--participant-label", "01",
                 "--no-reports", "--no-attribution", "-w", str(tmp_path / "work")]) == 0
    sidecar = next((out / "sub-01" / "func").glob("*_desc-roi_embedding.json"))
    assert json.loads(sidecar.read_text())["Model"]["ModelCard"] == "bids::models/desc-roi/model.md"
