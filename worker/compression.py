"""A worker's side of a run's compression (``RunSpec.compression``): its pushes in the run's wire
form. Pulls arrive in it too and are converted as they land (``paramserver.sink``).

Top-k with error feedback (Seide et al. 2014; Lin et al., Deep Gradient Compression, 2018; BytePS's
compressors): each push carries, of each tensor, about ``k = ceil(ratio * size)`` elements of
``residual + gradient`` largest in magnitude; what was not sent, and the rounding of what was
(in half precision), stays in the residual and joins the next gradient. Nothing is lost, only
delayed: after any number of pushes, what was sent plus the residual is the sum of the
gradients (up to float32 rounding). The residual lives as long as this rank's assignment: it
survives retries and reconnects (the same trainer), and is dropped when the server sends the
rank back to an earlier clock (those iterations are computed again) or gives it to another
worker (eviction: the new incarnation starts without it).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from paramserver.v1 import compress, wire
from paramserver.v1 import paramserver_pb2 as pb

from .rates import OwnRate

__all__ = ["PushCodec"]


class PushCodec:
    """Encodes a rank's gradients for its run; ``sent`` is what the last push carries, as the
    server will apply it (for the worker's read-my-writes step)."""

    def __init__(self, compression: pb.Compression) -> None:
        self.dtype = compression.dtype or pb.DATA_TYPE_FLOAT32
        self.ratio = compression.topk_ratio
        self.residual: dict[str, np.ndarray] = {}
        self.sent: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
        """Name -> (positions or None for all, values in the wire form) of the last push."""

    @classmethod
    def of(cls, spec: pb.RunSpec) -> PushCodec | None:
        """The codec of ``spec``'s run; None when its pushes go as they are (float32, dense)."""
        c = spec.compression
        return cls(c) if (c.dtype not in (pb.DATA_TYPE_UNSPECIFIED, pb.DATA_TYPE_FLOAT32) or c.topk_ratio) else None

    def encode(self, grads: Mapping[str, np.ndarray]) -> dict[str, wire.CodedPart]:
        out: dict[str, wire.CodedPart] = {}
        for name, g in grads.items():
            flat = np.ascontiguousarray(g, np.float32).reshape(-1)
            if not self.ratio:
                values = compress.encode(flat, self.dtype)
                out[name] = wire.CodedPart(values, self.dtype, g.shape)
                self.sent[name] = (None, values)
                continue
            acc = self.residual.get(name)
            if acc is None or acc.size != flat.size:
                acc = self.residual[name] = flat.copy()
            else:
                acc += flat
            picked = compress.top_k(acc, compress.k_of(self.ratio, flat.size))
            chosen = acc[picked]
            values = compress.encode(chosen, self.dtype)
            acc[picked] -= chosen if self.dtype == pb.DATA_TYPE_FLOAT32 else self._decoded(values)  # the rounding too
            out[name] = wire.CodedPart(values, self.dtype, g.shape, picked)
            self.sent[name] = (picked, values)
        return out

    def _decoded(self, values: np.ndarray) -> np.ndarray:
        out = np.empty(values.size, np.float32)
        compress.decode_into(values, self.dtype, out)
        return out

    def sent_values(self, name: str) -> tuple[np.ndarray | None, np.ndarray]:
        """What the last push carried of tensor ``name``: (positions or None for all, float32 values)."""
        picked, values = self.sent[name]
        return picked, values if self.dtype == pb.DATA_TYPE_FLOAT32 else self._decoded(values)

    def step_locally(self, params: dict[str, np.ndarray], rate: OwnRate) -> None:
        """Plain SGD's step with what the last push carried (what the server applies of it)."""
        for name in self.sent:
            picked, values = self.sent_values(name)
            flat = params[name].reshape(-1)
            lr = rate.elements(name, params[name].shape, picked)
            if picked is None:
                flat -= lr * values
            else:
                flat[picked] -= lr * values

    def reset(self) -> None:
        self.residual.clear()
        self.sent.clear()
