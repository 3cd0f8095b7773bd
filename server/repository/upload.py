"""The files and config given with a load (the repository API's upload), checked before
anything is written."""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc

from ..core.errors import ErrorCode, GatewayError
from .config import config_from_json
from .scan import staged_paths

TORCH_PLATFORMS = ("pytorch_libtorch", "pytorch")


def checked_upload(name: str, files: dict[str, bytes], config_json: str | None) -> tuple[list, mc.ModelConfig]:
    """The staged paths of ``files`` and the config they go with; INVALID_ARGUMENT when either
    is refused."""
    if config_json is None:
        raise GatewayError(ErrorCode.INVALID_ARGUMENT, f"model '{name}': files given with a load need a 'config' too")
    staged = staged_paths(name, files)  # all checked first
    override = config_from_json(config_json, name)
    # A TorchScript file is a program (its ops can read files, e.g. torch.from_file): one
    # uploaded through the API would run with the server's rights. Only a repository the
    # operator placed serves TorchScript.
    uploaded_torch = override.platform in TORCH_PLATFORMS or override.backend in TORCH_PLATFORMS
    if uploaded_torch or any(p.lower().endswith((".pt", ".pth")) for p in files):
        raise GatewayError(
            ErrorCode.INVALID_ARGUMENT,
            f"model '{name}': TorchScript models cannot be uploaded with a load (a TorchScript file is a "
            "program that runs with the server's rights); put them in the model repository",
        )
    return staged, override
