"""The agent config: defaults, and errors that name the bad key or file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from nixfarm.builder import config
from nixfarm.builder.config import MAX_CONFIG_BYTES, AgentConfig, load_config, parse_config
from nixfarm.common.errors import ConfigError, UsageError

FULL = {
    "store_dir": "/srv/nix/store",
    "state_dir": "/srv/nixfarm",
    "nix_conf_dir": "/srv/nix-conf",
    "build_users_group": "builders",
    "nix_daemon_unit": "nix-daemon-2.service",
    "nix_bin_dir": "/opt/nix/bin",
    "gateway_log": "/var/log/nixfarm-gateway.log",
    "network_interfaces": ["eth0", "wg0"],
    "stream_max_seconds": 60,
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NIXFARM_CONFIG", raising=False)
    monkeypatch.delenv("NIX_CONF_DIR", raising=False)


def write(path: Path, text: str | bytes) -> str:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


# parse_config


def test_empty_object_gives_defaults() -> None:
    cfg = parse_config({}, "agent.json")
    assert cfg == AgentConfig()
    assert cfg.store_dir == "/nix/store"
    assert cfg.state_dir == "/var/lib/nixfarm"
    assert cfg.nix_conf_dir == "/etc/nix"
    assert cfg.build_users_group == "nixbld"
    assert cfg.nix_daemon_unit == "nix-daemon.service"
    assert cfg.nix_bin_dir == ""
    assert cfg.gateway_log == ""
    assert cfg.network_interfaces == ()
    assert cfg.stream_max_seconds == 7 * 24 * 3600


def test_nix_conf_dir_default_follows_nix_conf_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIX_CONF_DIR", "/etc/nix-test")
    assert parse_config({}, "agent.json").nix_conf_dir == "/etc/nix-test"


def test_every_key_is_accepted() -> None:
    cfg = parse_config(FULL, "agent.json")
    assert cfg.store_dir == "/srv/nix/store"
    assert cfg.state_dir == "/srv/nixfarm"
    assert cfg.nix_conf_dir == "/srv/nix-conf"
    assert cfg.build_users_group == "builders"
    assert cfg.nix_daemon_unit == "nix-daemon-2.service"
    assert cfg.nix_bin_dir == "/opt/nix/bin"
    assert cfg.gateway_log == "/var/log/nixfarm-gateway.log"
    assert cfg.network_interfaces == ("eth0", "wg0")  # a tuple: the config is frozen
    assert cfg.stream_max_seconds == 60


def test_stream_max_seconds_accepts_a_float() -> None:
    assert parse_config({"stream_max_seconds": 0.5}, "agent.json").stream_max_seconds == 0.5


def test_config_error_is_a_usage_error_with_exit_code_2() -> None:
    with pytest.raises(UsageError) as excinfo:
        parse_config({"nope": 1}, "agent.json")
    assert isinstance(excinfo.value, ConfigError)
    assert excinfo.value.exit_code == 2


def test_unknown_key_is_named_with_the_known_keys() -> None:
    with pytest.raises(ConfigError, match=r"^agent\.json: unknown key 'store_path'") as excinfo:
        parse_config({"store_dir": "/nix/store", "store_path": "/nix/store"}, "agent.json")
    message = str(excinfo.value)
    for key in FULL:
        assert key in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("store_dir", 1),
        ("state_dir", None),
        ("nix_conf_dir", ["/etc/nix"]),
        ("build_users_group", {"name": "nixbld"}),
        ("nix_daemon_unit", 1.5),
        ("nix_bin_dir", False),
        ("gateway_log", True),
        ("network_interfaces", "eth0"),
        ("network_interfaces", {"eth0": True}),
        ("stream_max_seconds", "60"),
        ("stream_max_seconds", None),
        ("stream_max_seconds", [60]),
    ],
)
def test_wrong_type_names_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^agent\.json: key '{key}' must be a "):
        parse_config({key: value}, "agent.json")


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_a_number(value: bool) -> None:
    """bool is an int subclass in Python; JSON true must still be refused."""
    message = r"key 'stream_max_seconds' must be a number, got (True|False)"
    with pytest.raises(ConfigError, match=message):
        parse_config({"stream_max_seconds": value}, "agent.json")


@pytest.mark.parametrize("items", [["eth0", 1], [None], [["eth0"]], ["eth0", True]])
def test_network_interfaces_items_must_be_strings(items: list[Any]) -> None:
    with pytest.raises(ConfigError, match=r"key 'network_interfaces' must be a list of strings"):
        parse_config({"network_interfaces": items}, "agent.json")


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5])
def test_stream_max_seconds_must_be_positive(value: float) -> None:
    with pytest.raises(ConfigError, match=r"key 'stream_max_seconds' must be a positive"):
        parse_config({"stream_max_seconds": value}, "agent.json")


def test_stream_max_seconds_nan_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.json", '{"stream_max_seconds": NaN}')
    with pytest.raises(ConfigError, match=r"stream_max_seconds"):
        load_config(path)


@pytest.mark.parametrize("data", [[], ["store_dir"], "store_dir", 1, None, True])
def test_top_level_must_be_an_object(data: Any) -> None:
    with pytest.raises(ConfigError, match=r"^agent\.json: the top level must be a JSON object"):
        parse_config(data, "agent.json")


# load_config


def test_load_reads_the_given_file(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.json", json.dumps(FULL))
    assert load_config(path) == parse_config(FULL, "agent.json")


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match=rf"^{re.escape(missing)}: config file not found"):
        load_config(missing)


def test_missing_default_file_gives_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent" / "agent.json"))
    assert load_config() == AgentConfig()


def test_default_file_is_read_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "agent.json", '{"state_dir": "/srv/state"}')
    monkeypatch.setattr(config, "DEFAULT_PATH", path)
    assert load_config().state_dir == "/srv/state"


def test_errors_in_the_file_name_the_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.json", '{"stat_dir": "/srv"}')
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: unknown key 'stat_dir'"):
        load_config(path)


@pytest.mark.parametrize(
    "text",
    ['{"store_dir": "/nix/store",}', "{store_dir: 1}", "", "{", "// comment\n{}", "{} {}"],
)
def test_invalid_json_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "agent.json", text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: not valid JSON"):
        load_config(path)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.json", b'{"store_dir": "\xff\xfe"}')
    with pytest.raises(ConfigError, match=r"not valid JSON"):
        load_config(path)


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    # Valid JSON, so only the size can be the reason.
    path = write(tmp_path / "agent.json", "{}" + " " * (MAX_CONFIG_BYTES - 1))
    with pytest.raises(ConfigError, match=rf"larger than {MAX_CONFIG_BYTES} bytes"):
        load_config(path)


def test_file_of_exactly_the_maximum_size_is_read(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.json", "{}" + " " * (MAX_CONFIG_BYTES - 2))
    assert load_config(path) == AgentConfig()


def test_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config"):
        load_config(str(tmp_path))  # a directory


def test_nixfarm_config_env_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "env.json", '{"build_users_group": "from-env"}')
    monkeypatch.setenv("NIXFARM_CONFIG", path)
    monkeypatch.setattr(config, "DEFAULT_PATH", write(tmp_path / "default.json", "{}"))
    assert load_config().build_users_group == "from-env"


def test_nixfarm_config_env_naming_a_missing_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIXFARM_CONFIG", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match=r"missing\.json: config file not found"):
        load_config()


def test_explicit_path_beats_nixfarm_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_path = write(tmp_path / "env.json", '{"build_users_group": "env"}')
    monkeypatch.setenv("NIXFARM_CONFIG", env_path)
    path = write(tmp_path / "arg.json", '{"build_users_group": "arg"}')
    assert load_config(path).build_users_group == "arg"
