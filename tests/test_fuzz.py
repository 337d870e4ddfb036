"""Property test: random attention programs, written the way models write them, are fused into
exactly one fusion_pass::attention and compute what eager computes, forward and backward.

A hypothesis strategy draws a ``Program`` from the cross product issue 10 lists:

* the QK^T spelling: ``torch.matmul`` / ``@`` / ``.matmul`` with K transposed by
  ``transpose(-1, -2)``, ``transpose(2, 3)``, ``.mT`` or ``permute``; K stored transposed (the
  program receives K^T); ``einsum``; ``torch.bmm``; ``torch.baddbmm`` (BLOOM);
* where the scale is applied: on q before the product, on k, on both, on the scores (``*``,
  ``/``, ``c * s``, in place ``s /= c``, ``s.mul_(c)``), as baddbmm's ``alpha``, or a tensor
  (a 0-dim buffer, a learnable 0-dim temperature, q times a buffer);
* the batch layout of each product, 4-D ``(B, H, N, D)`` or merged ``(B*H, N, D)``, and of the
  score chain between them (views between layouts anywhere, with inferred ``-1`` sizes);
* q, k, v given directly or projected (``(B, N, H*D)`` viewed and transposed: strided operands);
* the score function: a chain of soft-capping (``tanh(s / c) * c``), a learnable bias (several
  broadcast shapes, either operand order, in place ``s += bias``), ALiBi built from aranges
  (``slopes[:, None, None] * (j - i)``, or BLOOM's key-only form), and pointwise functions from
  ``kernels/pointwise.py``'s table as models spell them (``torch.sin``, ``.cos()``, ``F.gelu``,
  ``s ** 3``, ``s * s``, ``clamp``...);
* the mask: none, ``tril`` / ``triu`` of ones, arange comparisons (causal top-left or bottom-right,
  with commuted operands), a sliding window, left padding, a data mask, or two of them (``&`` or
  two steps), applied by ``masked_fill`` (also in place and as ``torch.masked_fill``),
  ``torch.where`` (either operand order) or as an additive mask (``s + m``, ``m + s``,
  ``s += m``, BERT's ``(1 - keep) * finfo.min``), with fills ``-inf``, ``finfo.min``, ``-1e9`` or
  graph-built (``torch.full((), finfo.min)``, ``torch.tensor(-inf)``);
* the softmax spelling: ``torch.softmax``, ``F.softmax``, ``.softmax``, ``dtype=float32`` then a
  cast back, decomposed (``exp(s - amax) / sum``, with ``max(...)[0]`` / ``.values`` / detached),
  ``log_softmax(s).exp()``;
* GQA / MQA by ``repeat_kv`` (expand + reshape or flatten) or ``repeat_interleave``, or MQA by one
  K/V head that the products broadcast (Falcon); K/V shared by the batch (batch 1, broadcast),
  expanded by the program where it merges heads;
* a dropout that is a no-op (``training=False`` or ``p=0``), shapes (odd lengths, Nq != Nk,
  length 1) and dtype (fp32, fp64).

The program is written out as Python source (printed by hypothesis when an example fails) and run
as an nn.Module's forward, so Dynamo sees exactly what a model would give it.

What the generator does *not* draw, and why. Every refusal the sweeps found was a gap in the pass
and is fixed (in-place updates through views of the scores, ``s.mul_(c)`` as a statement followed
by ``s += b``, a no-op ``.float()`` aliasing the scores, products that broadcast K/V heads or
batch dims, GQA by ``expand(...).flatten``) or a kernel bug (a K stored transposed on ATen's flash path gave
wrong outputs). What is left out cannot be checked against eager, or cannot be fused soundly:

* ``-inf`` fills on rows that the masks empty completely: eager's softmax gives NaN there, which
  a NaN-free comparison cannot check (the kernels reproduce it: tests/test_kernel_soundness.py),
  so such programs get a finite fill instead (``programs`` below); the assumption in
  ``check_program`` rejects any other program whose eager output or gradient is not finite;
* a score function or softcap *after* the mask (``sin(masked_fill(s, m, -inf))``): NaN rows again;
* an in-place mask or bias right after a pointwise function (``torch.tanh(s).masked_fill_(...)``):
  eager's backward refuses it (tanh's saved output "modified by an inplace operation");
* ALiBi on merged ``(B*H, Nq, Nk)`` scores is drawn in BLOOM's form (``slopes.repeat(B)``):
  ``slopes[:, None, None]`` would not broadcast there (an error in eager too);
* the scores read after a write through one of their views (``t = s.view(...); t.mul_(c);
  softmax(s)``): the write changes what the other node reads, so the updates are not the
  functional ops, and the site stays a near miss ("the raw scores are also used outside the
  region"; pinned in tests/test_generality.py);
* a QK product that broadcasts *both* operands (q of shape (1, H, N, D) against k of (B, 1, N, D)):
  the product's batch is neither operand's; expanding both is not implemented, so it stays a near
  miss ("... nor one broadcast into the other's", pinned in test_generality.py). One operand
  broadcast into the other's batch dims (K/V shared by the batch or the heads, queries shared by
  the batch) is drawn and fused;
* dropout with p > 0 in training: a different random stream than eager's (tested for its
  distribution in tests/test_kernel_soundness.py and tests/test_sdpa_sites.py).
"""
from __future__ import annotations

