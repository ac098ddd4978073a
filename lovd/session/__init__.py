"""Sessions: one OpenCode container per chat, from creation to expiry.

model.py       states and the Session row (ground floor: imports nothing of lovd's, so
               store and metrics may use it; see README, Layout)
machine.py     the one writer of a session's state (the table, compare-and-set, outbox,
               waiters)
wakes.py       one wake per session, whichever socket asked
launcher.py    the container's settings, start, readiness, stop (returns outcomes;
               writes no state)
starts.py      a start's state: starting, then the launcher's outcome
admission.py   places, ports, when a place frees up
warm.py        the warm pool (on top of launcher and admission)
housekeeping.py activity, unused/idle stops, expiry
reconcile.py   adopt, lost, orphans
lifecycle.py   the facade the web layer and the daemon use (``Sessions``)
"""
