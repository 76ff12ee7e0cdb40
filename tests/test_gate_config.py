"""The [evaluate] and [gate] config sections: defaults, overrides, validation that names the key."""

from __future__ import annotations

import pytest

from lacd import config
from lacd.config import ConfigError
from lacd.pipeline.gate import DEFAULT_GUARDS, DEFAULT_PRIMARY, DEFAULT_TOLERANCE
from lacd.pipeline.stages import eval_tools
from lacd.protocol import TOOLS, TOOLS_V2


def test_defaults_match_the_gate_and_the_agents_tools():
    s = config.load(env={})
    assert (s.gate.primary, s.gate.tolerance, s.gate.if_unmeasured) == (DEFAULT_PRIMARY, DEFAULT_TOLERANCE, "reject")
    assert {"heldout_loss": s.gate.max_loss_increase, "fabricated_output_rate": s.gate.max_fabricated_increase,
            "clean_stop_rate": s.gate.max_clean_stop_drop} == dict(DEFAULT_GUARDS)
    assert eval_tools(s.evaluate.tools) == TOOLS
    assert (s.evaluate.max_cases, s.evaluate.max_new_tokens) == (50, 128)


def test_tools_v2_and_explicit_lists():
    assert eval_tools("v2") == TOOLS_V2
    assert eval_tools("read_file(1), list_directory(1-2),get_project_context(0)") == {
        "read_file": (1, 1), "list_directory": (1, 2), "get_project_context": (0, 0)}
    s = config.load(env={"LACD_EVALUATE_TOOLS": "git_diff(0-1)", "LACD_GATE_IF_UNMEASURED": "promote",
                         "LACD_GATE_PRIMARY": "tool_name_accuracy", "LACD_EVALUATE_MAX_CASES": "3"})
    assert eval_tools(s.evaluate.tools) == {"git_diff": (0, 1)}
    assert (s.gate.if_unmeasured, s.gate.primary, s.evaluate.max_cases) == ("promote", "tool_name_accuracy", 3)


@pytest.mark.parametrize("env, message", [
    ({"LACD_EVALUATE_TOOLS": "read_file(x)"}, "[evaluate] tools: must be v1, v2 or a list like"),
    ({"LACD_EVALUATE_TOOLS": "read_file(2-1)"}, "MIN is above MAX"),
    ({"LACD_EVALUATE_MAX_CASES": "0"}, "[evaluate] max_cases: must be >= 1"),
    ({"LACD_GATE_PRIMARY": "bleu"}, "[gate] primary: must be one of exact_call_accuracy"),
    ({"LACD_GATE_IF_UNMEASURED": "maybe"}, "[gate] if_unmeasured: must be one of reject, promote"),
    ({"LACD_GATE_TOLERANCE": "-0.1"}, "[gate] tolerance: must be between 0 and 1"),
])
def test_bad_values_name_the_key(env, message):
    with pytest.raises(ConfigError) as err:
        config.load(env=env)
    assert message in str(err.value)


def test_lacd_init_documents_both_sections(tmp_path):
    text = config.render_default_config()
    assert "[evaluate]\n# held-out prompts each model answers" in text
    assert "[gate]" in text and 'if_unmeasured = "reject"' in text and 'tools = "v1"' in text
    (tmp_path / "c.toml").write_text(text)
    assert config.load(str(tmp_path / "c.toml"), env={}).gate == config.load(env={}).gate
