"""gq: Gaussian Quant (GQ) and the Target Divergence Constraint (TDC), in pure PyTorch.

Paper: "Vector Quantization using Gaussian Variational Autoencoder", Xu et al., arXiv 2512.06609.
"""

from gq.calibration import Calibration
from gq.checkpoint import CheckpointError, describe, load, save
from gq.codebook import CodebookSpec, GaussianCodebook
from gq.diffusers_vae import from_diffusers
from gq.layout import LAYOUTS, merge_groups, split_groups
from gq.model import GQVAE, ModelConfig, ModelIdentity
from gq.networks import NetworkConfig
from gq.official import from_official, save_official, to_official_config, to_official_state
from gq.presets import OPERATING_POINTS, PRESETS, model_config, operating_point
from gq.quantizer import LOGVAR_RANGE, GaussianQuantizer, QuantizerConfig, dequantize, quantize
from gq.tdc import KLStats, TargetDivergenceConstraint, TDCConfig, kl_bits
from gq.version import __version__  # noqa: F401 (gq.__version__)
from gq.vit import ViTConfig

__all__ = [
    "GQVAE",
    "Calibration",
    "LAYOUTS",
    "OPERATING_POINTS",
    "PRESETS",
    "CheckpointError",
    "describe",
    "from_diffusers",
    "from_official",
    "save_official",
    "to_official_config",
    "to_official_state",
    "ModelConfig",
    "ModelIdentity",
    "NetworkConfig",
    "ViTConfig",
    "load",
    "model_config",
    "operating_point",
    "save",
    "LOGVAR_RANGE",
    "CodebookSpec",
    "GaussianCodebook",
    "GaussianQuantizer",
    "KLStats",
    "QuantizerConfig",
    "TDCConfig",
    "TargetDivergenceConstraint",
    "dequantize",
    "kl_bits",
    "merge_groups",
    "quantize",
    "split_groups",
]
