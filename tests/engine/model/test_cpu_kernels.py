"""The C kernels: agree with torch, are batch- and grouping-invariant, and fall back cleanly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_serve.cache_policies.native_build import LoadOnce, cpu_flags
from moe_serve.engine.model import cpu_kernels
from moe_serve.engine.model.cpu_kernels import ExpertRows, expert_ffn, kernel_flavour, linear, packs_weights
from moe_serve.engine.model.packed import PackedMatrix, pack_blocks, unpack_blocks
from moe_serve.engine.model.weights import pack_expert

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def needs_kernel() -> None:
    if kernel_flavour() == "torch":
        pytest.skip("no C compiler here: the torch fallback serves every call")


@pytest.fixture
def fresh_loader(monkeypatch):
    """Forget the loaded library for one test (restored afterwards)."""
    monkeypatch.setattr(cpu_kernels, "_kernels", LoadOnce(cpu_kernels._open_kernels))


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 40])
def test_packing_round_trips_and_looks_up_rows(rows: int) -> None:
    weight = torch.randn(rows, 24)
    blocks = pack_blocks(weight)
    assert blocks.shape == (-(-rows // 16), 24, 16) and blocks.is_contiguous()
    last = min(rows, 16) - 1  # the last output of the first block
    assert torch.equal(blocks[0, 3, last], weight[last, 3])
    assert not blocks[-1, :, (rows - 1) % 16 + 1 :].any()  # zero padding
    assert torch.equal(unpack_blocks(blocks, rows), weight)
    packed = PackedMatrix.pack(weight)
    assert packed.shape == (rows, 24) and packed.dtype is torch.float32
    ids = torch.tensor([rows - 1, 0, rows // 2, 0])
    assert torch.equal(packed.rows_at(ids), weight[ids])


@pytest.mark.parametrize("n,k", [(512, 512), (7, 33), (300, 1000)])
def test_linear_matches_torch_and_each_row_is_independent_of_the_batch(n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n + k)
    weight, bias = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    x = torch.randn(100, k, generator=gen)  # past one work chunk of rows (48): prefill sizes too
    packed = PackedMatrix.pack(weight)
    full = linear(x, packed, bias)
    torch.testing.assert_close(full, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    for rows in (1, 2, 5, 6, 7, 13, 48, 49, 99):
        assert torch.equal(linear(x[:rows], packed, bias), full[:rows])
    for i in range(x.shape[0]):
        assert torch.equal(linear(x[i : i + 1], packed, bias), full[i : i + 1])
    assert linear(x[:0], packed).shape == (0, n)


def test_linear_reads_strided_rows() -> None:
    x = torch.randn(4, 96)[:, :64]  # row stride 96
    weight = PackedMatrix.pack(torch.randn(32, 64))
    assert torch.equal(linear(x, weight), linear(x.contiguous(), weight))


def test_bf16_linear_sums_in_fp32_and_rounds_once() -> None:
    gen = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(300, 1000, generator=gen).bfloat16(), torch.randn(300, generator=gen).bfloat16()
    x = torch.randn(70, 1000, generator=gen).bfloat16()
    packed = PackedMatrix.pack(weight)
    full = linear(x, packed, bias)
    assert full.dtype is torch.bfloat16
    exact = F.linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(full.float(), exact, rtol=2**-8, atol=1e-3)  # an fp32 sum, rounded to bf16 once
    torch.testing.assert_close(full, F.linear(x, weight, bias), rtol=2**-7, atol=1e-2)  # torch's own bf16 GEMM
    for rows in (1, 2, 5, 70):
        assert torch.equal(linear(x[:rows], packed, bias), full[:rows])
    as_fp32 = linear(x.float(), PackedMatrix.pack(weight.float()), bias.float())  # bf16 widens exactly
    assert torch.equal(full, as_fp32.bfloat16())


@pytest.mark.parametrize("case", ["plain fp32", "plain fp16", "fp64", "transposed weight", "1-D input"])
def test_plain_weights_go_to_torch(case: str) -> None:
    x, weight = torch.randn(3, 64), torch.randn(32, 64)
    if case == "plain fp16":
        x, weight = x.half(), weight.half()
    elif case == "fp64":
        x, weight = x.double(), weight.double()
    elif case == "transposed weight":
        weight = torch.randn(64, 32).T
    elif case == "1-D input":
        x = x[0]
    assert torch.equal(linear(x, weight), F.linear(x, weight))


def test_a_packed_weight_with_inputs_the_kernel_cannot_take_still_computes() -> None:
    weight = torch.randn(20, 64)
    packed = PackedMatrix.pack(weight)
    x = torch.randn(3, 64)
    assert torch.equal(linear(x.double(), PackedMatrix(packed.blocks.double(), 20)), F.linear(x.double(), weight.double()))
    torch.testing.assert_close(linear(x[0], packed), F.linear(x[0], weight))  # 1-D: unpacked, through torch
    with pytest.raises(ValueError, match="columns"):
        linear(torch.randn(3, 65), packed)


def _reference_experts(x, ids, weights, gate_ups, downs) -> torch.Tensor:
    """The plain torch loop: [T * A, H] rows, one per (token, slot)."""
    top_k = ids.shape[1]
    out = x.new_zeros(ids.numel(), x.shape[1])
    for row, expert in enumerate(ids.flatten().tolist()):
        gate, up = F.linear(x[row // top_k], gate_ups[expert]).chunk(2)
        out[row] = F.linear(F.silu(gate) * up, downs[expert]) * weights.flatten()[row]
    return out


def _expert_problem(tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    experts, top_k, hidden, ffn = 6, 2, 40, 12  # neither a multiple of the 16-output block: padding runs
    gate_ups = [torch.randn(2 * ffn, hidden, generator=gen) for _ in range(experts)]
    downs = [torch.randn(hidden, ffn, generator=gen) for _ in range(experts)]
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    return x, ids, weights, gate_ups, downs, ffn


def _run_kernel(x, ids, weights, gate_ups, downs, ffn, split: bool) -> torch.Tensor:
    top_k = ids.shape[1]
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(gate_ups)).tolist()
    starts = [sum(counts[:e]) for e in range(len(counts))]
    packed = [pack_expert((gu, d)) for gu, d in zip(gate_ups, downs, strict=True)]
    groups = [(starts[e], starts[e] + c, *packed[e]) for e, c in enumerate(counts) if c]
    rows = ExpertRows(x, order // top_k, order, weights.flatten()[order], ffn)
    out = torch.zeros(flat.numel(), x.shape[1])
    for part in ([[g] for g in reversed(groups)] if split else [groups]):
        expert_ffn(rows, out, part)
    return out


def test_expert_ffn_matches_the_torch_loop_whatever_the_grouping() -> None:
    problem = _expert_problem(tokens=30)  # ~10 rows per expert: more than one tile of 6
    together = _run_kernel(*problem, split=False)
    torch.testing.assert_close(together, _reference_experts(*problem[:5]), rtol=1e-5, atol=1e-4)
    assert torch.equal(_run_kernel(*problem, split=True), together)  # one call per expert, any order


def test_expert_ffn_row_does_not_depend_on_the_batch() -> None:
    x, ids, weights, gate_ups, downs, ffn = _expert_problem(tokens=20, seed=3)
    batched = _run_kernel(x, ids, weights, gate_ups, downs, ffn, split=False)
    top_k = ids.shape[1]
    for t in range(x.shape[0]):
        alone = _run_kernel(x[t : t + 1], ids[t : t + 1], weights[t : t + 1], gate_ups, downs, ffn, split=False)
        assert torch.equal(alone, batched[t * top_k : (t + 1) * top_k])


def test_bf16_experts_match_the_fp32_kernel_on_the_same_values() -> None:
    """bf16 weights widen exactly, so the kernel must give the fp32 kernel's bits on bf16-valued inputs."""
    x, ids, weights, gate_ups, downs, ffn = _expert_problem(tokens=9, seed=2)
    x, gate_ups, downs = x.bfloat16(), [w.bfloat16() for w in gate_ups], [w.bfloat16() for w in downs]
    as_bf16 = _run_kernel(x, ids, weights, gate_ups, downs, ffn, split=False)
    as_fp32 = _run_kernel(x.float(), ids, weights, [w.float() for w in gate_ups], [w.float() for w in downs], ffn,
                          split=False)
    assert torch.equal(as_bf16, as_fp32)