import linecache
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import fusion_pass

from helpers import max_rel_error, profiled_op_counts

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings, strategies as st  # noqa: E402

RTOL = {torch.float32: 1e-5, torch.float64: 1e-5}

# pointwise score functions, spelled as a model would (each a line ``s = <expr>``); the names on
# the right of kernels/pointwise.py's table are all reached (log, sqrt, rsqrt, reciprocal on a
# positive argument, so no NaN enters the comparison)
POINTWISE = {
    "sin": "torch.sin(s)", "cos": "s.cos()", "exp": "torch.exp(s * 0.1)",
    "expm1": "torch.expm1(s * 0.1)", "log1p": "torch.log1p(s.abs())", "log": "torch.log(s.abs() + 1.0)",
    "sqrt": "torch.sqrt(s.abs() + 1.0)", "rsqrt": "torch.rsqrt(s * s + 1.0)",
    "reciprocal": "torch.reciprocal(s.abs() + 1.0)", "neg": "-s", "square": "torch.square(s)",
    "mul_self": "s * s", "abs": "torch.abs(s)", "sigmoid": "torch.sigmoid(s)", "F.sigmoid": "F.sigmoid(s)",
    "erf": "torch.erf(s)", "relu": "F.relu(s)", "silu": "F.silu(s)", "gelu": "F.gelu(s)",
    "gelu_tanh": "F.gelu(s, approximate='tanh')", "softplus": "F.softplus(s, beta=2.0)",
    "leaky_relu": "F.leaky_relu(s, 0.2)", "clamp": "torch.clamp(s, -2.0, 3.0)",
    "clamp_min": "s.clamp(min=-1.0)", "pow3": "s ** 3", "pow_method": "s.pow(2)", "tanh": "torch.tanh(s)",
}

# a scale applied to the scores (``{c}`` is the constant); in place: ``div_`` (s /= c), ``mul_``
SCORE_SCALES = {"mul": "s * {c}", "div": "s / {c}", "rmul": "{c} * s", "torch_mul": "torch.mul(s, {c})",
                "div_method": "s.div({c})", "torch_div": "torch.div(s, {c})", "buffer": "s * self.scale",
                "param": "s * self.temperature", "buffer_div": "s / self.scale"}

FILLS = {"-inf": "float('-inf')", "finfo_min": "torch.finfo(s.dtype).min", "-1e9": "-1e9",
         "full": "torch.full((), torch.finfo(s.dtype).min, dtype=s.dtype)",
         "tensor_inf": "torch.tensor(float('-inf'), dtype=s.dtype)"}


