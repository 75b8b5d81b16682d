"""data: datasets and folders on disk. Reading and validating stage inputs against the schemas (io), atomic,
locked, resumable stage outputs (output), manifests and fingerprints (manifest), the chain of manifests behind
an output (lineage), and Hub ids as folders of huggingface_hub's cache (hub).

May import: `alignpipe.core`, `alignpipe.schemas`.
"""
