"""CPU detection and per-op kernel choice (isa.py, plan.py, calibrate.py, info.py)."""
