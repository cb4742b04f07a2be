"""Data: the on-disk format and its checks, readers and writers, importers, packing, pipeline.

`format` (layout, index, encodings), `reader` (validated reads), `writer` (atomic,
resumable writes), `checks` (a whole dataset up front).
"""
