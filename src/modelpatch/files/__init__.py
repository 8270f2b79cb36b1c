"""Files a run writes: patch files (safetensors + checksummed metadata) and ``results.json``."""
