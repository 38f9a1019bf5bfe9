"""The physical constants the simulation and the fits share, defined once.

The simulation draws multiple scattering with them (simulation.physics.highland_sigma) and every fit that knows
it (model.scattering_fit, classical.gbl, the Cramér-Rao bound of analysis.limit) writes the same Highland formula
in its own array library (Numba, JAX, NumPy) with the same constants. A change here changes the simulation's and
the training's code version (simulation.shards.code_version, model.run_folder.TRAINING_SOURCES).
"""

from __future__ import annotations

#: muon mass [GeV] (PDG); the simulation also uses it for the extra tracks' beta in the Highland formula
MUON_MASS = 0.1056583755
#: Highland's constants (PDG 2024 eq. 34.16): theta0 = HIGHLAND_SCALE / (beta p) sqrt(x/X0) (1 + HIGHLAND_LOG
#: ln(x / (X0 beta^2)))
HIGHLAND_SCALE = 0.0136
HIGHLAND_LOG = 0.038
#: cos(theta) floor of the path length x/X0 / cos theta through a layer (and of the fits' circle direction)
COS_FLOOR = 1e-3
