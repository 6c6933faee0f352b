"""Peak host memory of converting and loading a checkpoint, against the size of its weights.

    python benchmarks/bench_convert_memory.py [--hidden 1024 --layers 16 --vocab 65536 --dtype bfloat16]

Writes a random Hugging Face Chameleon checkpoint (transformers `save_pretrained`, safetensors),
then, each in a fresh subprocess so the numbers do not mix: transformers `from_pretrained` (the
reference), `tokenloom convert --from chameleon-hf`, and `tokenloom.load` of the result. Reports
each one's peak resident memory (ru_maxrss) above an interpreter with the same modules imported, as
a multiple of the weights' bytes. Streaming (memory-mapped tensors into a meta-device model) should
keep tokenloom near 1x. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import write_result

ROOT = Path(__file__).resolve().parents[1]

# Loaded weights may stay memory-mapped and only become resident when read: TOUCH reads every one,
# as a forward pass would, so the peak counts them.
PRELUDE = ("import resource, sys, torch; sys.path.insert(0, %r)\n" % str(ROOT / "src")
           + "def TOUCH(m):\n    [float(p.sum()) for p in m.parameters()]\n")
REPORT = "\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"

BUILD = PRELUDE + """
from transformers import ChameleonConfig, ChameleonForConditionalGeneration
from tokenloom.text_tokenizer import TextTokenizer
from tokenloom.vocab import chameleon_image_token
out, hidden, layers, vocab, codes, dtype = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
tok = TextTokenizer.train(["a red square", "two cats and a dog"] * 8, 300, ["<s>", "<pad>", "</s>", "<unk>"])
tok.add_special_tokens([chameleon_image_token(c) for c in range(codes)]
                       + ["<racm3:break>", "<eoss>", "<reserved08706>", "<image>"])
cfg = ChameleonConfig(vocab_size=max(vocab, tok.vocab_size), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      vocabulary_map=tok.get_vocab(), bos_token_id=0, pad_token_id=1, eos_token_id=2,
                      vq_config=dict(embed_dim=8, num_embeddings=codes, latent_channels=8, resolution=32,
                                     base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                                     attn_resolutions=[]))
with torch.device("meta"):
    model = ChameleonForConditionalGeneration(cfg)
model = model.to_empty(device="cpu").to(getattr(torch, dtype))
for p in model.parameters():
    p.data.normal_(0, 0.02)
model.save_pretrained(out)
tok.save_pretrained(out)
print(sum(p.numel() * p.element_size() for p in model.parameters()))
"""

# The same imports as the measured steps, no work: what is left above it is the work's own memory.
BASELINE = PRELUDE + "import transformers, tokenloom, tokenloom.convert, tokenloom.pipeline\n" \
    "from transformers import ChameleonForConditionalGeneration\n" + REPORT
REFERENCE = PRELUDE + """
from transformers import ChameleonForConditionalGeneration
m = ChameleonForConditionalGeneration.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
TOUCH(m)
""" + REPORT
CONVERT = PRELUDE + """
import warnings
warnings.simplefilter("ignore")
from tokenloom.convert import convert
convert("chameleon-hf", sys.argv[1], sys.argv[3], dtype=sys.argv[2])
""" + REPORT
LOAD = PRELUDE + """
import tokenloom
pipe = tokenloom.load(sys.argv[3])
TOUCH(pipe.model)
""" + REPORT


def run(script: str, *args) -> int:
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=65536, help="embedding rows (Chameleon: 65536)")
    p.add_argument("--codes", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert_memory.json"))
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "hf", Path(tmp) / "converted"
        weights = run(BUILD, src, a.hidden, a.layers, a.vocab, a.codes, a.dtype)
        base = run(BASELINE)
        peaks = {name: run(script, src, a.dtype, dst) - base
                 for name, script in (("transformers from_pretrained (reference)", REFERENCE),
                                      ("tokenloom convert --from chameleon-hf", CONVERT),
                                      ("tokenloom.load of the converted model", LOAD))}
    rows = [{"step": k, "peak_above_baseline_bytes": v, "multiple_of_weights": round(v / weights, 2)}
            for k, v in peaks.items()]
    print(f"weights: {weights / 2**20:.0f} MiB ({a.dtype}); baseline (interpreter + imports) {base / 2**20:.0f} MiB")
    for r in rows:
        print(f"  {r['step']:45s} {r['peak_above_baseline_bytes'] / 2**20:8.0f} MiB  {r['multiple_of_weights']:5.2f}x")
    result = {"benchmark": "peak host memory of conversion and loading", "hidden": a.hidden, "layers": a.layers,
              "vocab": a.vocab, "dtype": a.dtype, "weights_bytes": weights, "baseline_bytes": base, "rows": rows}
    write_result(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
