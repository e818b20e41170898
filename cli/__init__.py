"""The kdistill command line."""
