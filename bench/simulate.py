"""The fleet simulation's longer run: ``python -m bench.simulate --steps 20000``.

Runs tests/sim's state machine (Hypothesis stateful testing) on a SQLite store, or on a
PostgreSQL database (``--postgres``, a server of its own, as the tests start it), for at
least the number of steps asked, in examples of ``--example-steps`` steps each, and prints
the steps run, the examples, the time taken and the rate. A violation is printed as the
shortest story Hypothesis found, and the exit status is 1.

The examples run in batches, each with a seed of its own (``--seed``, then the next ones), so
a run is the same every time.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis.stateful import run_state_machine_as_test

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.sim.machine import FleetSim


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000, help="at least this many steps")
    parser.add_argument("--example-steps", type=int, default=60, help="steps per example")
    parser.add_argument("--seed", type=int, default=0, help="the first batch's seed")
    parser.add_argument("--batch", type=int, default=100, help="examples per batch")
    parser.add_argument("--postgres", action="store_true", help="a PostgreSQL store")
    parser.add_argument("--no-shrink", action="store_true", help="report the first failure as found")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # vmpower's warnings are part of the story, not news

    server = None
    if args.postgres:
        from tests.unit.pgserver import PostgresServer, find_bindir
        server = PostgresServer(find_bindir())
        server.start()
        store_factory = staticmethod(lambda directory: server.schema())
    else:
        store_factory = staticmethod(lambda directory: os.path.join(directory, "records.sqlite"))
    fleet = type("Fleet", (FleetSim,), {"store_factory": store_factory, "steps": 0})
    # Batches of examples, each with a seed of its own (the first is --seed), until the steps
    # asked have run: an example ends early when Hypothesis draws it so, so a batch's steps vary.
    phases = [Phase.explicit, Phase.generate] + ([] if args.no_shrink else [Phase.shrink])
    options = settings(max_examples=args.batch, stateful_step_count=args.example_steps,
                       deadline=None, database=None, suppress_health_check=list(HealthCheck),
                       print_blob=False, phases=phases)
    begun = time.monotonic()
    failed = None
    batches = 0
    try:
        while fleet.steps < args.steps and failed is None:
            run_state_machine_as_test(seed(args.seed + batches)(fleet), settings=options)
            batches += 1
    except BaseException as exc:  # the story is printed below
        failed = exc
        batches += 1
    finally:
        if server is not None:
            server.stop()
    took = time.monotonic() - begun
    print(f"steps: {fleet.steps}  examples: {batches} x {args.batch} of up to {args.example_steps} steps  "
          f"store: {'postgresql' if args.postgres else 'sqlite'}  took: {took:.1f}s  "
          f"rate: {fleet.steps / took:.0f} steps/s")
    if failed is not None:
        # Hypothesis puts each story (the shortest sequence of rules it found) in the notes of
        # its failure; distinct failures come as an exception group
        for one in getattr(failed, "exceptions", [failed]):
            print()
            for note in getattr(one, "__notes__", []):
                print(note)
            print(f"FAILED: {type(one).__name__}: {one}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
