"""ebmm: energy-based memory models from the shell.

Importing the package, before torch loads, makes OpenMP's idle threads sleep instead of
spin (`OMP_WAIT_POLICY=PASSIVE`, unless the environment sets it). Why: ebmm's steps are
thousands of small kernels, and torch's threads spin at every barrier. On a machine
whose cores are busy with anything else, a spinning team waits at each barrier for
whichever thread the scheduler took away: on the 2-core development machine beside one
training, `make demo`'s refining write took 346 s with spinning threads, 21 s with
sleeping ones (19 s on one thread). Idle, sleeping costs some speed (12.0 s against
16.4 s): `OMP_WAIT_POLICY=ACTIVE` gets it back on a machine ebmm has to itself. GNU
OpenMP reads the policy once, when torch loads it, so a program that imports torch
before ebmm_cli keeps its own.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
