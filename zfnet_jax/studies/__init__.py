"""Studies made of many runs: flag sweeps and their tables (``sweeps``) and the
first-layer study (``conv1_sweep``)."""
