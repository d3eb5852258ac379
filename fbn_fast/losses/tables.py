"""Float32 lookup tables held by a loss module: kept float32 under dtype casts, saved only when asked.

A table (the relatedness matrix, the VA means) is data the user passed, not a weight. ``module.half()``,
``module.to(torch.bfloat16)`` or Lightning's ``bf16-true`` cast every floating buffer; rounding a table of
probabilities to bf16 changes the loss, so :class:`TableModule` moves its tables with the module's device only.
Whether a table is part of the module's ``state_dict`` is the ``persistent`` choice:

- ``persistent=False`` (default): tables are not saved, and a state dict that has them (a checkpoint written
  before this choice existed, or with ``persistent=True``) loads with them ignored, so a checkpoint never
  overwrites the table given to the constructor.
- ``persistent=True``: tables are saved; loading adopts the checkpoint's tables (a table the module lacks, such
  as VA means, included), keeps the module's where the checkpoint has none, and reports a size mismatch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["TableModule"]


class TableModule(nn.Module):
    """An ``nn.Module`` whose tables registered by :meth:`register_table` stay float32 (see the module doc)."""

    def __init__(self, persistent: bool = False) -> None:
        super().__init__()
        self.persistent_tables = bool(persistent)
        self._table_names: tuple[str, ...] = ()

    def register_table(self, name: str, value: Tensor | None) -> None:
        """Register ``value`` (float32, or ``None`` for an absent table) as the buffer ``name``."""
        if value is not None:
            value = value.detach().to(torch.float32).clone()
        self.register_buffer(name, value, persistent=self.persistent_tables)
        self._table_names = (*self._table_names, name)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> TableModule:
        before = {name: self._buffers[name] for name in self._table_names}
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32:
                # The cast went through `fn`; take the exact float32 values to the device it chose instead.
                self._buffers[name] = old.to(device=new.device)
        return out

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        keys = {prefix + name: name for name in self._table_names}
        for key, name in keys.items():
            value = state_dict.pop(key, None)
            if value is None or not self.persistent_tables:
                continue
            current = self._buffers[name]
            if current is not None and tuple(value.shape) != tuple(current.shape):
                error_msgs.append(f"size mismatch for {key}: the state dict has shape {tuple(value.shape)}, "
                                  f"the module {tuple(current.shape)}")
                continue
            device = current.device if current is not None else self._buffers[self._table_names[0]].device
            self._buffers[name] = value.detach().to(device=device, dtype=torch.float32).clone()
        first_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # A table the state dict lacks keeps the module's value: not a missing key.
        missing_keys[first_missing:] = [k for k in missing_keys[first_missing:] if k not in keys]
