"""Backends register by the platform names a config.pbtxt uses; a platform nobody serves is a
clear load error, not a crash."""

from __future__ import annotations

import tritonclient.http as httpclient

from batchgate.backends.base import local_backend, local_platforms
from batchgate.backends.onnx import OnnxBackend
from batchgate.demo import _save, classifier_model


def test_onnx_registers_under_its_platform_and_backend_names():
    assert local_backend("onnxruntime_onnx") is OnnxBackend
    assert local_backend("onnxruntime") is OnnxBackend
    assert "onnxruntime_onnx" in local_platforms()


def test_config_platform_or_backend_picks_the_backend(tmp_path, serve):
    repo = str(tmp_path)
    _save(classifier_model(), repo, "by_backend", config='backend: "onnxruntime"\n')
    _save(classifier_model(), repo, "by_platform", config='platform: "onnxruntime_onnx"\n')
    _save(classifier_model(), repo, "tf", config='platform: "tensorflow_savedmodel"\n')
    running = serve(repo)
    c = httpclient.InferenceServerClient(running.http_url)
    assert c.is_model_ready("by_backend") and c.is_model_ready("by_platform")
    assert not c.is_model_ready("tf")
    rows = {r["name"]: r for r in c.get_model_repository_index()}
    reason = rows["tf"]["reason"]
    assert "platform 'tensorflow_savedmodel' is not served" in reason and "onnxruntime_onnx" in reason
    assert running.gateway.repository.resolve("by_backend", "").execution.__class__.__name__ == "LocalExecution"
