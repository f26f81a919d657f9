"""Reading nix.conf the way Nix does: sizes, includes, `extra-` keys and defaults."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from nixfarm.common import nixconf
from nixfarm.common.errors import UsageError
from nixfarm.common.nixconf import default_system, load_nix_settings, parse_size, read_settings

DEFAULT_FEATURES = ("nixos-test", "benchmark", "big-parallel")


def write_conf(directory: Path, text: str, name: str = "nix.conf") -> str:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.fixture
def no_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make /dev/kvm look inaccessible, whatever this machine has."""
    real_access = os.access

    def access(path: str, mode: int) -> bool:
        return False if path == "/dev/kvm" else real_access(path, mode)

    monkeypatch.setattr(nixconf.os, "access", access)


# parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1073741824", 1073741824),
        ("18446744073709551615", (1 << 64) - 1),
        ("1K", 1 << 10),
        ("512M", 512 << 20),
        ("10G", 10 << 30),
        ("2T", 2 << 40),
        ("1k", 1 << 10),
        ("512m", 512 << 20),
        ("10g", 10 << 30),
        ("2t", 2 << 40),
        (" 10G ", 10 << 30),
        ("10 G", 10 << 30),
        ("\t5M\n", 5 << 20),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", " ", "G", "-1", "+1", "1.5G", "10GB", "10KiB", "1e9", "0x10", "ten", "10P", "1 0"]
)
def test_parse_size_refuses_bad_input_naming_it(text: str) -> None:
    with pytest.raises(UsageError, match=rf"not a size: {re.escape(repr(text))}"):
        parse_size(text)


# read_settings


def test_read_settings_strips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = write_conf(
        tmp_path,
        "# a comment line\n"
        "max-jobs = 4 # trailing comment\n"
        "\n"
        "   \n"
        "cores=2\n"
        "  sandbox   =   false  \n"
        "#min-free = 1G\n"
        "a line without an equals sign\n",
    )
    assert read_settings(path) == {"max-jobs": "4", "cores": "2", "sandbox": "false"}


def test_read_settings_empty_value(tmp_path: Path) -> None:
    path = write_conf(tmp_path, "substituters =\n")
    assert read_settings(path) == {"substituters": ""}


def test_read_settings_later_value_wins(tmp_path: Path) -> None:
    path = write_conf(tmp_path, "max-jobs = 1\nmax-jobs = 3\n")
    assert read_settings(path) == {"max-jobs": "3"}


def test_read_settings_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_settings(str(tmp_path / "nix.conf")) == {}


@pytest.mark.parametrize("directive", ["include", "!include"])
def test_include_is_relative_to_the_including_file(tmp_path: Path, directive: str) -> None:
    main = write_conf(tmp_path, f"max-jobs = 2\n{directive} sub/extra.conf\n")
    # sub/extra.conf names nested.conf: that is sub/nested.conf, not ./nested.conf.
    write_conf(tmp_path, f"cores = 4\n{directive} nested.conf\n", "sub/extra.conf")
    write_conf(tmp_path, "min-free = 1G\n", "sub/nested.conf")
    write_conf(tmp_path, "min-free = 999\n", "nested.conf")
    assert read_settings(main) == {"max-jobs": "2", "cores": "4", "min-free": "1G"}


def test_include_absolute_path(tmp_path: Path) -> None:
    other = write_conf(tmp_path / "elsewhere", "cores = 8\n")
    main = write_conf(tmp_path / "etc", f"include {other}\n")
    assert read_settings(main) == {"cores": "8"}


@pytest.mark.parametrize("directive", ["include", "!include"])
def test_missing_include_is_ignored(tmp_path: Path, directive: str) -> None:
    main = write_conf(tmp_path, f"{directive} does-not-exist.conf\nmax-jobs = 3\n")
    assert read_settings(main) == {"max-jobs": "3"}


def test_include_order_later_settings_win(tmp_path: Path) -> None:
    write_conf(tmp_path, "max-jobs = 5\ncores = 5\n", "inc.conf")
    main = write_conf(tmp_path, "max-jobs = 1\ninclude inc.conf\ncores = 2\n")
    assert read_settings(main) == {"max-jobs": "5", "cores": "2"}


def test_include_cycle_terminates(tmp_path: Path) -> None:
    a = write_conf(tmp_path, "max-jobs = 7\ninclude b.conf\n", "a.conf")
    write_conf(tmp_path, "cores = 3\ninclude a.conf\n", "b.conf")
    assert read_settings(a) == {"max-jobs": "7", "cores": "3"}


def test_extra_keys_are_appended_and_kept_apart(tmp_path: Path) -> None:
    path = write_conf(
        tmp_path,
        "system-features = kvm\n"
        "extra-system-features = big-parallel\n"
        "extra-system-features = benchmark nixos-test\n",
    )
    assert read_settings(path) == {
        "system-features": "kvm",
        "extra-system-features": "big-parallel benchmark nixos-test",
    }


def test_extra_keys_in_an_include_are_appended(tmp_path: Path) -> None:
    write_conf(tmp_path, "extra-system-features = kvm\n", "inc.conf")
    main = write_conf(tmp_path, "extra-system-features = big-parallel\ninclude inc.conf\n")
    assert read_settings(main)["extra-system-features"] == "big-parallel kvm"


# load_nix_settings


def test_defaults_without_nix_conf(tmp_path: Path, no_kvm: None) -> None:
    s = load_nix_settings(str(tmp_path))
    assert s.max_jobs == 1
    assert s.cores == 0
    assert s.min_free_bytes == 0
    assert s.max_free_bytes is None
    extra = ("i686-linux",) if default_system() == "x86_64-linux" else ()
    assert s.systems == (default_system(), *extra)
    assert s.features == DEFAULT_FEATURES


