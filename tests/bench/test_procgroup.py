"""The reaper (bench.procgroup): when its owner dies without cleaning up, the trees it watched end too, also
the grandchildren already orphaned by their parent's death (as Ray's agents are when the raylet dies)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from bench.procgroup import _stat, reap_when_gone, start_reaper, tree

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OWNER = textwrap.dedent('''
    import os, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])
    from bench.procgroup import start_reaper
    # a root (like the raylet) whose child (like the DashboardAgent) outlives it
    root = subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
        " print(p.pid, flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    grandchild = int(root.stdout.readline())
    start_reaper([root.pid])
    print(root.pid, grandchild, flush=True)
    time.sleep(600)
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper reads /proc")
def test_reaper_ends_orphaned_grandchildren_after_the_owner_is_sigkilled(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    owner = subprocess.Popen([sys.executable, str(script), REPO], stdout=subprocess.PIPE, text=True)
    root, grandchild = map(int, owner.stdout.readline().split())
    watched = [root, grandchild]
    try:
        time.sleep(3.0)  # the reaper has polled at least once
        owner.send_signal(signal.SIGKILL)  # the owner dies, then the root (as the raylet on its parent-death
        owner.wait()                       # signal): the grandchild is orphaned, no longer below either
        os.kill(root, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _stat(grandchild) is not None:
            time.sleep(0.2)
        assert _stat(grandchild) is None, "the orphaned grandchild outlived its owner"
    finally:
        for pid in watched:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_reaper_returns_at_once_when_the_roots_end_first():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    roots = {child.pid: _stat(child.pid)[1]}
    assert child.pid in tree(roots)
    child.wait()
    me = _stat(os.getpid())
    t0 = time.monotonic()
    assert reap_when_gone(os.getpid(), me[1], roots, poll_s=0.1) == 0  # owner alive, roots gone: nothing to do
    assert time.monotonic() - t0 < 2
    assert start_reaper([]) is None
