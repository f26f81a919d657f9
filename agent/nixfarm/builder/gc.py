"""Keep the store's free space between min-free and max-free, least recently used first.

A pass: ask Nix which paths are dead, order them by last use (never-used
first, then oldest use; registration time only breaks ties), and delete
through `nix-store --delete` in batches until free space reaches max-free.
Taking a path also takes every dead path that refers to it, and each batch
lists referrers before their references, as Nix requires. Only one pass runs
at a time on a machine: a flock on `state_dir/gc.lock`.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from typing import Any

from ..common import store
from ..common.atomic import write_atomic
from ..common.errors import UsageError
from ..common.nixconf import NixSettings, load_nix_settings, parse_size
from .config import AgentConfig
from .usage import UsageRecords

BATCH = 100  # paths per nix-store --delete: bounded argv, progress between batches
HISTORY_KEEP = 50
Progress = Callable[[dict[str, Any]], None]


def parse_limit(value: int | str, total_bytes: int, key: str) -> int:
    """Bytes from 1073741824, "16M", "10G" or "10%" (of the store's filesystem)."""
    if isinstance(value, int):
        return value
    text = value.strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            percent = -1.0
        if not 0 <= percent <= 100:
            raise UsageError(f"{key}: {value!r} is not a percentage from 0% to 100%")
        return int(total_bytes * percent / 100)
    try:
        return parse_size(text)
    except UsageError:
        raise UsageError(f"{key}: {value!r} is not a size (e.g. 16M, 10G, 10%)") from None


class Limits:
    """min-free and max-free in bytes and, as the same fractions, in inodes."""

    def __init__(self, min_free: int, max_free: int, total_bytes: int, total_inodes: int) -> None:
        if max_free < min_free:
            raise UsageError(f"max_free ({max_free} bytes) must not be below min_free ({min_free} bytes)")
        self.min_free = min_free
        self.max_free = max_free
        fraction = total_inodes / total_bytes if total_bytes else 0
        self.min_free_inodes = int(min_free * fraction)
        self.max_free_inodes = int(max_free * fraction)

    def needs_gc(self, fs: dict[str, int]) -> bool:
        return fs["free_bytes"] < self.min_free or fs["free_inodes"] < self.min_free_inodes

    def satisfied(self, fs: dict[str, int]) -> bool:
        return fs["free_bytes"] >= self.max_free and fs["free_inodes"] >= self.max_free_inodes


def resolve_limits(config: AgentConfig, fs: dict[str, int], nix: NixSettings | None = None) -> Limits | None:
    """The limits in force: the agent config's, else nix.conf's; None when GC is off.

    `nix`: nix.conf's settings if the caller has read them already.
    """
    nix = nix or load_nix_settings(config.nix_conf_dir)
    total = fs["total_bytes"]
    min_free = (
        parse_limit(config.min_free, total, "min_free") if config.min_free != "" else nix.min_free_bytes
    )
    if config.max_free != "":
        max_free = parse_limit(config.max_free, total, "max_free")
    else:
        max_free = nix.max_free_bytes if nix.max_free_bytes is not None else total
    if min_free <= 0:
        return None
    return Limits(min_free, min(max_free, total), total, fs["total_inodes"])


def filesystem(store_dir: str) -> dict[str, int]:
    """Free and total bytes and inodes of the store's filesystem."""
    st = os.statvfs(store_dir)
    return {
        "free_bytes": st.f_bavail * st.f_frsize,
        "total_bytes": st.f_blocks * st.f_frsize,
        "free_inodes": st.f_favail,
        "total_inodes": st.f_files,
    }


class Planned:
    """One path the plan would delete, and why it goes where it does."""

    __slots__ = ("last_used", "path", "reason", "size")

    def __init__(self, path: str, size: int, last_used: float | None, reason: str) -> None:
        self.path = path
        self.size = size
        self.last_used = last_used
        self.reason = reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size_bytes": self.size,
            "last_used": self.last_used,
            "reason": self.reason,
        }


def plan(
    infos: dict[str, store.PathInfo],
    last_used: dict[str, float],
    need_bytes: int,
    now: float | None = None,
) -> list[Planned]:
    """Dead paths to delete, in an order `nix-store --delete` accepts, until `need_bytes`.

    `infos` holds the dead paths (all of them: a dead path's referrers are dead
    too). `last_used` maps store path names to their last use.
    """
    now = time.time() if now is None else now
    referrers: dict[str, set[str]] = {p: set() for p in infos}
    for path, info in infos.items():
        for ref in info.references:
            referrers[ref].add(path)

    def used(path: str) -> float:
        return last_used.get(os.path.basename(path), 0.0)

    chosen: dict[str, str] = {}  # path -> reason, in the order chosen
    freed = 0
    for path in sorted(infos, key=lambda p: (used(p), infos[p].registered, p)):
        if freed >= need_bytes:
            break
        if path in chosen:
            continue
        group = [path, *_referrer_closure(path, referrers)]
        for member in group:
            if member not in chosen:
                chosen[member] = _reason(member, path, used(member), infos[member].registered, now)
                freed += infos[member].size
    return [
        Planned(p, infos[p].size, used(p) or None, chosen[p])
        for p in _referrers_first(list(chosen), referrers)
    ]


def _referrer_closure(path: str, referrers: dict[str, set[str]]) -> list[str]:
    seen: set[str] = set()
    stack = list(referrers[path])
    while stack:
        p = stack.pop()
        if p not in seen:
            seen.add(p)
            stack.extend(referrers[p])
    return sorted(seen)


