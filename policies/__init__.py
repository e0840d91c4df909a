"""Pure, pluggable decisions: routing, placement, eviction, batching.

Every policy takes the state of the world as arguments and returns a decision; none
performs I/O or logs. The scheduler commits and records what they decide.
"""
