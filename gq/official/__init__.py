"""The paper's released checkpoints, in and out: official Lightning `.ckpt` + YAML <-> our GQVAE.

The official code (github.com/tongdaxu/VQ-VAE-from-Gaussian-VAE) builds `pit.modules.unet.Encoder` /
`Decoder` and a `GaussianQuantRegularizer` (interleaved groups) or `GaussianQuantRegularizer2`
(contiguous) from a YAML config. `from_official` translates that config into a `ModelConfig` (refusing,
with the field's name, anything this version cannot build), maps every official tensor name onto ours
(our attention keeps q, k, v in one 1x1 conv, concatenated in that order) and checks every shape.
`to_official` is the way back: the official names, shapes and a YAML the authors' code loads.

Modules, in reading order: `yaml_bounds` (the YAML read within bounds), `config` (the config translated),
`vit` (the ViT's config), `names` (tensor names), `shapes` (sizes checked before building),
`unpickler` + `zip_crc` (a `.ckpt` read without running it), `checkpoint` (in), `export` (out).
"""

from gq.official.checkpoint import from_official, load_official_state, read_official_checkpoint
from gq.official.config import CONVERTER_VERSION, model_config_from_official, read_config
from gq.official.export import save_official, to_official_config, to_official_state
from gq.official.names import official_names

__all__ = [
    "CONVERTER_VERSION",
    "from_official",
    "load_official_state",
    "model_config_from_official",
    "official_names",
    "read_config",
    "read_official_checkpoint",
    "save_official",
    "to_official_config",
    "to_official_state",
]
