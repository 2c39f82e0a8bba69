"""edgecow's benchmark harness: figures and ratios measured side by side in one run, never asserted.

    python -m bench                 # core, shm and soak (a few minutes)
    python -m bench shm --quick     # one part, smoke size
"""
