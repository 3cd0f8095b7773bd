"""Drift monitors checked at start: a reference profile read, and a monitor refused (ConfigError,
naming what does not fit) when it cannot work with its model's signature."""

from __future__ import annotations

import json
import logging
import os

from ..core.drift import Profile, profile_from_json
from ..core.drift_monitors import MonitorSpec
from ..core.errors import ConfigError
from ..core.signature import ModelSignature
from ..core.types import printable
from ..state import read_capped

log = logging.getLogger("batchgate.drift")


def read_profile(path: str) -> Profile:
    raw = read_capped(path, 256 * 1024 * 1024, "drift profile")
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"drift profile {path} is not JSON: {e}") from None
    return profile_from_json(data, f"drift profile {path}")


def check_monitor(spec: MonitorSpec, profile: Profile, signature: ModelSignature | None, max_features: int) -> None:
    """A monitor that cannot work is refused at start, naming what does not fit. ``signature``
    None: a remote model (or a route of them) not loaded yet: only what the profile alone
    decides is checked (live, a tensor of another width is counted invalid)."""
    where = f"drift monitor of '{spec.model}'"
    if profile.model and profile.model != spec.model:  # (a copied monitor entry with the wrong file, say)
        log.warning(
            "%s: its profile was made for model '%s'; its tensors fit, so it is used (profile this "
            "model, or rename the file, if that is not meant)",
            where,
            printable(profile.model[:128]),
        )
    for name in spec.inputs:
        if signature is None:
            if name not in profile.inputs:
                raise ConfigError(f"{where}: the profile describes no input '{name}' ({', '.join(profile.inputs)})")
            continue
        tensors = {t.name: t for t in signature.inputs}
        t = tensors.get(name)
        if t is None:
            raise ConfigError(f"{where}: the model has no input '{name}' (inputs: {', '.join(sorted(tensors))})")
        if name not in profile.inputs:
            raise ConfigError(f"{where}: the profile describes no input '{name}' ({', '.join(profile.inputs)})")
        _check_width(where, "input", t, len(profile.inputs[name]), signature.max_batch_size)
        _check_kinds(where, "input", t, profile.inputs[name])
    extra = sorted(set(profile.inputs) - set(spec.inputs))
    if extra:
        raise ConfigError(f"{where}: the profile describes input(s) the monitor does not watch: {', '.join(extra)}")
    if spec.outputs:
        if not profile.outputs:
            raise ConfigError(
                f"{where}: 'outputs: true' needs a profile with outputs (batchgate drift profile --model)"
            )
        outs = {t.name: t for t in signature.outputs} if signature is not None else {}
        for name, feats in profile.outputs.items() if signature is not None else ():
            t = outs.get(name)
            if t is None:
                raise ConfigError(f"{where}: the profile describes output '{name}', which the model does not have")
            _check_width(where, "output", t, len(feats), signature.max_batch_size)  # type: ignore[union-attr]
            _check_kinds(where, "output", t, feats)
    count = len(profile.features(spec.outputs))
    if spec.min_drifted_features > count and not spec.min_drifted_share:
        raise ConfigError(
            f"{where}: min_drifted_features {spec.min_drifted_features} is more than the {count} features watched"
        )
    if count > max_features:
        raise ConfigError(f"{where}: {count} features are more than drift_max_features ({max_features})")


def _check_kinds(where: str, side: str, tensor, features) -> None:
    """Text taken as numbers can never be scored (every window would be refused): an output's
    too, which until 2026-12-06 started and then counted every sample invalid."""
    numeric = [f.name for f in features if f.kind == "numeric"]
    if numeric and tensor.dtype.v2 == "BYTES":
        raise ConfigError(
            f"{where}: {side} '{tensor.name}' holds BYTES, but the profile takes feature '{numeric[0]}' as numeric"
        )


def _check_width(where: str, side: str, tensor, width: int, max_batch: int) -> None:
    dims = tensor.dims if max_batch > 0 else tensor.dims[1:]
    if len(dims) > 1:
        raise ConfigError(
            f"{where}: {side} '{tensor.name}' has shape {list(tensor.dims)}; drift watches 2-D [-1, features] tensors"
        )
    have = dims[0] if dims else 1
    if have != -1 and have != width:
        raise ConfigError(f"{where}: {side} '{tensor.name}' has {have} columns but the profile describes {width}")


def check_dead_letter(path: str) -> None:
    """The dead-letter file must be one the detector process can read and replace (it writes a
    temporary file beside it): a directory, or a folder it cannot write in, stops the start (the
    detector would otherwise fail at each start, restarted without end). A missing folder is
    made, as drift_profiles_dir is."""
    where = f"drift_dead_letter_file {path}"
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{where}: cannot make its directory: {e.strerror}") from None
    if os.path.exists(path) and not os.path.isfile(path):
        raise ConfigError(f"{where}: not a regular file")
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        raise ConfigError(f"{where}: cannot be read and written")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: its directory {folder} is not writable")
