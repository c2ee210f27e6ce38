"""posattn.compat.* against each library's documented behaviour (fp64 oracles), on every
usable backend, with the libraries' own kinds of inputs: odd head counts (73 query, 155 key
heads), head_dim 92/112/160/192 with partial rotary, batch 1..989, offsets, int32/int64
indices, in place and out of place, fp16/bf16/fp32."""
import pytest
import torch

import posattn
from posattn.compat import flash_attn, flashinfer, transformers as tf_compat, vllm
from tests._tol import assert_close
from tests.compat._oracles import flashinfer_freqs, ragged_positions, rotate_rows, tables_at
from tests.conftest import DEVICE, usable_backends

BACKENDS = usable_backends("rope_cos_sin")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def small(backend):
    """The Triton interpreter costs ~20 ms a launch and more for big tiles, and the fp64 reference
    is slow on big shapes: small cases only for those (the big ones run on the fast backends)."""
    return backend == "reference" or (backend == "triton" and DEVICE == "cpu")


def _cache(N, R, dtype=torch.float32, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    ang = torch.arange(N, dtype=torch.float64)[:, None] * inv
    return torch.cat((ang.cos(), ang.sin()), dim=-1).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------
# vLLM

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vllm_rotary_embedding(backend, dtype):
    # (tokens, Hq, Hk, head_size, rotary_dim, is_neox, flattened, pos dtype, key?)
    cases = [(3, 73, 155, 92, 46, True, True, torch.int32, True),
             (989, 2, 1, 64, 64, False, False, torch.int64, True),
             (5, 4, 2, 112, 64, True, False, torch.int64, False),
             (2, 3, 1, 192, 96, False, True, torch.int32, True)]
    if small(backend):
        cases = [(3, 5, 3, 92, 46, True, True, torch.int32, True), (4, 2, 1, 64, 64, False, False, torch.int64, False)]
    with posattn.use_backend(backend):
        for T, HQ, HK, D, R, neox, flat, pdt, has_key in cases:
            cache = _cache(300, R)
            pos = torch.randint(0, 300, (T,), dtype=pdt, device=DEVICE)
            q = torch.randn(T, HQ, D, dtype=dtype, device=DEVICE)
            k = torch.randn(T, HK, D, dtype=dtype, device=DEVICE)
            q0, k0 = q.clone(), k.clone()
            qa = q.view(T, HQ * D) if flat else q
            ka = (k.view(T, HK * D) if flat else k) if has_key else None
            assert vllm.rotary_embedding(pos, qa, ka, D, cache, neox) is None
            c, s = cache.double().cpu()[pos.long().cpu()].split(R // 2, dim=-1)
            assert_close(q, rotate_rows(q0, c, s, not neox), dtype, msg=f"q {T, HQ, D, R}")
            if has_key:
                assert_close(k, rotate_rows(k0, c, s, not neox), dtype, msg=f"k {T, HK, D, R}")
            else:
                assert torch.equal(k, k0)


def test_vllm_batched_positions_and_fused_qkv():
    """[B, S, H*D] inputs with [B, S] positions, and q/k slices of one fused qkv buffer."""
    B, S, HQ, HK, D = 2, 3, 4, 2, 64
    qkv = torch.randn(B, S, (HQ + 2 * HK) * D, device=DEVICE)
    ref = qkv.clone()
    q, k = qkv[..., : HQ * D], qkv[..., HQ * D:(HQ + HK) * D]
    pos = torch.randint(0, 50, (B, S), device=DEVICE)
    cache = _cache(50, D)
    assert vllm.rotary_embedding(pos, q, k, D, cache, True) is None  # in place through the slices
    c, s = cache.double().cpu()[pos.reshape(-1).cpu()].split(D // 2, dim=-1)
    flat, qkv2 = ref.view(B * S, -1), qkv.view(B * S, -1)
    assert_close(qkv2[:, : HQ * D].reshape(B * S, HQ, D),
                 rotate_rows(flat[:, : HQ * D].reshape(B * S, HQ, D), c, s, False), torch.float32)
    assert_close(qkv2[:, HQ * D:(HQ + HK) * D].reshape(B * S, HK, D),
                 rotate_rows(flat[:, HQ * D:(HQ + HK) * D].reshape(B * S, HK, D), c, s, False), torch.float32)
    # a layout that cannot be viewed as [T, H, D] without a copy is refused (in place needs a view)
    with pytest.raises(ValueError, match="viewable"):
        vllm.rotary_embedding(pos, ref.clone().transpose(0, 1)[..., : HQ * D], None, D, cache, True)
    assert torch.equal(qkv2[:, (HQ + HK) * D:], flat[:, (HQ + HK) * D:])  # v untouched


def test_vllm_out_of_range_is_an_error_on_cpu():
    q = torch.randn(2, 2, 64)
    with pytest.raises(ValueError, match="positions must index rows"):
        vllm.rotary_embedding(torch.tensor([1, 50]), q, None, 64, _cache(50, 64).cpu(), True)


# ---------------------------------------------------------------------------
# FlashInfer

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flashinfer_pos_ids_and_ragged(backend, dtype):
    # (Hq, Hk, D, rotary_dim or None, interleave, llama31, nnz/segments)
    cases = [(73, 155, 92, 46, False, False, "pos3"),
             (2, 1, 64, None, True, True, "ragged989"),
             (3, 2, 160, 80, False, True, "pos5"),
             (4, 2, 112, None, True, False, "ragged7")]
    if small(backend):
        cases = [(5, 3, 92, 46, False, False, "pos3"), (2, 1, 64, None, True, True, "ragged7")]
    with posattn.use_backend(backend):
        for i, (HQ, HK, D, R, inter, l31, form) in enumerate(cases):
            idt = torch.int32 if i % 2 == 0 else torch.int64
            if form.startswith("ragged"):
                B = int(form[6:])
                lens = torch.ones(B, dtype=torch.int64) if B == 989 else torch.tensor([3, 0, 4])[:B]
                indptr = torch.cat((torch.zeros(1, dtype=torch.int64), lens.cumsum(0))).to(idt).to(DEVICE)
                offsets = torch.randint(0, 3000, (len(lens),), dtype=idt, device=DEVICE)
                nnz = int(indptr[-1])
                pos_ref = ragged_positions(indptr.cpu(), offsets.cpu())
            else:
                nnz = int(form[3:])
                pos_ids = torch.randint(0, 70000, (nnz,), dtype=idt, device=DEVICE)
                pos_ref = pos_ids.long().cpu()
            q = torch.randn(nnz, HQ, D, dtype=dtype, device=DEVICE)
            k = torch.randn(nnz, HK, D, dtype=dtype, device=DEVICE)
            rot = R or D
            kw = dict(rotary_dim=R, interleave=inter)
            if l31:
                kw.update(rope_scale=8, rope_theta=5e5)  # FlashInfer's Llama 3.1 defaults, spelled out
                spec = flashinfer.rope_spec(D, R, inter, 8, 5e5, (1, 4, 8192))
            else:
                kw.update(rope_scale=2.5, rope_theta=1e4)
                spec = flashinfer.rope_spec(D, R, inter, 2.5, 1e4)
            freqs = spec.inv_freq()  # pinned to FlashInfer's formula by test_flashinfer_frequencies
            c, s = tables_at(pos_ref, freqs)
            eq, ek = rotate_rows(q, c, s, inter), rotate_rows(k, c, s, inter)
            name = ("apply_llama31_rope" if l31 else "apply_rope") + ("" if form.startswith("ragged") else "_pos_ids")
            idx_args = (indptr, offsets) if form.startswith("ragged") else (pos_ids,)
            qo, ko = getattr(flashinfer, name)(q, k, *idx_args, **kw)
            assert_close(qo, eq, dtype, msg=f"{name} {HQ, HK, D, R}")
            assert_close(ko, ek, dtype, msg=f"{name} {HQ, HK, D, R}")
            assert getattr(flashinfer, name + "_inplace")(q, k, *idx_args, **kw) is None
            assert_close(q, eq, dtype)
            assert_close(k, ek, dtype)


@pytest.mark.parametrize("rot, scale, theta, l31", [
    (128, 1, 1e4, None), (92, 2.5, 1e4, None), (128, 8, 5e5, (1, 4, 8192)), (64, 4, 5e5, (2, 8, 4096)),
    (160, 32, 1e6, (1, 4, 8192)),
])
def test_flashinfer_frequencies(rot, scale, theta, l31):
    """The frequencies the doors use are FlashInfer's documented formula. The oracle evaluates it in
    fp64 (wavelength form) and rounds once; posattn's (like FlashInfer's and transformers') are fp32
    evaluations. Outside Llama 3.1's blend band those agree within 4 fp32 ulps; inside it the blend
    weight comes from 2*pi/freq in fp32 and is ill-conditioned (~10 ulps measured). A wrong mapping
    (scale applied the wrong way, old_context_len or the factors swapped) errs by > 1e-2 relative,
    so 1e-5 relative pins the semantics without pretending to fp64 frequencies."""
    got = flashinfer.rope_spec(rot, None, False, scale, theta, l31).inv_freq().double()
    exp = flashinfer_freqs(rot, scale, theta, None if l31 is None else tuple(map(float, l31))).double()
    assert ((got - exp).abs() / exp).max() <= 1e-5
    if l31 is None:
        ulp = torch.ldexp(torch.ones_like(exp), torch.floor(torch.log2(exp)).long() - 23)  # fp32 ulp at exp
        assert ((got - exp).abs() / ulp).max() <= 4


def test_flashinfer_defaults_are_flashinfers():
    import inspect

    sig = inspect.signature(flashinfer.apply_llama31_rope_pos_ids)
    assert {n: sig.parameters[n].default for n in ("rotary_dim", "interleave", "rope_scale", "rope_theta",
                                                   "low_freq_factor", "high_freq_factor", "old_context_len")} == \
        {"rotary_dim": None, "interleave": False, "rope_scale": 8, "rope_theta": 5e5, "low_freq_factor": 1,
         "high_freq_factor": 4, "old_context_len": 8192}
    sig = inspect.signature(flashinfer.apply_rope)
    assert list(sig.parameters) == ["q", "k", "indptr", "offsets", "rotary_dim", "interleave", "rope_scale", "rope_theta"]
    assert (sig.parameters["rope_scale"].default, sig.parameters["rope_theta"].default) == (1, 1e4)
    # the default Llama 3.1 call against the oracle
    q, k = torch.randn(4, 2, 128, device=DEVICE), torch.randn(4, 1, 128, device=DEVICE)
    pos = torch.tensor([0, 9000, 70000, 131000], device=DEVICE)
    qo, _ = flashinfer.apply_llama31_rope_pos_ids(q, k, pos)
    c, s = tables_at(pos.cpu(), flashinfer.rope_spec(128, None, False, 8, 5e5, (1, 4, 8192)).inv_freq())
    assert_close(qo, rotate_rows(q, c, s, False), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flashinfer_cos_sin_cache(backend, dtype):
    cases = [(3, 73, 155, 192, 96, True, True), (989, 2, 1, 64, 64, False, False)]
    if small(backend):
        cases = [(3, 5, 3, 192, 96, True, True), (6, 2, 1, 64, 64, False, False)]
    with posattn.use_backend(backend):
        for nnz, HQ, HK, D, R, neox, flat in cases:
            cache = _cache(400, R)
            pos = torch.randint(0, 400, (nnz,), device=DEVICE)
            q = torch.randn(nnz, HQ, D, dtype=dtype, device=DEVICE)
            k = torch.randn(nnz, HK, D, dtype=dtype, device=DEVICE)
            qa, ka = (q.view(nnz, -1), k.view(nnz, -1)) if flat else (q, k)
            c, s = cache.double().cpu()[pos.cpu()].split(R // 2, dim=-1)
            eq, ek = rotate_rows(q, c, s, not neox), rotate_rows(k, c, s, not neox)
            qo, ko = flashinfer.apply_rope_with_cos_sin_cache(pos, qa, ka, D, cache, is_neox=neox)
            assert qo.shape == qa.shape and ko.shape == ka.shape
            assert_close(qo.view(q.shape), eq, dtype)
            assert_close(ko.view(k.shape), ek, dtype)
            flashinfer.apply_rope_with_cos_sin_cache_inplace(pos, qa, ka, D, cache, is_neox=neox)
            assert_close(q, eq, dtype)
            assert_close(k, ek, dtype)


@pytest.mark.parametrize("call, match", [
    (lambda q, k: flashinfer.apply_rope_pos_ids(q, k, torch.arange(3), rope_scale=0), "rope_scale"),
    (lambda q, k: flashinfer.apply_llama31_rope_pos_ids(q, k, torch.arange(3), low_freq_factor=4), "high_freq_factor"),
    (lambda q, k: flashinfer.apply_rope(q, k, torch.tensor([0, 3]), torch.tensor([1, 2])), "offsets must be"),
    (lambda q, k: flashinfer.apply_rope_pos_ids(q[0], k, torch.arange(3)), r"q must be a \[nnz"),
    (lambda q, k: flashinfer.apply_rope(q.cpu(), k.cpu(), torch.tensor([0, 2]), torch.tensor([1])),
     r"indptr must start at 0 and end at the number of tokens \(3\)"),
    (lambda q, k: flashinfer.apply_rope_with_cos_sin_cache(torch.arange(3), q.view(3, -1)[:, :-1], k, 64,
                                                           _cache(8, 64)), "query must be"),
])
def test_flashinfer_bad_inputs(call, match):
    q, k = torch.randn(3, 2, 64, device=DEVICE), torch.randn(3, 1, 64, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        call(q, k)


# ---------------------------------------------------------------------------
# flash-attn

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flash_attn_apply_rotary_emb(backend, dtype):
    # (B, S, H, D, rotary_dim, interleaved, offsets kind)
    cases = [(1, 3, 73, 92, 46, False, "int"), (989, 1, 2, 64, 64, True, "tensor"),
             (3, 4, 3, 160, 80, False, "zero"), (2, 5, 155, 112, 32, True, "tensor")]
    if small(backend):
        cases = [(1, 3, 5, 92, 46, False, "int"), (3, 2, 2, 64, 64, True, "tensor")]
    with posattn.use_backend(backend):
        for B, S, H, D, R, inter, okind in cases:
            ro = 40
            ang = torch.rand(ro, R // 2, dtype=torch.float64) * 6
            cos, sin = ang.cos().to(dtype).to(DEVICE), ang.sin().to(dtype).to(DEVICE)  # x's dtype, as flash-attn wants
            x = torch.randn(B, S, H, D, dtype=dtype, device=DEVICE)
            offs = {"int": 7, "zero": 0, "tensor": torch.randint(0, ro - S + 1, (B,), dtype=torch.int32, device=DEVICE)}[okind]
            out = flash_attn.apply_rotary_emb(x, cos, sin, interleaved=inter, seqlen_offsets=offs)
            offl = offs.long().cpu() if isinstance(offs, torch.Tensor) else torch.full((B,), offs)
            rows = (torch.arange(S)[None, :] + offl[:, None]).reshape(-1)
            exp = rotate_rows(x.reshape(B * S, H, D), cos.double().cpu()[rows], sin.double().cpu()[rows], inter)
            assert_close(out.reshape(B * S, H, D), exp, dtype, msg=f"{B, S, H, D, R, okind}")
            assert torch.equal(out[..., R:], x[..., R:])
            res = flash_attn.apply_rotary_emb(x, cos, sin, interleaved=inter, seqlen_offsets=offs, inplace=True)
            assert res is x
            assert_close(x.reshape(B * S, H, D), exp, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_varlen(backend):
    lens = [3, 1, 4] if small(backend) else [3, 1, 4, 0, 9]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    T, H, D = int(cu[-1]), 3, 64
    x = torch.randn(T, H, D, device=DEVICE)
    ang = torch.rand(30, D // 2, dtype=torch.float64) * 6
    cos, sin = ang.cos().float().to(DEVICE), ang.sin().float().to(DEVICE)
    with posattn.use_backend(backend):
        for offs in (0, 5, torch.randint(0, 10, (len(lens),), dtype=torch.int32, device=DEVICE)):
            out = flash_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets=offs, cu_seqlens=cu, max_seqlen=max(lens))
            rows = ragged_positions(cu.cpu(), offs.cpu() if isinstance(offs, torch.Tensor) else offs)
            assert_close(out, rotate_rows(x, cos.double().cpu()[rows], sin.double().cpu()[rows], False), torch.float32)


def test_flash_attn_autograd():
    """Differentiable in x, in and out of place, like flash-attn's ApplyRotaryEmb."""
    B, S, H, D, R = 2, 4, 3, 64, 32
    x0 = torch.randn(B, S, H, D, device=DEVICE)
    ang = torch.rand(10, R // 2, dtype=torch.float64) * 6
    cos, sin = ang.cos().float().to(DEVICE), ang.sin().float().to(DEVICE)
    g = torch.randn(B, S, H, D, device=DEVICE)
    offs = torch.tensor([0, 3], device=DEVICE)
    xr = x0.double().cpu().requires_grad_()
    rows = (torch.arange(S)[None, :] + offs.cpu()[:, None])
    c = cos.double().cpu()[rows][:, :, None]
    s = sin.double().cpu()[rows][:, :, None]
    a, b = xr[..., : R // 2], xr[..., R // 2: R]
    ref = torch.cat((a * c - b * s, b * c + a * s, xr[..., R:]), dim=-1)
    (ref * g.double().cpu()).sum().backward()
    for inplace in (False, True):
        x = x0.clone().requires_grad_()
        xin = x * 1.0 if inplace else x
        out = flash_attn.apply_rotary_emb(xin, cos, sin, inplace=inplace, seqlen_offsets=offs)
        (out * g).sum().backward()
        assert_close(x.grad, xr.grad, torch.float32)


def test_flash_attn_bad_inputs():
    x = torch.randn(1, 8, 2, 64)
    cos = torch.randn(6, 32)
    with pytest.raises(ValueError, match=r"seqlen_ro \(6\) must be >= seqlen \(8\)"):
        flash_attn.apply_rotary_emb(x, cos, cos)
    with pytest.raises(ValueError, match=r"cu_seqlens is None"):
        flash_attn.apply_rotary_emb(x[0], cos, cos)
    with pytest.raises(ValueError, match=r"positions must index rows"):
        flash_attn.apply_rotary_emb(x[:, :4], cos, cos, seqlen_offsets=torch.tensor([5]))
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0 and end at the number of tokens \(8\)"):
        flash_attn.apply_rotary_emb(x[0], cos, cos, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32))


# ---------------------------------------------------------------------------
# transformers (installed: its own functions are the oracle, run in fp64)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transformers_apply_rotary_pos_emb(backend, dtype):
    from transformers.models.llama import modeling_llama
    from transformers.models.phi3 import modeling_phi3

    cases = [(2, 5, 73, 155, 92, 92, 1), (1, 3, 4, 2, 112, 56, 2), (989, 1, 2, 1, 64, 64, 1), (2, 3, 3, 3, 192, 96, 2)]
    if small(backend):
        cases = [(2, 5, 5, 3, 92, 92, 1), (1, 3, 4, 2, 112, 56, 2)]
    with posattn.use_backend(backend):
        for B, S, HQ, HK, D, R, udim in cases:
            shape = (lambda h: (B, h, S, D)) if udim == 1 else (lambda h: (B, S, h, D))
            q = torch.randn(*shape(HQ), dtype=dtype, device=DEVICE)
            k = torch.randn(*shape(HK), dtype=dtype, device=DEVICE)
            ang = torch.rand(B, S, R // 2, dtype=torch.float64) * 6
            emb = torch.cat((ang, ang), dim=-1)
            cos, sin = emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)
            ref_fn = modeling_llama.apply_rotary_pos_emb if R == D else modeling_phi3.apply_rotary_pos_emb
            eq, ek = ref_fn(q.double().cpu(), k.double().cpu(), cos.double().cpu(), sin.double().cpu(), unsqueeze_dim=udim)
            qo, ko = tf_compat.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=udim)
            assert_close(qo, eq, dtype, msg=f"{B, S, HQ, HK, D, R, udim}")
            assert_close(ko, ek, dtype)
            # transformers 4.38-4.4x positional form: (q, k, cos, sin, position_ids, unsqueeze_dim)
            qo2, _ = tf_compat.apply_rotary_pos_emb(q, k, cos, sin, None, udim)
            assert torch.equal(qo2, qo)


def test_transformers_old_cache_form_and_autograd():
    """transformers <= 4.37 indexed a [max_pos, D] cache with position_ids; and gradients flow."""
    from transformers.models.llama import modeling_llama

    B, H, S, D = 2, 3, 4, 64
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    emb = torch.arange(20, dtype=torch.float64)[:, None] * inv
    emb = torch.cat((emb, emb), dim=-1)
    cos, sin = emb.cos().float().to(DEVICE), emb.sin().float().to(DEVICE)
    pid = torch.tensor([[0, 1, 2, 3], [7, 8, 9, 19]], device=DEVICE)
    q = torch.randn(B, H, S, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, 1, S, D, device=DEVICE, requires_grad=True)
    qo, ko = tf_compat.apply_rotary_pos_emb(q, k, cos, sin, pid)
    qr, kr = q.detach().double().cpu().requires_grad_(), k.detach().double().cpu().requires_grad_()
    eq, ek = modeling_llama.apply_rotary_pos_emb(qr, kr, cos.double().cpu()[pid.cpu()], sin.double().cpu()[pid.cpu()])
    assert_close(qo, eq, torch.float32)
    g1, g2 = torch.randn_like(qo), torch.randn_like(ko)
    ((qo * g1).sum() + (ko * g2).sum()).backward()
    ((eq * g1.double().cpu()).sum() + (ek * g2.double().cpu()).sum()).backward()
    assert_close(q.grad, qr.grad, torch.float32)
    assert_close(k.grad, kr.grad, torch.float32)


def test_transformers_multimodal_and_vision():
    B, H, S, D = 1, 2, 5, 32
    section = [4, 6, 6]
    cos = torch.randn(3, B, S, D, device=DEVICE)
    sin = torch.randn(3, B, S, D, device=DEVICE)
    q, k = torch.randn(B, H, S, D, device=DEVICE), torch.randn(B, 1, S, D, device=DEVICE)
    qo, ko = tf_compat.apply_multimodal_rotary_pos_emb(q, k, cos, sin, section)
    # documented recomposition: pair columns of section i take axis i % 3, in both halves
    axis = torch.tensor(sum(([i % 3] * n for i, n in enumerate(section * 2)), []))
    cm = cos.cpu().double()[axis, :, :, torch.arange(D)].permute(1, 2, 0)
    sm = sin.cpu().double()[axis, :, :, torch.arange(D)].permute(1, 2, 0)
    rh = lambda x: torch.cat((-x[..., D // 2:], x[..., : D // 2]), dim=-1)  # noqa: E731
    eq = q.double().cpu() * cm[:, None] + rh(q.double().cpu()) * sm[:, None]
    assert_close(qo, eq, torch.float32)
    from transformers.models.qwen2_vl import modeling_qwen2_vl as mq

    qv, kv = torch.randn(S, H, D, dtype=torch.bfloat16), torch.randn(S, H, D, dtype=torch.bfloat16)
    cv, sv = torch.randn(S, D), torch.randn(S, D)
    got = tf_compat.apply_rotary_pos_emb_vision(qv.to(DEVICE), kv.to(DEVICE), cv.to(DEVICE), sv.to(DEVICE))
    exp = mq.apply_rotary_pos_emb_vision(qv.double(), kv.double(), cv.double(), sv.double())
    assert_close(got[0], exp[0], torch.bfloat16)
    assert_close(got[1], exp[1], torch.bfloat16)


def test_transformers_bad_unsqueeze_dim():
    q = torch.randn(1, 2, 3, 8)
    c = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="unsqueeze_dim must be 1"):
        tf_compat.apply_rotary_pos_emb(q, q, c, c, unsqueeze_dim=3)
