"""The client's long-running command: `nixfarm dispatch`, from its command line."""

from __future__ import annotations

import os

from ..common.errors import UsageError

# mypy treats any name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def run(args: argparse.Namespace) -> int:
    from .dispatch import Settings, run_dispatch
    from .inventory import load_inventory
    from .slots import SlotHolds, raise_open_file_limit
    from .status import status_path

    inventory = load_inventory(args.inventory)
    settings = Settings(
        interval=args.interval,
        keepalive=args.keepalive,
        backoff_base=args.backoff_base,
        backoff_max=args.backoff_max,
        build_poll_interval=args.build_poll_interval,
    )
    machines_dir = os.path.dirname(os.path.abspath(args.machines))
    if not os.access(machines_dir, os.W_OK):
        raise UsageError(f"--machines {args.machines}: cannot write in {machines_dir}")
    try:
        os.makedirs(args.current_load, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--current-load {args.current_load}: {(e.strerror or str(e)).lower()}") from None
    if not os.access(args.current_load, os.W_OK):
        raise UsageError(
            f"--current-load {args.current_load}: cannot write there; run the dispatcher as the "
            "user Nix builds as (root with nix-daemon)"
        )
    raise_open_file_limit()
    holds = SlotHolds(args.current_load, args.lock_names)
    return run_dispatch(inventory, args.machines, settings, status_path(args.machines), holds)
