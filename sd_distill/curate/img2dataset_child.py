"""The child interpreter that runs img2dataset: ``python -m sd_distill.curate.img2dataset_child <args.json>``.

img2dataset spawns its download workers, so it runs here, not in the caller (notebooks, scripts without a
``__main__`` guard, Prefect workers are never re-imported by ``spawn``). ``args.json`` holds
``img2dataset.download``'s keyword arguments plus ``"_guard"``, the ``netguard.Guard`` fields.

Every worker fetches through the network guard: img2dataset builds one ``Downloader`` and pickles it to
each spawned worker; ``GuardedDownloader`` carries the guard along and installs ``netguard``'s opener in
the worker before its first shard.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from img2dataset.downloader import Downloader

from sd_distill.curate import netguard

_GUARD: netguard.Guard | None = None  # set by main() before img2dataset builds its Downloader


class GuardedDownloader(Downloader):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = _GUARD  # pickled with the downloader into every worker

    def __call__(self, row):
        if self.guard is None:
            raise RuntimeError("GuardedDownloader built without a guard: refusing to download unguarded")
        netguard.install(self.guard)
        return super().__call__(row)


def main(args_file: str) -> None:
    global _GUARD
    # the module, not the `main` function that img2dataset/__init__.py binds to the same name
    i2d_main = importlib.import_module("img2dataset.main")

    kwargs = json.loads(Path(args_file).read_text())
    g = kwargs.pop("_guard")
    _GUARD = netguard.Guard(
        block_private=g["block_private"], allowed_networks=tuple(g["allowed_networks"]),
        allowed_endpoints=tuple(g["allowed_endpoints"]), max_bytes=int(g["max_bytes"]),
    )
    i2d_main.Downloader = GuardedDownloader
    i2d_main.download(**kwargs)


if __name__ == "__main__":
    main(sys.argv[1])
