"""Side concerns of the training loop, one small hook per file (mosaicml-style callbacks).

- ``ema``         exponential moving average of the student's weights.
- ``nan_guard``   stops on non-finite or exploding losses with a clear error; the last good checkpoint stays.
- ``checkpoint``  periodic checkpoints with everything an exact resume needs.
- ``progress``    ProgressFn calls and JSON progress lines on stdout (parsed by the Prefect task).
"""
