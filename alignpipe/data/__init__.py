"""data: datasets and folders on disk. Reading and validating stage inputs against the schemas (io), atomic,
locked, resumable stage outputs (output), manifests and fingerprints (manifest), the chain of manifests behind
an output (lineage), what an output is in words for `inspect` (describe), and Hub ids as folders of
huggingface_hub's cache (hub).

May import: `alignpipe.core`, `alignpipe.schemas`.
"""
