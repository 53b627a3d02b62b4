"""A summary row is one typed record in memory and the same JSON on disk (summary.json, eval.json)."""

from __future__ import annotations

import math

import attrs
from hypothesis import given
from hypothesis import strategies as st

from geco_core.training.rows import ConstraintRow, Judged, SecondUnit

finite = st.floats(-1e6, 1e6, allow_nan=False)
maybe = st.none() | finite


@st.composite
def rows(draw) -> ConstraintRow:
    base = {
        "constraint": "re",
        "component": draw(st.sampled_from(["re", "re[3]"])),
        "kappa": draw(finite),
        "units": "u",
    }
    if draw(st.booleans()):  # an overview of many components
        fields = ("satisfied_fraction", "c_ma_max", "lambda_median", "heldout_satisfied_fraction")
        return ConstraintRow(**base, components=draw(st.integers(9, 99)), **{k: draw(maybe) for k in fields})
    geco = draw(st.booleans())
    status = draw(st.sampled_from(["met", "at bound", "violated", "unreachable"]))
    state = (
        {"c_ma": draw(finite), "lambda_": draw(finite), "beta": draw(finite), "reached": draw(maybe)} if geco else {}
    )
    if geco and status == "unreachable":
        state.update(best=draw(finite), best_step=draw(st.integers(0, 10**6)))
    heldout = {"heldout_value": draw(finite), "heldout_reached": draw(maybe)} if draw(st.booleans()) else {}
    judges = tuple(
        Judged(name, draw(finite), draw(maybe), draw(st.sampled_from(["met", "violated"])))
        for name in draw(st.lists(st.sampled_from(["twin", "standard", "mlp"]), unique=True))
    )
    data = {"data_reached": draw(finite), "beyond_data": draw(st.booleans())} if draw(st.booleans()) else {}
    row = ConstraintRow(**base, status=status if geco or heldout else None, **state, **heldout, judges=judges, **data)
    if draw(st.booleans()):  # a second unit: the values it converts
        values = {
            k: 2 * v for k in ("kappa", "reached", "heldout_reached", "best") if (v := getattr(row, k)) is not None
        }
        row = ConstraintRow(**{**_fields(row), "also": SecondUnit("x2", "twice", values)})
    return row


def _fields(row: ConstraintRow) -> dict:
    return attrs.asdict(row, recurse=False)


@given(rows())
def test_a_row_reads_back_as_it_was_written(row):
    assert ConstraintRow.from_json(row.to_json()) == row


@given(rows())
def test_the_json_form_leaves_out_what_is_missing_and_names_the_second_unit(row):
    written = row.to_json()
    assert None not in written.values() and "lambda_" not in written
    assert ("lambda" in written) == (row.lambda_ is not None)
    if row.also is not None:
        for key, value in row.also.values.items():
            assert written[f"{key}_x2"] == value and row.second(key) == f" ({value:.1f} twice)"
    twin = [j for j in row.judges if j.name == "twin"]
    if twin:
        assert written["twin_status"] == twin[0].status and written["judges_met"] == row.judges_met


def test_the_data_line_says_what_the_data_reach_and_whether_kappa_asks_more():
    row = ConstraintRow(constraint="cla", component="cla", kappa=0.9, units="p", data_reached=0.884, beyond_data=True)
    assert row.data_line() == (
        "cla: the held-out data themselves reach 0.884 (kappa 0.9): kappa asks the reconstructions to beat the data"
    )
    assert ConstraintRow(constraint="re", component="re", kappa=0.1, units="rmse").data_line() is None


def test_a_judges_line_counts_the_judges_that_met_it():
    judges = (Judged("twin", -0.1, 0.93, "met"), Judged("standard", 0.4, 0.61, "violated"))
    row = ConstraintRow(constraint="cla", component="cla", kappa=0.9, units="p", heldout_value=-0.01, judges=judges)
    assert row.judges_met == 1 and math.isclose(row.heldout, -0.01)
    assert row.judges_line() == (
        "cla: met under its own network, met under 1 of 2 independent judges (twin 0.930 met, standard 0.610 violated)"
    )
