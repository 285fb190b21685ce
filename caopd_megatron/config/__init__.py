from caopd_megatron.config.loader import ConfigError, load_config, save_config, to_yaml
from caopd_megatron.config.schema import CaOPDConfig

__all__ = ["CaOPDConfig", "ConfigError", "load_config", "save_config", "to_yaml"]
