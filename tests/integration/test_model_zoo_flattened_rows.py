"""A token classifier whose logits come out flattened, ``[batch * sequence, classes]`` (PyTorch's
``logits.view(-1, classes)``, as token-classification heads compute their loss), exported with a
dynamic batch and sequence. The run at load that tells whether an output's first dimension is
the batch set every other dynamic dimension to 1, where ``batch * 1`` rows look like the batch:
completion batched it, and every request with a sequence longer than one token got a 500 (its
answer had more rows than the request). The run now also sets them to 3."""

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


class TokenTagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(30, 6)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1).float()
        return self.head(hidden).view(-1, 4)


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    torch.manual_seed(0)
    model = TokenTagger().eval()
    ids = torch.zeros((2, 5), dtype=torch.int64)
    f = io.BytesIO()
    tokens = {0: "batch", 1: "seq"}
    torch.onnx.export(
        model,
        (ids, torch.ones_like(ids)),
        f,
        dynamo=False,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={"input_ids": tokens, "attention_mask": tokens, "logits": {0: "tokens"}},
    )
    return model, f.getvalue()


def _repo(root, data, config=None):
    os.makedirs(os.path.join(root, "tagger", "1"))
    with open(os.path.join(root, "tagger", "1", "model.onnx"), "wb") as out:
        out.write(data)
    if config:
        with open(os.path.join(root, "tagger", "config.pbtxt"), "w") as out:
            out.write(config)
    return str(root)


def _infer(i, url, ids, mask):
    mod = grpcclient if i % 2 else httpclient
    inputs = []
    for name, x in (("input_ids", ids), ("attention_mask", mask)):
        t = mod.InferInput(name, list(x.shape), "INT64")
        t.set_data_from_numpy(x)
        inputs.append(t)
    return mod.InferenceServerClient(url).infer("tagger", inputs).as_numpy("logits")


def test_flattened_token_logits_are_served_unbatched_with_each_callers_tokens(tagger, serve, tmp_path):
    model, data = tagger
    running = serve(_repo(tmp_path, data), default_max_batch_size=8)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    assert c.get_model_config("tagger").config.max_batch_size == 0
    rng = np.random.default_rng(5)
    requests = []
    for _ in range(24):
        rows, length = int(rng.integers(1, 3)), int(rng.integers(2, 9))
        ids = rng.integers(0, 30, (rows, length)).astype(np.int64)
        requests.append((ids, (rng.random((rows, length)) > 0.2).astype(np.int64)))

    def call(i):
        ids, mask = requests[i]
        return _infer(i, running.grpc_url if i % 2 else running.http_url, ids, mask)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, range(len(requests))))
    with torch.no_grad():
        for (ids, mask), got in zip(requests, answers):
            want = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("warm_up", [True, False])
def test_a_config_that_batches_flattened_logits_fails_its_load(tagger, serve, tmp_path, warm_up):
    _, data = tagger
    repo = _repo(tmp_path, data, "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n")
    running = serve(repo, model_control_mode="explicit", warm_up=warm_up)
    c = httpclient.InferenceServerClient(running.http_url)
    with pytest.raises(InferenceServerException) as e:
        c.load_model("tagger")
    assert "output 'logits' has shape [6, 4] for a batch of 2 rows" in e.value.message()
    assert "Set max_batch_size: 0" in e.value.message()
