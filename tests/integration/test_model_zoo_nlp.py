"""An NLP-like model: INT64 ``input_ids`` and ``attention_mask`` of dynamic [batch, sequence],
exported from PyTorch (legacy exporter, then dynamo), gateway-batched. Requests of different
lengths, sent at once over gRPC and HTTP, each get PyTorch's answer for their own tokens. A
request whose two inputs disagree on the sequence length (a caller's mistake) was a 500 quoting
ONNX Runtime's broadcasting internals; the model names that dimension alike on both inputs, so
it is now refused before it runs, naming the inputs and the sizes."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

BATCHED = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n"


class MeanPooled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(40, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


@pytest.fixture(scope="module")
def nlp(tmp_path_factory):
    torch.manual_seed(1)
    model = MeanPooled().eval()
    ids = torch.ones((2, 5), dtype=torch.int64)
    mask = torch.ones((2, 5), dtype=torch.int64)  # (two tensors: one given twice is exported as one input)
    repo = tmp_path_factory.mktemp("nlp")
    f = io.BytesIO()
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        model,
        (ids, mask),
        f,
        dynamo=False,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
    )
    files = {"legacy": f.getvalue()}
    dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("sequence", max=64)}
    exported = torch.onnx.export(
        model,
        (ids, mask),
        dynamo=True,
        verbose=False,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": dims, "attention_mask": dims},
    )
    files["dynamo"] = exported.model_proto.SerializeToString()
    for name, data in files.items():
        os.makedirs(repo / name / "1")
        (repo / name / "1" / "model.onnx").write_bytes(data)
        (repo / name / "config.pbtxt").write_text(BATCHED)
    return model, str(repo)


def _infer(mod, url, model, ids, mask):
    inputs = []
    for name, x in (("input_ids", ids), ("attention_mask", mask)):
        t = mod.InferInput(name, list(x.shape), "INT64")
        t.set_data_from_numpy(x)
        inputs.append(t)
    return mod.InferenceServerClient(url).infer(model, inputs).as_numpy("logits")


def test_requests_of_different_lengths_each_get_their_own_answer(nlp, serve):
    model, repo = nlp
    running = serve(repo)
    rng = np.random.default_rng(2)
    requests = []
    for i in range(40):
        rows, length = int(rng.integers(1, 4)), int(rng.integers(1, 12))
        mask = (rng.random((rows, length)) > 0.25).astype(np.int64)
        requests.append((("legacy", "dynamo")[i % 2], rng.integers(0, 40, (rows, length)).astype(np.int64), mask))

    def call(i):
        mod, url = (grpcclient, running.grpc_url) if i % 3 else (httpclient, running.http_url)
        name, ids, mask = requests[i]
        return _infer(mod, url, name, ids, mask)

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(call, range(len(requests))))
    with torch.no_grad():
        for (_, ids, mask), got in zip(requests, answers):
            np.testing.assert_allclose(got, model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy(), atol=1e-5)


@pytest.mark.parametrize("mod", [grpcclient, httpclient], ids=["grpc", "http"])
def test_inputs_that_disagree_on_a_dimension_the_model_names_alike_are_refused(nlp, serve, mod):
    _, repo = nlp
    running = serve(repo)
    url = running.grpc_url if mod is grpcclient else running.http_url
    ids = np.ones((1, 5), np.int64)
    for name in ("legacy", "dynamo"):
        with pytest.raises(InferenceServerException) as e:
            _infer(mod, url, name, ids, np.ones((1, 6), np.int64))
        assert e.value.status() == ("StatusCode.INVALID_ARGUMENT" if mod is grpcclient else "400")
        assert "inputs 'input_ids' and 'attention_mask' must have the same size in dimension" in e.value.message()
        assert "'input_ids' has 5 at dimension 1, 'attention_mask' has 6 at dimension 1" in e.value.message()
        assert _infer(mod, url, name, ids, np.ones((1, 5), np.int64)).shape == (1, 3)
