"""Data: the on-disk format and its checks, readers and writers, importers, packing, pipeline.

`format` (layout, index, encodings), `reader` (validated reads), `writer` (atomic,
resumable writes), `checks` (a whole dataset up front), `sources` (random access to
a folder's frames), `shards` and `shard_records` (ArrayRecord packing and its
source), `vhap` and `framing` (the VHAP importer and its face-framing crops),
`sampling`, `augment`, `pipeline` and `global_batches` (the grain pipeline).
"""
