"""``make bench``: the worker's throughput and costs beside the least the machine can do.

``bench.run`` orchestrates one run (``python -m bench.run``); ``bench.floor`` holds the two
yardsticks it measures the worker against. ``bench/README.md`` explains every figure.
"""
