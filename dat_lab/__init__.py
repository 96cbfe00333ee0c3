"""dat-lab: take Deformable Attention Transformers (Xia et al., CVPR 2022) apart by ablation.

Importing dat_lab registers every named DAT variant with timm (`timm.create_model("dat_tiny")`).
"""

from .models import (VARIANTS, DAT, DATConfig, StageConfig, config_from_official, create_model, get_config,
                     load_checkpoint, load_official, replace_config, save_checkpoint)

__version__ = "0.1.0"
__all__ = ["VARIANTS", "DAT", "DATConfig", "StageConfig", "config_from_official", "create_model", "get_config",
           "load_checkpoint", "load_official", "replace_config", "save_checkpoint"]
