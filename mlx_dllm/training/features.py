"""The frozen target's features for each training sequence, computed once and optionally kept on disk.

After the first epoch the target forward is the same every time a sequence comes back (only the anchors change),
so `--cache-features` saves it in the work folder and later epochs, and resumed runs, read it instead. Files
hold the features in their own dtype, so a cached run trains exactly as an uncached one.
"""

import hashlib
import os
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx

from ..models.target import Target


class TargetFeatures:
    def __init__(self, target: Target, folder: Optional[Path] = None, target_id: str = ""):
        self.target = target
        self.folder = None
        if folder is not None:
            key = hashlib.sha256(f"{target_id}:{target.capture_layer_ids}".encode()).hexdigest()[:16]
            self.folder = folder / key
            self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, ids: Sequence[int]) -> mx.array:
        """[1, N, K*H] features of the sequence `ids`."""
        file = self._file(ids)
        if file is not None and file.exists():
            try:
                return mx.load(str(file))["features"]
            except (OSError, ValueError, RuntimeError, KeyError):
                pass  # unreadable (a foreign file): recompute and replace it
        _, features = self.target(mx.array(ids, dtype=mx.int32)[None], self.target.make_cache())
        mx.eval(features)
        if file is not None:
            partial = file.with_name(f".{file.stem}.partial.safetensors")
            mx.save_safetensors(str(partial), {"features": features})
            os.replace(partial, file)  # a kill leaves the file whole or absent
        return features

    def _file(self, ids: Sequence[int]) -> Optional[Path]:
        if self.folder is None:
            return None
        digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:24]
        return self.folder / f"{digest}.safetensors"
