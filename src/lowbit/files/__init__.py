"""lowbit.files: writing files safely (atomic replace, outputs that never overwrite inputs or the cache), below
every package that writes one."""
