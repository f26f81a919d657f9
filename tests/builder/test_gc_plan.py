"""The GC's pure logic: limits, and the order in which a plan deletes paths.

Deletion itself is covered on real stores in test_gc.py.
"""

from __future__ import annotations

import pytest

from nixfarm.builder.gc import Limits, parse_limit, plan
from nixfarm.builder.usage import STORE_PATH, names_in
from nixfarm.common.errors import UsageError
from nixfarm.common.store import PathInfo

MiB = 1 << 20
NOW = 1_000_000.0


def store(name: str) -> str:
    return f"/nix/store/{'a' * 32}-{name}"


def infos(sizes: dict[str, int], refs: dict[str, list[str]] | None = None) -> dict[str, PathInfo]:
    """Dead paths by short name, registered at 1, 2, 3... in the given order."""
    out = {}
    for i, (name, size) in enumerate(sizes.items(), 1):
        out[store(name)] = PathInfo(size, i)
    for referrer, references in (refs or {}).items():
        out[store(referrer)].references = {store(r) for r in references}
    return out


def names(planned: list) -> list[str]:  # type: ignore[type-arg]
    return [p.path.rsplit("-", 1)[1] for p in planned]


def used(**times: float) -> dict[str, float]:
    return {store(name).removeprefix("/nix/store/"): t for name, t in times.items()}


def test_least_recently_used_go_first_and_never_used_before_all() -> None:
    dead = infos({"hot": MiB, "warm": MiB, "cold": MiB, "junk": MiB})
    order = plan(dead, used(hot=NOW - 10, warm=NOW - 3600, cold=NOW - 86400), 4 * MiB, NOW)
    assert names(order) == ["junk", "cold", "warm", "hot"]


def test_registration_time_only_breaks_ties() -> None:
    dead = infos({"newer": MiB, "older": MiB})  # "newer" registered first here
    dead[store("older")].registered = 0
    assert names(plan(dead, {}, 2 * MiB, NOW)) == ["older", "newer"]
    # Use beats registration: an old path used recently stays longer than a new unused one.
    assert names(plan(dead, used(older=NOW - 5), 2 * MiB, NOW)) == ["newer", "older"]


def test_stops_once_enough_would_be_freed() -> None:
    dead = infos({"a": 3 * MiB, "b": 3 * MiB, "c": 3 * MiB})
    assert names(plan(dead, used(a=1, b=2, c=3), 5 * MiB, NOW)) == ["a", "b"]
    assert plan(dead, {}, 0, NOW) == []


def test_taking_a_path_takes_its_referrers_and_lists_them_first() -> None:
    # app -> lib -> libc: only libc is old, but it cannot go while its dead referrers stay.
    dead = infos({"libc": MiB, "lib": MiB, "app": MiB}, {"app": ["lib"], "lib": ["libc"]})
    order = plan(dead, used(libc=1, lib=NOW, app=NOW), MiB, NOW)
    assert names(order) == ["app", "lib", "libc"]
    reasons = {n: p.reason for n, p in zip(names(order), order, strict=True)}
    assert reasons["libc"].startswith("last used")
    assert reasons["app"] == f"refers to {'a' * 32}-libc, which goes"


def test_every_path_comes_after_all_its_referrers_in_a_diamond() -> None:
    dead = infos(
        {"base": MiB, "left": MiB, "right": MiB, "top": MiB},
        {"top": ["left", "right"], "left": ["base"], "right": ["base"]},
    )
    order = names(plan(dead, {}, 4 * MiB, NOW))
    assert order.index("top") < order.index("left") < order.index("base")
    assert order.index("top") < order.index("right") < order.index("base")


def test_reasons_say_when_a_path_was_used() -> None:
    dead = infos({"x": MiB, "y": MiB})
    by_name = dict(zip(["x", "y"], plan(dead, used(y=NOW - 7200), 2 * MiB, NOW), strict=True))
    assert by_name["x"].reason == "never seen in use since it was registered 12 days ago"
    assert by_name["y"].reason == "last used 2 h ago"
    assert by_name["y"].last_used == NOW - 7200 and by_name["x"].last_used is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1024, 1024),
        ("16M", 16 * MiB),
        ("1G", 1 << 30),
        ("10%", 100 * MiB),
        ("0%", 0),
        ("100%", 1000 * MiB),
    ],
)
def test_limits_accept_bytes_suffixes_and_percentages(value: int | str, expected: int) -> None:
    assert parse_limit(value, 1000 * MiB, "min_free") == expected


@pytest.mark.parametrize("value", ["ten", "10%%", "-5%", "101%", "16X"])
def test_bad_limits_name_the_key(value: str) -> None:
    with pytest.raises(UsageError, match="max_free"):
        parse_limit(value, 1000 * MiB, "max_free")


def test_limits_apply_to_inodes_as_the_same_fraction() -> None:
    limits = Limits(16 * MiB, 32 * MiB, total_bytes=64 * MiB, total_inodes=6400)
    assert (limits.min_free_inodes, limits.max_free_inodes) == (1600, 3200)
    plenty = {"free_bytes": 40 * MiB, "free_inodes": 5000}
    assert not limits.needs_gc(plenty) and limits.satisfied(plenty)
    assert limits.needs_gc({"free_bytes": 40 * MiB, "free_inodes": 1000})
    assert limits.needs_gc({"free_bytes": 8 * MiB, "free_inodes": 5000})
    assert not limits.satisfied({"free_bytes": 20 * MiB, "free_inodes": 5000})


def test_max_free_below_min_free_is_refused() -> None:
    with pytest.raises(UsageError, match="must not be below min_free"):
        Limits(32 * MiB, 16 * MiB, 64 * MiB, 100)


def test_store_paths_are_found_in_process_data() -> None:
    environ = (
        b"PATH=/nix/store/0c7f5bd1f3d2l4hzbhlx2rgahp1ib2rz-coreutils-9.1/bin\0"
        b"src=/nix/store/9q8a2mxzbgfwi3hk5gq3xbjlh1vd8mvc-source\0"
        b"bad=/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-no-e-in-nix-base32\0"
    )
    assert names_in(environ) == {
        "0c7f5bd1f3d2l4hzbhlx2rgahp1ib2rz-coreutils-9.1",
        "9q8a2mxzbgfwi3hk5gq3xbjlh1vd8mvc-source",
    }
    assert STORE_PATH.pattern.startswith(b"/nix/store/")
