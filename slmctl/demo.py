"""`make demo`: the model library end to end on CPU, with no network.

Shows every preset's size, then builds a small encoder-decoder and its decoder-only
baseline, saves and reloads them, and generates with greedy, beam and sampled
decoding while streaming tokens. (The full pretrain -> eval pipeline joins this
demo as the stages land.)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from slmctl.model import PRESETS, build_model, count_parameters, load_model, save_model


def main() -> None:
    console = Console()
    torch.manual_seed(0)
    table = Table(title="slmctl model presets")
    for column in ("preset", "arch", "layers (enc/dec)", "d_model", "heads (q/kv)", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for name, cfg in PRESETS.items():
        table.add_row(name, cfg.arch, f"{cfg.n_encoder_layers}/{cfg.n_decoder_layers}", str(cfg.d_model),
                      f"{cfg.n_heads}/{cfg.n_kv_heads}", f"{count_parameters(cfg) / 1e6:.2f}M")
    console.print(table)

    prompt = torch.randint(3, 8192, (2, 48))
    mask = torch.ones_like(prompt)
    mask[1, 40:] = 0  # the second prompt is shorter: a padded batch
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("small", "deconly-small"):
            model = build_model(preset, seed=0)
            directory = save_model(model, Path(tmp) / preset)
            model = load_model(directory).eval()
            console.rule(f"{preset}: {model.num_parameters() / 1e6:.1f}M parameters, saved to and loaded from {directory.name}/")
            for label, kwargs in (("greedy", {}), ("beam x4", {"num_beams": 4}),
                                  ("sampled (T=0.8, top-p 0.9)", {"do_sample": True, "temperature": 0.8, "top_p": 0.9})):
                start = time.perf_counter()
                out = model.generate(prompt, attention_mask=mask, max_new_tokens=16, **kwargs)
                seconds = time.perf_counter() - start
                console.print(f"  {label:<28} {out.shape[1]} tokens/row in {seconds * 1000:6.0f} ms  row 0: {out[0, :8].tolist()}")
            streamed = []
            model.generate(prompt[:1], max_new_tokens=8, streamer=lambda t: streamed.append(int(t[0])))
            console.print(f"  streamed one token at a time: {streamed}")
    console.print("[green]demo finished[/green]")


if __name__ == "__main__":
    main()
