"""Small PyTorch models the converter tests build (imported as ``convert_models:<factory>``)."""

from __future__ import annotations

import torch
from torch import nn


def _seeded(cls):
    def build():
        torch.manual_seed(0)
        return cls()

    return build


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(8, 5)

    def forward(self, image):
        return torch.softmax(self.head(self.conv(image).flatten(1)), dim=-1)


class TwoInTwoOut(nn.Module):
    """Token ids (INT64) and dense features (FP32) in; a score and an embedding out."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.dense = nn.Linear(3, 6)
        self.score = nn.Linear(6, 1)

    def forward(self, tokens, dense):
        h = self.emb(tokens).mean(dim=1) + self.dense(dense)
        return self.score(torch.tanh(h)), h


class SequenceEncoder(nn.Module):
    """A masked mean over a sequence whose length varies from request to request."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 4)

    def forward(self, ids, mask):
        h = self.proj(self.emb(ids)) * mask.unsqueeze(-1)
        return h.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


class Unexportable(nn.Module):
    """SVD has no ONNX operator: neither exporter can export it."""

    def forward(self, x):
        return torch.linalg.svd(x)[1]


class Noisy(nn.Module):
    """Draws new noise on every call: ONNX Runtime and torch cannot agree."""

    def forward(self, x):
        return x + torch.rand_like(x)


mlp = _seeded(MLP)
cnn = _seeded(CNN)
two_in_two_out = _seeded(TwoInTwoOut)
sequence_encoder = _seeded(SequenceEncoder)
not_a_module = 42


class SumOverBatch(nn.Module):
    """Sums over the batch: its output has no batch dimension."""

    def forward(self, x):
        return x.sum(0)


class ArgmaxAndLog(nn.Module):
    """An integer output (compared for equality) and one with NaN (log of negative inputs)."""

    def forward(self, x):
        return torch.argmax(x, dim=-1), torch.log(x)


class DictOut(nn.Module):
    """Answers a dict of tensors: its keys name the outputs."""

    def forward(self, x):
        return {"logits": x * 2.0, "total": x.sum(-1, keepdim=True)}


class Printer(nn.Module):
    """Prints as it runs (its output must not reach the stdout of `convert --json`)."""

    def forward(self, x):
        print("forward called")
        return x * 2.0


class MeanBySize(nn.Module):
    """Divides by the row length as a Python float: a tracing exporter bakes in the length it saw."""

    def forward(self, x):
        return x.sum(-1, keepdim=True) / float(x.shape[-1])


class IgnoresFlags(nn.Module):
    """Takes token ids it does not read (yet): the legacy exporter leaves such an input out."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, flags, x):
        return self.lin(x)


ignores_flags = _seeded(IgnoresFlags)


class CentredOnTheBatch(nn.Module):
    """Subtracts the batch mean: each row's answer depends on the rows batched with it."""

    def forward(self, x):
        return x - x.mean(dim=0, keepdim=True)


class Difference(nn.Module):
    """a - b: passing its inputs in the wrong order changes the answer."""

    def forward(self, a, b):
        return a - b


class Scaled(nn.Module):
    """An optional parameter between the inputs and a keyword-only one."""

    def forward(self, x, bias=None, *, scale):
        return x * scale if bias is None else x * scale + bias


class KindEmbedding(nn.Module):
    """An embedding of 3 kinds: an index of 3 or more is out of its range."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.kinds = nn.Embedding(3, 4)
        self.lin = nn.Linear(2, 4)

    def forward(self, kind, x):
        return self.kinds(kind).squeeze(1) + self.lin(x)


def half_mlp():
    """A model of FP16 weights, FP16 in and out."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).half()
