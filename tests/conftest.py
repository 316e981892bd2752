import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> str:
    """A randomly initialised small-f8c16 GQ-VAE (0.25 bpp, K = 2^16) saved as a real checkpoint."""
    import gq

    torch.manual_seed(0)
    model = gq.GQVAE(gq.model_config("small-f8c16", 0.25))
    path = tmp_path_factory.mktemp("ckpt") / "small-random.safetensors"
    gq.save(model, str(path), provenance={"note": "random init, tests only"})
    return str(path)
