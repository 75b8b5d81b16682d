"""Installed as `alignpipe.stages` (see alignpipe/__init__.py)."""
if __name__ == "stages":  # the old top-level spelling, imported before alignpipe: become the one alignpipe.stages
    import sys

    import alignpipe.stages

    sys.modules[__name__] = alignpipe.stages