@dataclass(frozen=True)
class Program:
    B: int
    H: int                    # K/V heads; q has H * kv_rep
    Nq: int
    Nk: int
    D: int
    dtype: torch.dtype
    qk: str = "matmul_t"      # QK_4D (4-D or merged) or QK_FLAT_ONLY (merged B*H)
    qk_layout: str = "4d"     # 4d | flat (bmm, bmm_method, baddbmm: flat)
    chain_layout: str = "4d"  # the layout of the score chain and softmax (a view after the product)
    pv: str = "matmul"        # matmul | operator | method | bmm | einsum
    pv_layout: str = "4d"
    view_inferred: bool = False  # views between layouts spell the batch size -1
    projected: bool = False   # q, k, v from (B, N, H*D) by view + transpose (strided)
    scale_at: str = "none"    # none | q | k | both | q_buffer | div_ | mul_ | alpha (baddbmm)
    #                           | a key of SCORE_SCALES
    scale_value: float = 1.0
    score_fns: Tuple[str, ...] = ()  # softcap | softcap_commuted | bias_<shape>[_first|_inplace]
    #                                  | alibi | alibi_keys | fn:<POINTWISE name>
    masks: Tuple[str, ...] = ()      # STRUCTURAL and DATA_MASKS (below), at most one of each
    combine: str = "and"      # and | steps (two masks: one keep, or one step each)
    mask_form: str = "masked_fill"  # masked_fill | masked_fill_ | torch_masked_fill | where
    #                                 | where_commuted | add | add_first | add_ | add_bert
    fill: str = "finfo_min"
    softmax: str = "torch"    # SOFTMAXES
    dropout: Optional[str] = None  # None | eval | p0 | module (nn.Dropout(0.0)) | contiguous
    kv_rep: int = 1
    repeat: str = "repeat_kv"  # repeat_kv | (torch_)repeat_interleave | expand_flatten | broadcast
    #                            (K/V have one head, which the products broadcast: Falcon's MQA)
    kv_batch_shared: bool = False  # K/V of batch 1, broadcast by the products over q's batch

    @property
    def Hq(self) -> int:
        return self.H * self.kv_rep

    # ---- inputs --------------------------------------------------------------------------------

    def input_names(self):
        names = ["q", "kt" if self.qk in ("stored_kt", "einsum_kt") else "k", "v"]
        names += [f"bias{i}" for i, f in enumerate(self.score_fns) if f.startswith("bias")]
        if "padding" in self.masks or "padding_eq0" in self.masks:
            names.append("pad")
        if "data" in self.masks:
            names.append("data")
        if "document" in self.masks:
            names += ["doc_q", "doc_k"]
        return names

    def bias_shape(self, fn: str):
        B, H, Nq, Nk = self.B, self.Hq, self.Nq, self.Nk
        kind = fn.split("_")[1]
        if self.chain_layout == "flat":
            return {"head": (1, Nq, Nk), "key": (B * H, 1, Nk), "qk": (Nq, Nk), "full": (B * H, Nq, Nk),
                    "perhead": (B * H, 1, 1)}[kind]
        return {"head": (1, H, Nq, Nk), "key": (B, 1, 1, Nk), "qk": (Nq, Nk), "full": (B, H, Nq, Nk),
                "perhead": (H, 1, 1)}[kind]

    def padding(self) -> torch.Tensor:
        """(B, Nk), 1 = a real key: the last batch row left-padded by up to 3 keys (never all)."""
        pad = torch.ones(self.B, self.Nk, dtype=torch.long)
        pad[-1, :min(3, self.Nk - 1)] = 0
        return pad

    def data_mask(self) -> torch.Tensor:
        """(Nq, Nk) keep mask from data: random, keys 0 and Nk - 1 always kept."""
        g = torch.Generator().manual_seed(self.Nq * 1000 + self.Nk)
        keep = torch.rand(self.Nq, self.Nk, generator=g) < 0.7
        keep[:, 0] = keep[:, -1] = True
        return keep

    def documents(self):
        """(B, Nq) and (B, Nk) document ids: runs of 5 positions, shifted by one per batch row."""
        return [torch.stack([(torch.arange(n) + b) // 5 for b in range(self.B)]) for n in (self.Nq, self.Nk)]

    def keep(self) -> torch.Tensor:
        """The (B, Nq, Nk) keep pattern the masks give, in Python (for choosing a safe fill)."""
        i = torch.arange(self.Nq)[:, None]
        j = torch.arange(self.Nk)[None, :]
        keep = torch.ones(self.B, self.Nq, self.Nk, dtype=torch.bool)
        for m in self.masks:
            keep = keep & {
                "tril": j <= i, "triu": j <= i, "causal": j <= i, "causal_commuted": j <= i,
                "causal_br": j <= i + (self.Nk - self.Nq), "window": (j <= i) & (i - j < 3),
                "padding": self.padding().bool()[:, None, :], "data": self.data_mask(),
                "padding_eq0": self.padding().bool()[:, None, :], "window_abs": (i - j).abs() < 3,
                "prefix": (j <= i) | (j < 2), "chunk": i // 4 == j // 4,
                "document": self.documents()[0][:, :, None] == self.documents()[1][:, None, :],
                "buffer_slice": j <= i + max(self.Nk - self.Nq, 0),
            }[m]
        return keep

    def inputs(self):
        B, Hq, H, Nq, Nk, D, dt = self.B, self.Hq, self.H, self.Nq, self.Nk, self.D, self.dtype
        Bk = 1 if self.kv_batch_shared else B
        if self.projected:
            shapes = [(B, Nq, Hq * D), (Bk, Nk, H * D), (Bk, Nk, H * D)]
        else:
            shapes = [(B, Hq, Nq, D), (Bk, H, Nk, D), (Bk, H, Nk, D)]
            if self.qk in ("stored_kt", "einsum_kt"):
                shapes[1] = (Bk, H, D, Nk)
        out = [torch.randn(s, dtype=dt, requires_grad=True) for s in shapes]
        for f in self.score_fns:
            if f.startswith("bias"):
                out.append((0.5 * torch.randn(self.bias_shape(f), dtype=dt)).requires_grad_())
        if "padding" in self.masks or "padding_eq0" in self.masks:
            out.append(self.padding())
        if "data" in self.masks:
            out.append(self.data_mask() if self.chain_layout == "flat" else self.data_mask()[None, None])
        if "document" in self.masks:
            out += self.documents()
        return out

    # ---- the program ---------------------------------------------------------------------------

    @property
    def kv_broadcast(self) -> bool:
        """K/V have fewer heads or batch elements than q, which the products broadcast."""
        return self.repeat == "broadcast" and self.kv_rep > 1 or self.kv_batch_shared

    def source(self) -> str:
        B, Hq, H, Nq, Nk, D = self.B, self.Hq, self.H, self.Nq, self.Nk, self.D
        Bk = 1 if self.kv_batch_shared else B
        L = []
        add = L.append
        kname = "kt" if self.qk in ("stored_kt", "einsum_kt") else "k"
        add(f"def forward(self, {', '.join(self.input_names())}):")
        if self.projected:  # (B, N, H*D) -> (B, H, N, D): strided, as a model's projections give
            add(f"    q = q.view({B}, {Nq}, {Hq}, {D}).transpose(1, 2)")
            if kname == "kt":
                add(f"    kt = kt.view({Bk}, {Nk}, {H}, {D}).permute(0, 2, 3, 1)")
            else:
                add(f"    k = k.view({Bk}, {Nk}, {H}, {D}).transpose(1, 2)")
            add(f"    v = v.view({Bk}, {Nk}, {H}, {D}).transpose(1, 2)")
        c = repr(self.scale_value)
        if self.scale_at == "q":
            add(f"    q = q * {c}")
        elif self.scale_at == "k":
            add(f"    {kname} = {kname} * {c}")
        elif self.scale_at == "both":
            add(f"    q = q * {math.sqrt(self.scale_value)!r}")
            add(f"    {kname} = {math.sqrt(self.scale_value)!r} * {kname}")
        elif self.scale_at == "q_buffer":
            add("    q = q * self.scale")
        if self.kv_rep > 1 and self.repeat != "broadcast":
            r = self.kv_rep
            for t in (kname, "v"):
                if self.repeat == "repeat_kv":
                    add(f"    b_, h_, x_, y_ = {t}.shape")
                    add(f"    {t} = {t}[:, :, None, :, :].expand(b_, h_, {r}, x_, y_)"
                        f".reshape(b_, h_ * {r}, x_, y_)")
                elif self.repeat == "expand_flatten":
                    add(f"    {t} = {t}.unsqueeze(2).expand(-1, -1, {r}, -1, -1).flatten(1, 2)")
                elif self.repeat == "torch_repeat_interleave":
                    add(f"    {t} = torch.repeat_interleave({t}, {r}, dim=1)")
                else:
                    add(f"    {t} = {t}.repeat_interleave({r}, dim=1)")
        # -- the QK product ----------------------------------------------------------------------
        flat = self.qk_layout == "flat"
        if flat:
            add(f"    q = q.reshape({B * Hq}, {Nq}, {D})")
            if self.kv_broadcast:  # merged heads: the user expands
                add(f"    {kname} = {kname}.expand({B}, {Hq}, -1, -1)")
            last_two = (D, Nk) if kname == "kt" else (Nk, D)
            add(f"    {kname} = {kname}.reshape({B * Hq}, {last_two[0]}, {last_two[1]})")
        t_last = "1, 2" if flat else "2, 3"
        perm = "0, 2, 1" if flat else "0, 1, 3, 2"
        b = "b" if flat else "bh"
        s = {
            "matmul_t": "torch.matmul(q, k.transpose(-1, -2))",
            "operator_t23": f"q @ k.transpose({t_last})",
            "method_mT": "q.matmul(k.mT)",
            "permute": f"q @ k.permute({perm})",
            "stored_kt": "q @ kt",
            "einsum": f"torch.einsum('{b}id,{b}jd->{b}ij', q, k)",
            "einsum_kt": f"torch.einsum('{b}id,{b}dj->{b}ij', q, kt)",
            "einsum_ellipsis": "torch.einsum('...qd,...kd->...qk', q, k)",
            "torch_transpose": "torch.matmul(q, torch.transpose(k, -2, -1))",
            "swapaxes": "q @ k.swapaxes(-1, -2)",
            "bmm": "torch.bmm(q, k.transpose(1, 2))",
            "bmm_method": "q.bmm(k.transpose(-1, -2))",
            "baddbmm": None, "baddbmm_alibi": None,
        }[self.qk]
        if self.qk == "baddbmm":
            alpha = c if self.scale_at == "alpha" else "1.0"
            add(f"    base = torch.zeros({B * Hq}, {Nq}, {Nk}, dtype=q.dtype, device=q.device)")
            add(f"    s = torch.baddbmm(base, q, k.transpose(1, 2), beta=0.0, alpha={alpha})")
        elif self.qk == "baddbmm_alibi":  # BLOOM: ALiBi (per head, per key) as baddbmm's input
            alpha = c if self.scale_at == "alpha" else "1.0"
            add(f"    alibi = self.slopes.repeat({B})[:, None, None] * torch.arange({Nk}, device=q.device)"
                f"[None, None, :].to(q.dtype)")
            add(f"    s = alibi.baddbmm(q, k.transpose(1, 2), beta=1.0, alpha={alpha})")
        else:
            add(f"    s = {s}")
        if self.qk_layout != self.chain_layout:
            if self.chain_layout == "flat":
                # a product that broadcast K/V may leave its batch dims non-contiguous (einsum):
                # view() refuses that in eager too, so such programs reshape
                how = "reshape" if self.kv_broadcast else "view"
                add(f"    s = s.{how}({-1 if self.view_inferred else B * Hq}, {Nq}, {Nk})")
            else:
                add(f"    s = s.view({B}, {-1 if self.view_inferred else Hq}, {Nq}, {Nk})")
        # -- the score chain ---------------------------------------------------------------------
        if self.scale_at == "div_":
            add(f"    s /= {c}")
        elif self.scale_at == "mul_":
            add(f"    s.mul_({c})")
        elif self.scale_at in SCORE_SCALES:
            add("    s = " + SCORE_SCALES[self.scale_at].format(c=c))
        chain_flat = self.chain_layout == "flat"
        for k_, fn in enumerate(self.score_fns):
            if fn == "softcap":
                add("    s = torch.tanh(s / 5.0) * 5.0")
            elif fn == "softcap_commuted":
                add("    s = 5.0 * (s / 5.0).tanh()")
            elif fn.startswith("bias"):
                if fn.endswith("_first"):
                    add(f"    s = bias{k_} + s")
                elif fn.endswith("_inplace"):
                    add(f"    s += bias{k_}")
                else:
                    add(f"    s = s + bias{k_}")
            elif fn in ("alibi", "alibi_keys"):
                slopes = f"self.slopes.repeat({B})" if chain_flat else "self.slopes"
                add(f"    aj = torch.arange({Nk}, device=q.device)")
                if fn == "alibi":
                    add(f"    ai = torch.arange({Nq}, device=q.device)")
                    add(f"    s = s + {slopes}[:, None, None] * (aj[None, :] - ai[:, None])")
                else:
                    add(f"    s = s + {slopes}[:, None, None] * aj[None, None, :].to(s.dtype)")
            else:
                add(f"    s = {POINTWISE[fn[3:]]}")
        if self.masks:
            L += ["    " + x for x in self._mask_lines()]
        # -- softmax -----------------------------------------------------------------------------
        sm = self.softmax
        last = 2 if self.chain_layout == "flat" else 3
        if sm.startswith("decomposed"):
            mx = {"decomposed": "s.amax(dim=-1, keepdim=True)",
                  "decomposed_max": "torch.max(s, dim=-1, keepdim=True)[0]",
                  "decomposed_values": "s.max(-1, keepdim=True).values.detach()"}[sm]
            add(f"    e = torch.exp(s - {mx})")
            add("    p = e / e.sum(dim=-1, keepdim=True)")
        else:
            add("    p = " + {
                "torch": "torch.softmax(s, dim=-1)", "functional": "F.softmax(s, dim=-1)",
                "method": "s.softmax(-1)",
                "dtype": "F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)",
                "log_softmax": "torch.log_softmax(s, dim=-1).exp()",
                "F.log_softmax": "F.log_softmax(s, -1).exp()",
                "type_as": "F.softmax(s, dim=-1, dtype=torch.float32).type_as(s)",
                "float_cast": "torch.softmax(s.float(), dim=-1).to(v.dtype)",
                "dim_pos": f"s.softmax(dim={last})",
            }[sm])
        if self.dropout == "eval":
            add("    p = F.dropout(p, p=0.1, training=False)")
        elif self.dropout == "p0":
            add("    p = F.dropout(p, p=0.0, training=self.training)")
        elif self.dropout == "module":
            add("    p = self.attn_dropout(p)")
        elif self.dropout == "contiguous":
            add("    p = p.contiguous()")
        # -- the PV product ----------------------------------------------------------------------
        if self.pv_layout != self.chain_layout:
            if self.pv_layout == "flat":
                add(f"    p = p.reshape({-1 if self.view_inferred else B * Hq}, {Nq}, {Nk})")
            else:
                add(f"    p = p.view({B}, {-1 if self.view_inferred else Hq}, {Nq}, {Nk})")
        if self.pv_layout == "flat":
            if self.kv_broadcast:
                add(f"    v = v.expand({B}, {Hq}, -1, -1)")
            add(f"    v = v.reshape({B * Hq}, {Nk}, {D})")
        b = "b" if self.pv_layout == "flat" else "bh"
        add("    o = " + {"matmul": "torch.matmul(p, v)", "operator": "p @ v", "bmm": "torch.bmm(p, v)",
                          "method": "p.matmul(v)",
                          "einsum": f"torch.einsum('{b}ij,{b}jd->{b}id', p, v)"}[self.pv])
        add(f"    return o.reshape({B}, {Hq}, {Nq}, {D})")
        return "\n".join(L) + "\n"

    def _mask_lines(self):
        """Lines that build the mask(s) and apply them to ``s``."""
        Nq, Nk, B, Hq = self.Nq, self.Nk, self.B, self.Hq
        flat = self.chain_layout == "flat"
        L = []
        keeps = []  # (expression of a keep mask, or of a *masked* mask when negated=True)
        for m in self.masks:
            if m in ("causal", "causal_commuted", "causal_br", "window", "window_abs", "prefix", "chunk") \
                    and "i_ = " not in "".join(L):
                L.append(f"i_ = torch.arange({Nq}, device=q.device)[:, None]")
                L.append(f"j_ = torch.arange({Nk}, device=q.device)[None, :]")
            if m == "tril":
                keeps.append((f"torch.tril(torch.ones({Nq}, {Nk}, dtype=torch.bool, device=q.device))", False))
            elif m == "triu":
                keeps.append((f"torch.triu(torch.ones({Nq}, {Nk}, dtype=torch.bool, device=q.device), diagonal=1)",
                              True))
            elif m == "causal":
                keeps.append(("j_ <= i_", False))
            elif m == "causal_commuted":
                keeps.append(("i_ < j_", True))
            elif m == "causal_br":
                keeps.append((f"j_ <= i_ + {Nk - Nq}", False))
            elif m == "window":
                keeps.append(("(j_ <= i_) & (i_ - j_ < 3)", False))
            elif m == "padding":
                if flat:
                    keeps.append((f"pad.bool()[:, None, None, :].expand({B}, {Hq}, 1, {Nk})"
                                   f".reshape({B * Hq}, 1, {Nk})", False))
                else:
                    keeps.append(("pad[:, None, None, :].bool()", False))
            elif m == "data":
                keeps.append(("data", False))
            elif m == "window_abs":
                keeps.append(("(i_ - j_).abs() < 3", False))
            elif m == "prefix":
                keeps.append(("(j_ <= i_) | (j_ < 2)", False))
            elif m == "chunk":
                keeps.append(("torch.div(i_, 4, rounding_mode='floor') != torch.div(j_, 4, rounding_mode='floor')",
                              True))
            elif m == "padding_eq0":
                keeps.append((f"pad[:, None, None, :].expand({B}, {Hq}, 1, {Nk}).reshape({B * Hq}, 1, {Nk}) == 0"
                              if flat else "pad[:, None, None, :] == 0", True))
            elif m == "document":
                doc = "doc_q[:, None, :, None] == doc_k[:, None, None, :]"
                keeps.append((f"({doc}).expand({B}, {Hq}, {Nq}, {Nk}).reshape({B * Hq}, {Nq}, {Nk})"
                              if flat else doc, False))
            elif m == "buffer_slice":  # GPT-2's registered causal buffer, sliced bottom-right
                lo = max(Nk - Nq, 0)
                keeps.append((f"self.causal[{'0' if flat else ':'}, :, {lo}:{lo + Nq}, :{Nk}]", False))
        # one keep mask (``&``) or one step per mask
        if self.combine == "and" and len(keeps) > 1:
            parts = [f"~({e})" if neg else f"({e})" for e, neg in keeps]
            keeps = [(" & ".join(parts), False)]
        fill = FILLS[self.fill]
        for n, (e, neg) in enumerate(keeps):
            L.append(f"{'masked' if neg else 'keep'}{n} = {e}")
            keep = f"~masked{n}" if neg else f"keep{n}"
            masked = f"masked{n}" if neg else f"~keep{n}"
            form = self.mask_form
            if form == "masked_fill":
                L.append(f"s = s.masked_fill({masked}, {fill})")
            elif form == "masked_fill_":
                L.append(f"s.masked_fill_({masked}, {fill})")
            elif form == "torch_masked_fill":
                L.append(f"s = torch.masked_fill(s, {masked}, {fill})")
            elif form == "where":
                L.append(f"s = torch.where({keep}, s, {fill})")
            elif form == "where_commuted":
                L.append(f"s = torch.where({masked}, {fill}, s)")
            elif form == "add_bert":
                L.append(f"am{n} = (1.0 - ({keep}).to(s.dtype)) * torch.finfo(s.dtype).min")
                L.append(f"s = s + am{n}")
            else:
                L.append(f"am{n} = torch.zeros(({keep}).shape, dtype=s.dtype, device=s.device)"
                         f".masked_fill({masked}, {fill})")
                L.append({"add": f"s = s + am{n}", "add_first": f"s = am{n} + s", "add_": f"s += am{n}"}[form])
        return L

    def module(self, name: Optional[str] = None) -> torch.nn.Module:
        return Attention(self, name)


class Attention(torch.nn.Module):
    """One program as a module: its forward is compiled from the program's source."""

    _count = 0

    def __init__(self, program: Program, name: Optional[str] = None):
        super().__init__()
        self.program = program
        dt = program.dtype
        if program.scale_at in ("buffer", "buffer_div", "q_buffer"):
            self.register_buffer("scale", torch.tensor(program.scale_value, dtype=dt))
        if program.scale_at == "param":
            self.temperature = torch.nn.Parameter(torch.tensor(program.scale_value, dtype=dt))
        if program.dropout == "module":
            self.attn_dropout = torch.nn.Dropout(0.0)
        if "buffer_slice" in program.masks:
            self.register_buffer("causal", torch.tril(torch.ones(32, 32, dtype=torch.bool))[None, None],
                                 persistent=False)
        if any(f.startswith("alibi") for f in program.score_fns) or program.qk == "baddbmm_alibi":
            h = program.Hq
            slopes = [2.0 ** (-8 * (k + 1) / h) for k in range(h)]
            self.register_buffer("slopes", torch.tensor(slopes, dtype=dt))
        Attention._count += 1
        filename = f"<{name or f'fuzz program {Attention._count}'}>"  # a name: stable reports
        source = program.source()
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        scope = {"torch": torch, "F": F}
        exec(compile(source, filename, "exec"), scope)
        self._forward = scope["forward"]

    def forward(self, *args):
        return self._forward(self, *args)


def gradient_errors(got, want) -> list:
    """max_rel_error per gradient, except that a gradient which is zero in exact arithmetic is
    measured against the largest gradient overall, since any summation order gives rounding
    noise there, not zero: q's and k's when Nk = 1 (a softmax over one key is constant), a bias
    constant along each row (per head, (H, 1, 1): the softmax cancels it). Such a gradient shows
    as one below 1e-4 of the largest."""
    scale = max(w.abs().max().item() for w in want)
    if not math.isfinite(scale):
        return [max_rel_error(got, want)]
    errs = []
    for g, w in zip(got, want):
        if not w.abs().max().item() < 1e-4 * scale:  # (NaN or inf in w: max_rel_error's rules)
            errs.append(max_rel_error([g], [w]))
        else:
            d = (g.double() - w.double()).abs().max().item()
            errs.append(d / max(scale, 1e-30) if math.isfinite(d) else math.inf)  # NaN: max() skips it
    return errs


# ---- the strategy ----------------------------------------------------------------------------------

QK_4D = ["matmul_t", "operator_t23", "method_mT", "permute", "stored_kt", "einsum", "einsum_kt",
         "einsum_ellipsis", "torch_transpose", "swapaxes"]
QK_FLAT_ONLY = ["bmm", "bmm_method", "baddbmm", "baddbmm_alibi"]
SCALES = ["none", "q", "k", "both", "div_", "mul_", "q_buffer"] + sorted(SCORE_SCALES)
BIASES = ["bias_head", "bias_key", "bias_qk", "bias_full", "bias_perhead"]
STRUCTURAL = ["tril", "triu", "causal", "causal_commuted", "causal_br", "window", "window_abs", "prefix",
              "chunk", "buffer_slice"]
DATA_MASKS = ["padding", "padding_eq0", "data", "document"]
FORMS = ["masked_fill", "masked_fill_", "torch_masked_fill", "where", "where_commuted", "add",
         "add_first", "add_", "add_bert"]
SOFTMAXES = ["torch", "functional", "method", "dtype", "decomposed", "decomposed_max",
             "decomposed_values", "log_softmax", "F.log_softmax", "type_as", "float_cast", "dim_pos"]


@st.composite
def programs(draw):
    qk = draw(st.sampled_from(QK_4D + QK_FLAT_ONLY))
    qk_layout = "flat" if qk in QK_FLAT_ONLY else draw(st.sampled_from(["4d", "flat"]))
    chain_layout = draw(st.sampled_from([qk_layout, qk_layout, "4d", "flat"]))
    pv_layout = draw(st.sampled_from([chain_layout, "4d", "flat"]))
    pv = draw(st.sampled_from(["matmul", "operator", "method", "einsum"]
                              + (["bmm"] if pv_layout == "flat" else [])))
    D = draw(st.sampled_from([8, 16]))
    scale_at = draw(st.sampled_from(SCALES + (["alpha", "alpha"] if qk.startswith("baddbmm") else [])))
    divides = ("div", "div_", "div_method", "torch_div", "buffer_div")
    scale_value = math.sqrt(D) if scale_at in divides else 1 / math.sqrt(D)
    fns = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["softcap", "bias", "alibi", "fn", "fn"]))
        if kind == "softcap":
            fns.append(draw(st.sampled_from(["softcap", "softcap_commuted"])))
        elif kind == "bias":
            inplace = ["_inplace"] if not (fns and fns[-1].startswith("fn:")) else []  # as below
            fns.append(draw(st.sampled_from(BIASES)) + draw(st.sampled_from(["", "_first"] + inplace)))
        elif kind == "alibi":
            fns.append(draw(st.sampled_from(["alibi", "alibi_keys"])))
        else:
            fns.append("fn:" + draw(st.sampled_from(sorted(POINTWISE))))
    n_masks = draw(st.sampled_from([0, 1, 1, 2]))
    masks = []
    if n_masks:
        masks.append(draw(st.sampled_from(STRUCTURAL + DATA_MASKS)))
    if n_masks == 2:
        masks.append(draw(st.sampled_from(DATA_MASKS if masks[0] in STRUCTURAL else STRUCTURAL)))
    kv_rep = draw(st.sampled_from([1, 1, 2, 3]))
    repeat = draw(st.sampled_from(["repeat_kv", "repeat_interleave", "torch_repeat_interleave",
                                   "expand_flatten", "broadcast"]))
    program = Program(
        B=draw(st.integers(1, 2)), H=1 if repeat == "broadcast" else draw(st.integers(1, 3)),
        Nq=draw(st.integers(1, 20)), Nk=draw(st.integers(1, 20)), D=D,
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float64])),
        qk=qk, qk_layout=qk_layout, chain_layout=chain_layout, pv=pv, pv_layout=pv_layout,
        view_inferred=draw(st.booleans()), projected=draw(st.booleans()),
        scale_at=scale_at, scale_value=scale_value, score_fns=tuple(fns), masks=tuple(masks),
        combine=draw(st.sampled_from(["and", "steps"])), mask_form=draw(st.sampled_from(FORMS)),
        fill=draw(st.sampled_from(sorted(FILLS))), softmax=draw(st.sampled_from(SOFTMAXES)),
        dropout=draw(st.sampled_from([None, "eval", "p0", "module", "contiguous"])),
        kv_rep=kv_rep, repeat=repeat, kv_batch_shared=draw(st.sampled_from([False, False, False, True])),
    )
    if fns and fns[-1].startswith("fn:") and program.mask_form in ("masked_fill_", "add_"):
        # eager refuses it: writing in place into tanh's / sigmoid's / exp's output, which their
        # backward reads ("modified by an inplace operation")
        program = _replace(program, mask_form=program.mask_form[:-1])
    if program.masks and not program.keep().any(-1).all() and "inf" in program.fill:
        # a row the masks empty: eager's softmax of all -inf is NaN (see the module docstring)
        program = _replace(program, fill="finfo_min")
    return program


