"""Attribution internals (bidsapp.inference) against hand computations."""

from __future__ import annotations

import torch

from bidsapp.attribution import _region_errors
from bidsapp.model.masking import Mask


def test_region_errors_sum_squared_errors_over_hidden_labelled_voxels() -> None:
    generator = torch.Generator().manual_seed(0)
    k, n_frames, shape, n_regions = 2, 3, (4, 4, 4), 3
    labels = torch.randint(-1, n_regions, shape, generator=generator)     # -1 = no region
    brain = torch.rand(shape, generator=generator) > 0.2
    hidden = torch.rand((k, 1, *shape), generator=generator) > 0.5
    pred = torch.randn((k, n_frames, *shape), generator=generator)
    target = torch.randn((k, n_frames, *shape), generator=generator)
    labelled = (brain & (labels >= 0)).flatten().nonzero().squeeze(1)
    mask = Mask(tokens=hidden, voxels=hidden)

    error, count = _region_errors(pred, target, mask, labelled, labels.flatten()[labelled],
                                  n_regions)

    expected_error = torch.zeros(k, n_regions)
    expected_count = torch.zeros(k, n_regions)
    for i in range(k):
        for voxel in zip(*torch.nonzero(brain & (labels >= 0), as_tuple=True), strict=True):
            if hidden[(i, 0, *voxel)]:
                region = labels[voxel]
                diff = pred[(i, slice(None), *voxel)] - target[(i, slice(None), *voxel)]
                expected_error[i, region] += (diff**2).sum()
                expected_count[i, region] += n_frames
    assert expected_count.sum() > 0
    torch.testing.assert_close(error, expected_error)
    torch.testing.assert_close(count, expected_count)