def test_expert_ffn_refuses_bad_weights() -> None:
    x, _, _, gate_ups, downs, ffn = _expert_problem(tokens=2)
    gate_up, down = pack_expert((gate_ups[0], downs[0]))
    rows = ExpertRows(x, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.ones(1), ffn)
    out = x.new_zeros(4, x.shape[1])
    with pytest.raises(ValueError, match="contiguous CPU tensors, all fp32 or all bf16"):
        expert_ffn(rows, out, [(0, 1, gate_up.transpose(1, 2), down)])
    with pytest.raises(ValueError, match="all fp32 or all bf16"):
        expert_ffn(rows, out, [(0, 1, gate_up, down.bfloat16())])
    with pytest.raises(ValueError, match="of shapes"):  # an unpacked expert
        expert_ffn(rows, out, [(0, 1, gate_ups[0], downs[0])])
    with pytest.raises(ValueError, match="of shapes"):  # the right dtype and layout, the wrong expert size
        expert_ffn(rows, out, [(0, 1, gate_up[:-1].contiguous(), down)])
    with pytest.raises(ValueError, match="token indices"):
        ExpertRows(x, torch.tensor([x.shape[0]]), torch.zeros(1, dtype=torch.long), torch.ones(1), ffn)
    with pytest.raises(ValueError, match="covering every destination row"):
        expert_ffn(ExpertRows(x, torch.zeros(1, dtype=torch.long), torch.tensor([9]), torch.ones(1), ffn), out,
                   [(0, 1, gate_up, down)])
    with pytest.raises(ValueError, match="outside the 1 assignment rows"):
        expert_ffn(rows, out, [(0, 2, gate_up, down)])
    with pytest.raises(ValueError, match="one length"):
        ExpertRows(x, torch.zeros(2, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.ones(1), ffn)


def test_packing_is_for_fp32_and_bf16_on_the_cpu() -> None:
    assert packs_weights(CPU, torch.float32) and packs_weights(CPU, torch.bfloat16)
    assert not packs_weights(CPU, torch.float16) and not packs_weights(torch.device("meta"), torch.float32)


def test_disabled_by_environment(monkeypatch, fresh_loader) -> None:
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    assert kernel_flavour() == "torch"
    assert not packs_weights(CPU, torch.float32)
    weight = torch.randn(32, 64)
    x = torch.randn(2, 64)
    torch.testing.assert_close(linear(x, PackedMatrix.pack(weight)), F.linear(x, weight))  # still right, via torch


def test_missing_compiler_falls_back_with_a_warning(monkeypatch, fresh_loader, tmp_path, caplog) -> None:
    monkeypatch.setenv("MOE_SERVE_EXT_DIR", str(tmp_path))  # nothing cached: it must compile
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level("WARNING", logger="moe_serve.engine.model.cpu_kernels"):
        assert kernel_flavour() == "torch"
    assert "the C kernels: unavailable" in caplog.text
    assert not packs_weights(CPU, torch.float32)


def test_compile_error_falls_back_with_a_warning(monkeypatch, fresh_loader, tmp_path, caplog) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setenv("MOE_SERVE_EXT_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    with caplog.at_level("WARNING", logger="moe_serve.engine.model.cpu_kernels"):
        assert kernel_flavour() == "torch"
    assert "the C kernels: compiling failed" in caplog.text
    assert not list(tmp_path.glob("kernels/*.so"))  # no half-written library left behind


def test_decode_attention_matches_sdpa_over_paged_slots() -> None:
    from moe_serve.engine.model.cpu_kernels import decode_attention, kernel_decode_attention

    gen = torch.Generator().manual_seed(7)
    seqs, heads, kv_heads, head_dim, slots_total = 3, 8, 2, 24, 64
    q = torch.randn(seqs, heads, head_dim, generator=gen)
    k_cache = torch.randn(slots_total, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(slots_total, kv_heads, head_dim, generator=gen)
    context_lens = torch.tensor([5, 17, 1])
    slots = torch.stack([torch.randperm(slots_total, generator=gen)[:20] for _ in range(seqs)])  # padded to 20
    assert kernel_decode_attention(q, k_cache)
    out = decode_attention(q, k_cache, v_cache, slots, context_lens, scale=0.3)
    for b in range(seqs):
        n = int(context_lens[b])
        keys = k_cache[slots[b, :n]].transpose(0, 1)  # [Hkv, n, D]
        values = v_cache[slots[b, :n]].transpose(0, 1)
        expected = F.scaled_dot_product_attention(q[b][:, None], keys, values, scale=0.3, enable_gqa=True)
        torch.testing.assert_close(out[b], expected.reshape(-1), rtol=1e-5, atol=1e-5)
        alone = decode_attention(q[b : b + 1], k_cache, v_cache, slots[b : b + 1], context_lens[b : b + 1], 0.3)
        assert torch.equal(alone[0], out[b])
    with pytest.raises(ValueError, match="context length"):
        decode_attention(q, k_cache, v_cache, slots[:, :4], context_lens, scale=0.3)
    with pytest.raises(ValueError, match="cache slots must be in"):
        decode_attention(q, k_cache, v_cache, slots + slots_total, context_lens, scale=0.3)


def test_a_prebuilt_library_needs_no_compiler(monkeypatch, fresh_loader, tmp_path) -> None:
    """Images build the kernels at build time and ship no compiler."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert kernel_flavour() != "torch"  # the library this session already built is reused


def test_the_portable_build_sums_in_the_same_order_as_the_vector_build(monkeypatch) -> None:
    """The portable C (one output at a time) and the register-tiled AVX2 code must give the same
    bits: both use fused multiply-adds in the same order (and, in attention, the same lanes and
    the same lane-sum tree)."""
    if kernel_flavour() == "c" or "fma" not in cpu_flags():
        pytest.skip("needs a CPU with FMA and a vector build to compare with")
    gen = torch.Generator().manual_seed(11)
    weight, x = PackedMatrix.pack(torch.randn(37, 1000, generator=gen)), torch.randn(50, 1000, generator=gen)
    problem = _expert_problem(tokens=9, seed=5)
    seqs, heads, kv_heads, head_dim = 2, 6, 2, 40
    q = torch.randn(seqs, heads, head_dim, generator=gen)
    caches = [torch.randn(32, kv_heads, head_dim, generator=gen) for _ in range(2)]
    slots, lens = torch.stack([torch.randperm(32, generator=gen)[:9] for _ in range(seqs)]), torch.tensor([9, 4])

    def run_all() -> list[torch.Tensor]:
        return [linear(x[:rows], weight) for rows in (1, 2, 5, 50)] + [
            _run_kernel(*problem, split=False),
            cpu_kernels.decode_attention(q, *caches, slots, lens, scale=0.2),
        ]

    vector = run_all()
    portable = cpu_kernels.open_library(cpu_kernels.build_library(["-mfma"]))
    monkeypatch.setattr(cpu_kernels, "_kernels", LoadOnce(lambda: (portable, "c")))
    for portable, tiled in zip(run_all(), vector, strict=True):
        assert torch.equal(portable, tiled)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_gives_torchs_bits(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(5, 3 * 4 * 16, generator=gen).to(dtype)
    x = qkv[:, : 4 * 16].view(5, 4, 16)  # a strided view, as the attention passes q
    angles = torch.rand(5, 8, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    rotated = torch.cat([-x[..., 8:], x[..., :8]], dim=-1)
    expected = x * cos[:, None, :].to(dtype) + rotated * sin[:, None, :].to(dtype)
    got = cpu_kernels.rope(x, cos, sin)
    assert got.dtype is dtype and torch.equal(got, expected)


def test_bf16_rms_norm_and_decode_attention_round_like_the_reference() -> None:
    gen = torch.Generator().manual_seed(4)
    x, weight = torch.randn(6, 40, generator=gen).bfloat16(), torch.randn(40, generator=gen).bfloat16()
    normed = cpu_kernels.rms_norm(x, weight, 1e-6)
    reference = weight * F.rms_norm(x.float(), (40,), eps=1e-6).bfloat16()
    assert normed.dtype is torch.bfloat16
    torch.testing.assert_close(normed, reference, rtol=2**-7, atol=0.0)  # at most one bf16 rounding step apart
    assert all(torch.equal(cpu_kernels.rms_norm(x[i : i + 1], weight, 1e-6), normed[i : i + 1]) for i in range(6))
    q = torch.randn(2, 4, 24, generator=gen).bfloat16()
    caches = [torch.randn(16, 2, 24, generator=gen).bfloat16() for _ in range(2)]
    slots, lens = torch.stack([torch.randperm(16, generator=gen)[:7] for _ in range(2)]), torch.tensor([7, 3])
    assert cpu_kernels.kernel_decode_attention(q, caches[0])
    out = cpu_kernels.decode_attention(q, *caches, slots, lens, scale=0.2)
    exact = cpu_kernels.decode_attention(q.float(), *(c.float() for c in caches), slots, lens, scale=0.2)
    assert out.dtype is torch.bfloat16 and torch.equal(out, exact.bfloat16())  # fp32 arithmetic, rounded once


@pytest.mark.parametrize("normalize", [True, False])
def test_route_matches_torch_topk_and_groups_by_expert(normalize: bool) -> None:
    gen = torch.Generator().manual_seed(8)
    logits, top_k = torch.randn(11, 16, generator=gen), 4
    routing = cpu_kernels.route(logits, top_k, normalize, torch.float32)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    order = torch.argsort(ids.flatten(), stable=True)
    assert torch.equal(routing.ids, ids) and torch.equal(routing.order, order)
    assert torch.equal(routing.tokens, order // top_k)
    assert routing.counts == torch.bincount(ids.flatten(), minlength=16).tolist()
    torch.testing.assert_close(routing.scale, weights.flatten()[order], rtol=1e-6, atol=1e-7)
    # bf16 logits tie often; ties go to the lower expert, and the chosen weights are torch's
    bf16 = cpu_kernels.route(logits.bfloat16(), top_k, normalize, torch.bfloat16)
    probs = torch.softmax(logits.bfloat16(), dim=-1, dtype=torch.float32)
    top = torch.topk(probs, top_k, dim=-1).values
    assert torch.equal(probs.gather(1, bf16.ids), top)
    # an override picks the experts; the weights are the router's probabilities there
    override = torch.stack([torch.randperm(16, generator=gen)[:top_k] for _ in range(11)])
    forced = cpu_kernels.route(logits, top_k, normalize, torch.float32, override)
    assert torch.equal(forced.ids, override)
    expected = torch.softmax(logits, dim=-1).gather(1, override)
    if normalize:
        expected = expected / expected.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(forced.scale, expected.flatten()[forced.order], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="expert ids below 16"):
        cpu_kernels.route(logits, top_k, normalize, torch.float32, override + 16)
    with pytest.raises(ValueError, match="top_k must be in"):
        cpu_kernels.route(logits, 17, normalize, torch.float32)