def test_default_features_include_kvm_when_dev_kvm_is_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nixconf.os, "access", lambda path, mode: path == "/dev/kvm")
    assert load_nix_settings(str(tmp_path)).features == (*DEFAULT_FEATURES, "kvm")


def test_reads_nix_conf_in_the_given_dir(tmp_path: Path) -> None:
    write_conf(tmp_path, "max-jobs = 8\ncores = 2\n")
    s = load_nix_settings(str(tmp_path))
    assert (s.max_jobs, s.cores) == (8, 2)


def test_max_jobs_auto_is_the_cpu_count(tmp_path: Path) -> None:
    write_conf(tmp_path, "max-jobs = auto\n")
    assert load_nix_settings(str(tmp_path)).max_jobs == (os.cpu_count() or 1)


def test_max_jobs_zero_is_kept(tmp_path: Path) -> None:
    write_conf(tmp_path, "max-jobs = 0\n")
    assert load_nix_settings(str(tmp_path)).max_jobs == 0


def test_unparsable_numbers_fall_back_to_defaults(tmp_path: Path) -> None:
    write_conf(tmp_path, "max-jobs = lots\ncores = some\n")
    s = load_nix_settings(str(tmp_path))
    assert (s.max_jobs, s.cores) == (1, 0)


def test_sizes_with_suffixes(tmp_path: Path) -> None:
    write_conf(tmp_path, "min-free = 512M\nmax-free = 10G\n")
    s = load_nix_settings(str(tmp_path))
    assert s.min_free_bytes == 512 << 20
    assert s.max_free_bytes == 10 << 30


def test_sizes_in_plain_bytes(tmp_path: Path) -> None:
    write_conf(tmp_path, "min-free = 1073741824\nmax-free = 4294967296\n")
    s = load_nix_settings(str(tmp_path))
    assert (s.min_free_bytes, s.max_free_bytes) == (1 << 30, 1 << 32)


def test_max_free_of_uint64_max_is_unlimited(tmp_path: Path) -> None:
    write_conf(tmp_path, "max-free = 18446744073709551615\n")
    assert load_nix_settings(str(tmp_path)).max_free_bytes is None


def test_bad_size_falls_back_to_defaults(tmp_path: Path) -> None:
    write_conf(tmp_path, "min-free = lots\nmax-free = 1.5G\n")
    s = load_nix_settings(str(tmp_path))
    assert (s.min_free_bytes, s.max_free_bytes) == (0, None)


def test_system_setting_replaces_the_default(tmp_path: Path) -> None:
    write_conf(tmp_path, "system = aarch64-linux\n")
    assert load_nix_settings(str(tmp_path)).systems == ("aarch64-linux",)


def test_extra_platforms_are_added(tmp_path: Path) -> None:
    write_conf(tmp_path, "system = x86_64-linux\nextra-platforms = i686-linux aarch64-linux\n")
    systems = load_nix_settings(str(tmp_path)).systems
    assert systems == ("x86_64-linux", "i686-linux", "aarch64-linux")


def test_extra_platforms_naming_the_system_is_not_repeated(tmp_path: Path) -> None:
    write_conf(tmp_path, "system = x86_64-linux\nextra-platforms = x86_64-linux i686-linux\n")
    assert load_nix_settings(str(tmp_path)).systems == ("x86_64-linux", "i686-linux")


def test_system_features_replace_the_defaults(tmp_path: Path) -> None:
    write_conf(tmp_path, "system-features = kvm gccarch-x86-64-v3\n")
    assert load_nix_settings(str(tmp_path)).features == ("kvm", "gccarch-x86-64-v3")


def test_empty_system_features_means_none(tmp_path: Path) -> None:
    write_conf(tmp_path, "system-features =\n")
    assert load_nix_settings(str(tmp_path)).features == ()


def test_extra_system_features_are_added_to_the_defaults(tmp_path: Path, no_kvm: None) -> None:
    write_conf(tmp_path, "extra-system-features = gccarch-x86-64-v3 big-parallel\n")
    assert load_nix_settings(str(tmp_path)).features == (*DEFAULT_FEATURES, "gccarch-x86-64-v3")


def test_extra_system_features_are_added_to_system_features(tmp_path: Path) -> None:
    write_conf(tmp_path, "system-features = kvm\nextra-system-features = benchmark kvm\n")
    assert load_nix_settings(str(tmp_path)).features == ("kvm", "benchmark")


def test_system_features_after_extra_system_features_replace_them(tmp_path: Path) -> None:
    write_conf(tmp_path, "extra-system-features = benchmark\nsystem-features = kvm\n")
    assert load_nix_settings(str(tmp_path)).features == ("kvm",)


def test_settings_from_an_include_are_used(tmp_path: Path) -> None:
    write_conf(tmp_path, "max-jobs = 6\nmin-free = 2G\n", "machine.conf")
    write_conf(tmp_path, "!include machine.conf\n")
    s = load_nix_settings(str(tmp_path))
    assert (s.max_jobs, s.min_free_bytes) == (6, 2 << 30)


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", "x86_64-linux"),
        ("amd64", "x86_64-linux"),
        ("arm64", "aarch64-linux"),
        ("aarch64", "aarch64-linux"),
        ("riscv64", "riscv64-linux"),
    ],
)
def test_default_system(monkeypatch: pytest.MonkeyPatch, machine: str, expected: str) -> None:
    monkeypatch.setattr(nixconf.platform, "machine", lambda: machine)
    assert default_system() == expected
