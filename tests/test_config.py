"""Configuration: file discovery, LACD_* overrides, validation that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lacd import config
from lacd.config import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_any_file(tmp_path):
    s = config.load(env={})
    assert s.queue.threshold == 50 and s.model.base == "smollm2-135m" and s.source == "embedded defaults"
    assert s.ollama.host == "http://127.0.0.1:11434"


def test_discovery_order(tmp_path):
    user = write(Path("~/.config/lacd/config.toml").expanduser(), "[queue]\nthreshold = 7\n")
    assert config.load(env={}).queue.threshold == 7
    via_env = write(tmp_path / "env.toml", "[queue]\nthreshold = 8\n")
    assert config.load(env={"LACD_CONFIG": str(via_env)}).queue.threshold == 8
    explicit = write(tmp_path / "explicit.toml", "[queue]\nthreshold = 9\n")
    assert config.load(str(explicit), env={"LACD_CONFIG": str(via_env)}).queue.threshold == 9
    assert config.load(env={}).source == str(user)


def test_env_overrides_file_and_paths_resolve_against_the_file(tmp_path):
    cfg = write(tmp_path / "c" / "config.toml", '[watch]\nlog = "logs/agent.jsonl"\n[state]\ndir = "~/st"\n[queue]\nthreshold = 3\n')
    s = config.load(str(cfg), env={"LACD_QUEUE_THRESHOLD": "12", "LACD_CURATION_DUPLICATE": "off"})
    assert s.queue.threshold == 12
    assert s.curation.duplicate is False
    assert s.watch.log == tmp_path / "c" / "logs" / "agent.jsonl"
    assert s.state.dir == Path("~/st").expanduser()


@pytest.mark.parametrize("text, env, message", [
    ("[queue]\nthreshold = 0\n", {}, "[queue] threshold: must be >= 1"),
    ('[queue]\nthreshold = "many"\n', {}, "[queue] threshold: expected an integer"),
    ("[queue]\nthreshhold = 5\n", {}, "unknown key [queue] threshhold"),
    ("[queues]\nthreshold = 5\n", {}, "unknown section [queues]"),
    ("[export]\nouttype = \"q4\"\n", {}, "[export] outtype: must be one of f16, bf16, f32, q8_0"),
    ("[queue\n", {}, "is not valid TOML"),
    ("", {"LACD_QUEUE_THRESHOLD": "x"}, "[queue] threshold: expected an integer, got 'x' (from LACD_QUEUE_THRESHOLD)"),
    ("", {"LACD_QUEUE_THRESHOLT": "5"}, "unknown environment variable LACD_QUEUE_THRESHOLT"),
    ("", {"LACD_CURATION_DUPLICATE": "maybe"}, "[curation] duplicate: expected true or false"),
])
def test_bad_values_name_the_key(tmp_path, text, env, message):
    cfg = write(tmp_path / "config.toml", text)
    with pytest.raises(ConfigError) as err:
        config.load(str(cfg), env=env)
    assert message in str(err.value)


def test_missing_explicit_file():
    with pytest.raises(ConfigError, match="does not exist; `lacd init` writes one"):
        config.load("/nonexistent/lacd.toml", env={})


def test_rendered_default_config_round_trips(tmp_path):
    text = config.render_default_config()
    for section in config.SECTIONS:
        assert f"[{section}]" in text
    cfg = write(tmp_path / "config.toml", text)
    assert config.load(str(cfg), env={}) == config.Settings(
        **{name: getattr(config.load(env={}), name) for name in config.SECTIONS}, source=str(cfg))
