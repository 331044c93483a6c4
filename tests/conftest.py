import os
import tempfile

# Ray: no token auth for local test clusters, no usage stats; keep torch from oversubscribing 2 cores.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# rendered synthetic scenes (bench/data/scene_store.py): one store per test session, shared with its Ray workers
os.environ.setdefault("BENCH_DATA_CACHE", tempfile.mkdtemp(prefix="bench-scenes-"))
