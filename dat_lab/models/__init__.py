"""DAT models: configs and variants, geometry, attention blocks, the model, checkpoint conversion."""

from .config import BLOCK_LETTERS, POSITIONS, VARIANTS, DATConfig, StageConfig, get_config, replace_config
from .convert import config_from_official, load_checkpoint, load_official, save_checkpoint
from .dat import DAT, create_model

__all__ = ["BLOCK_LETTERS", "POSITIONS", "VARIANTS", "DAT", "DATConfig", "StageConfig", "config_from_official",
           "create_model", "get_config", "load_checkpoint", "load_official", "replace_config", "save_checkpoint"]
