"""The network's encodings, the ensemble and their checkpoints and ONNX graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.common.model import (
    FraudEnsemble,
    FraudNet,
    ModelConfig,
    load_checkpoint,
    predict_proba,
    quantile_bins,
    save_checkpoint,
    smoothed_log_odds,
)

CARDINALITIES = [4, 3]


def toy_split(n: int = 2_000, seed: int = 0):
    """Ids where id 1 of column 0 is mostly positive, and two numeric columns (one constant)."""
    rng = np.random.default_rng(seed)
    cats = np.stack([rng.integers(0, k, n) for k in CARDINALITIES], axis=1).astype(np.int64)
    label = (rng.random(n) < np.where(cats[:, 0] == 1, 0.6, 0.02)).astype(np.float32)
    nums = np.stack([rng.normal(size=n), np.full(n, 3.0)], axis=1).astype(np.float32)
    return cats, nums, label


def net(**overrides) -> FraudNet:
    torch.manual_seed(0)
    config = dict(cardinalities=CARDINALITIES, n_numeric=2, hidden=[8], target_encoding=True, numeric_bins=4)
    return FraudNet(ModelConfig(**{**config, **overrides})).eval()


def test_target_table_is_the_smoothed_log_odds_of_the_training_split():
    cats, nums, label = toy_split()
    model = net(target_smoothing=10.0)
    model.fit_encodings(cats, nums, label)
    prior = label.mean()
    for column, offset in ((0, 0), (1, CARDINALITIES[0])):
        for value in range(CARDINALITIES[column]):
            rows = cats[:, column] == value
            rate = (label[rows].sum() + 10.0 * prior) / (rows.sum() + 10.0)
            expected = np.log(rate / (1 - rate))
            assert float(model.te_table[offset + value]) == pytest.approx(expected, rel=1e-5)
    # The mostly-positive id stands out; an unseen id would get the prior's log-odds.
    assert float(model.te_table[1]) > float(model.te_table[0]) + 2.0
    assert smoothed_log_odds(np.zeros(1), np.zeros(1), 0.1, 10.0)[0] == pytest.approx(np.log(0.1 / 0.9))


def test_a_training_row_never_sees_its_own_label():
    """Out-of-fold encodings: flipping one row's label leaves that row's encoding as it was."""
    cats, nums, label = toy_split()
    before = net().fit_encodings(cats, nums, label, seed=3)
    for row in (0, 17, 1_234):
        flipped = label.copy()
        flipped[row] = 1.0 - flipped[row]
        after = net().fit_encodings(cats, nums, flipped, seed=3)
        assert np.array_equal(after[row], before[row])
        # ...while the rows of other folds with the same ids do move.
        same_ids = np.flatnonzero((cats == cats[row]).all(axis=1))
        assert (np.abs(after[same_ids] - before[same_ids]).max(axis=1) > 0).any()


def test_encodings_are_deterministic_for_a_seed():
    cats, nums, label = toy_split()
    first, second = net(), net()
    a = first.fit_encodings(cats, nums, label, seed=5)
    b = second.fit_encodings(cats, nums, label, seed=5)
    assert np.array_equal(a, b)
    assert torch.equal(first.te_table, second.te_table) and torch.equal(first.bin_low, second.bin_low)
    assert not np.array_equal(a, net().fit_encodings(cats, nums, label, seed=6))


def test_quantile_bins_cover_the_training_values_and_skip_constant_columns():
    _, nums, _ = toy_split()
    low, width = quantile_bins(nums, 4)
    assert low.shape == width.shape == (2, 4)
    assert low[0, 0] == pytest.approx(nums[:, 0].min())
    assert low[0, 3] + width[0, 3] == pytest.approx(nums[:, 0].max())
    assert np.all(np.diff(low[0]) > 0)
    # A constant column has no distinct quantiles: all its bins are unused (always 0).
    assert np.all(low[1] >= 1e8)


def test_piecewise_linear_encoding_is_zero_below_a_bin_and_one_above():
    cats, nums, label = toy_split()
    model = net(target_encoding=False)
    model.fit_encodings(cats, nums, label)
    x = torch.tensor([[-100.0, 3.0], [100.0, 3.0]])
    position = torch.clamp((x.unsqueeze(2) - model.bin_low) / model.bin_width, 0, 1)
    assert torch.all(position[0, 0] == 0) and torch.all(position[1, 0] == 1)
    assert torch.all(position[:, 1] == 0)


def test_scoring_uses_the_full_table_and_training_can_pass_out_of_fold_values():
    cats, nums, label = toy_split()
    model = net()
    out_of_fold = model.fit_encodings(cats, nums, label)
    c, n = torch.from_numpy(cats[:50]), torch.from_numpy(nums[:50])
    full = model.te_table[c + model.te_offsets].numpy()
    with torch.no_grad():
        assert torch.equal(model(c, n), model(c, n, torch.from_numpy(full)))
        assert not torch.equal(model(c, n), model(c, n, torch.from_numpy(out_of_fold[:50])))


def test_ensemble_is_the_mean_of_its_members_logits(tmp_path):
    cats, nums, label = toy_split()
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        member = FraudNet(ModelConfig(CARDINALITIES, 2, hidden=[8], target_encoding=True, numeric_bins=4)).eval()
        member.fit_encodings(cats, nums, label, seed=seed)
        members.append(member)
    ensemble = FraudEnsemble(members).eval()
    c, n = torch.from_numpy(cats[:64]), torch.from_numpy(nums[:64])
    with torch.no_grad():
        logits = torch.stack([m(c, n) for m in members])
        out = ensemble(c, n)
    # Members differ, and the ensemble sits inside their spread, at their mean.
    assert not torch.allclose(logits[0], logits[1])
    assert torch.all(out >= logits.min(dim=0).values) and torch.all(out <= logits.max(dim=0).values)
    assert torch.allclose(out * 3, logits.sum(dim=0), atol=1e-5)

    # Checkpoints round-trip, members included.
    save_checkpoint(ensemble, str(tmp_path / "model.pt"), extra={"k": 1})
    loaded, extra = load_checkpoint(str(tmp_path / "model.pt"))
    assert isinstance(loaded, FraudEnsemble) and len(loaded.members) == 3 and extra == {"k": 1}
    assert np.array_equal(predict_proba(loaded, cats, nums), predict_proba(ensemble, cats, nums))


def test_a_checkpoint_without_encodings_or_members_still_loads(tmp_path):
    """Models registered before the encodings existed keep serving."""
    old = FraudNet(ModelConfig(CARDINALITIES, 2, hidden=[8])).eval()
    payload = {"config": {"cardinalities": CARDINALITIES, "n_numeric": 2, "hidden": [8], "dropout": 0.1,
                          "max_embedding_dim": 16}, "state_dict": old.state_dict(), "extra": {}}
    torch.save(payload, tmp_path / "old.pt")
    loaded, _ = load_checkpoint(str(tmp_path / "old.pt"))
    cats, nums, _ = toy_split(100)
    assert isinstance(loaded, FraudNet)
    assert np.array_equal(predict_proba(loaded, cats, nums), predict_proba(old, cats, nums))


def test_onnx_graph_of_an_encoded_ensemble_matches_pytorch(tmp_path):
    from jobs.export import export_onnx, onnx_parity

    cats, nums, label = toy_split()
    members = []
    for i in range(2):
        torch.manual_seed(100 + i)  # different weights: the mean is not of clones
        member = FraudNet(ModelConfig(CARDINALITIES, 2, hidden=[8], target_encoding=True, numeric_bins=4)).eval()
        member.fit_encodings(cats, nums, label, seed=i)
        members.append(member)
    ensemble = FraudEnsemble(members).eval()
    path = str(tmp_path / "model.onnx")
    export_onnx(ensemble, len(CARDINALITIES), 2, path)
    parity = onnx_parity(path, ensemble, cats[:500], nums[:500])
    assert parity["rows"] == 500
    assert parity["max_abs_diff"] < 1e-5


def test_an_id_outside_its_table_is_a_clear_error():
    cats, nums, label = toy_split()
    cats[5, 1] = CARDINALITIES[1]  # one past the last id of column 1
    with pytest.raises(ValueError, match="categorical column 1: ids span 0..3, the table has 3"):
        net().fit_encodings(cats, nums, label)


def test_a_single_id_column_gets_no_fold_noise_blown_up():
    """Out-of-fold priors differ a little by fold; a column with one id must not turn that
    into a unit-variance fold marker."""
    cats, nums, label = toy_split()
    cats[:, 1] = 0
    model = net()
    out_of_fold = model.fit_encodings(cats, nums, label)
    standardized = (out_of_fold[:, 1] - float(model.te_scale[0, 1])) / float(model.te_scale[1, 1])
    assert np.abs(standardized).max() < 0.5


def test_training_refuses_a_validation_split_without_both_labels():
    from jobs.common.features import Preprocessor
    from jobs.common.training import SplitArrays, TrainConfig, fit

    cats, nums, label = toy_split()
    pre = Preprocessor(dataset="synthetic", categorical={"a": ["x", "y", "z"], "b": ["u", "v"]},
                       numeric={"n1": {"mean": 0.0, "std": 1.0}, "n2": {"mean": 0.0, "std": 1.0}},
                       feature_spec_hash="test")
    train = SplitArrays(cats, nums, label)
    negatives = label == 0
    validation = SplitArrays(cats[negatives][:100], nums[negatives][:100], label[negatives][:100])
    with pytest.raises(ValueError, match=r"validation split \(100 rows, 0 positive\) needs both labels"):
        fit(TrainConfig(members=2, epochs=1), pre, train, validation, num_threads=1)


def test_a_pair_gets_the_target_encoding_of_the_combination():
    """Column 0's id 1 is positive only with column 1's id 2: neither column alone says so."""
    rng = np.random.default_rng(1)
    n = 4_000
    cats = np.stack([rng.integers(0, k, n) for k in CARDINALITIES], axis=1).astype(np.int64)
    label = (rng.random(n) < np.where((cats[:, 0] == 1) & (cats[:, 1] == 2), 0.7, 0.02)).astype(np.float32)
    nums = rng.normal(size=(n, 2)).astype(np.float32)
    model = net(target_pairs=[[0, 1]], target_smoothing=10.0)
    out_of_fold = model.fit_encodings(cats, nums, label)
    assert out_of_fold.shape == (n, 3)
    assert model.config.encoded_sizes() == [4, 3, 12]
    pair_table = model.te_table[sum(CARDINALITIES):].numpy()
    rows = (cats[:, 0] == 1) & (cats[:, 1] == 2)
    rate = (label[rows].sum() + 10.0 * label.mean()) / (rows.sum() + 10.0)
    assert pair_table[1 * 3 + 2] == pytest.approx(np.log(rate / (1 - rate)), rel=1e-5)
    # The combination stands out from every other pair with the same column-0 id.
    assert pair_table[1 * 3 + 2] > pair_table[[3, 4]].max() + 2.0
    # The graph gathers the same values as the table.
    c = torch.from_numpy(cats[:20])
    from jobs.common.model import encoded_ids

    ids = encoded_ids(c, model.config)
    assert torch.equal(ids[:, 2], c[:, 0] * 3 + c[:, 1])


def test_pair_encodings_stay_out_of_fold():
    cats, nums, label = toy_split()
    before = net(target_pairs=[[0, 1]]).fit_encodings(cats, nums, label, seed=3)
    flipped = label.copy()
    flipped[17] = 1.0 - flipped[17]
    after = net(target_pairs=[[0, 1]]).fit_encodings(cats, nums, flipped, seed=3)
    assert np.array_equal(after[17], before[17])


def test_a_pair_with_more_combinations_than_the_cap_shares_rows_by_modulo(tmp_path):
    from jobs.common.model import encoded_ids

    config = ModelConfig(CARDINALITIES, 2, target_encoding=True, target_pairs=[[0, 1]], pair_table_cap=5)
    assert config.encoded_sizes() == [4, 3, 5]
    c = torch.tensor([[3, 2], [0, 0], [1, 2]])
    assert encoded_ids(c, config)[:, 2].tolist() == [11 % 5, 0, 5 % 5]
    cats, nums, label = toy_split()
    model = FraudNet(config).eval()
    model.fit_encodings(cats, nums, label)
    assert model.te_table.shape == (4 + 3 + 5,)
    # The cap travels with the checkpoint: the tables load at the size they were fitted at.
    save_checkpoint(model, str(tmp_path / "m.pt"))
    loaded, _ = load_checkpoint(str(tmp_path / "m.pt"))
    assert loaded.config.pair_table_cap == 5
    assert np.array_equal(predict_proba(loaded, cats, nums), predict_proba(model, cats, nums))
    assert ModelConfig(CARDINALITIES, 2).pair_table_cap == 1 << 16


@pytest.mark.parametrize("pairs, message", [
    ([[0, 0]], "not two distinct column indices"),
    ([[0, 2]], "not two distinct column indices below 2"),
    ([[0]], "not two distinct column indices"),
])
def test_bad_pairs_are_refused(pairs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(CARDINALITIES, 2, target_encoding=True, target_pairs=pairs)
    with pytest.raises(ValueError, match="target_pairs needs target_encoding"):
        ModelConfig(CARDINALITIES, 2, target_pairs=[[0, 1]])


def test_onnx_graph_with_pair_encodings_matches_pytorch(tmp_path):
    from jobs.export import export_onnx, onnx_parity

    cats, nums, label = toy_split()
    model = net(target_pairs=[[0, 1]])
    model.fit_encodings(cats, nums, label)
    path = str(tmp_path / "model.onnx")
    export_onnx(model, len(CARDINALITIES), 2, path)
    assert onnx_parity(path, model, cats[:500], nums[:500])["max_abs_diff"] < 1e-5
