"""Reading a state-dict file safely (``weights_only=True``): the one loader for every weights file edgepipe reads
(model specs' ``weights``, artifacts, detector backbones). Below the zoo and the loaders, so both may use it."""
from __future__ import annotations

from pathlib import Path

import torch

from edgepipe.errors import EdgepipeError


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EdgepipeError(f"{p}: weights file not found") from None
    except Exception as e:  # noqa: BLE001 - torch raises many unpickling errors; all mean "not a state dict"
        raise EdgepipeError(f"{p}: not a loadable state dict ({type(e).__name__}); "
                            "save it with torch.save(model.state_dict(), path)") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise EdgepipeError(f"{p}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    return sd
