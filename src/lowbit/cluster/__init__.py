"""Where lowbit's units of work run: in this process, in order, or as tasks on a Ray cluster (``--ray``)."""
