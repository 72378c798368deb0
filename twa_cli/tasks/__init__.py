"""Models, data and tasks: the registries, the Task interface, and "the flag, else the checkpoint's metadata"."""
