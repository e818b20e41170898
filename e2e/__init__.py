"""End-to-end runs on a real cluster with real pods (rung 4 of the testing ladder)."""
