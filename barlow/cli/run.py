"""`barlow run ...`: runs a spec on this machine (arrives with the local runtime)."""
