"""microgpt: train small GPTs fast, then make them smaller still.

model, tokenizer = microgpt.load("outputs/.../checkpoints/last.ckpt")
logits = model(torch.tensor([tokenizer.encode("hello")]))   # (1, T, vocab)
"""

from microgpt import _moved
from microgpt.config import GPTConfig
from microgpt.model import GPT, build_model

_moved.install()  # old names (microgpt.train, microgpt.checkpoint, ...) of modules in training/ and io/

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "build_model", "load", "__version__"]


def load(path, map_location="cpu", base=None, dequantize=False):
    """Rebuild (model, tokenizer) from a checkpoint written by train.py; no Hydra needed.

    A LoRA adapter (directory or adapter.safetensors) is applied to `base`, or to the base it recorded.
    An int8 export comes back with int8 Linear layers (x86 int8 kernels); dequantize=True gives float ones.
    """
    from microgpt.checkpoint import load as _load

    return _load(path, map_location, base, dequantize)
