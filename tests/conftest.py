"""Suite-wide settings."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests use tiny tensors: one intra-op thread is far faster (and steadier) than OpenMP contention on 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _private_encoder_cache(tmp_path_factory):
    """ONNX encoder exports of models without a writable folder go to a temporary cache, never the user's.

    Not restored at the end: a backend's background export may still be finishing then.
    """
    import os

    os.environ["OVSAM_ENCODER_CACHE"] = str(tmp_path_factory.mktemp("encoder-cache"))
