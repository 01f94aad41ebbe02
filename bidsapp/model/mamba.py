"""A Mamba-1 mixer (Gu & Dao 2023) in plain PyTorch, with a chunked selective scan that is fast on the CPU.

:class:`Mamba` has the parameters of ``mamba_ssm.Mamba`` (state-spaces/mamba v2.2.2, the version
NeuroSTORM pins), with the same names and shapes, so a state dict maps one to one: ``in_proj``,
the depthwise causal ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D`` and ``out_proj``. Its
forward pass is the math of ``Mamba.forward`` without the fused kernels (``selective_scan_ref``):
the scan runs in float32, ``dt`` goes through ``dt_proj`` and a softplus with ``dt_proj``'s bias,
``D`` skips the scan and the output is gated by ``SiLU(z)``.

The selective scan (:func:`selective_scan`) computes, for every channel ``d`` and state ``n``,

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t,        y_t = C_t . h_t + D u_t,

without a Python loop over the tokens. The sequence is cut into chunks of ``K`` tokens:

1. the state each chunk would end with if it started from zero: with gradients in closed form,
   a sum over its tokens of ``exp(A * (delta summed over the later tokens of the chunk)) *
   delta_s B_s u_s`` (exponents never positive: no overflow); without, by the recurrence over the
   ``K`` positions, all chunks at once, reusing one ``exp(delta A)`` per token for step 3;
2. a loop over the chunks carries the states across them (``h <- exp(A sum(delta)) h + local``);
3. a loop over the ``K`` positions of a chunk, all chunks at once, runs the recurrence from each
   chunk's true initial state and reads ``y``.

That is at most ``2K + L/K`` loop steps instead of ``L`` (48 instead of 256 for NeuroSTORM's
4x4x4x4 windows), each on every window of the batch at once (in groups of 16 MB without
gradients), and the same arithmetic as the token-by-token recurrence (float32 tolerance). On CUDA
with ``mamba_ssm`` installed, its fused kernel is used instead (optional; nothing depends on it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Tokens per chunk of :func:`selective_scan` (``2K + L/K`` loop steps: few at 256 tokens).
CHUNK_SIZE = 16
#: Most state values (sequences x tokens x channels x states) scanned at once without gradients:
#: 16 MB of float32, which the allocator reuses (larger blocks are mapped and faulted in anew).
GROUP_ELEMENTS = 2**22


def _chunked(t: torch.Tensor, n_chunks: int, size: int) -> torch.Tensor:
    """``(b, n_chunks*size, f) -> (size, b*n_chunks, f)``: the position in the chunk leads."""
    b, _, f = t.shape
    return t.reshape(b, n_chunks, size, f).permute(2, 0, 1, 3).reshape(size, b * n_chunks, f)


def _unchunked(y: torch.Tensor, b: int, n_chunks: int) -> torch.Tensor:
    """Inverse of :func:`_chunked`: ``(size, b*n_chunks, f) -> (b, n_chunks*size, f)``."""
    size, _, f = y.shape
    return y.view(size, b, n_chunks, f).permute(1, 2, 0, 3).reshape(b, n_chunks * size, f)


def _carry(local: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """States each chunk starts from, given its zero-start end state and decay: ``(b, nc, ...)``."""
    starts = [torch.zeros_like(local[:, 0])]
    for c in range(local.shape[1] - 1):
        starts.append(torch.addcmul(local[:, c], decay[:, c], starts[-1]))
    return torch.stack(starts, 1)


def _scan_chunks(delta: torch.Tensor, du: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, b: int, n_chunks: int) -> torch.Tensor:
    """Differentiable scan of chunked ``(K, b*nc, .)`` inputs (out-of-place: autograd keeps them)."""
    size, bc, d = delta.shape
    # 1. Zero-start end state of each chunk: sum_s exp(A R_s) du_s B_s, with R_s the sum of delta
    #    over the chunk's later tokens (exponents never positive).
    later = delta.flip(0).cumsum(0).flip(0) - delta  # (K, bc, d)
    local = (torch.exp(later[..., None] * A) * du[..., None] * B[:, :, None, :]).sum(0)  # (bc, d, n)
    decay = torch.exp(delta.sum(0)[..., None] * A)  # (bc, d, n): over a whole chunk
    # 2. Carry the states across chunks; 3. the recurrence inside every chunk at once.
    h = _carry(local.view(b, n_chunks, d, -1), decay.view(b, n_chunks, d, -1)).view(bc, d, -1)
    ys = []
    for k in range(size):
        h = torch.addcmul(du[k, :, :, None] * B[k, :, None, :], torch.exp(delta[k, :, :, None] * A), h)
        ys.append(torch.bmm(h, C[k, :, :, None]).squeeze(-1))  # (bc, d)
    return torch.stack(ys, 0)


def _scan_chunks_inplace(delta: torch.Tensor, du: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         C: torch.Tensor, b: int, n_chunks: int) -> torch.Tensor:
    """:func:`_scan_chunks` without autograd: one exp per element, in-place updates.

    States are laid out ``(n, d)``, channels last, which the CPU vectorises best.
    """
    size, bc, d = delta.shape
    A = A.t()  # (n, d)
    decay_step = torch.mul(delta[:, :, None, :], A)  # (K, bc, n, d)
    decay_step.exp_()
    h = delta.new_zeros(bc, A.shape[0], d)
    for k in range(size):  # 1. zero-start end state of every chunk
        h.mul_(decay_step[k]).addcmul_(du[k, :, None, :], B[k, :, :, None])
    decay = torch.exp(delta.sum(0)[:, None, :] * A)  # (bc, n, d)
    h = _carry(h.view(b, n_chunks, -1, d), decay.view(b, n_chunks, -1, d)).view(bc, -1, d)  # 2.
    y = delta.new_empty(size, bc, d)
    for k in range(size):  # 3. from the true start state, reading y
        h.mul_(decay_step[k]).addcmul_(du[k, :, None, :], B[k, :, :, None])
        torch.bmm(C[k, :, None, :], h, out=y[k, :, None, :])
    return y


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """The selective scan of Mamba-1 with input-dependent ``B`` and ``C``, channels last.

    The math of ``mamba_ssm``'s ``selective_scan_ref`` (real ``A``; ``B`` and ``C`` of shape
    ``(b, n, L)`` there), computed in float32 by chunks (see the module docstring). Without
    gradients, the sequences are scanned in groups of at most :data:`GROUP_ELEMENTS` state values
    (memory), with in-place updates.

    Parameters
    ----------
    u, delta : torch.Tensor, shape (b, L, d)
        Input and step size of every token and channel.
    A : torch.Tensor, shape (d, n)
        State matrix (diagonal per channel; negative for a stable scan).
    B, C : torch.Tensor, shape (b, L, n)
        Input and output projections of the state, per token.
    D : torch.Tensor, shape (d,), optional
        Skip connection ``y += D * u``.
    z : torch.Tensor, shape (b, L, d), optional
        Gate: ``y *= silu(z)``.
    delta_bias : torch.Tensor, shape (d,), optional
        Added to ``delta`` first.
    delta_softplus : bool
        Apply softplus to ``delta`` (after the bias).
    chunk_size : int
        Tokens per chunk; any length works (the last chunk is padded with steps that change
        nothing).

    Returns
    -------
    torch.Tensor, shape (b, L, d)
        In the dtype of ``u``.
    """
    dtype = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    b, length, d = u.shape
    size = max(1, min(chunk_size, length))
    n_chunks = math.ceil(length / size)
    pad = n_chunks * size - length
    du = delta * u
    if pad:  # delta = 0: the state carries over unchanged and nothing is added
        delta, du, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (delta, du, B, C))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (delta, du, A, B, C))
    group = b if grad else max(1, GROUP_ELEMENTS // (n_chunks * size * d * A.shape[1]))
    scan = _scan_chunks if grad else _scan_chunks_inplace
    ys = []
    for start in range(0, b, group):
        part = slice(start, start + group)
        bg = u[part].shape[0]
        delta_c, du_c, B_c, C_c = (_chunked(t[part], n_chunks, size) for t in (delta, du, B, C))
        ys.append(_unchunked(scan(delta_c, du_c, A, B_c, C_c, bg, n_chunks), bg, n_chunks))
    y = torch.cat(ys)[:, :length]
    if D is not None:
        y = y + u * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def _fused_scan(x, dt, A, B, C, D, z, delta_bias):  # pragma: no cover - CUDA with mamba_ssm only
    """``mamba_ssm``'s CUDA kernel where it is installed; None otherwise."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:
        return None
    t = lambda v: v.transpose(1, 2).contiguous()  # noqa: E731 - (b, L, f) -> (b, f, L)
    y = selective_scan_fn(t(x), t(dt), A, t(B), t(C), D, z=t(z), delta_bias=delta_bias,
                          delta_softplus=True)
    return y.transpose(1, 2)


