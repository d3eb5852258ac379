"""The loss module's state: float32 tables under dtype casts, the persistence choice, old state dicts; tables
subset, reordered and renamed by label names; label checks sized by the table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fbn_fast import FaceBehaviorLoss, validate_labels
from fbn_fast import relatedness as R
from fbn_fast.labels import AUS, EXPRESSIONS


def _with_means() -> R.Relatedness:
    prior = R.prior()
    mu = np.linspace(-0.9, 0.9, 2 * len(prior.classes)).reshape(-1, 2)
    return R.Relatedness(prior.matrix, prior.classes, prior.aus, va_means=mu)


def _odd_table() -> torch.Tensor:
    # Values bf16 and fp16 cannot hold: a cast of the table would change them.
    return torch.full((7, 17), 0.123456789, dtype=torch.float32)


@pytest.mark.parametrize("cast", [
    lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(), lambda m: m.bfloat16(),
    lambda m: m.to("cpu", torch.float16), lambda m: m.type(torch.float16),
])
def test_tables_stay_float32_under_module_casts(cast):
    table, mu = _odd_table(), torch.full((7, 2), 0.1234567, dtype=torch.float32)
    model = nn.Sequential(nn.Linear(3, 3), FaceBehaviorLoss(table, va_means=mu))  # the loss as a submodule
    cast(model)
    loss = model[1]
    assert model[0].weight.dtype != torch.float32  # the cast did apply to the weights
    assert loss.relatedness.dtype == torch.float32 and loss.va_means.dtype == torch.float32
    assert torch.equal(loss.relatedness, table) and torch.equal(loss.va_means, mu)  # exact, not a round trip


def test_tables_follow_device_moves_and_stay_out_of_the_state_dict_by_default():
    loss = FaceBehaviorLoss(_with_means())
    loss.to("meta")  # a real move (the meta device needs no GPU)
    assert {t.device.type for t in (loss.relatedness, loss.va_means, loss.term_weights)} == {"meta"}
    assert loss.relatedness.dtype == torch.float32 and loss.term_weights.dtype == torch.float64
    assert list(loss.state_dict()) == []
    # the tables and the float64 weights the kernels read: buffers that move with the module, none saved
    assert {name for name, _ in loss.named_buffers()} == {"relatedness", "va_means", "term_weights"}


def test_default_ignores_tables_of_an_old_state_dict():
    mine = FaceBehaviorLoss(_odd_table())
    old = {"relatedness": torch.zeros(7, 17), "va_means": torch.zeros(7, 2)}  # saved when tables were buffers
    result = mine.load_state_dict(old)  # strict: no unexpected keys either
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(mine.relatedness, _odd_table()) and mine.va_means is None
    # Nested, as in a model checkpoint that holds the loss.
    model = nn.ModuleDict({"head": nn.Linear(2, 2), "loss": FaceBehaviorLoss(_odd_table())})
    state = {**{f"head.{k}": v for k, v in model["head"].state_dict().items()},
             "loss.relatedness": torch.zeros(7, 17)}
    model.load_state_dict(state)
    assert torch.equal(model["loss"].relatedness, _odd_table())


def test_persistent_tables_are_saved_and_adopted():
    saved = FaceBehaviorLoss(_with_means(), persistent=True).state_dict()
    assert set(saved) == {"relatedness", "va_means"}
    # A module without VA means loads a state dict that has them, and adopts them as float32.
    bare = FaceBehaviorLoss(_odd_table(), persistent=True)
    bare.half()
    bare.load_state_dict({k: v.double() for k, v in saved.items()})
    assert bare.va_means is not None and bare.va_means.dtype == torch.float32
    assert torch.equal(bare.relatedness, saved["relatedness"]) and torch.equal(bare.va_means, saved["va_means"])
    # A state dict without VA means keeps the module's: not a missing key.
    keep = FaceBehaviorLoss(_with_means(), persistent=True)
    assert keep.load_state_dict({"relatedness": torch.zeros(7, 17)}).missing_keys == []
    assert torch.equal(keep.va_means, saved["va_means"]) and float(keep.relatedness.abs().sum()) == 0.0
    with pytest.raises(RuntimeError, match=r"size mismatch for relatedness: the state dict has shape \(6, 17\)"):
        keep.load_state_dict({"relatedness": torch.zeros(6, 17)})


def test_loss_under_half_module_matches_float32_module():
    rel = _with_means()
    g = torch.Generator().manual_seed(0)
    z_e, z_a, v = torch.randn(4, 7, generator=g), torch.randn(4, 17, generator=g), torch.rand(4, 2, generator=g)
    expr, expr_mask = torch.tensor([0, 3, 6, 2]), torch.ones(4, dtype=torch.bool)
    ref = FaceBehaviorLoss(rel, backend="torch")(z_e, z_a, v, expr=expr, expr_mask=expr_mask)
    half = FaceBehaviorLoss(rel, backend="torch").to(torch.bfloat16)(z_e, z_a, v, expr=expr, expr_mask=expr_mask)
    assert torch.equal(ref.total, half.total)  # same float32 tables, same inputs: the same computation


def test_plain_table_is_checked_against_the_names_given_with_it():
    with pytest.raises(ValueError, match=r"relatedness: shape \(7, 17\), expected \(8, \*\)"):
        FaceBehaviorLoss(np.full((7, 17), 0.5), classes=tuple(f"c{i}" for i in range(8)))
    with pytest.raises(ValueError, match=r"relatedness: shape \(7, 17\), expected \(\*, 12\)"):
        FaceBehaviorLoss(torch.full((7, 17), 0.5), aus=tuple(f"a{i}" for i in range(12)))
    FaceBehaviorLoss(np.full((7, 17), 0.5), classes=EXPRESSIONS, aus=AUS)


def test_select_subsets_and_reorders_by_name():
    full = _with_means()
    full = R.Relatedness(full.matrix, full.classes, full.aus, full.va_means, "data",
                         {"annotated_counts": np.arange(7 * 17).reshape(7, 17).tolist(), "alpha": 1.0})
    classes, aus = ["Surprise", "Neutral", "Anger"], ["AU12", "AU1", "AU26"]
    sub = full.select(classes=classes, aus=aus)
    assert sub.classes == tuple(classes) and sub.aus == tuple(aus)
    rows, cols = [full.classes.index(c) for c in classes], [full.aus.index(a) for a in aus]
    for i, r in enumerate(rows):
        assert sub.va_means[i].tolist() == full.va_means[r].tolist()
        for j, c in enumerate(cols):
            assert sub.matrix[i, j] == full.matrix[r, c]
            assert sub.meta["annotated_counts"][i][j] == r * 17 + c
    assert sub.meta["alpha"] == 1.0 and sub.source == "data"
    assert full.select(aus=aus).classes == full.classes  # None keeps an axis whole
    FaceBehaviorLoss(sub, classes=tuple(classes), aus=tuple(aus))  # usable as a table for that label space


def test_select_names_unknown_and_repeated_labels():
    prior = R.prior()
    with pytest.raises(ValueError, match=r"unknown class name\(s\) \['Contempt'\]; this table has \['Neutral'"):
        prior.select(classes=["Anger", "Contempt"])
    with pytest.raises(ValueError, match=r"unknown AU name\(s\) \['AU3'\]"):
        prior.select(aus=["AU1", "AU3"])
    with pytest.raises(ValueError, match=r"AU name\(s\) \['AU1'\] given more than once"):
        prior.select(aus=["AU1", "AU1"])
    with pytest.raises(TypeError, match="sequence of names"):
        prior.select(classes="Anger")


def test_rename_maps_names_and_refuses_unknown_or_clashing():
    happy = R.prior().rename(classes={"Happiness": "Happy"}, aus={"AU1": "inner_brow_raiser"})
    assert happy.classes[4] == "Happy" and happy.aus[0] == "inner_brow_raiser"
    assert np.array_equal(happy.matrix, R.prior().matrix)
    with pytest.raises(ValueError, match=r"cannot rename unknown class name\(s\) \['Joy'\]"):
        R.prior().rename(classes={"Joy": "Happy"})
    with pytest.raises(ValueError, match=r"renaming gives the class name\(s\) \['Anger'\] to more than one"):
        R.prior().rename(classes={"Fear": "Anger"})


def test_validate_labels_takes_its_sizes_from_the_table():
    table = R.prior().select(classes=["Neutral", "Anger", "Fear"], aus=["AU1", "AU2", "AU4", "AU6"])
    expr, expr_mask = torch.tensor([0, 2]), torch.ones(2, dtype=torch.bool)
    au, au_mask = torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool)
    validate_labels(expr, expr_mask, au, au_mask, relatedness=table)
    validate_labels(expr, expr_mask, au, au_mask, relatedness=table.matrix)  # a plain array too
    with pytest.raises(ValueError, match=r"expr: row 1 has value 3, outside \[0, 3\)"):
        validate_labels(torch.tensor([0, 3]), expr_mask, au, au_mask, relatedness=table)
    with pytest.raises(ValueError, match=r"au: shape \(2, 17\), expected \(2, 4\)"):
        validate_labels(expr, expr_mask, torch.zeros(2, 17), torch.ones(2, 17, dtype=torch.bool),
                        relatedness=table)
    with pytest.raises(ValueError, match=r"relatedness: shape \(3, 4\), expected \(7, \*\)"):
        validate_labels(expr, expr_mask, num_classes=7, relatedness=table)
