"""Installed as `alignpipe.pipelines` (see alignpipe/__init__.py)."""
if __name__ == "pipelines":  # the old top-level spelling, imported before alignpipe: become the one alignpipe.pipelines
    import sys

    import alignpipe.pipelines

    sys.modules[__name__] = alignpipe.pipelines
