"""Block reshaping, bit packing, scale encodings and scale search: format-independent."""
