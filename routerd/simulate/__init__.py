"""``routerd simulate``: the daemon's own scheduler on virtual time.

- ``loop`` — an event loop whose clock jumps and whose executor work lasts virtual time;
- ``hardware`` — simulated GPUs and a backend whose costs come from the model table;
- ``costs`` — the model table; ``trace`` — requests as JSON lines;
- ``generate`` — synthetic traces (Zipf, bursty, shifting popularity);
- ``learn`` — a daemon's own traffic and costs, read from its store;
- ``run`` — one replay with one eviction policy; ``report`` — its figures.
"""
