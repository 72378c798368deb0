"""Files: checkpoints of every format read lazily, results written atomically, run-folder names."""
