"""summary.md's account of the evaluation set says what was, and what was not, chosen on it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from superdiffusion.bench.report import evaluation_text


def _bench(checkpoint: str, predictor: str, test=None, *, method: str = "supervised", stage1: str = "last"):
    cfg = {"method": method, "bcp": {"pretrain_checkpoint": stage1}, "split": {"val": 16},
           "eval": {"checkpoint": checkpoint, "predictor": predictor},
           "data": {"root": "LA", "list": None, "format": "la", "dims": 2, "size": [96, 96, None]}}
    return SimpleNamespace(specs=[SimpleNamespace(cfg=cfg)], test=test, runs=lambda: [], methods=[])


@pytest.mark.parametrize(("checkpoint", "predictor", "chosen"), [
    ("last", "first", None), ("last", "student", None), ("best", "first", "the checkpoint"),
    ("last", "auto", "the predictor"), ("best", "auto", "the checkpoint and the predictor")])
def test_evaluation_text_names_only_what_validation_chose(checkpoint, predictor, chosen):
    text = " ".join(evaluation_text(_bench(checkpoint, predictor), {}))
    assert "validation numbers" in text
    if chosen:
        assert f"the same cases chose {chosen}: optimistic" in text
    else:
        assert "nothing was chosen on these cases" in text and "optimistic compared" not in text
    test = SimpleNamespace(root="test", list=None, ids=["a", "b"])
    text = " ".join(evaluation_text(_bench(checkpoint, predictor, test), {}))
    assert "separate test set" in text and (f"to choose {chosen} only" if chosen else "to monitor only") in text


def test_evaluation_text_says_when_bcp_chose_its_stage_1_on_validation():
    """bcp.pretrain_checkpoint: best picks stage 1's step on the validation cases: the report says so."""
    text = " ".join(evaluation_text(_bench("last", "first", method="bcp", stage1="best"), {}))
    assert "the same cases chose BCP's stage-1 checkpoint: optimistic" in text
    text = " ".join(evaluation_text(_bench("last", "first", method="supervised", stage1="best"), {}))
    assert "nothing was chosen on these cases" in text
