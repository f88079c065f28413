"""Config values as plain containers, so hyper-parameters saved in checkpoints need no OmegaConf."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(cfg: Any) -> Any:
    """A resolved dict/list for a DictConfig/ListConfig; anything else unchanged."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
