"""Losses against hand computations: Wang et al.'s dual-level weighted CE, soft Dice, boundary
loss and their weighted mix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from KneeSegLogic.training.losses import (
    MixedLoss,
    area_ratio_weights,
    boundary_loss,
    dual_level_weighted_ce,
    signed_distance_maps,
    soft_dice_loss,
)

torch.set_num_threads(1)


def test_area_ratio_weights_are_normalised_inverse_area_ratios() -> None:
    # Counts 70/20/10: ratios 0.7/0.2/0.1, inverse 1.4286/5/10, normalised by their sum 16.4286.
    weights = area_ratio_weights([70, 20, 10]).numpy()
    np.testing.assert_allclose(weights, [1.4285714 / 16.4285714, 5 / 16.4285714, 10 / 16.4285714], rtol=1e-6)
    np.testing.assert_allclose(weights, [0.0869565, 0.3043478, 0.6086957], rtol=1e-5)
    assert weights.sum() == pytest.approx(1.0)


def test_area_ratio_weights_give_unseen_classes_the_largest_seen_weight() -> None:
    weights = area_ratio_weights([70, 30, 0]).numpy()
    inverse = np.array([1 / 0.7, 1 / 0.3, 1 / 0.3])
    np.testing.assert_allclose(weights, inverse / inverse.sum(), rtol=1e-6)


def manual_dual_level_ce(logits: np.ndarray, target: np.ndarray, external: np.ndarray) -> float:
    """Wang et al.'s loss written out: voxel weight = external(y) * internal(y), with internal
    weights the normalised inverse area ratios of this batch; weighted mean of -log p(y)."""
    classes = logits.shape[1]
    counts = np.array([(target == c).sum() for c in range(classes)], float)
    internal = np.array([counts.sum() / n if n else 0.0 for n in counts])
    internal /= internal.sum()
    class_weight = external * internal
    scores = np.moveaxis(logits, 1, -1).reshape(-1, classes).astype(np.float64)
    log_softmax = scores - scores.max(1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
    labels = target.reshape(-1)
    voxel_weight = class_weight[labels]
    return float((voxel_weight * -log_softmax[np.arange(labels.size), labels]).sum() / voxel_weight.sum())


def test_dual_level_weighted_ce_reproduces_the_formula() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    # Batch areas 28/8/4 voxels: rare classes weigh more at both levels.
    target = np.zeros((2, 4, 5), np.int64)
    target.reshape(-1)[rng.permutation(40)[:12]] = np.array([1] * 8 + [2] * 4)
    external = area_ratio_weights([70, 20, 10])
    loss = dual_level_weighted_ce(torch.from_numpy(logits), torch.from_numpy(target), external)
    expected = manual_dual_level_ce(logits, target, external.numpy().astype(float))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Not just plain cross-entropy: the weighting changes the value.
    plain = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(target)))
    assert abs(plain - expected) > 0.01


def test_dual_level_weighted_ce_with_a_class_absent_from_the_batch() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 3, 6, 6)).astype(np.float32)
    target = (rng.random((1, 6, 6)) < 0.3).astype(np.int64)  # classes 0 and 1 only
    external = area_ratio_weights([50, 30, 20])
    loss = dual_level_weighted_ce(torch.from_numpy(logits), torch.from_numpy(target), external)
    assert float(loss) == pytest.approx(manual_dual_level_ce(logits, target, external.numpy().astype(float)), rel=1e-5)


def test_dual_level_weighted_ce_is_plain_ce_for_balanced_classes() -> None:
    logits = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    target = torch.zeros(1, 4, 4, dtype=torch.int64)
    target[..., :2] = 1  # 8 voxels each
    loss = dual_level_weighted_ce(logits, target, area_ratio_weights([5, 5]))
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))


def two_squares() -> torch.Tensor:
    target = torch.zeros(1, 16, 16, dtype=torch.int64)
    target[0, 2:7, 2:7] = 1
    target[0, 9:14, 8:15] = 2
    return target


def test_soft_dice_is_zero_for_perfect_and_one_for_disjoint_predictions() -> None:
    target = two_squares()
    perfect = 50.0 * F.one_hot(target, 3).movedim(-1, 1).float()
    assert float(soft_dice_loss(perfect, target)) == pytest.approx(0.0, abs=1e-4)
    swapped = target.clone()
    swapped[target == 1], swapped[target == 2] = 2, 1
    disjoint = 50.0 * F.one_hot(swapped, 3).movedim(-1, 1).float()
    assert float(soft_dice_loss(disjoint, target)) == pytest.approx(1.0, abs=1e-4)
    # Half right: class 1 perfect, class 2 predicted as background -> mean Dice 0.5.
    half = target.clone()
    half[target == 2] = 0
    assert float(soft_dice_loss(50.0 * F.one_hot(half, 3).movedim(-1, 1).float(), target)) == pytest.approx(0.5, abs=1e-3)


def test_signed_distance_is_negative_inside_and_positive_outside() -> None:
    target = torch.zeros(1, 16, 16, dtype=torch.int64)
    target[0, 4:12, 4:12] = 1
    maps = signed_distance_maps(target, 3)
    assert maps.shape == (1, 3, 16, 16)
    assert float(maps[0, 1, 7, 7]) == pytest.approx(-4.0)  # 4 voxels from the nearest outside voxel
    assert float(maps[0, 1, 0, 0]) == pytest.approx(np.hypot(4, 4))  # to the square's corner voxel
    assert (maps[0, 1][target[0] == 1] < 0).all() and (maps[0, 1][target[0] == 0] > 0).all()
    assert not maps[:, 0].any() and not maps[:, 2].any()  # background and absent classes: no term


def test_boundary_loss_rewards_inside_and_penalises_outside() -> None:
    target = torch.zeros(1, 16, 16, dtype=torch.int64)
    target[0, 4:12, 4:12] = 1
    maps = signed_distance_maps(target, 2)
    perfect = 50.0 * F.one_hot(target, 2).movedim(-1, 1).float()
    everywhere = torch.zeros(1, 2, 16, 16)
    everywhere[:, 1] = 50.0
    nowhere = torch.zeros(1, 2, 16, 16)
    nowhere[:, 0] = 50.0
    loss_perfect = float(boundary_loss(perfect, maps))
    assert loss_perfect < 0  # probabilities only where distances are negative
    assert float(boundary_loss(everywhere, maps)) > 0  # outside distances dominate
    assert float(boundary_loss(nowhere, maps)) == pytest.approx(0.0, abs=1e-6)
    # Mean of probability x distance over the foreground map's 256 voxels: inside distances / 256.
    assert loss_perfect == pytest.approx(float(maps[0, 1][target[0] == 1].sum()) / 256, rel=1e-4)


@pytest.mark.parametrize("taus", [(1.0, 1.0, 0.0), (0.3, 2.0, 0.5), (0.0, 0.0, 1.0)])
def test_mixed_loss_combines_terms_with_tau_weights(taus: tuple[float, float, float]) -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 16, 16, generator=generator)
    target = torch.cat([two_squares(), two_squares().flip(-1)])
    dice = soft_dice_loss(logits, target)
    boundary = boundary_loss(logits, signed_distance_maps(target, 3))
    ce = F.cross_entropy(logits, target)
    expected = taus[0] * dice + taus[1] * ce + taus[2] * boundary
    torch.testing.assert_close(MixedLoss(*taus)(logits, target), expected)
    external = area_ratio_weights([200, 30, 40])
    weighted = taus[0] * dice + taus[1] * dual_level_weighted_ce(logits, target, external) + taus[2] * boundary
    torch.testing.assert_close(MixedLoss(*taus, external_weights=external)(logits, target), weighted)


def test_mixed_loss_trains_towards_the_target() -> None:
    # A few Adam steps on free logits lower the mixed loss and reach the target labels.
    target = two_squares()
    logits = torch.zeros(1, 3, 16, 16, requires_grad=True)
    loss_function = MixedLoss(1.0, 1.0, 0.1, external_weights=area_ratio_weights([180, 25, 35]))
    optimiser = torch.optim.Adam([logits], lr=0.3)
    first = loss_function(logits, target).item()
    for _ in range(40):
        loss = loss_function(logits, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.2 * first
    assert torch.equal(logits.argmax(1), target)


def test_selectable_losses_are_the_mixed_loss_variants() -> None:
    from KneeSegLogic.commands.train import LOSSES as CLI_LOSSES
    from KneeSegLogic.training.losses import LOSSES, make_loss

    assert tuple(LOSSES) == CLI_LOSSES  # the CLI offers exactly what the trainer can build
    logits = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    target = torch.cat([two_squares(), two_squares().flip(-1)])
    counts = [200.0, 30.0, 40.0]
    dice = soft_dice_loss(logits, target)
    ce = F.cross_entropy(logits, target)
    torch.testing.assert_close(make_loss("dice-ce", counts)(logits, target), dice + ce)
    weighted = dice + dual_level_weighted_ce(logits, target, area_ratio_weights(counts))
    torch.testing.assert_close(make_loss("dice-wce", counts)(logits, target), weighted)
    boundary = boundary_loss(logits, signed_distance_maps(target, 3))
    torch.testing.assert_close(make_loss("dice-ce-boundary", counts)(logits, target), dice + ce + 0.1 * boundary)
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        make_loss("focal", counts)
