"""Status: how far a run is, read from its files (runfiles), and the report `barlow status` shows of it and its job
(report). No torch here: the CLI image reads status too."""
