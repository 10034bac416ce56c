"""A hand-written MoE block (not transformers) upcycled through the ExpertsAdapter interface."""

import torch
from torch import nn

from weightwise.experts import ExpertsAdapter, FusedExpertsAdapter, upcycle_experts


class ToyMoE(nn.Module):
    """Top-k softmax routing over experts ``relu(x @ w_in[e]) @ w_out[e]``, renormalised."""

    def __init__(self, hidden=8, inter=6, experts=3, top_k=1):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, hidden, inter))
        self.w_out = nn.Parameter(torch.randn(experts, inter, hidden))
        self.top_k = top_k

    def forward(self, x):
        probs = torch.softmax(self.router(x), -1)
        weights, index = probs.topk(self.top_k, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for slot in range(self.top_k):
            e = index[:, slot]
            h = torch.relu(torch.einsum("bh,bhi->bi", x, self.w_in[e]))
            out += weights[:, slot, None] * torch.einsum("bi,bih->bh", h, self.w_out[e])
        return out


class ToyAdapter(ExpertsAdapter):
    def __init__(self, block: ToyMoE):
        self.block = block

    num_experts = property(lambda self: self.block.w_in.shape[0])
    top_k = property(lambda self: self.block.top_k)
    renormalizes = property(lambda self: True)
    intermediate_size = property(lambda self: self.block.w_in.shape[-1])
    router_weight = property(lambda self: self.block.router.weight)

    def expert_parameters(self):
        return {"w_in": self.block.w_in, "w_out": self.block.w_out}

    def gather_experts(self, tensors, sources, output_scale):
        return {"w_in": tensors["w_in"][sources], "w_out": tensors["w_out"][sources] * output_scale}

    def split_experts(self, tensors, parts, output_scale):
        e, h, i = tensors["w_in"].shape
        w_in = tensors["w_in"].reshape(e, h, parts, i // parts).permute(0, 2, 1, 3).reshape(e * parts, h, i // parts)
        w_out = tensors["w_out"].reshape(e * parts, i // parts, h) * output_scale
        return {"w_in": w_in, "w_out": w_out}

    def set_routing(self, num_experts, top_k, intermediate_size):
        self.block.top_k = top_k


def test_custom_block_granular_and_duplicate_preserve_the_function():
    torch.manual_seed(0)
    x = torch.randn(50, 8)
    for method, top_k in (("granular", 2), ("duplicate", 1)):
        block = ToyMoE(top_k=top_k)
        assert not FusedExpertsAdapter.matches(block)
        before = block(x)
        report = upcycle_experts(block, 2, method=method, adapters={"toy": ToyAdapter(block)})
        assert report.exact and block.w_in.shape[0] == 6
        assert (block(x) - before).abs().max() <= 1e-5
