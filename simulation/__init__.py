"""The Numba toy detector: muon helices, multiple scattering, strip digitisation, noise and extra tracks."""
