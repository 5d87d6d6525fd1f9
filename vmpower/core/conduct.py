"""Whether a decision is carried out: dry runs (``test=True``) and observe mode
(``vmpower:mode: observe``), decided here so that every path (reconcile, sync) agrees.

- A dry run changes nothing: no action, no record written, no audit entry. It reports what
  would be done and why.
- Observe mode records (what libvirt says is the truth: power_state, first records) and audits
  and reports what it would have done, but never acts on a domain: for rolling vmpower out
  onto a host whose VMs already run as someone intended.
- Otherwise (``enforce``, the default) the decision is carried out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vmpower.core.settings import ConfigError

ENFORCE, OBSERVE = "enforce", "observe"
MODES = (ENFORCE, OBSERVE)
NO_ACTION = "none"
OBSERVED = "observe"  # the audit action of a decision observe mode did not carry out


@dataclasses.dataclass(frozen=True)
class Conduct:
    """What the shell may do with one decision.

    ``act``: carry its action out; ``write``: write the record (what was observed, and the
    outcome only if it acted); ``audit``: write audit entries; ``result``: what the report
    says happened instead of the action's own result ("" when it acts).
    """

    act: bool
    write: bool
    audit: bool
    result: str = ""


def parse_mode(raw: Any) -> str:
    """``vmpower:mode``: ``enforce`` (the default) or ``observe``."""
    if raw in (None, ""):
        return ENFORCE
    if raw not in MODES:
        raise ConfigError(f"vmpower:mode must be one of {', '.join(MODES)}, not {raw!r}")
    return raw


def conduct(action: str, mode: str, test: bool) -> Conduct:
    """How to carry out a decision whose action is ``action`` (``none``, ``power_off``,
    ``start``) in ``mode``, as a dry run if ``test``."""
    verb = action.replace("_", " ")
    if test:
        return Conduct(False, False, False,
                       f"test: would {verb}" if action != NO_ACTION else "test: nothing written")
    if mode == OBSERVE and action != NO_ACTION:
        return Conduct(False, True, True, f"observe mode: would {verb}; not done")
    return Conduct(True, True, True)


def observed_reason(action: str, reason: str) -> str:
    """The audit reason of a decision observe mode did not carry out."""
    return f"observe mode: would {action.replace('_', ' ')}: {reason}"
