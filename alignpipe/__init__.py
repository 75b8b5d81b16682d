"""alignpipe: online alignment as a loop of restartable stages exchanging fixed-schema datasets on disk."""
__version__ = "0.1.0"
