"""A model folder as one type: what every workflow reads of an nbl-dist output (or of a plain checkpoint) before it
loads any weight. The config.json as written, its "nbl" section, the linearized layers (sorted, read in one place:
modeling_nbl.linearized_layers), the family adapter (built in one place: arch.adapter_for), the checkpoint keys of
each layer's map, the baseline a healing named, the records of which blocks of --data each run used, and whether
the weights are quantized.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from nbl_dist.errors import CheckpointError
from nbl_dist.model.arch import ArchAdapter, adapter_for
from nbl_dist.model.modeling_nbl import NBL_MODEL_TYPE_PREFIX, linearized_layers
from nbl_dist.model.validate import config_json


@dataclasses.dataclass(frozen=True)
class ModelFolder:
    """A folder holding a config.json (and weights beside it).

    Attributes:
        path: the folder.
        config: config.json as written.
    """

    path: Path
    config: dict

    @classmethod
    def open(cls, path: str | Path, flag: str = "--model") -> ModelFolder:
        """The folder at `path`; CheckpointError naming `flag` when it is no folder or has no readable config.json."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{flag} {str(path)!r} does not exist or is not a folder")
        return cls(path, config_json(path, flag))

    @property
    def nbl(self) -> dict:
        """config.json's "nbl" section ({} for a plain checkpoint)."""
        return self.config.get("nbl") or {}

    @property
    def linearized_layers(self) -> list[int]:
        return linearized_layers(self.config)

    @property
    def is_linearized(self) -> bool:
        """An nbl-dist output in the current format: an nbl_<family> model type and at least one linearized layer."""
        return str(self.config.get("model_type", "")).startswith(NBL_MODEL_TYPE_PREFIX) and bool(self.linearized_layers)

    @functools.cached_property
    def adapter(self) -> ArchAdapter:
        return adapter_for(self.config)

    def map_keys(self) -> dict[int, tuple[str, str]]:
        """Each linearized layer's checkpoint keys of its map, (W, b), in layer order."""
        return {i: self.adapter.nbl_keys(i) for i in self.linearized_layers}

    @property
    def quantization(self) -> dict | None:
        """config.json's quantization_config (None: float weights)."""
        return self.config.get("quantization_config") or None

    @property
    def data_records(self) -> list[dict]:
        """Every record of which blocks of --data a run made this folder with: its calibration's, its healing's, its
        quantization's."""
        from nbl_dist.data.ledger import data_records

        return data_records(self.nbl)
