"""A process that runs libvirt's event loop on a thread (the minion with the vmpower beacon)
forks job processes: none may inherit a libvirt lock held by that thread (a job that
inherited one hung in its first libvirt call). Real forks, a real libvirt event loop kept busy
by a timer that fires at every iteration, and children that need the event loop's lock at
once, as a job opening a remote connection does."""

import json
import subprocess
import sys
import textwrap


def run_python(code: str, *args: str, timeout: float = 120) -> str:
    """Run ``code`` in a fresh Python process (real forks, real threads); what it printed.
    A failed run fails the test with its stderr."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout

FORKER = textwrap.dedent("""
    import os, sys, threading, time
    import libvirt
    from vmpower import eventloop

    eventloop.ensure_running()  # the minion's loop thread, as the beacon starts it
    busy = libvirt.virEventAddTimeout(0, lambda timer, opaque: None, None)  # a storm of events
    time.sleep(0.2)
    hung = 0
    children = int(sys.argv[1])
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            # What a job's first libvirt calls do: register a timer and a handle, remove them.
            timer = libvirt.virEventAddTimeout(-1, lambda timer, opaque: None, None)
            libvirt.virEventRemoveTimeout(timer)
            os._exit(0)
        # A child that has not exited long after it should have is hung (it needs microseconds).
        deadline = time.monotonic() + 10
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                hung += 1
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                break
            time.sleep(0.001)
        if hung:
            break  # one is enough to fail
    print(hung, eventloop.ensure_running().is_alive(), flush=True)
""")


def test_forked_children_never_inherit_a_held_libvirt_lock():
    # Without the guard, 29 children of 300 hung here.
    # none hung, and the parent's loop still runs
    assert run_python(FORKER, "300", timeout=600).split() == ["0", "True"]


def test_a_forked_child_cannot_run_the_parents_loop():
    code = textwrap.dedent("""
        import os
        from vmpower import eventloop, forksafe
        eventloop.ensure_running()
        pid = os.fork()
        if pid == 0:
            try:
                eventloop.ensure_running()
            except RuntimeError as exc:
                os._exit(0 if "a forked process cannot run it" in str(exc)
                         and not forksafe.loop_runs_here() else 2)
            os._exit(1)
        print(os.waitpid(pid, 0)[1] >> 8, forksafe.loop_runs_here())
    """)
    assert run_python(code).split() == ["0", "True"]


# The loop's thread is parked before its first iteration (the main thread holds forksafe's
# condition, as a scheduler that has not run the new thread yet would), and the process forks.
# The test's own at-fork hooks are registered before vmpower's, so they run inside vmpower's
# guard: the before hook lets the thread go and gives it time to enter libvirt.
EARLY_FORK = textwrap.dedent("""
    import os, time
    import libvirt
    seen = []

    def fork_begins():
        seen.append("fork begins")
        forksafe._cond.release()  # the loop thread may run now
        time.sleep(0.5)

    os.register_at_fork(before=fork_begins, after_in_parent=lambda: seen.append("fork ends"))
    from vmpower import eventloop, forksafe

    for name in ("virEventAddTimeout", "virEventRunDefaultImpl"):
        def entered(*args, _real=getattr(libvirt, name)):
            seen.append("libvirt")
            return _real(*args)
        setattr(libvirt, name, entered)

    forksafe._cond.acquire()
    eventloop.ensure_running()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    ticks = []
    libvirt.virEventAddTimeout(0, lambda timer, opaque: ticks.append(1), None)
    time.sleep(0.5)
    before = len(ticks)
    time.sleep(0.5)
    during = seen[seen.index("fork begins"):seen.index("fork ends")]
    print("libvirt-during-fork" if "libvirt" in during else "clean",
          "loop-runs" if len(ticks) > before else "loop-stuck")
""")


def test_a_fork_before_the_loops_first_iteration_keeps_it_out_of_libvirt():
    # Before the guard knew of a started thread until its first iteration, the thread entered
    # libvirt during the fork, and the fork's end left the loop waiting for good.
    assert run_python(EARLY_FORK).split() == ["clean", "loop-runs"]


# A thread inside a section while the main thread forks: the fork is made once it ends.
SECTION = textwrap.dedent("""
    import os, threading, time
    from vmpower import forksafe

    order = []
    inside = threading.Event()

    def work():
        with forksafe.no_fork_inside():
            inside.set()
            time.sleep(0.5)
            order.append("section-ends")

    thread = threading.Thread(target=work)
    thread.start()
    inside.wait(10)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    order.append("fork-made")
    os.waitpid(pid, 0)
    thread.join()
    print(*order)
""")


def test_a_fork_waits_for_the_sections_of_other_threads():
    assert run_python(SECTION).split() == ["section-ends", "fork-made"]


# The minion's process as the beacon runs in it: its threads (the watcher's, the status
# thread writing the live metrics and the status file) run through connecting, events, the
# journal and the metrics file, and every import they make is recorded. A job forked while
# another thread imports a module hangs for good when it imports that module too; the status
# thread once imported vmpower.metrics, PostgreSQL's and Prometheus's clients at its first tick,
# and the syncs the reactor ran at a minion's start hung.
THREAD_IMPORTS = textwrap.dedent("""
    import json, os, sys, threading, time
    import libvirt
    from vmpower import eventloop
    from vmpower.core.settings import BeaconSettings
    from vmpower.journal import Journal, journal_path

    imported = []

    class Recorder:
        def find_spec(self, name, path=None, target=None):
            if threading.current_thread() is not threading.main_thread():
                imported.append(threading.current_thread().name + ": " + name)
            return None

    sys.meta_path.insert(0, Recorder())
    cachedir = sys.argv[1]
    opts = {"id": "minion", "cachedir": cachedir, "file_client": "local",
            "vmpower": {"metrics_file": os.path.join(cachedir, "vmpower.prom"),
                        "store": os.path.join(cachedir, "records.sqlite")}}
    loop = eventloop.EventLoop()
    settings = BeaconSettings(uri="test:///default", stop_grace=0)
    dom = libvirt.open("test:///default").lookupByName("test")
    changes = [dom.suspend, dom.resume, dom.destroy, dom.create]
    journal = Journal(journal_path(cachedir))
    # Until the status thread has written the metrics twice (at the latest its 30 s heartbeat)
    # and the watcher has journaled the four changes: both paths ran.
    while loop.metrics is None or loop.metrics.writes < 2 or journal.last_seq() < 4:
        loop.drain(settings, os.path.join(cachedir, "status.json"), opts)
        if changes:
            changes.pop(0)()
        time.sleep(0.2)
    print(json.dumps({"imported": imported, "metrics_writes": loop.metrics.writes,
                      "journaled": journal.last_seq()}))
""")


def test_the_beacons_threads_import_nothing(tmp_path):
    # It runs until both paths did their work (the timeout only ends a hang).
    result = json.loads(run_python(THREAD_IMPORTS, str(tmp_path)))
    assert result["metrics_writes"] >= 2 and result["journaled"] >= 4, result  # the paths ran
    assert result["imported"] == [], result["imported"]
