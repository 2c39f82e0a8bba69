"""edgecow's benchmark harness: figures and ratios measured side by side in one run, never asserted.

    python -m bench                 # every part: core, shm, models, outside, startup, soak (several minutes)
    python -m bench shm --quick     # one part, smoke size
"""
