"""The promotion gate: the primary metric with its tolerance, the guards with their limits, the messages."""

from __future__ import annotations

import json

import pytest

from lacd.pipeline.gate import Decision, GateError, decide

IN_USE = {"exact_call_accuracy": 0.80, "tool_name_accuracy": 0.9, "heldout_loss": 1.20,
          "fabricated_output_rate": 0.05, "clean_stop_rate": 0.95, "n_cases": 20}


def candidate(**changes) -> dict:
    return {**IN_USE, **changes}


def test_an_equal_or_better_candidate_is_promoted_with_every_check_listed():
    d = decide(candidate(exact_call_accuracy=0.85, heldout_loss=1.1), IN_USE)
    assert d.promote
    assert d.reasons[0] == "exact-call accuracy 0.85 >= 0.80 - 0.02"
    assert "held-out loss 1.100 <= 1.200 + 5%" in d.reasons
    assert len(d.reasons) == 4 and d.summary().startswith("promoted: ")


def test_a_worse_primary_metric_is_rejected_with_the_numbers():
    d = decide(candidate(exact_call_accuracy=0.62), IN_USE)
    assert not d.promote
    assert d.reasons[0] == "exact-call accuracy 0.62 < 0.80 - 0.02"
    assert d.summary() == "rejected by gate: exact-call accuracy 0.62 < 0.80 - 0.02"


def test_the_tolerance_allows_a_small_drop_and_no_more():
    assert decide(candidate(exact_call_accuracy=0.78), IN_USE).promote  # exactly at the tolerance
    assert not decide(candidate(exact_call_accuracy=0.77), IN_USE).promote
    assert decide(candidate(exact_call_accuracy=0.70), IN_USE, tolerance=0.1).promote


@pytest.mark.parametrize("metric, value, message", [
    ("heldout_loss", 1.27, "held-out loss 1.270 > 1.200 + 5%"),  # relative limit: 1.26
    ("fabricated_output_rate", 0.08, "fabricated-output rate 0.08 > 0.05 + 0.02"),
    ("clean_stop_rate", 0.89, "clean-stop rate 0.89 < 0.95 - 0.05"),
])
def test_each_guard_rejects_a_regression_beyond_its_limit(metric, value, message):
    d = decide(candidate(exact_call_accuracy=0.95, **{metric: value}), IN_USE)
    assert not d.promote and d.reasons[0] == message


def test_guards_within_their_limits_pass():
    d = decide(candidate(heldout_loss=1.25, fabricated_output_rate=0.07, clean_stop_rate=0.90), IN_USE)
    assert d.promote, d.reasons


def test_primary_metric_and_guards_are_configurable():
    better_names_worse_calls = candidate(exact_call_accuracy=0.5, tool_name_accuracy=0.95)
    assert decide(better_names_worse_calls, IN_USE, primary="tool_name_accuracy").promote
    noisy = candidate(heldout_loss=2.0)
    assert not decide(noisy, IN_USE).promote
    assert decide(noisy, IN_USE, guards={"clean_stop_rate": 0.05}).promote  # the loss guard switched off
    with pytest.raises(GateError, match="unknown gate metric"):
        decide(noisy, IN_USE, primary="bleu")
    with pytest.raises(GateError):
        decide(noisy, IN_USE, tolerance=-1)


def test_a_metric_the_model_in_use_lacks_is_skipped_and_said():
    served_only = {**IN_USE, "heldout_loss": None}  # only its Ollama tag was left to measure
    d = decide(candidate(heldout_loss=9.0), served_only)
    assert d.promote
    assert "held-out loss 9.000; the model in use has none, so it is not compared" in d.reasons


def test_an_unmeasured_candidate_is_rejected_unless_configured_otherwise():
    nothing = {"exact_call_accuracy": None, "heldout_loss": None, "fabricated_output_rate": None,
               "clean_stop_rate": None, "n_cases": 0}
    d = decide(nothing, IN_USE)
    assert not d.promote and "could not be measured" in d.reasons[0]
    assert decide(nothing, IN_USE, if_unmeasured="promote").promote


def test_decision_round_trips_through_json():
    d = decide(candidate(exact_call_accuracy=0.1), IN_USE)
    again = Decision.from_dict(json.loads(json.dumps(d.to_dict())))
    assert again == d and again.to_dict()["summary"] == d.summary()