class Mamba(nn.Module):
    """Mamba-1 mixer with ``mamba_ssm.Mamba``'s parameters: ``(b, L, d_model) -> (b, L, d_model)``.

    Parameters
    ----------
    d_model : int
        Channels in and out.
    d_state : int
        State size ``n`` per inner channel.
    d_conv : int
        Width of the depthwise causal convolution.
    expand : int
        Inner channels ``d_inner = expand * d_model``.
    dt_rank : int or "auto"
        Rank of the step-size projection; "auto" is ``ceil(d_model / 16)``.
    dt_min, dt_max, dt_init_floor : float
        Range of the initial step sizes (as mamba_ssm's initialisation).
    conv_bias, bias : bool
        Bias of the convolution; of ``in_proj`` and ``out_proj``.
    chunk_size : int
        Tokens per chunk of the scan.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        chunk_size: int = CHUNK_SIZE,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.chunk_size = chunk_size
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self._dt_range = (dt_min, dt_max, dt_init_floor)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's initialisation of the step size, ``A`` (S4D real) and ``D``."""
        dt_min, dt_max, floor = self._dt_range
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_dt = torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        states = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_log.copy_(torch.log(states).expand_as(self.A_log))
        self.D.fill_(1.0)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise causal convolution along the tokens of ``x (b, L, d_inner)``, channels last."""
        k = self.d_conv
        length = x.shape[1]
        weight = self.conv1d.weight[:, 0]  # (d_inner, k)
        padded = F.pad(x, (0, 0, k - 1, 0))
        out = padded[:, k - 1:] * weight[:, k - 1]
        for j in range(k - 1):
            out = torch.addcmul(out, padded[:, j:j + length], weight[:, j])
        return out if self.conv1d.bias is None else out + self.conv1d.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Mix the tokens of every sequence of ``hidden (b, L, d_model)``, causally."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, L, d_inner) each
        x = F.silu(self._conv(x))
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # the bias is added in the scan, in float32
        A = -torch.exp(self.A_log.float())
        y = None
        if x.is_cuda:
            y = _fused_scan(x, dt, A, B, C, self.D.float(), z, self.dt_proj.bias.float())
        if y is None:
            y = selective_scan(x, dt, A, B, C, self.D, z, delta_bias=self.dt_proj.bias,
                               delta_softplus=True, chunk_size=self.chunk_size)
        return self.out_proj(y)
