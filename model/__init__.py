"""MemMamba and its baselines in plain PyTorch (CUDA kernels are optional fast paths)."""
from model.compile import compile_layers
from model.config import ConfigError, MemMambaConfig, TransformerConfig, model_config_from_dict
from model.memmamba import MemMambaLM
from model.pretrained import build_model, load_pretrained, save_pretrained
from model.state import ModelState
from model.transformer import KVCache, TransformerLM

__all__ = ["ConfigError", "MemMambaConfig", "TransformerConfig", "model_config_from_dict", "MemMambaLM",
           "TransformerLM", "ModelState", "KVCache", "build_model", "load_pretrained", "save_pretrained",
           "compile_layers"]
