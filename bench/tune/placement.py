"""Placement groups of trials that ASHA stopped: recorded by the trial's rank-0 worker, removed by the driver."""

from __future__ import annotations

import os

from bench.tune.constants import PG_FILE

def release_placement_groups(trial_dir: str) -> int:
    """Remove the still-reserved placement groups a finished or stopped trial recorded; returns how many."""
    path = os.path.join(trial_dir, PG_FILE)
    if not os.path.exists(path):
        return 0
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    removed = 0
    with open(path) as fh:
        ids = [ln.strip() for ln in fh if ln.strip()]
    for hex_id in dict.fromkeys(ids):
        try:
            pg = PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id)))
            if ray.util.placement_group_table(pg).get("state") == "CREATED":
                ray.util.remove_placement_group(pg)
                removed += 1
        except Exception:  # noqa: BLE001 - already gone, or not of this cluster (a resumed search)
            continue
    return removed

