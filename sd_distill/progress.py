"""Progress reporting without a framework: library code calls ``progress(done, total, message)``.

Prefect tasks pass a callback that updates a progress artifact; scripts pass a tqdm bar;
tests pass a list's ``append``. ``None`` means nobody is listening.
"""

from __future__ import annotations

from typing import Callable, Optional

from tqdm.auto import tqdm

ProgressFn = Callable[[int, int, str], None]


def report(progress: Optional[ProgressFn], done: int, total: int, message: str = "") -> None:
    if progress is not None:
        progress(done, total, message)


def tqdm_progress(desc: str) -> ProgressFn:
    """A terminal progress bar as a ProgressFn."""
    bar = tqdm(desc=desc, total=0, leave=False)

    def update(done: int, total: int, message: str = "") -> None:
        bar.total = total
        bar.n = done
        if message:
            bar.set_postfix_str(message[:60])
        bar.refresh()
        if total and done >= total:
            bar.close()

    return update