def _replace(program, **kw):
    import dataclasses
    return dataclasses.replace(program, **kw)


def check_program(program: Program, training: bool) -> None:
    """The program fuses exactly one site, and the compiled module equals eager in its output and
    in the gradients of q, k, v, every learnable bias and the learnable temperature."""
    torch._dynamo.reset()  # each example compiles afresh: no recompile limit, no stale guards
    torch.manual_seed(0)
    model = program.module().train(training)
    inputs = program.inputs()
    diff = [x for x in inputs if x.requires_grad] + [p for p in model.parameters()]

    ref = model(*inputs)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, diff, g)
    assume(torch.isfinite(ref).all() and all(torch.isfinite(r).all() for r in ref_grads))

    # one query row (Nq = 1) on CPU is kept for Inductor by default: the fuzz tests our kernels
    with fusion_pass.configure(fuse_cpu_decode=True):
        expl = fusion_pass.explain(model, *inputs)
    assert len(expl.fused) == 1 and not expl.missed, f"{program.source()}\n{expl}"

    compiled = torch.compile(model, backend=fusion_pass.Backend(fuse_cpu_decode=True))
    torch.autograd.grad(compiled(*inputs), diff, g)  # compile forward and backward first
    out, n_fwd, _ = profiled_op_counts(lambda: compiled(*inputs))
    grads, _, n_bwd = profiled_op_counts(lambda: torch.autograd.grad(out, diff, g))

    rtol = RTOL[program.dtype]
    assert (n_fwd, n_bwd) == (1, 1), f"{n_fwd} forward, {n_bwd} backward calls\n{program.source()}"
    err = max_rel_error([out], [ref])
    assert err < rtol, f"output error {err:.3g}\n{program.source()}"
    errs = gradient_errors(grads, ref_grads)
    assert max(errs) < rtol * 10, f"gradient errors {[f'{e:.3g}' for e in errs]}\n{program.source()}"
    torch._dynamo.reset()


# the default run: 12 programs (each compiled forward and backward, ~1-2 s); the sweep
# below draws many more (`python -m pytest -m slow`)
@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(programs(), st.booleans())
def test_random_attention_program_is_fused_and_equal_to_eager(program, training):
    check_program(program, training)


@pytest.mark.slow
@settings(max_examples=250, deadline=None, derandomize=True, database=None)
@given(programs(), st.booleans())
def test_random_attention_program_sweep(program, training):
    check_program(program, training)
