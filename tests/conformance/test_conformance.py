"""The ONNX backend node tests through edgecc, as a tier (marker `conformance`, outside the default
run; tests/conformance/run.py says how the cases run). A case that passed in expected.json must
still pass, and no case may come out wrong, as an error or as a crash: a model edgecc cannot
compile must be refused in one line naming the op. The few cases expected.json records as wrong or
error are known defects: they show as xfail with their detail until fixed, and any other case
that comes out that way fails."""

import json

import pytest

from tests.conformance import run

pytestmark = pytest.mark.conformance

EXPECTED = json.loads(run.EXPECTED.read_text())["cases"]


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return run.run_cases(run.node_cases(), jobs=2, log=lambda _message: None)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_case(results, case):
    got = results.get(case)
    assert got is not None, f"{case} is no longer an onnx node case: regenerate with run.py --update"
    if got["edgecc"] in run.BAD and got["edgecc"] == EXPECTED[case]["edgecc"]:
        pytest.xfail(f"known defect, edgecc {got['edgecc']}: {got['detail']}")
    assert got["edgecc"] not in run.BAD, f"edgecc: {got['edgecc']}: {got['detail']}"
    if EXPECTED[case]["edgecc"] == "pass":
        assert got["edgecc"] == "pass", f"passed before, now {got['edgecc']}: {got['detail']}"


def test_every_case_has_an_expectation(results):
    assert not sorted(set(results) - set(EXPECTED)), "new onnx node cases: regenerate with run.py --update"
