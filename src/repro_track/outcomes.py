"""The one list of replay outcomes, used by ``replay``, ``--json``, the run tags, the card and ``audit``.

A replay first *expects* (from the prediction rules, before anything runs):

- ``exact``: every output should come back bit for bit;
- ``close``: the noise comes back but the arithmetic may round differently;
- ``none``: the noise (or the call) cannot be regenerated here, so it is not rerun unless forced.

Then it *observes* (after the rerun):

- ``exact``: every output compared bit for bit equal (or the same exception, type and message);
- ``close``: every output within the per-dtype tolerance;
- ``different``: an output outside tolerance, missing, or a changed call status or exception;
- ``unverified``: nothing could be compared (the call returned no array, image or file, or the
  replay ran past its timeout). Never counted as a success.
"""

from __future__ import annotations

EXPECTED = ("exact", "close", "none")  # best first
OBSERVED = ("exact", "close", "different", "unverified")
NOT_RERUN = "not-rerun"  # audit and tags: the replay stopped at the prediction

_RANK = {"exact": 0, "close": 1, "different": 2, "none": 3}


def meets(expected: str, observed: str) -> bool:
    """Whether an observed outcome is at least as good as the expected one (unverified never is)."""
    if observed == "unverified":
        return False
    return _RANK[observed] <= _RANK[expected]
