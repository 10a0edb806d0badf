"""Artifacts: what a stage produces and the next stage consumes.

An artifact is a folder-relative file set plus a small JSON descriptor (``artifact.json``) saying
its kind, its files and facts the next stage needs (precision, whether it is quantized). Its content
hash (over the files, in order) is what the manifest records and the cache keys on.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_write_text
from edgepipe.types import ArtifactKind, DType

DESCRIPTOR = "artifact.json"


@dataclass
class Artifact:
    """A stage output: ``kind``, files relative to ``root``, and facts about the model."""

    kind: ArtifactKind
    root: Path
    files: dict[str, str]
    """Role -> file name relative to root, e.g. {"onnx": "model.onnx"}."""
    dtype: DType = DType.FP32
    quantized: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else the next stage or the report needs (e.g. input shape, backend, device)."""

    def path(self, role: str) -> Path:
        if role not in self.files:
            raise EdgepipeError(f"{self.root / DESCRIPTOR}: artifact has no '{role}' file (has: {', '.join(self.files)})")
        return self.root / self.files[role]

    def size_bytes(self) -> int:
        """Size on disk of the deployable files (all files of the artifact)."""
        return sum((self.root / f).stat().st_size for f in self.files.values() if (self.root / f).is_file())

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for role in sorted(self.files):
            p = self.root / self.files[role]
            h.update(role.encode())
            if p.is_file() and p.suffix == ".pt" and _hash_state_dict(p, h):
                continue
            if p.is_file():  # any other file, or a .pt that does not load (damaged: its bytes then differ anyway)
                with p.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
        return h.hexdigest()[:16]

    def save(self) -> Path:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["dtype"] = self.dtype.value
        d.pop("root")
        return atomic_write_text(self.root / DESCRIPTOR, json.dumps(d, indent=2, default=str))

    @classmethod
    def load(cls, root: Path) -> Artifact:
        desc = Path(root) / DESCRIPTOR
        try:
            d = json.loads(desc.read_bytes())
        except FileNotFoundError:
            raise EdgepipeError(f"{desc}: no artifact here; run the stage that produces it (with --force if it is "
                                "recorded as done)") from None
        except ValueError:  # JSONDecodeError, or random bytes that are not even UTF-8
            raise EdgepipeError(f"{desc}: damaged descriptor (not readable JSON); rerun the stage that produced it "
                                "with --force") from None
        try:
            files = d["files"]
            if not (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
                raise TypeError("files")
            return cls(kind=ArtifactKind(d["kind"]), root=Path(root), files=files, dtype=DType(d["dtype"]),
                       quantized=bool(d.get("quantized", False)), meta=dict(d.get("meta") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise EdgepipeError(f"{desc}: damaged descriptor ({type(e).__name__}: {e}); rerun the stage that produced "
                                "it with --force") from None


def _hash_state_dict(path: Path, h: "hashlib._Hash") -> bool:
    """Hash a saved state dict by its tensors: torch.save embeds a random serialization id, so two
    saves of identical weights differ byte-wise, which would defeat caching and lineage checks.
    False when the file is not a loadable state dict (a damaged file: the caller hashes its bytes)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        items = sorted(state.items())
    except Exception:  # noqa: BLE001 - torch raises many types for a truncated or foreign file
        return False
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}:{t!r}".encode())
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return True
