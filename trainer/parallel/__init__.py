"""Multi-process training: device mesh, teacher pipeline split, student DP/TP/PP, gradient compression."""
