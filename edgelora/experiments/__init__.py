"""Experiments: sweeps over configs (sweep), their reports and plots (report), the centralized baseline
(centralized) and the Flower comparison of bytes (flower).

May import: the shared core, edgelora.simulation, edgelora.server. Nothing below imports this package.
"""
