"""Where a measured call's time goes: wall time per phase, each phase timed around the methods
that do it, and what no phase covers counted as the rest.

A phase's time is exclusive: a timed method called inside another timed method counts in its
own phase, not in both. Only calls made on the measuring thread are timed (a method a
``Hypervisor`` runs on its connection's thread counts in the phase of the call that handed it
over). The wrappers cost about a microsecond a call; they time tens of calls in a sync, not
one per domain, so they do not move the figures they report.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator

REST = "the rest"


class Phases:
    """Exclusive time per phase of the calls made inside ``timing()``: wall time, or what
    ``clock`` counts (``time.process_time``: the CPU of every thread of the process)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = []  # [phase, started, time spent in timed calls inside it]
        self._patched: list[tuple[object, str, object]] = []
        self._thread = threading.main_thread()

    def _enter(self, phase: str) -> None:
        self._stack.append([phase, self._clock(), 0.0])

    def _leave(self) -> None:
        phase, started, inner = self._stack.pop()
        took = self._clock() - started
        self.seconds[phase] = self.seconds.get(phase, 0.0) + took - inner
        if self._stack:
            self._stack[-1][2] += took

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name``."""
        self._enter(name)
        try:
            yield
        finally:
            self._leave()

    def wrap(self, owner: object, attribute: str, phase: str | Callable[..., str],
             context: bool = False) -> None:
        """Time every call of ``owner.attribute`` (a function or method) as ``phase`` (or as
        what ``phase`` returns for the call's arguments); with ``context``, the context manager
        it returns is timed on entering and leaving too."""
        original = owner.__dict__[attribute] if attribute in getattr(owner, "__dict__", {}) \
            else getattr(owner, attribute)
        function = original.__func__ if isinstance(original, staticmethod) else original

        @functools.wraps(function)
        def timed(*args, **kwargs):
            if threading.current_thread() is not self._thread:
                return function(*args, **kwargs)
            name = phase(*args, **kwargs) if callable(phase) else phase
            with self.phase(name):
                result = function(*args, **kwargs)
            if context:
                return _TimedContext(self, name, result)
            return result

        setattr(owner, attribute, staticmethod(timed) if isinstance(original, staticmethod) else timed)
        self._patched.append((owner, attribute, original))

    def restore(self) -> None:
        """Put back every wrapped method."""
        for owner, attribute, original in reversed(self._patched):
            setattr(owner, attribute, original)
        self._patched.clear()

    def timing(self, call: Callable[[], object]) -> tuple[float, object]:
        """``call()``'s time and result; its phases add up into ``seconds``, with
        what no phase covers as ``REST``."""
        self.seconds = {}
        with self.phase(REST):
            started = self._clock()
            result = call()
            took = self._clock() - started
        return took, result


class _TimedContext(contextlib.AbstractContextManager):
    """A context manager whose entering and leaving are timed as ``phase``."""

    def __init__(self, phases: Phases, phase: str, inner: contextlib.AbstractContextManager):
        self._phases, self._phase, self._inner = phases, phase, inner

    def __enter__(self):
        with self._phases.phase(self._phase):
            return self._inner.__enter__()

    def __exit__(self, *exc):
        with self._phases.phase(self._phase):
            return self._inner.__exit__(*exc)
