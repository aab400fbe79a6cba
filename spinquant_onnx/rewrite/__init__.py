"""Rewrites: norm fusion, rotations and online rotation nodes, planned first and applied per tensor."""
