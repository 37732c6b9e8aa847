"""Do the captured block calls (what the sequential pipeline and the refinement run each block through)
reproduce the model's own forward? Chains the calls from block 0's captured input on one 512-token
calibration window and prints each block output's relative difference from ``output_hidden_states``.

    python experiments/block_calls_check.py gemma3-270m
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import DATA
from qera import load_model, find_targets
from qera.io.data import calibration_batches, load_text
from qera.calibrate.forward import runner_for
from qera.calibrate.capture import capture_calls
from qera.nn.targets import find_blocks
name = sys.argv[1]
model, tok = load_model(name); model.eval()
valid = load_text(str(DATA / "wikitext-2" / "wiki.valid.tokens"), "calibration")
b = calibration_batches(tok, valid, n_samples=1, seq_len=512, seed=0, batch_size=1)[0]
targets = find_targets(model)
bname, blocks = find_blocks(model, list(targets))
runner = runner_for(model, list(targets))
first, calls = capture_calls(runner, blocks, b, torch.device("cpu"))
with torch.no_grad():
    hs = model(**b, output_hidden_states=True, use_cache=False).hidden_states
    h = first
    print("input rel diff", float((h - hs[0]).norm() / hs[0].norm()))
    for i, blk in enumerate(blocks):
        h = calls[i](blk, h)
        if i < len(blocks) - 1:
            print(i, float((h - hs[i + 1]).norm() / hs[i + 1].norm()))
