"""Paged AdamW (32- or 8-bit state): optimizer state lives in host memory and visits the compute device in
pages, under a byte budget, just before the update that needs it.

Math (AdamW, decoupled weight decay; identical with or without paging — the update is elementwise, so
doing it one page at a time changes nothing)::

    m ← β1·m + (1−β1)·g          v ← β2·v + (1−β2)·g²
    p ← p − lr·wd·p − lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)

8-bit state (bitsandbytes' scheme, DESIGN.md §2): m and v are stored blockwise (256 values per block) as
uint8 codes of the signed / unsigned dynamic map with one float32 absmax per block; tensors with fewer than
``min_8bit_size`` elements keep float32 state. A page always holds whole 256-blocks, so paged and unpaged
8-bit runs round identically.

Paging (no CUDA unified memory): each page's state is copied host → device, updated, copied back and
freed; the next page is prefetched on a side CUDA stream while the current one updates. On a CPU-only
machine host and device are the same memory, and the same code path runs with real copies, so the
pager's invariants (budget never exceeded, bytes in/out) are testable anywhere.

Under FSDP2 a parameter is a sharded DTensor: each rank updates its own shard, with state for that shard only
(8-bit blocks are blocks of the shard), so ``state_dict()`` holds plain per-rank tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError
from ..quant.codebooks import dynamic_map
from ..quant.double_quant import dequantize8, quantize8, rounding_lut
from .registry import BLOCK, MIN_8BIT_SIZE, OPTIMIZERS, check_optimizer

__all__ = ["AdamW", "PagerStats", "make"]


@dataclass
class PagerStats:
    budget_bytes: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    pages: int = 0

    def take(self, n: int):
        self.resident_bytes += n
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        if self.budget_bytes and self.resident_bytes > self.budget_bytes:
            raise RuntimeError(f"pager over budget: {self.resident_bytes} > {self.budget_bytes} bytes")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (FSDP2 DTensor) parameter or gradient; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


class AdamW(torch.optim.Optimizer):
    """AdamW with ``bits`` = 32 or 8 state, and ``paged`` state kept off the device under ``budget_bytes``.

    ``budget_bytes`` = 0 picks two pages of ``PAGE_ELEMS`` elements' state (double-buffered where a GPU prefetches).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bits: int = 32,
                 paged: bool = False, budget_bytes: int = 0, min_8bit_size: int = MIN_8BIT_SIZE):
        kind = next((k for k in OPTIMIZERS.values() if k.state_bits == bits and k.paged == paged), None)
        if kind is None:
            raise LowbitError(f"bits must be 8 or 32, got {bits}")
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise LowbitError("AdamW: lr, eps > 0; 0 <= betas < 1; weight_decay >= 0")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.bits, self.paged, self.min_8bit_size = bits, paged, min_8bit_size
        self.local_state = True  # state covers this rank's shard of each parameter (plain tensors, never DTensors)
        budget = budget_bytes or kind.default_budget_bytes()
        if paged and budget < 2 * BLOCK * 9:
            raise LowbitError(f"paged optimizer budget of {budget} bytes is too small: two pages of {BLOCK} "
                              f"elements' float32 state need {2 * BLOCK * 9} (optimizer_budget_mb ≥ 0.005)")
        # elements per page for 8-bit and for float32 state (small tensors of an 8-bit optimizer keep float32 state):
        # two pages resident at once, each element's state plus a byte of margin for the block constants
        self.page_elems = {is8: max(BLOCK, (budget // 2 // (width + 1)) // BLOCK * BLOCK)
                           for is8, width in ((True, 2), (False, 8))}
        self.stats = PagerStats(budget_bytes=budget if paged else 0)
        self._codes = (dynamic_map(signed=True), dynamic_map(signed=False))
        self._tables: dict = {}  # device → (signed map, unsigned map, their rounding tables): built once
        self._stream = None

    # ---- state storage --------------------------------------------------------------------------
    def _home(self, p):
        if self.paged and p.device.type == "cuda":
            return torch.device("cpu")
        return p.device

    def _is8(self, p) -> bool:
        return self.bits == 8 and _local(p).numel() >= self.min_8bit_size

    def _init_state(self, p):
        st = self.state[p]
        n, home = _local(p).numel(), self._home(p)
        pin = home.type == "cpu" and p.device.type == "cuda"
        st["step"] = torch.zeros((), dtype=torch.float32, device="cpu")
        if self._is8(p):
            nb = -(-n // BLOCK)
            for k in ("m", "v"):
                st[f"{k}_q"] = torch.zeros(n, dtype=torch.uint8, device=home, pin_memory=pin)
                st[f"{k}_absmax"] = torch.zeros(nb, dtype=torch.float32, device=home, pin_memory=pin)
            # code 0 must mean 0.0 for a fresh state: find the zero of each map
            st["m_q"].fill_(int(torch.argmin(self._codes[0].abs())))
            st["v_q"].fill_(int(torch.argmin(self._codes[1].abs())))
        else:
            for k in ("m", "v"):
                st[k] = torch.zeros(n, dtype=torch.float32, device=home, pin_memory=pin)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.state.values() for k, t in st.items() if k != "step")

    # ---- pages ----------------------------------------------------------------------------------
    def _slices(self, st, lo, hi, is8):
        if is8:
            blocks = slice(lo // BLOCK, -(-hi // BLOCK))
            return {"m_q": st["m_q"][lo:hi], "v_q": st["v_q"][lo:hi], "m_absmax": st["m_absmax"][blocks],
                    "v_absmax": st["v_absmax"][blocks]}
        return {"m": st["m"][lo:hi], "v": st["v"][lo:hi]}

    def _fetch(self, host: dict, device) -> dict:
        if not self.paged:
            return host
        nbytes = sum(t.numel() * t.element_size() for t in host.values())
        self.stats.take(nbytes)
        self.stats.bytes_in += nbytes
        self.stats.pages += 1
        if device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
            with torch.cuda.stream(self._stream):
                dev = {k: t.to(device, non_blocking=True) for k, t in host.items()}
            return {"__event": self._stream.record_event(), **dev}
        return {k: t.clone() for k, t in host.items()}  # CPU: a real copy, so the pager is exercised

    def _store(self, host: dict, dev: dict):
        if not self.paged:
            return
        nbytes = 0
        for k, t in host.items():
            t.copy_(dev[k], non_blocking=False)
            nbytes += t.numel() * t.element_size()
        self.stats.bytes_out += nbytes
        self.stats.resident_bytes -= nbytes

    # ---- the update -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                if not self.state[p]:
                    self._init_state(p)
                st, local = self.state[p], _local(p)
                st["step"] += 1
                t = float(st["step"])
                bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                flat_p, flat_g = local.view(-1), _local(p.grad).reshape(-1)
                is8, n = self._is8(p), local.numel()
                step = self.page_elems[is8] if self.paged else n
                bounds = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
                nxt = self._fetch(self._slices(st, *bounds[0], is8), p.device)
                for i, (lo, hi) in enumerate(bounds):
                    cur = nxt
                    if i + 1 < len(bounds):  # prefetch the next page while this one updates
                        nxt = self._fetch(self._slices(st, *bounds[i + 1], is8), p.device)
                    ev = cur.pop("__event", None)
                    if ev is not None:
                        torch.cuda.current_stream(p.device).wait_event(ev)
                    self._update(flat_p[lo:hi], flat_g[lo:hi].float(), cur, is8, lr, b1, b2, eps, wd, bc1, bc2)
                    self._store(self._slices(st, lo, hi, is8), cur)
        return loss

    def _update(self, p, g, s, is8, lr, b1, b2, eps, wd, bc1, bc2):
        if is8:
            cm, cv, lm, lv = self._device_tables(p.device)
            m = dequantize8(s["m_q"], s["m_absmax"], cm, BLOCK)
            v = dequantize8(s["v_q"], s["v_absmax"], cv, BLOCK)
        else:
            m, v = s["m"], s["v"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        if wd:
            p.mul_(1 - lr * wd)
        denom = (v / bc2).sqrt_().add_(eps)
        p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / bc1)
        if is8:
            for key, x, code, lut in (("m", m, cm, lm), ("v", v, cv, lv)):
                q, am = quantize8(x, code, BLOCK, lut=lut)
                s[f"{key}_q"].copy_(q)
                s[f"{key}_absmax"].copy_(am)

    def _device_tables(self, device) -> tuple:
        """The 8-bit maps and rounding tables on ``device``, copied there once, not per page."""
        if device not in self._tables:
            cm, cv = (c.to(device) for c in self._codes)
            self._tables[device] = (cm, cv, rounding_lut(cm, device), rounding_lut(cv, device))
        return self._tables[device]

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for p, st in self.state.items():  # torch moves state to the parameter's device; paged state lives at home
            for k, t in list(st.items()):
                if torch.is_tensor(t) and k != "step":
                    st[k] = t.to(self._home(p))
                    if k.endswith("_q"):
                        st[k] = st[k].to(torch.uint8)


def make(name: str, params, lr: float, weight_decay: float = 0.0, budget_bytes: int = 0, betas=(0.9, 0.999),
         eps: float = 1e-8, **kw) -> torch.optim.Optimizer:
    """The optimizer called ``name`` in ``registry.OPTIMIZERS``: ``adamw`` is torch's (foreach; the 8-bit and
    paging settings mean nothing for it), the rest lowbit's ``AdamW``. ``params``: tensors, or parameter groups
    (dicts with ``params`` and their own ``lr``)."""
    kind = check_optimizer(name)
    if kind.state_bits == 32 and not kind.paged:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, foreach=True)
    return AdamW(params, lr=lr, weight_decay=weight_decay, bits=kind.state_bits, paged=kind.paged,
                 budget_bytes=budget_bytes, betas=tuple(betas), eps=eps, **kw)
