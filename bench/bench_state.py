"""The training states the rows save, built live in a row process: state A (a transformer LM with
AdamW state and a scheduler) and state B (many small tensors), on the CPU or a CUDA device.

torch is passed in (imported by the row process), never imported here: the driver imports the
bench's modules without paying for torch.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

# State A: a decoder-style transformer LM. At --scale 1: vocab 32000, d_model 768, 8 layers, untied
# output head -> 105.9M parameters; with AdamW's two moments that is 1.27 GB (1.18 GiB) of tensors.
LM_VOCAB, LM_D, LM_LAYERS = 32000, 768, 8
# State B: many small tensors, to expose per-tensor overhead.
SMALL_COUNT, SMALL_ELEMS = 10_000, 1024  # 4 KiB each (fp32), 41 MB in all at --scale 1


def lm_dims(scale: float) -> Dict[str, int]:
    """LM shape for --scale: d_model and vocab both scale with sqrt(scale), layers stay, so every
    term of the parameter count (layers*12*d^2 and 2*vocab*d) scales linearly with `scale`."""
    root = math.sqrt(scale)
    d = max(8.0, LM_D * root)
    heads = max(1, round(d / 64))
    d_model = max(heads, round(d / heads) * heads)
    return {"vocab": max(16, round(LM_VOCAB * root)), "d_model": d_model, "heads": heads, "layers": LM_LAYERS}


def cuda_unavailable_reason(torch: Any) -> str:
    """One line: why --device cuda cannot run here."""
    if not torch.version.cuda:
        why = f"this torch ({torch.__version__}) is built without CUDA"
    else:
        why = f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no usable GPU"
    return f"--device cuda: CUDA is not available: {why}; run on a CUDA machine, or use --device cpu"


def _lm_module(torch: Any, dims: Dict[str, int]) -> Any:
    """State A's model (not yet on its device): embedding, pre-norm encoder layers, norm, untied head."""
    nn = torch.nn

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(dims["vocab"], dims["d_model"])
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(
                    dims["d_model"], dims["heads"], 4 * dims["d_model"], dropout=0.0, batch_first=True, norm_first=True
                )
                for _ in range(dims["layers"])
            )
            self.norm = nn.LayerNorm(dims["d_model"])
            self.head = nn.Linear(dims["d_model"], dims["vocab"], bias=False)

        def forward(self, tokens: Any) -> Any:
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

    return LM()


def _tensor_bag(torch: Any, tensors: Dict[str, Any]) -> Any:
    """State B's stateful: many small tensors behind state_dict()/load_state_dict() (loads copy in place)."""

    class TensorBag:
        """A stateful holding many small tensors; loads copy in place."""

        def __init__(self, tensors: Dict[str, Any]) -> None:
            self.tensors = tensors

        def state_dict(self) -> Dict[str, Any]:
            return dict(self.tensors)

        def load_state_dict(self, state: Dict[str, Any]) -> None:
            with torch.no_grad():
                for name, tensor in self.tensors.items():
                    tensor.copy_(state[name])

    return TensorBag(tensors)


class RowContext:
    """One state (A or B) live in this process, with what the savers need from it.

    `device` is where the state lives ("cpu" or "cuda"): the model and the optimizer step that
    creates AdamW's state run there, and state B's tensors are made there."""

    def __init__(self, torch: Any, state: str, scale: float, device: str = "cpu") -> None:
        self.torch = torch
        self.state = state
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        torch.manual_seed(0)
        if state == "A":
            self._build_lm(scale)
        else:
            self._build_small(scale)
        self.sync()
        self.tensors = self._all_tensors()
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)

    def sync(self) -> None:
        """Wait for all work queued on the device (every stream): call before a timer stops. No-op on CPU."""
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def sync_stream(self) -> None:
        """Wait for the current stream only, as a training step that reads its loss (loss.item()) would;
        copies a background saver runs on its own stream are not waited for. No-op on CPU."""
        if self.cuda:
            self.torch.cuda.current_stream(self.device).synchronize()

    def host_empty(self, like: Any) -> Any:
        """An uninitialized host tensor shaped like `like`; page-locked (pinned) when the state is on
        the GPU, so device-to-host copies into it run at full speed and may be asynchronous."""
        if self.cuda:
            return self.torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=True)
        return self.torch.empty_like(like)

    def _build_lm(self, scale: float) -> None:
        torch = self.torch
        dims = lm_dims(scale)
        model = _lm_module(torch, dims).to(self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=1000)
        # One real optimizer step, so AdamW's state (two moments per parameter) exists.
        tokens = torch.randint(dims["vocab"], (2, 16), device=self.device)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, dims["vocab"]), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        del logits, loss
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.statefuls: Dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        self.params = sum(p.numel() for p in model.parameters())
        self.dims = dims
        self.probe = model.embed.weight  # load_state_dict copies into it in place: checks loads really load

    def _build_small(self, scale: float) -> None:
        torch = self.torch
        count = max(10, round(SMALL_COUNT * min(1.0, scale * 10)))  # --scale 0.1 and up: all 10,000
        bag = _tensor_bag(torch, {f"t{i:05d}": torch.randn(SMALL_ELEMS, device=self.device) for i in range(count)})
        self.statefuls = {"tensors": bag}
        self.params = count * SMALL_ELEMS
        self.dims = {"tensors": count, "elements_each": SMALL_ELEMS}
        self.probe = bag.tensors["t00000"]

    def state_dict(self) -> Dict[str, Any]:
        """The plain nested state dict (tensors are the live ones, not copies)."""
        return {key: s.state_dict() for key, s in self.statefuls.items()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Load a nested state dict (as state_dict() returns) into the live statefuls."""
        for key, s in self.statefuls.items():
            s.load_state_dict(state[key])

    def _all_tensors(self) -> List[Any]:
        found: List[Any] = []
        seen = set()

        def walk(value: Any) -> None:
            if isinstance(value, self.torch.Tensor):
                key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
                if key not in seen:
                    seen.add(key)
                    found.append(value)
            elif isinstance(value, dict):
                for v in value.values():
                    walk(v)
            elif isinstance(value, (list, tuple)):
                for v in value:
                    walk(v)

        walk(self.state_dict())
        return found
