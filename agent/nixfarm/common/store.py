"""What the GC needs from the Nix store: dead paths, sizes, references, deletion.

Deletion always goes through Nix (`nix-store --delete`), which takes the GC
lock and re-checks gc roots, temp roots and runtime roots for every path, so
nothing live can go even if our plan is stale. For planning we read Nix's
SQLite database read-only: one query gives the sizes and the reference graph
of every dead path, where asking `nix-store --query` would cost a process per
path. The tables we read (ValidPaths, Refs) have kept their shape since
Nix 1.x.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
from collections.abc import Iterable

from .errors import NixfarmError

DB_PATH = "/nix/var/nix/db/db.sqlite"
# "... 3 store paths deleted, 12.00 MiB freed" (Nix prints MiB with two decimals).
_FREED = re.compile(r"(\d+) store paths deleted, ([\d.]+) MiB freed")
_ALIVE = re.compile(r"cannot delete path '([^']+)' since it is still alive", re.IGNORECASE)
NIX_STORE_TIMEOUT = 600


class StoreError(NixfarmError):
    """A nix-store command failed."""


class PathInfo:
    """Size and registration time of one store path, and what it references."""

    __slots__ = ("references", "registered", "size")

    def __init__(self, size: int, registered: int) -> None:
        self.size = size
        self.registered = registered
        self.references: set[str] = set()


def nix_store(args: list[str], timeout: float = NIX_STORE_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run nix-store with `args`; returns the finished process (not checked)."""
    try:
        return subprocess.run(
            ["nix-store", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise StoreError("nix-store not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise StoreError(f"nix-store {' '.join(args[:2])} did not finish in {timeout:.0f} s") from None


def dead_paths() -> list[str]:
    """Every store path no root keeps alive, as Nix's GC sees it right now."""
    result = nix_store(["--gc", "--print-dead"])
    if result.returncode != 0:
        raise StoreError(f"nix-store --gc --print-dead failed: {_last_line(result.stderr)}")
    return [line for line in result.stdout.splitlines() if line.startswith("/")]


def path_infos(paths: Iterable[str], db_path: str = DB_PATH) -> dict[str, PathInfo]:
    """Size, registration time and references (among `paths`) of each valid path."""
    wanted = set(paths)
    infos: dict[str, PathInfo] = {}
    with _connect(db_path) as db:
        ids: dict[int, str] = {}
        for pid, path, registered, size in db.execute(
            "SELECT id, path, registrationTime, narSize FROM ValidPaths"
        ):
            if path in wanted:
                ids[pid] = path
                infos[path] = PathInfo(size or 0, registered or 0)
        for referrer, reference in db.execute("SELECT referrer, reference FROM Refs"):
            if referrer in ids and reference in ids and referrer != reference:
                infos[ids[referrer]].references.add(ids[reference])
    return infos


def closure(path: str, db_path: str = DB_PATH) -> list[str]:
    """`path` and everything it references, transitively (empty if not valid)."""
    query = """
        WITH RECURSIVE c(id) AS (
            SELECT id FROM ValidPaths WHERE path = ?
            UNION SELECT r.reference FROM Refs r JOIN c ON r.referrer = c.id
        )
        SELECT path FROM ValidPaths WHERE id IN c
    """
    with _connect(db_path) as db:
        return [row[0] for row in db.execute(query, (path,))]


def valid_paths(paths: Iterable[str], db_path: str = DB_PATH) -> set[str]:
    """Which of `paths` are valid (registered) in the store."""
    wanted = sorted(set(paths))
    if not wanted:
        return set()
    with contextlib.closing(_connect(db_path)) as db:
        query = f"SELECT path FROM ValidPaths WHERE path IN ({','.join('?' * len(wanted))})"  # noqa: S608 - placeholders only
        return {row[0] for row in db.execute(query, wanted)}


def count_unsigned(db_path: str = DB_PATH) -> int:
    """Valid paths with no signature at all and no content address: what an untrusted builder
    refuses as inputs. One query (ValidPaths.sigs and .ca are there since Nix 2.0)."""
    with contextlib.closing(_connect(db_path)) as db:
        query = "SELECT count(*) FROM ValidPaths WHERE coalesce(sigs, '') = '' AND coalesce(ca, '') = ''"
        return int(db.execute(query).fetchone()[0])


def _connect(db_path: str) -> sqlite3.Connection:
    if not os.path.exists(db_path):
        raise StoreError(f"Nix database {db_path} not found")
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
        db.execute("SELECT 1 FROM ValidPaths LIMIT 1")
    except sqlite3.Error as e:
        raise StoreError(f"cannot read Nix database {db_path}: {e}") from None
    return db


class DeleteResult:
    """What one `nix-store --delete` call did."""

    def __init__(self, deleted: int, freed_bytes: int, alive: list[str]) -> None:
        self.deleted = deleted
        self.freed_bytes = freed_bytes
        self.alive = alive  # paths Nix refused because something keeps them alive


def delete(paths: list[str]) -> DeleteResult:
    """Delete `paths` (referrers must come before their references) through Nix.

    Nix stops at the first path that is still alive; that path is reported in
    `alive`, and the caller retries the rest without it.
    """
    result = nix_store(["--delete", *paths])
    freed = _FREED.search(result.stdout + result.stderr)
    deleted, freed_bytes = (int(freed.group(1)), int(float(freed.group(2)) * 2**20)) if freed else (0, 0)
    alive = _ALIVE.findall(result.stderr)
    if result.returncode != 0 and not alive:
        raise StoreError(f"nix-store --delete failed: {_last_line(result.stderr)}")
    return DeleteResult(deleted, freed_bytes, alive)


def collect_garbage(max_freed: int) -> int:
    """Fallback when the database cannot be read: Nix's own GC, up to `max_freed` bytes."""
    result = nix_store(["--gc", "--max-freed", str(max_freed)])
    if result.returncode != 0:
        raise StoreError(f"nix-store --gc failed: {_last_line(result.stderr)}")
    freed = _FREED.search(result.stdout + result.stderr)
    return int(float(freed.group(2)) * 2**20) if freed else 0


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "(no output)"
