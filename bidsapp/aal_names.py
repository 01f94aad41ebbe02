"""AAL's naming scheme: the lobe-level group and the hemisphere of a region, from its name.

Used for label tables without ``group`` or ``hemisphere`` columns (AAL1, AAL2, AAL3 and any table
that follows their names); other atlases get ``n/a``, and roimae leaves out the summaries by group.
"""

from __future__ import annotations

import re

# AAL name stem (the name without its ``_L``/``_R`` suffix, or a ``STEM_...`` prefix of it) ->
# lobe-level group, as in the AAL3v1 table. Older AAL spellings (Cingulum_*, Thalamus) are kept
# so AAL1/AAL2 tables get groups too.
_GROUP_OF_STEM = {
    "Precentral": "central",
    "Rolandic_Oper": "central",
    "Paracentral_Lobule": "central",
    "Frontal": "frontal",
    "Supp_Motor_Area": "frontal",
    "Olfactory": "frontal",
    "Rectus": "frontal",
    "OFCmed": "frontal",
    "OFCant": "frontal",
    "OFCpost": "frontal",
    "OFClat": "frontal",
    "Insula": "insula",
    "Cingulate": "limbic",
    "Cingulum": "limbic",
    "Hippocampus": "limbic",
    "ParaHippocampal": "limbic",
    "Amygdala": "limbic",
    "Temporal_Pole": "limbic",
    "ACC": "limbic",
    "Calcarine": "occipital",
    "Cuneus": "occipital",
    "Lingual": "occipital",
    "Occipital": "occipital",
    "Fusiform": "occipital",
    "Postcentral": "parietal",
    "Parietal": "parietal",
    "SupraMarginal": "parietal",
    "Angular": "parietal",
    "Precuneus": "parietal",
    "Caudate": "subcortical",
    "Putamen": "subcortical",
    "Pallidum": "subcortical",
    "Thalamus": "subcortical",
    "Thal": "subcortical",
    "N_Acc": "subcortical",
    "Heschl": "temporal",
    "Temporal": "temporal",
    "Cerebelum": "cerebellum",
    "Cerebellum": "cerebellum",
    "Vermis": "cerebellum",
    "VTA": "brainstem",
    "SN": "brainstem",
    "Red_N": "brainstem",
    "LC": "brainstem",
    "Raphe": "brainstem",
}


def group_for_region(name: str) -> str:
    """Lobe-level group of an AAL region name.

    Parameters
    ----------
    name : str
        AAL (1, 2 or 3) region name, e.g. ``"Temporal_Pole_Sup_L"``.

    Returns
    -------
    str
        One of central, frontal, temporal, parietal, occipital, insula, limbic, subcortical,
        cerebellum, brainstem; ``"n/a"`` for names outside the AAL scheme.

    Examples
    --------
    >>> group_for_region("Temporal_Pole_Sup_L"), group_for_region("Temporal_Sup_L")
    ('limbic', 'temporal')
    """
    stem = re.sub(r"_[LR]$", "", name)
    # The longest matching stem wins, so Temporal_Pole_* is limbic while Temporal_* is temporal.
    matches = [s for s in _GROUP_OF_STEM if stem == s or stem.startswith(f"{s}_")]
    return _GROUP_OF_STEM[max(matches, key=len)] if matches else "n/a"


def hemisphere_of(name: str) -> str:
    """``L`` or ``R`` from an AAL region name's suffix, ``"n/a"`` without one."""
    match = re.search(r"_([LR])$", name)
    return match.group(1) if match else "n/a"
