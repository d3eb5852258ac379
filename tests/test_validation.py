import numpy as np
import pytest
import torch

from fbn_fast import face_behavior_loss, validate_labels, validate_relatedness
from fbn_fast import relatedness as R


def good(b=4):
    return dict(
        expr=torch.tensor([0, 6, 99, 3]),  # row 2 is unlabelled: its value does not matter
        expr_mask=torch.tensor([True, True, False, True]),
        au=torch.tensor(np.where(np.arange(17) % 2, 1.0, 0.0)).repeat(b, 1),
        au_mask=torch.ones(b, 17, dtype=torch.bool),
        va=torch.tensor([[0.5, -1.0], [1.0, 0.0], [np.nan, 9.0], [0.0, 0.0]]),
        va_mask=torch.tensor([True, True, False, True]),
    )


def test_valid_labels_pass():
    validate_labels(**good())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["expr"].__setitem__(1, 7), r"expr: row 1 has value 7, outside \[0, 7\)"),
        (lambda d: d["expr"].__setitem__(3, -1), r"expr: row 3 has value -1"),
        (lambda d: d["au"].__setitem__((2, 5), 0.5), r"au: row 2, column 5 has value 0.5, expected 0 or 1"),
        (lambda d: d["va"].__setitem__((1, 1), 1.5), r"va: row 1, column 1 has value 1.5, outside \[-1, 1\]"),
        (lambda d: d["va"].__setitem__((0, 0), float("nan")), r"va: row 0, column 0 has value nan"),
    ],
)
def test_bad_labels_named(edit, message):
    d = good()
    edit(d)
    with pytest.raises(ValueError, match=message):
        validate_labels(**d)


def test_bad_shapes_named():
    d = good()
    d["au"] = d["au"][:, :16]
    with pytest.raises(ValueError, match=r"au: shape \(4, 16\), expected \(4, 17\)"):
        validate_labels(**d)
    d = good()
    d["va_mask"] = d["va_mask"][:3]
    with pytest.raises(ValueError, match=r"va_mask: shape \(3,\), expected \(4,\)"):
        validate_labels(**d)
    with pytest.raises(ValueError, match="given together"):
        validate_labels(expr=torch.zeros(3, dtype=torch.long))


def test_relatedness_validation():
    with pytest.raises(ValueError, match=r"relatedness: shape \(7, 16\), expected \(7, 17\)"):
        validate_relatedness(np.zeros((7, 16)), 7, 17)
    bad = np.zeros((7, 17))
    bad[4, 8] = -0.1
    with pytest.raises(ValueError, match=r"row 4, column 8 has value -0.1"):
        validate_relatedness(bad)


def test_loss_validate_flag():
    d = good()
    d["au"][3, 0] = 2.0
    z_e, z_a, v = torch.zeros(4, 7), torch.zeros(4, 17), torch.zeros(4, 2)
    face_behavior_loss(z_e, z_a, v, R.prior().tensor(), **d, backend="torch")  # off: no check, no sync
    with pytest.raises(ValueError, match=r"au: row 3, column 0 has value 2.0"):
        face_behavior_loss(z_e, z_a, v, R.prior().tensor(), **d, backend="torch", validate=True)
    with pytest.raises(ValueError, match=r"relatedness: shape \(7, 16\), expected \(7, 17\) from z_e and z_a"):
        face_behavior_loss(z_e, z_a, v, torch.zeros(7, 16), backend="torch")
