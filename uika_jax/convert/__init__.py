"""Weight converters: local safetensors files (HF layouts) into NNX model state.

Nothing here reaches a hub: every path is a local file named in the config.
"""