def _referrers_first(paths: list[str], referrers: dict[str, set[str]]) -> list[str]:
    """Order `paths` so that each comes after every chosen path that refers to it."""
    chosen = set(paths)
    done: set[str] = set()
    order: list[str] = []
    for start in paths:
        stack = [(start, False)]
        while stack:
            p, expanded = stack.pop()
            if p in done:
                continue
            if expanded:
                done.add(p)
                order.append(p)
                continue
            stack.append((p, True))
            stack.extend((r, False) for r in sorted(referrers[p] & chosen) if r not in done)
    return order


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _reason(path: str, for_path: str, used: float, registered: int, now: float) -> str:
    if path != for_path:
        return f"refers to {os.path.basename(for_path)}, which goes"
    if used:
        return f"last used {_ago(now - used)} ago"
    return f"never seen in use since it was registered {_ago(now - registered)} ago"


class GcResult:
    """What a pass did; saved as the GC state and appended to the history."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.started = time.time()
        self.finished: float | None = None
        self.deleted = 0
        self.bytes_freed = 0
        self.free_before: int | None = None
        self.free_after: int | None = None
        self.error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "started": self.started,
            "last_run": self.finished,
            "duration_seconds": None if self.finished is None else round(self.finished - self.started, 3),
            "deleted": self.deleted,
            "bytes_freed": self.bytes_freed,
            "free_before": self.free_before,
            "free_after": self.free_after,
            "error": self.error,
        }


class GarbageCollector:
    """Runs passes, one at a time per machine, and keeps their state on disk."""

    def __init__(self, config: AgentConfig, usage: UsageRecords) -> None:
        self.config = config
        self.usage = usage
        self.state_path = os.path.join(config.state_dir, "gc-state.json")
        self.history_path = os.path.join(config.state_dir, "gc-history.jsonl")
        self.lock_path = os.path.join(config.state_dir, "gc.lock")
        self.stop_requested = False  # set from a signal handler: finish the batch, then stop

    def dry_run(self, target_free: int | None = None) -> dict[str, Any]:
        """The plan a pass would carry out now, without deleting anything."""
        fs = filesystem(self.config.store_dir)
        limits = resolve_limits(self.config, fs)
        target = target_free if target_free is not None else (limits.max_free if limits else fs["free_bytes"])
        need = max(0, target - fs["free_bytes"])
        infos = store.path_infos(store.dead_paths())
        planned = plan(infos, self.usage.last_used, need) if need else []
        return {
            "free_bytes": fs["free_bytes"],
            "target_free_bytes": target,
            "dead_paths": len(infos),
            "dead_bytes": sum(i.size for i in infos.values()),
            "plan": [p.as_dict() for p in planned],
        }

    def run(
        self, reason: str, target_free: int | None = None, progress: Progress | None = None
    ) -> GcResult | None:
        """One pass up to `target_free` (default max-free); None if one is already running."""
        fd = os.open(self.lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            result = GcResult(reason)
            self._save_state(result, running=True)
            try:
                self._pass(result, target_free, progress or (lambda _: None))
            except store.StoreError as e:
                result.error = str(e)
            result.finished = time.time()
            self._save_state(result, running=False)
            self._append_history(result)
            return result
        finally:
            os.close(fd)  # releases the lock

    def _pass(self, result: GcResult, target_free: int | None, progress: Progress) -> None:
        fs = filesystem(self.config.store_dir)
        result.free_before = result.free_after = fs["free_bytes"]
        limits = resolve_limits(self.config, fs)
        target = (
            target_free if target_free is not None else (limits.max_free if limits else fs["total_bytes"])
        )
        if fs["free_bytes"] >= target and (limits is None or limits.satisfied(fs)):
            return
        try:
            infos = store.path_infos(store.dead_paths())
        except store.StoreError:
            # Without the database we cannot order by use; Nix's own GC still frees safely.
            result.bytes_freed = store.collect_garbage(target - fs["free_bytes"])
            result.free_after = filesystem(self.config.store_dir)["free_bytes"]
            return
        planned = [p.path for p in plan(infos, self.usage.last_used, target - fs["free_bytes"])]
        progress(
            {
                "event": "plan",
                "paths": len(planned),
                "free_bytes": fs["free_bytes"],
                "target": target,
            }
        )
        while planned and not self.stop_requested:
            batch, rest = planned[:BATCH], planned[BATCH:]
            outcome = store.delete(batch)
            planned = rest
            if outcome.alive:
                # Something started using it since the plan: keep it and what it references,
                # and retry what Nix did not reach. Each round drops at least one path.
                keep = set(outcome.alive)
                for alive in outcome.alive:
                    keep |= infos[alive].references if alive in infos else set()
                planned = [p for p in batch + rest if p not in keep and os.path.lexists(p)]
            result.deleted += outcome.deleted
            result.bytes_freed += outcome.freed_bytes
            self.usage.forget(os.path.basename(p) for p in batch if not os.path.lexists(p))
            fs = filesystem(self.config.store_dir)
            result.free_after = fs["free_bytes"]
            progress(
                {
                    "event": "progress",
                    "deleted": result.deleted,
                    "bytes_freed": result.bytes_freed,
                    "free_bytes": fs["free_bytes"],
                }
            )
            if fs["free_bytes"] >= target and (limits is None or limits.satisfied(fs)):
                break

    def _save_state(self, result: GcResult, running: bool) -> None:
        state = {**result.as_dict(), "running": running}
        write_atomic(self.state_path, json.dumps(state).encode())

    def _append_history(self, result: GcResult) -> None:
        lines = read_history(self.history_path)[-(HISTORY_KEEP - 1) :]
        lines.append(result.as_dict())
        write_atomic(self.history_path, "".join(json.dumps(x) + "\n" for x in lines).encode())


def read_history(path: str) -> list[dict[str, Any]]:
    """Past passes, oldest first; unreadable lines are skipped."""
    runs = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    runs.append(entry)
    except OSError:
        return []
    return runs
