import os

from bench.raycluster import SPINCOUNT  # imports no torch

# libgomp's OpenMP threads spin 300k iterations (its default) before they sleep: on a small machine a training
# process's idle intra-op thread then holds a core that its DataLoader worker needs. 10k spins measured +10-12%
# images/s for ViCE and CrOC with one loader worker on 2 cores (docs/speed.md). Read once, when torch loads: set
# here, before anything imports torch; every process this one starts (local Ray workers) inherits it.
os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)

from bench.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
