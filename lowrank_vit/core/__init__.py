"""The mathematics, on torch alone: the decompositions and their energies, the calibration statistics, the loss-aware
curvature, the rank allocation, and small shared helpers."""
